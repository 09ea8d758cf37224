"""Lifecycle: attach keeps the model a normal module, bake leaves plain weights, calls out
of order fail, state saves and restores to the same result, registries name valid choices."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optg
from optg import LifecycleError


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train(model, sp, epochs, start=0, stop=None, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for epoch in range(start, stop if stop is not None else epochs):
        sp.start_epoch(epoch)
        for x, y in batches(seed=epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); sp.step(lr=opt.param_groups[0]["lr"])
    return opt


@pytest.mark.parametrize("method,kw", [
    ("optg", dict(target=0.8)), ("optg", dict(pattern="2:4")), ("gmp", dict(target=0.8)),
    ("random", dict(target=0.8)), ("oneshot", dict(pattern="1:4")), ("srste", dict(pattern="2:8")),
])
def test_attach_keeps_state_dict_and_bake_equals_masked_forward(method, kw):
    model = small_cnn()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    sp = optg.create(method, model, epochs=3, **kw).attach()
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    # while attached (not after bake, which would remove a parametrization anyway)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    train(model, sp, 3)
    model.eval()
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        masked = model(x)
    masks = sp.masks()
    sp.bake()
    with torch.no_grad():
        baked = model(x)
    assert torch.equal(masked, baked)
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
        if name in masks:
            assert torch.all(module.weight[~masks[name]] == 0)
    assert list(model.state_dict()) == keys


def test_report_names_dense_layers_and_reasons():
    model = small_cnn()
    sp = optg.create("optg", model, pattern="2:4", epochs=2).attach()
    rows = {r.name: r for r in sp.report()}
    assert rows["0"].pattern == optg.Pattern.dense() and "C=3" in rows["0"].reason
    assert rows["3"].pattern == optg.Pattern.dense() and "grouped conv" in rows["3"].reason
    assert rows["5"].pattern == optg.Pattern.nm(2, 4) and rows["5"].targeted
    assert rows["5"].to_dict()["pattern"] == "2:4" and rows["0"].to_dict()["pattern"] == "dense"
    train(model, sp, 2)
    rows = {r.name: r for r in sp.report()}
    assert rows["5"].sparsity == 0.5 and rows["9"].sparsity == 0.5


def test_include_exclude_and_overrides():
    model = small_cnn()
    sp = optg.create("gmp", model, target=0.5, epochs=1, exclude=[r"^9$"],
                     overrides={r"^5$": "2:4", r"^0$": 0.25})
    kinds = {p.name: (p.kind, p.reason) for p in sp.plans}
    assert kinds["9"] == ("dense", "excluded by '^9$'")
    assert kinds["5"][0] == "nm"
    assert kinds["0"][0] == "layerwise"
    sp.attach()
    sp.start_epoch(1)
    rows = {r.name: r for r in sp.report()}
    assert rows["0"].sparsity == pytest.approx(0.25, abs=0.01)
    assert rows["5"].sparsity == 0.5


def test_out_of_order_calls_raise_clear_errors():
    model = small_cnn()
    sp = optg.create("optg", model, target=0.5, epochs=2)
    with pytest.raises(LifecycleError, match="attach"):
        sp.step(lr=0.1)
    with pytest.raises(LifecycleError, match="attach"):
        sp.bake()
    sp.attach()
    with pytest.raises(LifecycleError, match="already"):
        sp.attach()
    with pytest.raises(LifecycleError, match="start_epoch"):
        sp.step(lr=0.1)
    sp.start_epoch(0)
    with pytest.raises(ValueError, match="lr"):
        sp.step()
    sp.bake()
    with pytest.raises(LifecycleError, match="baked"):
        sp.bake()
    with pytest.raises(LifecycleError, match="baked"):
        sp.start_epoch(1)


def test_snip_requires_calibration_then_holds_mask():
    model = small_cnn()
    sp = optg.create("snip", model, target=0.7, epochs=2).attach()
    with pytest.raises(LifecycleError, match="calibrate"):
        sp.start_epoch(0)
    assert sp.calibrate(batches(2), optg.supervised(F.cross_entropy)) == 2
    before = {k: v.clone() for k, v in sp.masks().items()}
    train(model, sp, 2)
    after = sp.masks()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sp.sparsity() == pytest.approx(0.7, abs=1e-3)


def test_random_masks_are_seeded():
    a = optg.create("random", small_cnn(), target=0.6, seed=3).attach().masks()
    b = optg.create("random", small_cnn(), target=0.6, seed=3).attach().masks()
    c = optg.create("random", small_cnn(), target=0.6, seed=4).attach().masks()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("method,kw", [("optg", dict(target=0.8)), ("optg", dict(pattern="2:4")),
                                       ("gmp", dict(target=0.8))])
def test_save_restore_mid_training_equals_uninterrupted(method, kw):
    epochs = 4
    ref = small_cnn()
    ref_sp = optg.create(method, ref, epochs=epochs, **kw).attach()
    train(ref, ref_sp, epochs)
    ref_sp.bake()

    part = small_cnn()
    sp = optg.create(method, part, epochs=epochs, **kw).attach()
    opt = train(part, sp, epochs, stop=2)
    saved = copy.deepcopy({"model": part.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})

    resumed = small_cnn()
    sp2 = optg.create(method, resumed, epochs=epochs, **kw).attach()
    resumed.load_state_dict(saved["model"])
    sp2.load_state_dict(saved["sp"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt2.load_state_dict(saved["opt"])
    train(resumed, sp2, epochs, start=2, opt=opt2)
    sp2.bake()
    for (name, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_state_rejects_other_model():
    sp = optg.create("optg", small_cnn(), target=0.5, epochs=2).attach()
    other = optg.create("optg", nn.Sequential(nn.Linear(4, 4)), target=0.5, epochs=2).attach()
    with pytest.raises(ValueError, match="does not match"):
        sp.load_state_dict(other.state_dict())


def test_deepcopy_of_attached_model_still_masks():
    model = small_cnn()
    sp = optg.create("gmp", model, target=0.9, epochs=1).attach()
    sp.start_epoch(1)
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    model.eval(); clone.eval()
    assert torch.equal(model(x), clone(x))


def test_unknown_names_list_valid_ones_and_errors_are_collected():
    with pytest.raises(ValueError) as err:
        optg.create("optq", small_cnn(), pattern="5:4", schedule="linear", epochs=0)
    text = str(err.value)
    assert "method: unknown method 'optq'" in text and "gmp, oneshot, optg, random, snip, sparsegpt, srste, wanda" in text
    assert "1 <= N < M" in text
    assert "unknown schedule 'linear'; valid: constant, cubic, sigmoid" in text
    with pytest.raises(ValueError, match="N:M patterns only"):
        optg.create("srste", small_cnn(), target=0.5)
    with pytest.raises(ValueError, match=re.escape("target: Input should be less than 1")):
        optg.create("gmp", small_cnn(), target=1.0, epochs=2)


def test_schedules_end_exactly_at_target():
    for epochs in (10, 30, 60, 120):
        s = optg.SigmoidSchedule(epochs)
        assert s.fraction(epochs - 1) == 1.0
        assert s.fraction(epochs - s.final_epochs) == 1.0
        assert s.fraction(0) < 0.01
        values = [s.fraction(e) for e in range(epochs)]
        assert values == sorted(values)
    paper = optg.SigmoidSchedule(100, beta=1.0, center=50.0)
    assert paper.fraction(40) < 0.001 and paper.fraction(60) > 0.999
    cubic = optg.CubicSchedule(10, start=1, end=5)
    assert cubic.fraction(0) == 0 and cubic.fraction(5) == 1 and cubic.fraction(3) == pytest.approx(1 - 0.5**3)


