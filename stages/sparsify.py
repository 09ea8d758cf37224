"""The sparsify stage: build an `optg` sparsifier from the config and train with it."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field, ModelWrapValidatorHandler, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from torch import nn

import optg
from optg.pattern import Pattern, parse_nm
from optg.spec import GuardSpec, ScheduleSpec, SparsitySpec
from optg.targets import Allocation, default_types
from stages.base import ConfigFieldError, StrictModel
from stages.context import RunContext, Stage
from stages.tasks import ClassificationTask, Task
from stages.train import TrainConfig, phase_trainer, run_phase


def one_shot_methods() -> list[str]:
    """Registered methods whose mask is fixed before training (a constant schedule, masked
    forward): without `sparsity.train` the pipeline prunes and bakes without training; with it
    the weights fine-tune under the mask. (SR-STE's schedule is constant too, but its forward
    re-prunes at every step: it trains.)"""
    return [name for name in optg.METHODS.names()
            if (m := optg.METHODS.get(name)).schedule == "constant" and m.forward == "mask"]


class CalibrationSettings(StrictModel):
    """Settings of a data-aware one-shot method (`snip`, `wanda`): how many training batches
    it scores on before pruning."""

    calibration_batches: int | None = Field(None, ge=1)
    """training batches the method scores on; null: the method's own (8 for wanda, 4 for snip)"""

    def spec_fields(self) -> dict[str, Any]:
        """The settings given, as `optg.SparsitySpec` keyword arguments."""
        return self.model_dump(exclude_unset=True)


class SparseGPTSettings(CalibrationSettings):
    """`method: sparsegpt`'s settings: its calibration batches and the Hessian dampening."""

    calibration_batches: int | None = Field(None, ge=1)
    """training batches whose inputs build each layer's Hessian; null: 8"""
    dampening: float = Field(0.01, ge=0, lt=1)
    """added to the Hessian's diagonal, as a fraction of its mean (SparseGPT's `percdamp`)"""

    def spec_fields(self) -> dict[str, Any]:
        given = self.model_dump(exclude_unset=True)
        if "dampening" in given:
            given["sparsegpt_percdamp"] = given.pop("dampening")
        return given


class SRSTESettings(StrictModel):
    """`method: srste`'s settings (sparse-refined straight-through estimator)."""

    decay: float = Field(2e-4, ge=0)
    """decay applied to the pruned weights each step (SR-STE's lambda_w)"""

    def spec_fields(self) -> dict[str, Any]:
        return {"srste_decay": self.decay} if "decay" in self.model_fields_set else {}


class OptGSettings(StrictModel):
    """`method: optg`'s own settings: how its learned scores start and what they are stored in.

    OptG's other knobs are chosen by `start` (the authors' values from scratch, the measured
    `optg.PRETRAINED` values from trained weights) and stay keyword arguments of the library
    (`optg.create(..., score_lr_factor=...)`, docs/library.md), where `benchmarks/` varies them."""

    score_init: Literal["zeros", "magnitude", "live", "wanda", "sparsegpt"] = "zeros"
    """where the learned scores start: zeros (the authors'), magnitude (a prior of |w| / mean |w|),
    live (the masks rank the scores plus that prior of the current weights; `start: pretrained`'s
    choice for N:M), or wanda / sparsegpt (from trained weights: the first mask is that one-shot
    method's, calibrated on `calibration_batches`)"""
    score_dtype: Literal["float32", "bfloat16"] = "float32"
    """learned scores and their momentum in float32, or bfloat16 for half their bytes
    (benchmarks/RESULTS.md says what it costs in accuracy)"""
    calibration_batches: int | None = Field(None, ge=1)
    """score_init wanda / sparsegpt: training batches the first mask is calibrated on; null: 8"""

    @model_validator(mode="after")
    def _calibration_needs_a_calibrated_init(self) -> "OptGSettings":
        if self.calibration_batches is not None and self.score_init not in ("wanda", "sparsegpt"):
            raise ValueError(f"calibration_batches applies to score_init wanda or sparsegpt, "
                             f"not {self.score_init!r}")
        return self

    def spec_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


MethodSettings = OptGSettings | CalibrationSettings | SparseGPTSettings | SRSTESettings

# The methods that have settings of their own, by the key their block sits under in
# `sparsity:` (the method's name). gmp, oneshot and random take none.
METHOD_SETTINGS: dict[str, type[MethodSettings]] = {
    "optg": OptGSettings, "snip": CalibrationSettings, "wanda": CalibrationSettings,
    "sparsegpt": SparseGPTSettings, "srste": SRSTESettings}

# Keys that `sparsity:` no longer takes, and where each went (an old config is refused with
# this text, exit 2). Training settings moved under `sparsity.train`; method settings under
# the method's block; the rest are library keyword arguments.
TRAINING_KEYS = tuple(TrainConfig.model_fields)
MOVED_KEYS: dict[str, str] = {
    **{key: f"moved to sparsity.train.{key} (the sparse phase's training settings are a section)"
       for key in TRAINING_KEYS},
    "epochs": "moved to sparsity.train.epochs; for one-shot (epochs: 0) leave sparsity.train out",
    "score_init": "moved to sparsity.optg.score_init",
    "score_dtype": "moved to sparsity.optg.score_dtype",
    "calibration_batches": "moved to the method's block: sparsity.<method>.calibration_batches "
                           "(snip, wanda, sparsegpt; optg with score_init wanda / sparsegpt)",
    "sparsegpt_percdamp": "moved to sparsity.sparsegpt.dampening",
    "srste_decay": "moved to sparsity.srste.decay",
    **{key: "no longer a config key: `start` sets it (the authors' value from scratch, the measured "
            "optg.PRETRAINED value from trained weights); it stays a keyword argument of optg.create "
            "(docs/library.md)"
       for key in ("score_momentum", "score_lr_factor", "score_lr_coupled", "score_warmup_steps",
                   "score_init_scale", "freeze_scores_last")},
    **{key: "no longer a config key: measured and not adopted (benchmarks/RESULTS.md); it stays a "
            "keyword argument of optg.create for experiments"
       for key in ("update_every_steps", "max_swap_fraction", "score_normalization")},
    **{key: "no longer a config key: a method names its criterion and forward rule; compose your own "
            "with optg.create(criterion=..., forward=...) or register a method (docs/library.md)"
       for key in ("criterion", "forward")},
}

# where a spec field sits in `sparsity:` (for the spec's own error locations)
_SPEC_TO_CONFIG: dict[str, tuple[str, ...]] = {
    "epochs": ("train", "epochs"), "score_init": ("optg", "score_init"), "score_dtype": ("optg", "score_dtype"),
    "sparsegpt_percdamp": ("sparsegpt", "dampening"), "srste_decay": ("srste", "decay")}
_COMMON = ("method", "pattern", "target", "allocation", "start", "schedule", "types", "include", "exclude",
           "overrides", "guard")


class SparsityConfig(StrictModel):
    """Sparse training: which method, pattern and target, on which layers; the method's own
    settings under its name (`optg:`, `snip:`, `wanda:`, `sparsegpt:`, `srste:`; only the block
    of the method in use is accepted); and the sparse phase's training (`train:`, absent for a
    one-shot prune)."""

    method: str
    """a registered method: optg, gmp, srste (trained masks); oneshot, random, snip, wanda,
    sparsegpt (one-shot: the mask is fixed before training)"""
    pattern: str = "unstructured"
    """'unstructured' or 'N:M' such as '2:4' (N kept in every M consecutive input weights)"""
    target: float | None = Field(None, gt=0, lt=1)
    """fraction of zeros; unstructured only (an N:M pattern implies 1 - N/M)"""
    allocation: Allocation = "global"
    """global: one threshold over all layers (OptG's) | layerwise: the same sparsity in every layer"""
    start: Literal["auto", "scratch", "pretrained"] = "auto"
    """scratch: the authors' OptG; pretrained: the measured `optg.PRETRAINED` settings (and a
    guard for every method); auto: pretrained when training starts from trained weights"""
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    """the sparsity ramp: `{name: ..., <its settings>}`; name null: the method's"""
    types: list[str] = Field(default_factory=lambda: list(default_types()))
    """layer types whose weights are targets (the `optg.weights` registry)"""
    include: list[str] = Field(default_factory=list)
    """regexes on module names; empty: every module of `types`"""
    exclude: list[str] = Field(default_factory=list)
    """regexes on module names left dense"""
    overrides: dict[str, str | float] = Field(default_factory=dict)
    """regex on module names -> `dense`, an `N:M` pattern or a sparsity, e.g. `{'^fc$': dense}`"""
    guard: GuardSpec | None = None
    """loss on fixed batches before/after each mask update (warns on a rise); `start: pretrained` turns it on"""
    train: TrainConfig | None = None
    """the sparse phase's training; absent: one-shot (prune and bake, no training; one-shot methods
    only). With a dense `train:` phase, keys not given here take its values (the optimizer key by key)"""
    # (this field shadows the `optg` module in the class body: annotations below use the names
    # imported from it, Pattern and SparsitySpec)
    optg: OptGSettings | None = None
    """`method: optg`'s settings: where its learned scores start, their dtype"""
    snip: CalibrationSettings | None = None
    """`method: snip`'s settings: its calibration batches"""
    wanda: CalibrationSettings | None = None
    """`method: wanda`'s settings: its calibration batches"""
    sparsegpt: SparseGPTSettings | None = None
    """`method: sparsegpt`'s settings: its calibration batches and Hessian dampening"""
    srste: SRSTESettings | None = None
    """`method: srste`'s settings: the decay of pruned weights"""

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        """A registered method (the error lists them), checked with the other fields."""
        try:
            optg.METHODS.get(value)
        except optg.UnknownNameError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_text(cls, value: Any) -> Any:
        """'unstructured', or N:M normalised ('2: 4' -> '2:4'); parse errors name the key."""
        if not isinstance(value, str):
            return value  # the str check reports it
        return "unstructured" if value.strip() == "unstructured" else "{}:{}".format(*parse_nm(value))

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_name(cls, value: Any) -> Any:
        """`schedule: cubic` is `schedule: {name: cubic}`."""
        return {"name": value} if value is None or isinstance(value, str) else value

    @model_validator(mode="wrap")
    @classmethod
    def _moved_keys(cls, data: Any, handler: ModelWrapValidatorHandler["SparsityConfig"]) -> "SparsityConfig":
        """An old-style key is refused with where it went, all of them at once and together with
        the section's other problems (validated without the old keys; that `train` is missing
        is not repeated when training keys moved)."""
        moved = [key for key in data if key in MOVED_KEYS] if isinstance(data, dict) else []
        if not moved:
            return handler(data)
        errors = [InitErrorDetails(type=PydanticCustomError("moved_key", "{message}", {"message": MOVED_KEYS[key]}),
                                   loc=(key,), input=data[key]) for key in moved]
        trained = any(key in TRAINING_KEYS for key in moved)
        try:
            handler({key: value for key, value in data.items() if key not in MOVED_KEYS})
        except ValidationError as exc:
            errors += [_again(err) for err in exc.errors() if not (trained and tuple(err["loc"]) == ("train",))]
        raise ValidationError.from_exception_data(cls.__name__, errors)

    @model_validator(mode="after")
    def _consistent(self) -> "SparsityConfig":
        """One method's block only; a trained method has a `train` section; and the library's
        own checks of the spec, located at the config's keys."""
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        for name in METHOD_SETTINGS:
            if getattr(self, name) is not None and name != self.method:
                problems.append(((name,), f"settings of method {name!r}; this config's method is "
                                          f"{self.method!r}", "{...}"))
        one_shot = one_shot_methods()
        if self.train is None and self.method not in one_shot:
            problems.append((("train",), f"method {self.method!r} trains its mask: add sparsity.train "
                                         f"(epochs, optimizer...); one-shot methods, which may leave it out, are "
                                         f"{', '.join(one_shot)}", None))
        if not problems:
            try:
                self.to_spec()
            except ValidationError as exc:
                moved = {**_SPEC_TO_CONFIG, "calibration_batches": (self.method, "calibration_batches")}
                for err in exc.errors():
                    loc = tuple(err["loc"])
                    where = moved.get(str(loc[0]), loc[:1]) + loc[1:] if loc else ()
                    problems.append((where, err["msg"].removeprefix("Value error, "), err.get("input")))
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}),
                                 loc=loc, input=value) for loc, message, value in problems])
        return self

    @property
    def settings(self) -> MethodSettings | None:
        """The method's own settings block: as given, else its defaults (None: the method has none)."""
        cls = METHOD_SETTINGS.get(self.method)
        if cls is None:
            return None
        given = getattr(self, self.method)
        return given if given is not None else cls()

    @property
    def as_pattern(self) -> Pattern:
        """The model's pattern as a value: `pattern` text with `target` (unstructured)."""
        return Pattern.parse(self.pattern, self.target)

    def resolved_start(self, from_trained: bool) -> Literal["scratch", "pretrained"]:
        """`auto` is pretrained when training starts from trained weights, else scratch."""
        if self.start == "auto":
            return "pretrained" if from_trained else "scratch"
        return self.start

    def to_spec(self, **library: Any) -> SparsitySpec:
        """The library's spec: the keys given here (only those: `start: pretrained` fills the
        rest), the method's settings, the sparse epochs, and `library` keyword arguments that the
        YAML does not take (benchmarks use them: `update_every_steps=10`)."""
        data: dict[str, Any] = {key: getattr(self, key) for key in _COMMON
                                if key in self.model_fields_set or key == "method"}
        if "guard" in data and data["guard"] is not None:
            data["guard"] = data["guard"].model_dump()
        if self.train is not None:
            data["epochs"] = self.train.epochs
        block = getattr(self, self.method, None) if self.method in METHOD_SETTINGS else None
        if block is not None:
            data.update(block.spec_fields())
        return SparsitySpec(**{**data, **library})


def _again(err: ErrorDetails) -> InitErrorDetails:
    """A caught validation error, raised again as it was (its type, location, input and context)."""
    try:
        again = InitErrorDetails(type=err["type"], loc=err["loc"], input=err["input"])
        if "ctx" in err:
            again["ctx"] = err["ctx"]
        ValidationError.from_exception_data("check", [again])  # a type pydantic knows, with its context
        return again
    except (KeyError, TypeError, ValueError):  # a custom type: its message as the template
        return InitErrorDetails(type=PydanticCustomError(err["type"], "{message}", {"message": err["msg"]}),
                                loc=err["loc"], input=err["input"])


def plan(model: nn.Module, cfg: SparsityConfig) -> list[optg.LayerPlan]:
    """The target-layer plan without touching the model; raises ValueError if nothing is sparsified.
    The plan does not depend on the start mode; planning as from trained weights lets a spec that
    needs them (`score_init: sparsegpt`) be planned, the config check having required them."""
    return _create(model, cfg, steps_per_epoch=1, seed=0, from_trained=True).plans


def build_sparsifier(model: nn.Module, cfg: SparsityConfig, *, steps_per_epoch: int,
                     seed: int, from_trained: bool = False,
                     library: dict[str, Any] | None = None) -> optg.Sparsifier:
    """Plan target layers and attach. The model must already be on its training device.
    from_trained: the model holds trained weights (a dense phase ran or `model.weights` was
    loaded), which makes `sparsity.start: auto` the pretrained mode. library: `optg.SparsitySpec`
    keyword arguments the config does not take (benchmarks' experiments)."""
    return _create(model, cfg, steps_per_epoch=steps_per_epoch, seed=seed, from_trained=from_trained,
                   library=library).attach()


def _create(model: nn.Module, cfg: SparsityConfig, *, steps_per_epoch: int, seed: int,
            from_trained: bool = False, library: dict[str, Any] | None = None) -> optg.Sparsifier:
    return optg.create(cfg.to_spec(**(library or {})), model, steps_per_epoch=steps_per_epoch, seed=seed,
                       from_trained=from_trained)


def settings_in_force(sparsifier: optg.Sparsifier, cfg: SparsityConfig, from_trained: bool) -> dict[str, Any]:
    """The sparsity settings a run trains with (`sparsifier`, built from `cfg`), JSON-ready:
    what `start` resolved to and why, the schedule as built (the pretrained ramp included), the
    score settings where scores are learned, and the guard; `start: auto` would otherwise
    change them unseen."""
    spec = sparsifier.spec
    start = cfg.resolved_start(from_trained)
    why = ("set in the config" if cfg.start != "auto" else
           "auto: training starts from trained weights" if from_trained else "auto: training starts from scratch")
    settings: dict[str, Any] = {
        "method": spec.method, "start": start, "start_reason": why,
        "schedule": {"name": type(sparsifier.schedule).__name__, **sparsifier.schedule.describe()},
        "update_every_steps": spec.update_every_steps}
    if getattr(sparsifier.criterion, "learned", False):
        settings.update({field: getattr(spec, field) for field in (
            "score_warmup_steps", "score_init", "score_init_scale", "score_lr_coupled", "score_lr_factor",
            "score_normalization", "score_dtype", "max_swap_fraction")})
    if getattr(sparsifier.criterion, "needs_calibration", False):
        settings["calibration_batches"] = spec.calibration_batches_in_force
    settings["guard"] = spec.guard.model_dump() if spec.guard is not None else None
    return settings


def calibrate_if_needed(sparsifier: optg.Sparsifier, loader: Iterable[Any], device: torch.device,
                        task: Task | None = None) -> int:
    """Data-aware criteria (SNIP, Wanda, SparseGPT) score on the first training batches (as many
    as the sparsifier's spec says) before training, with the task's loss; others skip."""
    if sparsifier.calibrated:
        return 0
    task = task or ClassificationTask()
    wanted = sparsifier.spec.calibration_batches_in_force
    batches = []
    for batch in loader:
        batches.append(task.to_device(batch, device))
        if len(batches) == wanted:
            break
    return sparsifier.calibrate(batches, task.batch_loss)


# --------------------------------------------------------------------------- the pipeline row


def run_sparsify(ctx: RunContext) -> None:
    """Attach the sparsifier and train; resumed mid-phase from the last sparse checkpoint. Also
    the restore: with every epoch checkpointed it trains zero epochs and leaves the sparsifier."""
    cfg, data = ctx.cfg.sparsity, ctx.cfg.data
    steps = len(ctx.bundle.loader("train", data.batch_size, shuffle=True, rank=ctx.dist.rank,
                                  world_size=ctx.dist.world_size))
    from_trained = ctx.cfg.has_reference
    sparsifier = ctx.sparsifier_ = build_sparsifier(
        ctx.model, cfg, steps_per_epoch=steps, seed=ctx.cfg.seed, from_trained=from_trained)
    settings = ctx.run.manifest.sparsity = settings_in_force(sparsifier, cfg, from_trained)
    ctx.log(f"[sparse] start {settings['start']} ({settings['start_reason']}); " + ", ".join(
        f"{k} {v}" for k, v in settings.items() if k not in ("method", "start", "start_reason")))
    checkpoint = ctx.run.checkpoints / "sparse.pt"
    trainer = phase_trainer(ctx, "sparse", cfg.train, sparsifier) if cfg.train is not None else None
    if not ctx.on_disk(checkpoint):
        calibrate_if_needed(sparsifier, ctx.bundle.loader("train", data.batch_size, shuffle=True, seed=ctx.cfg.seed),
                            ctx.device, ctx.task)
    if trainer is None:  # one-shot without `sparsity.train`: the calibrated mask is the result
        return
    try:
        run_phase(ctx, trainer, checkpoint)
    except ConfigFieldError as exc:  # the trainer's fields sit under sparsity.train
        exc.nest("train")
        raise


ROW = Stage("sparsify", run_sparsify, restore=run_sparsify, state="weights", section="sparsity", inputs=("sparsity",))
