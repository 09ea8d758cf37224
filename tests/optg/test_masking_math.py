"""Exact mask math on hand-set tensors: STE gradients, score updates, thresholds, N:M axes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optg
from optg import LayerPlan, Pattern, masking
from optg.nm import from_groups, to_groups
from optg.patterns import global_masks, keep_threshold, nm_masks


def test_ste_gradients_are_g_times_w_for_scores_and_g_times_m_for_weights():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]], requires_grad=True)
    s = torch.zeros(2, 2, requires_grad=True)
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    out = masking.optg_masked(w, s, m)
    assert torch.equal(out, w.detach() * m)
    out.backward(g)
    assert torch.equal(s.grad, g * w.detach())  # pruned positions included
    assert torch.equal(w.grad, g * m)          # pruned weights get no loss gradient


def _single_linear_optg(weight, epochs=4):
    model = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    sp = optg.create("optg", model, target=0.5, epochs=epochs).attach()
    return model, sp


def test_one_sgd_step_moves_scores_by_minus_lr_w_g():
    w = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    model, sp = _single_linear_optg(w)
    sp.start_epoch(3)  # last epoch: schedule at the target, score lr == weight lr
    assert sp.fraction == 1.0
    x = torch.tensor([[1.0, 2.0, -1.0, 4.0]])
    out = model(x)
    out.sum().backward()
    g = x  # dL/d(w*m) for L = sum(x @ (w*m).T), one output row
    lr = 0.1
    sp.step(lr=lr)
    assert torch.allclose(sp.layers[0].scores.detach(), -lr * w * g)


def test_score_lr_follows_schedule_fraction():
    model, sp = _single_linear_optg(torch.randn(2, 4), epochs=10)
    sp.start_epoch(0)
    model(torch.randn(3, 4)).sum().backward()
    sp.step(lr=1.0)
    expected = sp.schedule.fraction(0.0)
    assert sp.score_optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert 0 < expected < 0.01


def test_global_threshold_hits_target_count_exactly():
    torch.manual_seed(0)
    scores = [torch.randn(10, 7), torch.randn(3, 5, 2), torch.randn(13)]
    plans = [LayerPlan(f"l{i}", Pattern.unstructured(0.37)) for i in range(3)]
    masks = global_masks(plans, scores, fraction=1.0)
    total = sum(s.numel() for s in scores)
    kept = sum(int(m.sum()) for m in masks)
    assert total - kept == round(0.37 * total)
    # the kept ones are exactly the globally largest
    flat = torch.cat([s.reshape(-1) for s in scores])
    kept_flat = torch.cat([m.reshape(-1) for m in masks])
    assert flat[kept_flat].min() > flat[~kept_flat].max()


def test_ties_at_threshold_are_kept():
    flat = torch.tensor([0.0, 0.0, 0.0, 1.0])
    threshold = keep_threshold(flat, 2)
    assert int((flat >= threshold).sum()) == 4  # all three zeros tie at the threshold
    # OptG starts with all-zero scores: nothing is pruned until scores differ
    model, sp = _single_linear_optg(torch.randn(4, 8))
    sp.start_epoch(3)
    assert bool(sp.layers[0].mask.all())


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(8, 6),
    lambda: nn.Conv1d(8, 6, 3),
    lambda: nn.Conv2d(8, 6, (3, 2)),
    lambda: nn.Conv3d(8, 4, 2),
])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_nm_masks_are_exact_along_input_channels(make, n, m):
    torch.manual_seed(1)
    layer = make()
    if layer.weight.shape[1] % m:
        pytest.skip("C not divisible by M")
    mask = nm_masks([LayerPlan("x", Pattern.nm(n, m))], [torch.randn_like(layer.weight)], 1.0)[0]
    # groups of M consecutive input channels at each (out channel, kernel position)
    along_c = mask.movedim(1, -1).reshape(-1, m)
    assert torch.all(along_c.sum(1) == n)


def test_nm_check_catches_grouping_in_memory_order():
    # Scores that make memory-order grouping (along the kernel width) differ from channels.
    w = torch.zeros(1, 4, 1, 4)
    w[0, :, 0, :] = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 4)  # each channel row identical
    w[0, 0, 0, :] += 10  # channel 0 and 1 are the strongest at every kernel position
    w[0, 1, 0, :] += 10
    mask = nm_masks([LayerPlan("x", Pattern.nm(2, 4))], [w], 1.0)[0]
    along_c = mask.movedim(1, -1).reshape(-1, 4)
    in_memory_order = mask.reshape(-1, 4)
    assert torch.all(along_c.sum(1) == 2)
    assert not torch.all(in_memory_order.sum(1) == 2)  # channels 2-3 entirely pruned
    assert bool(mask[0, :2].all()) and not bool(mask[0, 2:].any())


def test_to_groups_round_trip_and_layout():
    w = torch.arange(2 * 8 * 3, dtype=torch.float).reshape(2, 8, 3)
    groups = to_groups(w, 4)
    assert torch.equal(groups[0], w[0, 0:4, 0])
    assert torch.equal(from_groups(groups, w), w)


def test_nm_ramp_prunes_weakest_candidates_globally():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]])
    plan = LayerPlan("x", Pattern.nm(2, 4))
    half = nm_masks([plan], [scores], 0.5)[0]
    # candidates: {1, 2} and {10, 20}; half of 4 candidates = the two lowest, 1 and 2
    assert half.tolist() == [[False, False, True, True, True, True, True, True]]
    full = nm_masks([plan], [scores], 1.0)[0]
    assert full.tolist() == [[False, False, True, True, False, False, True, True]]
    none = nm_masks([plan], [scores], 0.0)[0]
    assert bool(none.all())


def test_srste_gradient_passes_through_with_decay_on_pruned():
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0]], requires_grad=True)
    g = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    out = masking.srste_masked(w, 2, 4, 0.01)
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert torch.equal(out, w.detach() * mask)
    out.backward(g)
    assert torch.allclose(w.grad, g + 0.01 * (1 - mask) * w.detach())


def test_layerwise_allocation_gives_each_layer_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    sp = optg.create("gmp", model, target=0.8, epochs=2, allocation="layerwise").attach()
    sp.start_epoch(2)
    for row in sp.report():
        assert row.sparsity == pytest.approx(0.8, abs=1e-3)


def test_cross_entropy_training_reduces_loss_with_masks():
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    sp = optg.create("optg", model, target=0.5, epochs=3).attach()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for epoch in range(3):
        sp.start_epoch(epoch)
        for _ in range(20):
            loss = F.cross_entropy(model(x), y)
            first = first if first is not None else loss.item()
            opt.zero_grad(); loss.backward(); opt.step(); sp.step(lr=0.1)
    assert loss.item() < first


@pytest.mark.parametrize(("normalization", "kept"), [
    ("none", ([1, 1, 1, 1], [0, 0, 0, 0])),   # one global threshold on raw scores: the large layer wins
    ("layer", ([0, 0, 1, 1], [0, 0, 1, 1])),  # scores / mean |score| per layer: each keeps its top half
])
def test_score_normalization_ranks_each_layer_by_its_own_scale(normalization, kept):
    """A library keyword argument (measured, not adopted: RESULTS section 5), exact on hand-set scores."""
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(1, 4, bias=False))
    sp = optg.create("optg", model, target=0.5, epochs=4, score_normalization=normalization).attach()
    with torch.no_grad():
        sp.layers[0].scores.copy_(torch.tensor([[10.0, 20.0, 30.0, 40.0]]))
        sp.layers[1].scores.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    sp.start_epoch(3)  # the last epoch: the schedule is at the target
    masks = sp.masks()
    assert (masks["0"].int().flatten().tolist(), masks["1"].int().flatten().tolist()) == kept
