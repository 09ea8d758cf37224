"""The radix select behind global thresholds returns exactly what `kthvalue` returns, so
masks (ties at the threshold kept) are unchanged by the faster algorithm."""
import pytest
import torch
from torch import nn

import optg
from optg.pattern import Pattern
from optg.patterns import global_masks, keep_threshold, kth_smallest, layerwise_masks, nm_masks
from optg.targets import LayerPlan

SPECIAL = torch.tensor([0.5, -0.0, 0.0, float("inf"), -float("inf"), 1e-40, -1e-40, -1e30, 3.0, -3.0,
                        1.0, 1.0000001, -0.5, -1.0000001])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 513])
def test_kth_smallest_equals_kthvalue_with_ties_signs_and_specials(n):
    gen = torch.Generator().manual_seed(n)
    many_ties = SPECIAL[torch.randint(0, len(SPECIAL), (n,), generator=gen)]
    spread = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n)
    for values in (many_ties, spread, -spread, torch.zeros(n)):
        for k in range(1, n + 1, max(1, n // 40)):
            assert kth_smallest(values, k) == values.kthvalue(k).values.item(), (values, k)


def test_kth_smallest_of_other_dtypes_and_shapes_matches_float32_kthvalue():
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    assert kth_smallest(x, 37) == x.reshape(-1).float().kthvalue(37).values.item()
    h = torch.randn(300).to(torch.bfloat16)
    assert kth_smallest(h, 150) == h.float().kthvalue(150).values.item()


def _kthvalue_threshold(flat: torch.Tensor, n_keep: int) -> float:
    """The pre-radix implementation, as the reference."""
    total = flat.numel()
    if n_keep >= total:
        return -float("inf")
    if n_keep <= 0:
        return float("inf")
    return flat.float().kthvalue(total - n_keep + 1).values.item()


@pytest.mark.parametrize("n_keep", [0, 1, 3, 4, 5, 9, 10])
def test_keep_threshold_keeps_ties_like_before(n_keep):
    flat = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0, -0.0, -1.0, -1.0, 3.0, 1.0])
    t = keep_threshold(flat, n_keep)
    assert t == _kthvalue_threshold(flat, n_keep)
    assert int((flat >= t).sum()) >= n_keep  # ties at the threshold are kept, never dropped


def test_mask_rules_match_the_kthvalue_reference_on_tied_scores():
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randint(-4, 5, (16, 8), generator=gen).float() / 4 for _ in range(3)]
    plans = [LayerPlan(f"l{i}", Pattern.unstructured(0.6)) for i in range(3)]
    flat = torch.cat([s.reshape(-1) for s in scores])
    for fraction in (0.3, 0.77, 1.0):
        keep = flat.numel() - min(flat.numel(), int(0.6 * fraction * flat.numel() + 0.5))
        reference = _kthvalue_threshold(flat, keep)
        for s, m in zip(scores, global_masks(plans, scores, fraction)):
            assert torch.equal(m, s >= reference)
        for plan, s, m in zip(plans, scores, layerwise_masks(plans, scores, fraction)):
            k = s.numel() - min(s.numel(), int(0.6 * fraction * s.numel() + 0.5))
            assert torch.equal(m, s >= _kthvalue_threshold(s.reshape(-1), k))
    nm_plans = [LayerPlan(f"l{i}", Pattern.nm(2, 4)) for i in range(3)]
    masks = nm_masks(nm_plans, scores, 0.5)
    assert all(m.shape == s.shape for m, s in zip(masks, scores))


def test_sparsifier_global_masks_unchanged_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    sp = optg.create("oneshot", model, target=0.8, epochs=1).attach()  # magnitude, fixed at attach
    weights = [model[0].weight.detach().abs(), model[2].weight.detach().abs()]
    flat = torch.cat([w.reshape(-1) for w in weights])
    threshold = _kthvalue_threshold(flat, flat.numel() - int(0.8 * flat.numel() + 0.5))
    for w, m in zip(weights, sp.masks().values()):
        assert torch.equal(m, w >= threshold)
