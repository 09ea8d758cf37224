"""`SparsitySpec`: every setting of one sparsification, validated in one place.

The spec is what `optg.create` builds a Sparsifier from, and what a pipeline's config holds
(its fields are the YAML keys of `sparsity:`). Field checks (a known method, pattern text,
regexes...) and the checks across fields and plug-ins (target vs pattern, the schedule's own
settings, criterion vs forward rule...) all live here and are reported together, each with
its location (`schedule.beta`, `target`): a pydantic ValidationError, which is a ValueError.

Plug-ins are named by their registry (`criterion: snip`, `schedule: {name: cubic, end: 40}`)
or passed as configured instances (`schedule=SigmoidSchedule(30, beta=1.0)`); a schedule's
settings are checked against the registered schedule class itself (`schedule_settings`), so
a newly registered schedule is usable with its own settings at once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from optg.criteria import CRITERIA, Criterion
from optg.forward import FORWARD_RULES, ForwardRule
from optg.methods import METHODS, Method
from optg.pattern import Pattern, parse_nm
from optg.registry import Registry, UnknownNameError
from optg.schedules import SCHEDULES, Schedule, schedule_settings
from optg.targets import (
    Allocation,
    TargetSpec,
    check_overrides,
    check_regexes,
    check_types,
    default_types,
)

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where (`loc`, a field path), what, and the value at fault."""

    loc: Loc
    message: str
    value: Any = None


class ScheduleSpec(BaseModel):
    """A schedule by registered name (None: the method's), its settings as further keys:
    `{name: sigmoid, beta: 1.0, center: 50}`. Settings are checked against the schedule."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    name: str | None = None
    """a registered schedule (its settings: see Per-name options); null: the method's (optg sigmoid, gmp cubic, others
    constant)"""

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None:
            _lookup(SCHEDULES, value)
        return value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GuardSpec(BaseModel):
    """The mask-update guard: the loss on `batches` fixed training batches before and after
    each mask update; a rise above `threshold` (in loss units, nats) is a warning naming the
    layer whose new mask alone raises the loss most."""

    model_config = ConfigDict(extra="forbid")

    batches: int = Field(2, ge=1, description="fixed training batches the loss is measured on")
    threshold: float = Field(0.5, gt=0, description="loss rise that is reported as a warning")


# Settings of `start: pretrained`, applied to every field the spec does not set itself.
# Chosen by measurement (benchmarks/RESULTS.md, "From pretrained"); the rule for the warm-up
# length in steps is `warmup_steps(...)`.
PRETRAINED: dict[str, Any] = {
    "score_lr_coupled": False,
    "score_init": "live",
    "score_init_scale": 0.01,
    "guard": {"batches": 2, "threshold": 0.5},
}
# Unstructured targets keep the authors' score settings and take only the guard: no prior
# scale measured on unstructured targets beat them across datasets (benchmarks/RESULTS.md,
# sections 5b, 5c: prior 0.1 collapsed digits at 98% to ~25%, 1.0 reached 71% vs the authors'
# 85%, and on MNIST-1D both trailed the authors' OptG at 90/95%). The collapse this mode fixes
# was measured under N:M ramps (the quickstart's 2:4), where the prior stays.
PRETRAINED_UNSTRUCTURED: dict[str, Any] = {"guard": PRETRAINED["guard"]}  # + PRETRAINED_RAMP
PRETRAINED_WARMUP = (0.1, 500)  # warm-up = min(10% of the sparse phase's steps, 500 steps)
# The ramp from trained weights, for the sigmoid schedule when the spec sets no schedule:
# (centre, final) as fractions of the sparse phase's E epochs, i.e. `center = c * E` and
# `final_epochs = round(f * E)`, so the target is reached by ~40% (unstructured) / ~25% (N:M)
# of fine-tuning and the rest recovers at the final mask, as ASP and movement pruning's
# cool-down do. The scratch default (0.4, 0.25) reached it at 75%: measured against it from
# pretrained (benchmarks/RESULTS.md section 5, 5 seeds each of digits and MNIST-1D),
# unstructured OptG gained on 5 of 6 cells (digits 98%: 85.2 -> 89.8); N:M with the prior
# at 0.01 (was 0.1) gained 0.8-4.2 points on all four cells (MNIST-1D 1:4: 89.4 -> 93.5).
PRETRAINED_RAMP: dict[str, tuple[float, float]] = {"unstructured": (0.2, 0.6), "nm": (0.1, 0.75)}


def pretrained_settings(pattern: str) -> dict[str, Any]:
    """The `start: pretrained` settings for learned scores at `pattern` ('unstructured' or
    'N:M'): `PRETRAINED` for N:M, `PRETRAINED_UNSTRUCTURED` (the guard alone) for unstructured."""
    if pattern == "unstructured":
        return dict(PRETRAINED_UNSTRUCTURED)
    return dict(PRETRAINED)


def pretrained_ramp(pattern: str, epochs: int) -> dict[str, Any]:
    """The sigmoid schedule's settings from trained weights for `epochs` sparse epochs at
    `pattern`: `{center: c * E, final_epochs: round(f * E)}` from `PRETRAINED_RAMP`."""
    center, final = PRETRAINED_RAMP["unstructured" if pattern == "unstructured" else "nm"]
    return {"center": round(center * epochs, 6), "final_epochs": min(epochs, max(1, round(final * epochs)))}


def warmup_steps(total_steps: int) -> int:
    """The pretrained warm-up length: a tenth of the phase, at most 500 optimizer steps, so a
    20-step-epoch run warms up ~1 epoch and a 5000-step-epoch run a tenth of one."""
    fraction, cap = PRETRAINED_WARMUP
    return min(cap, int(fraction * total_steps))


class SparsitySpec(BaseModel):
    """Method, pattern and target, plug-ins and their settings, layer selection."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True,
                              use_attribute_docstrings=True)

    method: str = Field(description="registered method: optg, gmp, snip, random, oneshot, srste, ...")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' such as '2:4'")
    target: float | None = Field(None, gt=0, lt=1, description="fraction of zeros; unstructured only")
    allocation: Allocation = "global"
    """global: one threshold over all layers (OptG) | layerwise: the same sparsity in every layer"""
    epochs: int | None = Field(None, ge=1, description="sparse-training length (sigmoid and cubic need it)")
    schedule: ScheduleSpec | Schedule = Field(default_factory=ScheduleSpec,
                                              description="None = the method's; or a Schedule instance")
    criterion: str | Criterion | None = Field(None, description="None = the method's; or an instance")
    forward: str | ForwardRule | None = Field(None, description="None = the method's; or an instance")
    update_every_steps: int | None = Field(None, ge=1, description="also recompute masks every k steps")
    types: list[str] = Field(default_factory=lambda: list(default_types()))
    """layer types whose weights are targets (the `optg.weights` registry)"""
    include: list[str] = Field(default_factory=list)
    """regexes on module names; empty: every module of `types`"""
    exclude: list[str] = Field(default_factory=list)
    """regexes on module names left dense"""
    overrides: dict[str, str | float] = Field(default_factory=dict)
    """regex on module names -> `dense`, an `N:M` pattern or a sparsity, e.g. `{'^fc$': dense}`"""
    calibration_batches: int | None = Field(None, ge=1, description=(
        "batches a data-aware method calibrates on; None = the method's: 8 for wanda and sparsegpt, 4 for snip"))
    sparsegpt_percdamp: float = Field(0.01, ge=0, lt=1, description="SparseGPT: dampening, a fraction of mean(diag H)")
    srste_decay: float = Field(2e-4, ge=0, description="SR-STE: decay on the pruned weights")
    score_momentum: float = Field(0.9, ge=0, lt=1, description="learned scores: SGD momentum")
    score_lr_factor: float = Field(1.0, ge=0, description="learned scores: lr = this * weight lr * p(e)/p_target")
    freeze_scores_last: int = Field(0, ge=0, description="learned scores: no updates in the last k epochs")
    # ---- starting from trained weights (see `for_start` and docs/library.md "OptG as implemented")
    start: Literal["auto", "scratch", "pretrained"] = Field(
        "auto", description="scratch: the authors' OptG; pretrained: the PRETRAINED settings for "
                            "every field not set; auto: pretrained when training starts from trained weights")
    score_warmup_steps: int = Field(0, ge=0, description="learned scores: optimizer steps of score "
                                    "learning before the first prune; the schedule runs in the rest")
    score_lr_coupled: bool = Field(True, description="learned scores: lr follows p(e)/p_target (authors); "
                                   "False: lr = score_lr_factor * weight lr throughout")
    score_init: Literal["zeros", "magnitude", "live", "wanda", "sparsegpt"] = Field(
        "zeros", description="learned scores start at 0, or at score_init_scale * |w| / mean |w| over all "
                             "targets (magnitude), or masks rank scores + that prior of the current weights (live); "
                             "wanda / sparsegpt (from trained weights): like live, with the scores set so that the "
                             "first mask is that one-shot method's (calibrated on calibration_batches)")
    score_init_scale: float = Field(1.0, ge=0, description="magnitude prior: scale of |w| / mean |w|")
    score_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="learned scores and their momentum: float32, or bfloat16 (half the bytes; see "
                               "benchmarks/RESULTS.md for what it costs in accuracy)")
    score_normalization: Literal["none", "layer"] = Field(
        "none", description="ranking: raw scores, or each layer's scores / their mean |score|")
    max_swap_fraction: float | None = Field(None, ge=0, le=1, description="a mask update revives at most "
                                            "this fraction of the previously kept count (None: unbounded)")
    guard: GuardSpec | None = Field(None, description="loss on fixed batches before/after each mask update")

    # ------------------------------------------------------------------ field checks
    @model_validator(mode="before")
    @classmethod
    def _pattern_value(cls, data: Any) -> Any:
        """A Pattern value may stand for `pattern` (and, unstructured, `target`)."""
        if isinstance(data, dict) and isinstance(data.get("pattern"), Pattern):
            value: Pattern = data["pattern"]
            data = {**data, "pattern": str(value)}
            if value.kind == "unstructured":
                if data.get("target") not in (None, value.target):
                    raise ValueError(f"target {data['target']} conflicts with pattern {value!r}")
                data["target"] = value.target
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        _lookup(METHODS, value)
        return value

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_text(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {value!r}")  # noqa: TRY004 - pydantic reports ValueError
        if value.strip() == "unstructured":
            return "unstructured"
        n, m = parse_nm(value)
        return f"{n}:{m}"

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        return _none_or_raise(check_types(value), value)

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        return _none_or_raise(check_regexes(value), value)

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, str | float]) -> dict[str, str | float]:
        return _none_or_raise(check_overrides(value), value)

    @field_validator("schedule", mode="wrap")
    @classmethod
    def _schedule(cls, value: Any, handler: Any) -> ScheduleSpec | Schedule:
        if isinstance(value, Schedule):
            return value
        if isinstance(value, ScheduleSpec):
            return value
        if value is None or isinstance(value, str):
            value = {"name": value}
        return ScheduleSpec.model_validate(value)

    @field_validator("criterion", mode="wrap")
    @classmethod
    def _criterion(cls, value: Any, handler: Any) -> str | Criterion | None:
        return _plugin(value, CRITERIA, Criterion)

    @field_validator("forward", mode="wrap")
    @classmethod
    def _forward(cls, value: Any, handler: Any) -> str | ForwardRule | None:
        return _plugin(value, FORWARD_RULES, ForwardRule)

    # ------------------------------------------------------------------ checks across fields
    @model_validator(mode="after")
    def _consistent(self) -> SparsitySpec:
        problems = self.problems()
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": p.message}),
                                 loc=p.loc, input=p.value) for p in problems])
        return self

    def problems(self) -> list[Problem]:
        """Everything wrong across fields and plug-ins ([] for a valid spec)."""
        return _resolve(self)[1]

    @property
    def calibration_batches_in_force(self) -> int:
        """`calibration_batches`, or the method's default (8 for Wanda/SparseGPT, 4 otherwise)."""
        if self.calibration_batches is not None:
            return self.calibration_batches
        return 8 if self.method in ("wanda", "sparsegpt") or self.score_init in ("wanda", "sparsegpt") else 4

    def resolve(self) -> Resolved:
        """The plug-ins this spec names, built fresh (criteria hold per-run state), and its
        pattern. Raises ValueError listing every problem."""
        resolved, problems = _resolve(self)
        if resolved is None or problems:
            raise ValueError("invalid sparsity settings:\n  - " + "\n  - ".join(
                f"{'.'.join(map(str, p.loc))}: {p.message}" if p.loc else p.message for p in problems))
        return resolved

    # ------------------------------------------------------------------ start mode
    def resolved_start(self, from_trained: bool) -> Literal["scratch", "pretrained"]:
        """`auto` is pretrained when training starts from trained weights, else scratch."""
        if self.start == "auto":
            return "pretrained" if from_trained else "scratch"
        return self.start

    def for_start(self, from_trained: bool, steps_per_epoch: int | None = None) -> SparsitySpec:
        """This spec with its start mode applied: itself for scratch (the authors' OptG,
        unchanged); for pretrained, a copy with `PRETRAINED` (and the warm-up of
        `warmup_steps`, given `steps_per_epoch` and `epochs`) for every field not set here,
        and `pretrained_ramp` for a sigmoid schedule given no settings of its own.
        Only methods with learned scores take the score settings and the ramp; every method
        takes the guard."""
        start = self.resolved_start(from_trained)
        if start == "scratch":
            return self
        learned = _resolve(self)[0]
        presets = pretrained_settings(self.pattern) if learned is not None and learned.criterion.learned \
            else {"guard": PRETRAINED["guard"]}
        if "score_init" in presets and "score_warmup_steps" not in presets and steps_per_epoch and self.epochs:
            # ends before the last epoch starts, whose mask is the final one
            presets["score_warmup_steps"] = min(warmup_steps(steps_per_epoch * self.epochs),
                                                max(0, steps_per_epoch * (self.epochs - 1) - 1))
        updates = {k: v for k, v in presets.items() if k not in self.model_fields_set}
        if learned is not None and learned.criterion.learned and self.epochs \
                and isinstance(self.schedule, ScheduleSpec) and self._default_sigmoid(self.schedule):
            updates["schedule"] = ScheduleSpec.model_validate(
                {"name": self.schedule.name, **pretrained_ramp(self.pattern, self.epochs)})
        data = {**self.model_dump(exclude_unset=True, exclude={"schedule", "criterion", "forward"}),
                "schedule": self.schedule, "criterion": self.criterion, "forward": self.forward,
                **updates, "start": start}
        return type(self).model_validate(data)

    def _default_sigmoid(self, schedule: ScheduleSpec) -> bool:
        """`schedule` is the sigmoid with no settings given (named or the method's): the
        pretrained ramp then fills them; any setting given, or an instance, is the user's."""
        return not schedule.options and (schedule.name or METHODS.get(self.method).schedule) == "sigmoid"

    # ------------------------------------------------------------------ typed views
    @property
    def as_pattern(self) -> Pattern:
        """The model's pattern as a value: `pattern` text with `target` (unstructured)."""
        return Pattern.parse(self.pattern, self.target)

    @property
    def selection(self) -> TargetSpec:
        """Which layers: types, include/exclude regexes, per-layer overrides."""
        return TargetSpec(types=tuple(self.types), include=list(self.include),
                          exclude=list(self.exclude), overrides=dict(self.overrides))


@dataclass(frozen=True)
class Resolved:
    """A spec's plug-ins, ready to build a Sparsifier from."""

    method: Method
    pattern: Pattern
    criterion: Criterion
    schedule: Schedule
    forward: ForwardRule


def spec_problems(exc: ValidationError) -> list[str]:
    """A spec's ValidationError as one line per problem: 'schedule.beta: message'."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return lines


# ---------------------------------------------------------------------- internals
def _lookup(registry: Registry[Any], name: str) -> Any:
    try:
        return registry.get(name)
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None


def _none_or_raise(errors: list[str], value: Any) -> Any:
    if errors:
        raise ValueError("; ".join(errors))
    return value


def _plugin(value: Any, registry: Registry[Any], protocol: type) -> Any:
    if value is None or isinstance(value, protocol):
        return value
    if isinstance(value, str):
        _lookup(registry, value)
        return value
    raise ValueError(f"{registry.kind} must be a registered name ({', '.join(registry.names())}) "
                     f"or a configured instance, got {value!r}")


def _construct(cls: type, spec: SparsitySpec) -> Any:
    """A registered plug-in class with its settings: `cls.build(spec)` if it reads any from the
    spec, else `cls()`."""
    build = getattr(cls, "build", None)
    return build(spec) if callable(build) else cls()


def _label(kind: str, value: Any, name: str) -> str:
    return f"{kind} {name!r}" if isinstance(value, str) or value is None else f"{kind} {type(value).__name__}"


def _resolve(spec: SparsitySpec) -> tuple[Resolved | None, list[Problem]]:
    problems: list[Problem] = []
    method = METHODS.get(spec.method)  # the field check made sure it is registered

    def pick(field: str, value: Any, default: str, registry: Registry[Any]) -> tuple[Any, str]:
        if value is not None and not isinstance(value, str):
            return value, type(value).__name__
        name = value or default
        try:
            return _construct(registry.get(name), spec), name
        except UnknownNameError as exc:  # a method naming an unregistered plug-in
            problems.append(Problem((field,) if value else ("method",), str(exc), name))
        except (ValueError, TypeError) as exc:
            problems.append(Problem((field,), f"{registry.kind} {name!r}: {exc}", name))
        return None, name

    criterion, criterion_name = pick("criterion", spec.criterion, method.criterion, CRITERIA)
    forward, forward_name = pick("forward", spec.forward, method.forward, FORWARD_RULES)
    schedule = _schedule(spec, method, problems)

    pattern = None
    try:
        pattern = spec.as_pattern
    except ValueError as exc:
        problems.append(Problem(("target",), str(exc), spec.target))
    if pattern is not None and not pattern.is_nm:
        if method.nm_only:
            problems.append(Problem(("pattern",), f"method {spec.method!r} trains N:M patterns only, "
                                    f"got pattern {spec.pattern!r}; use e.g. '2:4'", spec.pattern))
        elif forward is not None and forward.nm_only:
            problems.append(Problem(("pattern",), f"{_label('forward rule', spec.forward, forward_name)} "
                                    f"trains N:M patterns only, got pattern {spec.pattern!r}", spec.pattern))
    if criterion is not None and forward is not None and criterion.learned != forward.trains_scores:
        crit = _label("criterion", spec.criterion, criterion_name)
        fwd = _label("forward rule", spec.forward, forward_name)
        where, value = (("forward",), forward_name) if spec.forward is not None else (("criterion",), criterion_name)
        problems.append(Problem(where, f"{crit} learns scores but {fwd} does not train them"
                                if criterion.learned else f"{fwd} trains learned scores but {crit} has none", value))
    if spec.freeze_scores_last:
        if spec.epochs is None or spec.freeze_scores_last > spec.epochs:
            problems.append(Problem(("freeze_scores_last",), f"must be at most epochs ({spec.epochs})",
                                    spec.freeze_scores_last))
        if criterion is not None and not criterion.learned:
            problems.append(Problem(("freeze_scores_last",), f"applies to learned scores; "
                                    f"{_label('criterion', spec.criterion, criterion_name)} has none",
                                    spec.freeze_scores_last))
    if criterion is not None and not criterion.learned:
        for field in ("score_warmup_steps", "score_init", "score_init_scale", "score_lr_coupled",
                      "score_normalization", "score_dtype"):
            if field in spec.model_fields_set and getattr(spec, field) != SparsitySpec.model_fields[field].default:
                problems.append(Problem((field,), f"applies to learned scores; "
                                        f"{_label('criterion', spec.criterion, criterion_name)} has none",
                                        getattr(spec, field)))
    if spec.score_warmup_steps and spec.epochs is None:
        problems.append(Problem(("score_warmup_steps",), "needs epochs (the schedule runs after the warm-up)",
                                spec.score_warmup_steps))
    if problems or criterion is None or forward is None or schedule is None or pattern is None:
        return None, problems
    return Resolved(method, pattern, criterion, schedule, forward), problems


def _schedule(spec: SparsitySpec, method: Method, problems: list[Problem]) -> Schedule | None:
    """The spec's schedule: an instance as given, or the registered class built with `epochs`
    and its settings, each setting checked by the class itself."""
    if not isinstance(spec.schedule, ScheduleSpec):
        return spec.schedule
    name = spec.schedule.name or method.schedule
    try:
        cls = SCHEDULES.get(name)
    except UnknownNameError as exc:
        problems.append(Problem(("method",), str(exc), name))
        return None
    options = spec.schedule.options
    settings = schedule_settings(cls)
    unknown = [key for key in options if key not in settings]
    for key in unknown:
        problems.append(Problem(("schedule", key), f"schedule {name!r} takes "
                                f"{settings if settings else 'no settings'}, not {key!r}", options[key]))
    if unknown:
        return None
    kwargs = {**options, **({"epochs": spec.epochs} if spec.epochs is not None else {})}
    try:
        if dataclasses.is_dataclass(cls) or issubclass(cls, BaseModel):
            schedule = cast(Schedule, TypeAdapter(cls).validate_python(kwargs))
        else:
            schedule = cast(Schedule, cls(**kwargs))
    except ValidationError as exc:
        for err in exc.errors():
            loc, message = tuple(err["loc"]), err["msg"].removeprefix("Value error, ")
            if loc[:1] == ("epochs",):
                text = (f"schedule {name!r} needs epochs (the sparse-training length)"
                        if err["type"] == "missing" else f"schedule {name!r}: epochs: {message}")
                problems.append(Problem(("epochs",), text, spec.epochs))
            else:
                problems.append(Problem(("schedule", *loc), message if loc else f"schedule {name!r}: {message}",
                                        err["input"] if loc else options))
        return None
    except (ValueError, TypeError) as exc:
        problems.append(Problem(("schedule",), f"schedule {name!r}: {exc}", options))
        return None
    return schedule
