"""Wanda and SparseGPT: Wanda's metric and mask exactly on hand-set tensors, SparseGPT's
reconstruction beating magnitude at the same pattern, groups on the reduction axis (Linear,
Conv2d, GPT-2 Conv1D), sequential processing, and one-shot accuracy on a trained model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optg
from optg.nm import to_groups


def _calibrate(model, batches, method, **kw):
    sp = optg.create(method, model, epochs=1, **kw).attach()
    sp.calibrate([(x, None) for x in batches], lambda m, b: m(b[0]).sum())
    sp.start_epoch(0)
    return sp


def test_wanda_scores_and_mask_by_hand():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]]))
    x = torch.tensor([[3.0, 0.0, 0.0, 4.0], [4.0, 1.0, 0.0, 3.0]])  # column norms 5, 1, 0, 5
    sp = _calibrate(nn.Sequential(layer), [x], "wanda", pattern="2:4", include=["0"])
    expected = layer.weight.abs() * torch.tensor([5.0, 1.0, 0.0, 5.0])
    assert torch.allclose(sp.criterion.scores("0", layer.weight), expected)
    # row 0: scores 5, 2, 0, 2.5 -> keep columns 0 and 3 (a magnitude mask would keep 1 and 2)
    assert sp.masks()["0"].tolist() == [[True, False, False, True], [True, False, False, True]]


def _correlated(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g)
    return torch.randn(n, d, generator=g) @ basis * torch.linspace(0.2, 3.0, d)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = _correlated(512, 64)
    dense = layer(x).detach()
    errors = {}
    for method in ("oneshot", "wanda", "sparsegpt"):
        model = copy.deepcopy(nn.Sequential(layer))
        kw = {"pattern": "2:4"} if pattern == "2:4" else {"target": 0.5, "allocation": "layerwise"}
        sp = _calibrate(model, [x[:256], x[256:]], method, **kw) if method != "oneshot" else \
            optg.create(method, model, epochs=1, **kw).attach()
        sp.bake()
        w = model[0].weight
        assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)
        if pattern == "2:4":
            assert ((to_groups(w, 4) != 0).sum(1) <= 2).all()
        errors[method] = float((model(x) - dense).detach().square().mean())
    assert errors["sparsegpt"] < errors["wanda"] < errors["oneshot"], errors
    assert errors["sparsegpt"] < 0.7 * errors["oneshot"], errors


def test_sparsegpt_on_a_conv_groups_input_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(16, 8, 6, 6)
    dense = conv(x).detach()
    model = nn.Sequential(copy.deepcopy(conv))
    _calibrate(model, [x], "sparsegpt", pattern="2:4").bake()
    w = model[0].weight
    assert ((to_groups(w, 4) != 0).sum(1) == 2).all()  # along C at each (k, kh, kw)
    magnitude = nn.Sequential(copy.deepcopy(conv))
    optg.create("oneshot", magnitude, pattern="2:4", epochs=1).attach().bake()
    assert (model(x) - dense).square().mean() < (magnitude(x) - dense).square().mean()


def test_sparsegpt_is_sequential_later_layers_see_pruned_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = _correlated(256, 16)
    sp = _calibrate(copy.deepcopy(model), [x], "sparsegpt", pattern="2:4")
    # recompute layer 2 alone from the pruned layer 1's outputs: the same result
    first = copy.deepcopy(model)
    sp_first = _calibrate(first, [x], "sparsegpt", pattern="2:4", include=["^0$"])
    sp_first.bake()
    second = nn.Sequential(copy.deepcopy(model[2]))
    hidden = first[1](first[0](x)).detach()
    _calibrate(second, [hidden], "sparsegpt", pattern="2:4").bake()
    sp.bake()
    assert torch.allclose(sp.model[2].weight, second[0].weight, atol=1e-5)


def test_wanda_on_gpt2_conv1d_groups_along_axis_0():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (4, 12))
    for method in ("wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        sp = optg.create(method, m, pattern="2:4", epochs=1).attach()
        sp.calibrate([ids], lambda mod, b: mod(input_ids=b).logits.sum())
        sp.start_epoch(0)
        sp.bake()
        w = m.transformer.h[0].mlp.c_fc.weight  # [in, out]
        assert ((to_groups(w, 4, 0) != 0).sum(1) <= 2).all(), method


def test_attention_projections_are_refused_with_their_names():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.raises(ValueError, match=r"0\.in_proj_weight.*sparsity\.types"):
        optg.create("wanda", model, pattern="2:4", epochs=1)
    plans = optg.create("wanda", nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2)), pattern="2:4",
                        epochs=1, types=["Linear"]).plans
    assert {p.name for p in plans if p.kind == "nm"} == {"0"}


def test_one_shot_on_a_trained_model_keeps_more_accuracy_than_magnitude():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, test = slice(0, 1400), slice(1400, None)
    for _ in range(60):
        for i in range(0, 1400, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[train][i:i + 100]), y[train][i:i + 100]).backward()
            opt.step()

    def accuracy(m):
        with torch.no_grad():
            return float((m(x[test]).argmax(1) == y[test]).float().mean())

    for pattern in ("2:4", "1:4"):
        acc = {}
        for method in ("oneshot", "sparsegpt"):
            m = copy.deepcopy(model)
            sp = optg.create(method, m, pattern=pattern, epochs=1, exclude=["^4$"]).attach()
            if sp.criterion.needs_calibration:
                sp.calibrate([x[train][i:i + 100] for i in range(0, 1400, 100)], lambda mod, b: mod(b).sum())
            sp.start_epoch(0)
            sp.bake()
            acc[method] = accuracy(m)
        # seeds 0-2 of this setup: SparseGPT 0.909/0.912/0.907 vs magnitude 0.902/0.867/0.894 at 2:4,
        # 0.844/0.856/0.877 vs 0.708/0.791/0.821 at 1:4 (Wanda is not consistently above magnitude here)
        assert acc["sparsegpt"] > acc["oneshot"], (pattern, acc)
