"""`optg.SparsitySpec` and the plug-in registries: one place for every check, a schedule's own
settings, methods as single registry entries, configured instances, the score settings, and a
state dict that `torch.load(weights_only=True)` reads."""
import io
import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass
from torch import nn

import optg
from optg import Method, Pattern, SparsitySpec


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train(model, sp, epochs, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for epoch in range(epochs):
        sp.start_epoch(epoch)
        for x, y in data(seed=epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); sp.step(lr=lr)


def locs(exc: ValidationError) -> dict[str, str]:
    return {".".join(map(str, e["loc"])): e["msg"] for e in exc.errors()}


# ---------------------------------------------------------------------- one place for errors
def test_field_errors_are_collected_in_one_error_with_their_locations():
    with pytest.raises(ValidationError) as err:
        SparsitySpec(method="optq", pattern="4:2", schedule="linear", types=["Linear", "LSTM"],
                     exclude=["("], overrides={"^fc$": "3:2"}, epochs=0, criterion="nope", forward=3)
    found = locs(err.value)
    assert set(found) == {"method", "pattern", "schedule.name", "types", "exclude", "overrides", "epochs",
                          "criterion", "forward"}
    assert "unknown method 'optq'; valid: gmp, oneshot, optg, random, snip, sparsegpt, srste, wanda" in found["method"]
    assert "N:M pattern needs 1 <= N < M, got 4:2" in found["pattern"]
    assert "unknown schedule 'linear'; valid: constant, cubic, sigmoid" in found["schedule.name"]
    assert "unknown layer types ['LSTM']" in found["types"]
    assert "bad regex '('" in found["exclude"]
    assert "override '^fc$'" in found["overrides"] and "1 <= N < M" in found["overrides"]
    assert "unknown criterion 'nope'; valid: magnitude, optg, random, snip" in found["criterion"]
    assert "forward rule must be a registered name (mask, srste, ste)" in found["forward"]
    assert isinstance(err.value, ValueError)  # a ValidationError is a ValueError


def test_cross_field_errors_are_collected_too():
    with pytest.raises(ValidationError) as err:
        SparsitySpec(method="optg", pattern="unstructured", epochs=4, criterion="magnitude",
                     schedule={"beta": 1.0, "start": 2, "ramp": 3}, freeze_scores_last=9)
    found = locs(err.value)
    assert found["target"] == "pattern 'unstructured' needs target (fraction of zeros, e.g. 0.9)"
    assert found["schedule.start"] == "schedule 'sigmoid' takes ['beta', 'center', 'final_epochs'], not 'start'"
    assert found["schedule.ramp"] == "schedule 'sigmoid' takes ['beta', 'center', 'final_epochs'], not 'ramp'"
    assert found["criterion"] == "forward rule 'ste' trains learned scores but criterion 'magnitude' has none"
    assert found["freeze_scores_last"] in ("must be at most epochs (4)",
                                           "applies to learned scores; criterion 'magnitude' has none")
    assert len(err.value.errors()) == 6  # freeze_scores_last: both of its problems


def test_schedule_values_are_checked_by_the_schedule_against_epochs():
    with pytest.raises(ValidationError) as err:
        SparsitySpec(method="gmp", target=0.9, epochs=3, schedule={"end": 40, "start": -1})
    assert locs(err.value) == {"schedule.start": "Input should be greater than or equal to 0"}
    with pytest.raises(ValidationError) as err:
        SparsitySpec(method="gmp", target=0.9, epochs=3, schedule={"end": 40})
    assert "cubic schedule needs 0 <= start < end <= epochs=3, got start=0.0, end=40.0" in locs(err.value)["schedule"]
    with pytest.raises(ValidationError) as err:
        SparsitySpec(method="optg", target=0.9)
    assert locs(err.value) == {"epochs": "schedule 'sigmoid' needs epochs (the sparse-training length)"}
    assert SparsitySpec(method="random", target=0.9).epochs is None  # constant schedules need none


def test_create_with_keywords_reports_every_problem_in_one_value_error():
    with pytest.raises(ValueError) as err:
        optg.create("srste", mlp(), pattern="unstructured", target=0.5, schedule_options={"beta": 2})
    text = str(err.value)
    assert text.startswith("invalid sparsity settings:")
    assert "pattern: method 'srste' trains N:M patterns only, got pattern 'unstructured'" in text
    assert "schedule.beta: schedule 'constant' takes no settings, not 'beta'" in text
    with pytest.raises(ValueError, match="target: target is implied by pattern '2:4'"):
        optg.create("gmp", mlp(), pattern="2:4", target=0.5, epochs=2)
    with pytest.raises(ValueError, match="colour: Extra inputs are not permitted"):
        optg.create("gmp", mlp(), target=0.5, epochs=2, colour="blue")
    with pytest.raises(TypeError, match="either a SparsitySpec or keyword settings"):
        optg.create(SparsitySpec(method="gmp", target=0.5, epochs=2), mlp(), target=0.6)


def test_spec_carries_a_typed_pattern_and_the_selection():
    spec = SparsitySpec(method="gmp", pattern=" 2 : 4 ", epochs=2, exclude=["^0$"])
    assert spec.pattern == "2:4" and spec.as_pattern == Pattern.nm(2, 4)
    assert spec.selection == optg.TargetSpec(exclude=["^0$"])
    unstructured = SparsitySpec(method="gmp", pattern=Pattern.unstructured(0.8), epochs=2)
    assert (unstructured.pattern, unstructured.target) == ("unstructured", 0.8)
    assert unstructured.as_pattern == Pattern.unstructured(0.8)
    assert SparsitySpec(method="gmp", pattern=Pattern.nm(1, 4), epochs=2).pattern == "1:4"
    with pytest.raises(ValidationError, match="conflicts"):
        SparsitySpec(method="gmp", pattern=Pattern.unstructured(0.8), target=0.5, epochs=2)
    plans = optg.create(spec, mlp()).plans
    assert [str(p.pattern) for p in plans] == ["dense", "2:4", "2:4"]
    assert plans[1].kind == "nm" and plans[1].target == 0.5


def test_spec_round_trips_through_json():
    spec = SparsitySpec(method="gmp", target=0.9, epochs=4, schedule={"name": "cubic", "end": 3.0},
                        overrides={"^2$": "2:4", "^0$": 0.5}, score_lr_factor=0.5)
    dumped = spec.model_dump(mode="json")
    assert dumped["schedule"] == {"name": "cubic", "end": 3.0}
    assert SparsitySpec.model_validate(dumped) == spec


# ---------------------------------------------------------------------- a schedule of one's own
@dataclass(config={"extra": "forbid"})
class StepSchedule:
    """Half the target until `at`, then all of it (a test-only schedule with one setting)."""

    one_shot: ClassVar[bool] = False
    epochs: int = Field(ge=1)
    at: float = Field(default=1.0, gt=0)

    def fraction(self, progress: float) -> float:
        return 0.5 if progress < self.at else 1.0

    def describe(self) -> dict[str, float]:
        return {"at": self.at}


@pytest.fixture
def step_schedule():
    optg.SCHEDULES.add("step_test", StepSchedule)
    yield "step_test"
    optg.SCHEDULES.remove("step_test")


def test_a_registered_schedule_is_usable_with_its_own_settings(step_schedule):
    assert optg.schedule_settings(StepSchedule) == ["at"]
    spec = SparsitySpec(method="gmp", target=0.8, epochs=4, schedule={"name": step_schedule, "at": 2})
    model = mlp()
    sp = optg.create(spec, model).attach()
    assert isinstance(sp.schedule, StepSchedule) and sp.schedule.at == 2.0 and sp.schedule.epochs == 4
    sp.start_epoch(1)
    assert sp.fraction == 0.5 and sp.sparsity() == pytest.approx(0.4, abs=0.01)
    sp.start_epoch(2)
    assert sp.fraction == 1.0 and sp.sparsity() == pytest.approx(0.8, abs=0.01)
    # keyword form, as docs/library.md's create(schedule=..., schedule_options=...)
    kw = optg.create("gmp", mlp(), target=0.8, epochs=4, schedule=step_schedule, schedule_options={"at": 3})
    assert kw.schedule.at == 3.0


def test_an_unknown_setting_of_a_registered_schedule_names_it(step_schedule):
    with pytest.raises(ValidationError) as err:
        SparsitySpec(method="gmp", target=0.8, epochs=4, schedule={"name": step_schedule, "beta": 1.0})
    assert locs(err.value) == {"schedule.beta": "schedule 'step_test' takes ['at'], not 'beta'"}
    with pytest.raises(ValidationError) as err:
        SparsitySpec(method="gmp", target=0.8, epochs=4, schedule={"name": step_schedule, "at": -1})
    assert locs(err.value) == {"schedule.at": "Input should be greater than 0"}


# ---------------------------------------------------------------------- a method is one entry
class DenseGradientSTE:
    """Forward `w * m`, gradient straight through to every weight (pruned ones included)."""

    trains_scores = False
    scheduled = True
    nm_only = False

    def weight(self, layer: optg.LayerState) -> torch.Tensor:
        w = layer.weight
        return w + (w * layer.mask - w).detach()

    def keep_mask(self, layer: optg.LayerState) -> torch.Tensor:
        return layer.mask


@pytest.fixture
def dense_grad_method():
    optg.FORWARD_RULES.add("dense_grad_test", DenseGradientSTE)
    optg.METHODS.add("gmp_dense_grad_test", Method("magnitude", "cubic", "dense_grad_test"))
    yield "gmp_dense_grad_test"
    optg.METHODS.remove("gmp_dense_grad_test")
    optg.FORWARD_RULES.remove("dense_grad_test")


def _grad_on_pruned(method: str) -> tuple[float, optg.Sparsifier, nn.Module]:
    model = mlp()
    sp = optg.create(method, model, target=0.8, epochs=2).attach()
    sp.start_epoch(2)  # past the ramp: 80% pruned
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    layer = sp.layers[-1]
    return float(layer.weight.grad[layer.mask == 0].abs().sum()), sp, model


def test_a_method_added_by_one_entry_with_its_own_forward_rule_works(dense_grad_method):
    assert dense_grad_method in optg.METHODS.names()
    pruned_grad, sp, model = _grad_on_pruned(dense_grad_method)
    assert isinstance(sp.forward, DenseGradientSTE)
    assert pruned_grad > 0  # the rule's gradient reaches pruned weights
    assert _grad_on_pruned("gmp")[0] == 0  # the built-in mask rule's does not
    x = torch.randn(3, 8)
    with torch.no_grad():
        masked = model(x)
        sp.bake()
        assert torch.equal(model(x), masked)
    assert sp.sparsity() == pytest.approx(0.8, abs=0.01)


def test_unknown_plug_in_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown forward rule 'sr-ste'; valid: mask, srste, ste"):
        optg.create("gmp", mlp(), target=0.5, epochs=2, forward="sr-ste")


# ---------------------------------------------------------------------- configured instances
def test_configured_instances_are_used_as_given():
    schedule = optg.CubicSchedule(4, start=0, end=2)
    criterion = optg.RandomScores(seed=7)
    sp = optg.create("gmp", mlp(), target=0.6, criterion=criterion, schedule=schedule).attach()
    assert sp.schedule is schedule and sp.criterion is criterion
    sp.start_epoch(2)
    same = optg.create("random", mlp(), target=0.6, seed=7).attach()  # the run seed, same draws
    assert all(torch.equal(a, b) for a, b in zip(sp.masks().values(), same.masks().values()))
    other = optg.create("random", mlp(), target=0.6, seed=8).attach()
    assert any(not torch.equal(a, b) for a, b in zip(sp.masks().values(), other.masks().values()))


def test_instance_schedule_needs_no_epochs_and_instance_forward_keeps_its_settings():
    sp = optg.create("optg", mlp(), target=0.5, schedule=optg.SigmoidSchedule(10, beta=1.0, center=5.0))
    assert sp.schedule.beta == 1.0
    srste = optg.create("srste", mlp(), pattern="2:4", forward=optg.SRSTE(decay=0.5)).attach()
    assert srste.forward.decay == 0.5
    assert optg.create("srste", mlp(), pattern="2:4", srste_decay=0.25).forward.decay == 0.25
    with pytest.raises(TypeError, match="schedule_options go with a schedule name"):
        optg.create("optg", mlp(), target=0.5, schedule=optg.SigmoidSchedule(10), schedule_options={"beta": 1})
    with pytest.raises(ValueError, match="criterion LearnedScores learns scores but forward rule 'mask'"):
        optg.create("gmp", mlp(), target=0.5, epochs=2, criterion=optg.LearnedScores())


# ---------------------------------------------------------------------- score settings
def test_score_momentum_and_lr_factor_reach_the_score_optimizer():
    model = mlp()
    sp = optg.create("optg", model, target=0.5, epochs=4, score_momentum=0.5, score_lr_factor=0.25).attach()
    sp.start_epoch(3)
    F.cross_entropy(model(data(1)[0][0]), data(1)[0][1]).backward()
    sp.step(lr=0.2)
    group = sp.score_optimizer.param_groups[0]
    assert group["momentum"] == 0.5
    assert group["lr"] == 0.2 * 0.25 * sp.fraction


def test_freeze_scores_last_stops_score_updates_in_the_last_epochs():
    model = mlp()
    sp = optg.create("optg", model, target=0.5, epochs=4, freeze_scores_last=1).attach()
    train(model, sp, 3)
    before = [l.scores.detach().clone() for l in sp.layers]
    assert any(b.abs().sum() > 0 for b in before)  # scores did learn before the freeze
    sp.start_epoch(3)
    for x, y in data(seed=3):
        F.cross_entropy(model(x), y).backward()
        sp.step(lr=0.05)
    assert sp.score_optimizer.param_groups[0]["lr"] == 0.0
    assert all(torch.equal(b, l.scores) for b, l in zip(before, sp.layers))


# ---------------------------------------------------------------------- state, modes, sums
@pytest.mark.parametrize("method,kw", [("optg", {"target": 0.7}), ("srste", {"pattern": "2:4"}),
                                       ("gmp", {"target": 0.7, "update_every_steps": 2, "steps_per_epoch": 4})])
def test_state_dict_loads_with_weights_only_and_restores(method, kw):
    model = mlp()
    sp = optg.create(method, model, epochs=3, **kw).attach()
    train(model, sp, 2)
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = mlp()
    fresh.load_state_dict(model.state_dict())
    sp2 = optg.create(method, fresh, epochs=3, **kw).attach()
    sp2.load_state_dict(state)
    assert (sp2.epoch, sp2.global_step, sp2.fraction) == (sp.epoch, sp.global_step, sp.fraction)
    assert all(torch.equal(a, b) for a, b in zip(sp.masks().values(), sp2.masks().values()))


def test_training_mode_restores_every_module_flag():
    model = mlp()
    model[2].eval()  # a submodule in a mode of its own
    with optg.training_mode(model, False):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[2].training and model[4].training
    with pytest.raises(RuntimeError), optg.training_mode(model, False):
        raise RuntimeError("boom")
    assert model.training and not model[2].training


def test_snip_scores_in_training_mode_and_restores_the_callers_modes():
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen: list[bool] = []

        def forward(self, x):
            self.seen.append(self.training)
            return x

    model = nn.Sequential(nn.Linear(8, 16), Recorder(), nn.ReLU(), nn.Linear(16, 4))
    model.eval()
    sp = optg.create("snip", model, target=0.5).attach()
    assert sp.calibrate(data(2), optg.supervised(F.cross_entropy)) == 2
    assert model[1].seen == [True, True]
    assert not any(m.training for m in model.modules())


def test_weighted_sparsity_weights_layers_by_size():
    rows = [optg.LayerReport("a", "Linear", (10, 10), 100, True, Pattern.unstructured(0.9), 0.9, ""),
            optg.LayerReport("b", "Linear", (10, 30), 300, True, Pattern.nm(2, 4), 0.5, "")]
    assert optg.weighted_sparsity(rows) == pytest.approx((90 + 150) / 400)
    assert optg.weighted_sparsity([]) == 0.0
    assert rows[1].to_dict()["pattern"] == "2:4" and rows[1].to_dict()["shape"] == [10, 30]


def test_sigmoid_defaults_scale_with_epochs():
    s = optg.SigmoidSchedule(20)
    assert (s.beta, s.center, s.final_epochs) == (1.0, 8.0, math.ceil(0.25 * 20))
