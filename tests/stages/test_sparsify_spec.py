"""stages.sparsify: the `sparsity:` section. Common keys, the sparse phase's `train:` section and
one settings block per method (selected by `method`) build the `optg.SparsitySpec`, so every
sparsity check, schedule setting and plug-in still comes from optg; keys of the old flat layout
are refused with their new place."""
from typing import ClassVar

import pytest
import torch
from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass
from torch import nn

import optg
from stages.sparsify import METHOD_SETTINGS, MOVED_KEYS, SparsityConfig, build_sparsifier, calibrate_if_needed, plan
from stages.train import TrainConfig


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def loader(n: int = 10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, 4, 4, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def locs(exc: ValidationError) -> dict[str, str]:
    return {".".join(map(str, e["loc"])): e["msg"].removeprefix("Value error, ") for e in exc.errors()}


TRAIN = {"epochs": 3}


def test_common_keys_a_train_section_and_one_block_per_method():
    common = {"method", "pattern", "target", "allocation", "start", "schedule", "types", "include", "exclude",
              "overrides", "guard"}
    assert set(SparsityConfig.model_fields) == common | {"train"} | set(METHOD_SETTINGS)
    assert set(METHOD_SETTINGS) == {"optg", "snip", "wanda", "sparsegpt", "srste"} <= set(optg.METHODS.names())
    assert len(SparsityConfig.model_fields) == 17  # half of the 34 keys of the flat layout
    cfg = SparsityConfig.model_validate({"method": "gmp", "target": 0.5, "train": TRAIN})
    assert isinstance(cfg.train, TrainConfig) and cfg.settings is None  # gmp has no settings of its own
    assert SparsityConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_a_method_that_trains_its_mask_needs_the_train_section_and_a_one_shot_does_not():
    with pytest.raises(ValidationError) as err:
        SparsityConfig(method="gmp", target=0.5)
    assert list(locs(err.value)) == ["train"] and "method 'gmp' trains its mask" in locs(err.value)["train"]
    one_shot = SparsityConfig(method="wanda", pattern="2:4")
    assert one_shot.train is None and one_shot.to_spec().epochs is None
    with_phase = SparsityConfig.model_validate({"method": "wanda", "pattern": "2:4", "train": {"epochs": 2}})
    assert with_phase.to_spec().epochs == 2  # the mask is held while the weights fine-tune


def test_field_errors_of_common_keys_and_the_train_section_come_together():
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate({"method": "optq", "pattern": "4:2",
                                       "train": {"epochs": 3, "optimizer": {"lr": -1}},
                                       "schedule": {"name": "linear"}})
    problems = locs(err.value)
    assert set(problems) == {"method", "pattern", "train.optimizer.lr", "schedule.name"}
    assert "'optq'" in problems["method"] and "optg" in problems["method"]  # the valid names are listed


@pytest.mark.parametrize("key", sorted(MOVED_KEYS))
def test_every_key_of_the_flat_layout_is_refused_with_its_new_place(key):
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate({"method": "optg", "pattern": "2:4", "train": TRAIN, key: 1})
    assert locs(err.value) == {key: MOVED_KEYS[key]}


def test_the_flat_layout_lists_every_moved_key_at_once():
    flat = {"method": "optg", "pattern": "2:4", "epochs": 3, "optimizer": {"lr": 0.05}, "score_init": "live",
            "sparsegpt_percdamp": 0.01, "update_every_steps": 10}
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate(flat)
    problems = locs(err.value)
    assert set(problems) == {"epochs", "optimizer", "score_init", "sparsegpt_percdamp", "update_every_steps"}
    assert problems["optimizer"].startswith("moved to sparsity.train.optimizer")
    assert problems["score_init"] == "moved to sparsity.optg.score_init"
    assert problems["sparsegpt_percdamp"] == "moved to sparsity.sparsegpt.dampening"
    assert "keyword argument of optg.create" in problems["update_every_steps"]
    # the flat layout covered every field of the spec and of the training phase
    assert set(optg.SparsitySpec.model_fields) | set(TrainConfig.model_fields) \
        <= set(SparsityConfig.model_fields) | set(MOVED_KEYS)


def test_a_block_of_another_method_is_refused():
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate({"method": "gmp", "target": 0.5, "train": TRAIN, "optg": {"score_init": "live"},
                                       "srste": {"decay": 0.1}})
    assert locs(err.value) == {"optg": "settings of method 'optg'; this config's method is 'gmp'",
                               "srste": "settings of method 'srste'; this config's method is 'gmp'"}
    with pytest.raises(ValidationError) as err:  # a block takes only its method's fields
        SparsityConfig.model_validate({"method": "wanda", "pattern": "2:4", "wanda": {"dampening": 0.1}})
    assert list(locs(err.value)) == ["wanda.dampening"]


def test_each_block_reaches_the_spec_and_unset_fields_leave_the_presets_alone():
    spec = SparsityConfig.model_validate({"method": "sparsegpt", "pattern": "2:4",
                                          "sparsegpt": {"calibration_batches": 3, "dampening": 0.05}}).to_spec()
    assert (spec.calibration_batches, spec.sparsegpt_percdamp) == (3, 0.05)
    spec = SparsityConfig.model_validate({"method": "srste", "pattern": "2:4", "train": TRAIN,
                                          "srste": {"decay": 1e-3}}).to_spec()
    assert spec.srste_decay == 1e-3
    cfg = SparsityConfig.model_validate({"method": "optg", "pattern": "2:4", "train": TRAIN,
                                         "optg": {"score_dtype": "bfloat16"}})
    assert cfg.to_spec().model_fields_set >= {"score_dtype"} and "score_init" not in cfg.to_spec().model_fields_set
    sp = build_sparsifier(model(), cfg, steps_per_epoch=10, seed=0, from_trained=True)
    assert (sp.spec.score_dtype, sp.spec.score_init) == ("bfloat16", optg.PRETRAINED["score_init"])  # live: the preset
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate({"method": "optg", "pattern": "2:4", "train": TRAIN,
                                       "optg": {"calibration_batches": 2}})
    assert locs(err.value) == {"optg": "calibration_batches applies to score_init wanda or sparsegpt, not 'zeros'"}


def test_the_library_keyword_arguments_the_yaml_does_not_take_reach_the_sparsifier():
    cfg = SparsityConfig.model_validate({"method": "optg", "target": 0.5, "train": {"epochs": 4}})
    sp = build_sparsifier(model(), cfg, steps_per_epoch=10, seed=0,
                          library={"score_momentum": 0.8, "score_lr_factor": 0.5, "freeze_scores_last": 1})
    assert sp.score_optimizer.param_groups[0]["momentum"] == 0.8
    assert (sp.score_lr_factor, sp.score_freeze_epoch) == (0.5, 3)


@dataclass(config={"extra": "forbid"})
class HalfwaySchedule:
    """None of the target before `start`, all of it after (test-only)."""

    one_shot: ClassVar[bool] = False
    epochs: int = Field(ge=1)
    start: int = Field(default=1, ge=0)

    def fraction(self, progress: float) -> float:
        return 0.0 if progress < self.start else 1.0

    def describe(self) -> dict[str, float]:
        return {"start": self.start}


@pytest.fixture
def halfway():
    optg.SCHEDULES.add("halfway_test", HalfwaySchedule)
    yield "halfway_test"
    optg.SCHEDULES.remove("halfway_test")


def test_a_newly_registered_schedule_is_usable_from_the_config(halfway):
    cfg = SparsityConfig.model_validate({"method": "gmp", "target": 0.75, "train": {"epochs": 4},
                                         "schedule": {"name": halfway, "start": 2}})
    net = model()
    sp = build_sparsifier(net, cfg, steps_per_epoch=10, seed=0)
    assert isinstance(sp.schedule, HalfwaySchedule) and sp.schedule.start == 2
    sp.start_epoch(1)
    assert sp.sparsity() == 0.0
    sp.start_epoch(2)
    assert sp.sparsity() == pytest.approx(0.75, abs=0.01)


def test_an_unknown_setting_of_that_schedule_is_named_with_its_path(halfway):
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate({"method": "gmp", "target": 0.75, "train": {"epochs": 4},
                                       "schedule": {"name": halfway, "beta": 1}})
    assert locs(err.value) == {"schedule.beta": "schedule 'halfway_test' takes ['start'], not 'beta'"}
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate({"method": "gmp", "target": 0.75, "train": {"epochs": 4},
                                       "schedule": {"name": halfway, "start": -2}})
    assert locs(err.value) == {"schedule.start": "Input should be greater than or equal to 0"}


def test_plan_build_and_calibrate_keep_their_signatures():
    cfg = SparsityConfig.model_validate({"method": "snip", "target": 0.6, "train": {"epochs": 2},
                                         "snip": {"calibration_batches": 3}, "exclude": ["^0$"]})
    net = model()
    plans = plan(net, cfg)
    assert [str(p.pattern) for p in plans] == ["dense", "unstructured", "unstructured"]
    assert plans[0].reason == "excluded by '^0$'"
    assert all("forward" not in m.__dict__ for m in net.modules())  # planning leaves the model alone
    sp = build_sparsifier(net, cfg, steps_per_epoch=10, seed=0)
    assert calibrate_if_needed(sp, loader(), torch.device("cpu")) == 3
    assert calibrate_if_needed(sp, loader(), torch.device("cpu")) == 0  # already calibrated
    assert sp.sparsity() == pytest.approx(0.6, abs=0.01)


def test_an_empty_plan_is_a_value_error_naming_the_reasons():
    cfg = SparsityConfig.model_validate({"method": "gmp", "target": 0.6, "train": {"epochs": 2},
                                         "include": ["^nothing$"]})
    with pytest.raises(ValueError, match="no layer can be sparsified .*not matched by include"):
        plan(model(), cfg)


def test_from_trained_weights_the_pretrained_mode_and_its_guard_reach_the_trainer():
    from stages.data import DataConfig, load_data
    from stages.model import ModelConfig, build_model
    from stages.train import Trainer

    bundle = load_data(DataConfig(name="digits", batch_size=128), 0)
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="small_cnn", options={"width": 4}), bundle.input_shape, bundle.num_classes)
    cfg = SparsityConfig.model_validate({"method": "optg", "pattern": "2:4", "train": TRAIN,
                                         "guard": {"batches": 1, "threshold": 1e-9}})
    sp = build_sparsifier(net, cfg, steps_per_epoch=10, seed=0, from_trained=True)
    assert sp.spec.start == "pretrained" and sp.spec.score_init == optg.PRETRAINED["score_init"]
    assert sp.score_warmup_steps == optg.warmup_steps(30) and sp.spec.guard.threshold == 1e-9  # the config's guard wins
    lines: list[str] = []
    assert cfg.train is not None
    trainer = Trainer(net, bundle, cfg.train, phase="sparse", device=torch.device("cpu"), seed=0, batch_size=128,
                      sparsifier=sp, log=lines.append)
    history = trainer.run()
    deltas = [r.mask_update_loss_delta for r in history]
    assert deltas[0] is None and all(d is not None for d in deltas[1:])  # nothing pruned in epoch 0
    assert sum("WARNING: mask update" in line for line in lines) == sum(e.warning for e in trainer.guard.events) > 0
    scratch = build_sparsifier(model(), SparsityConfig(method="optg", pattern="2:4", train=TrainConfig(epochs=3)),
                               steps_per_epoch=10, seed=0, from_trained=False)
    assert scratch.spec.start == "auto" and scratch.spec.guard is None and scratch.score_warmup_steps == 0


def test_settings_in_force_say_what_start_auto_became_and_the_ramp_it_built():
    from stages.sparsify import settings_in_force

    cfg = SparsityConfig(method="optg", pattern="2:4", train=TrainConfig(epochs=12))
    pre = settings_in_force(build_sparsifier(model(), cfg, steps_per_epoch=20, seed=0, from_trained=True), cfg, True)
    assert (pre["start"], pre["start_reason"]) == ("pretrained", "auto: training starts from trained weights")
    assert pre["schedule"] == {"name": "SigmoidSchedule", "beta": 20 / 12, "center": 1.2, "final_epochs": 9}
    assert (pre["score_init"], pre["score_init_scale"], pre["score_warmup_steps"], pre["score_lr_coupled"]) == \
        ("live", optg.PRETRAINED["score_init_scale"], optg.warmup_steps(240), False)
    assert pre["guard"] == {"batches": 2, "threshold": 0.5} and pre["update_every_steps"] is None
    un = SparsityConfig(method="optg", target=0.9, train=TrainConfig(epochs=12))
    unstructured = settings_in_force(build_sparsifier(model(), un, steps_per_epoch=21, seed=0, from_trained=True),
                                     un, True)
    assert unstructured["update_every_steps"] is None and unstructured["score_init"] == "zeros"
    assert unstructured["schedule"]["final_epochs"] == 7  # the unstructured ramp
    scratch = settings_in_force(build_sparsifier(model(), cfg, steps_per_epoch=20, seed=0), cfg, False)
    assert (scratch["start"], scratch["start_reason"]) == ("scratch", "auto: training starts from scratch")
    assert scratch["schedule"]["center"] == pytest.approx(4.8) and scratch["score_init"] == "zeros"
    assert scratch["guard"] is None
    gmp = SparsityConfig(method="gmp", target=0.9, train=TrainConfig(epochs=12), start="pretrained")
    magnitude = settings_in_force(build_sparsifier(model(), gmp, steps_per_epoch=20, seed=0), gmp, False)
    assert magnitude["start_reason"] == "set in the config" and "score_init" not in magnitude
    assert magnitude["schedule"] == {"name": "CubicSchedule", "start": 0.0, "end": 9.0}


def test_moved_keys_come_together_with_the_sections_other_problems():
    with pytest.raises(ValidationError) as err:
        SparsityConfig.model_validate({"method": "optg", "pattern": "4:2", "epochs": 3, "guard": {"batches": 0}})
    problems = locs(err.value)
    assert set(problems) == {"epochs", "pattern", "guard.batches"}  # `train` missing is not said again
    assert problems["guard.batches"] == "Input should be greater than or equal to 1"
    assert problems["pattern"] == "N:M pattern needs 1 <= N < M, got 4:2"
