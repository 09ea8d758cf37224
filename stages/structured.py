"""The structured-pruning stage: remove whole channels with Torch-Pruning, record the plan.

Torch-Pruning's dependency graph couples every layer that shares a channel (residual adds,
depthwise convs, BatchNorm, Flatten->Linear) and removes a group's channels from all of them;
its importances (group magnitude, Taylor) score the groups. This module adds what it lacks: the
config, the OptG importance (stages/structured_importance.py), the channel selection (the rule
of Torch-Pruning's `BasePruner`, except that no group is ever emptied, see `select_channels`),
MACs/params targets, iterative steps with a caller-supplied fine-tune between them,
checkpoint/resume, and a JSON plan that rebuilds the slimmed architecture on a freshly built
dense model (stages/structured_plan.py).

Entry point (what a runner calls):

    result = prune_channels(model, cfg, example_input, batches=source, finetune=ft,
                            checkpoint=save, resume=progress_or_None, seed=seed)

Loading a slimmed model without re-running pruning (`structured_plan.json` is `result.plan`;
the plan helpers live in stages/structured_plan.py and are re-exported here):

    model = build_model(...)                     # the dense architecture, same config
    apply_plan(model, json.loads(Path("structured_plan.json").read_text()))
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"), strict=True)

The plan is plain JSON (module types, structural attributes, tensor shapes); nothing in it can
run code, unlike `torch_pruning.state_dict`, which pickles whole module `__dict__`s.

Each step: (1) score every group of the current model with the chosen importance; (2) resolve
this step's ratio (a channel fraction, or searched on deep copies for a MACs/params target);
(3) select channels (kept counts rounded down to multiples of `round_to`, at least `round_to`
kept per group) and prune them through the dependency graph;
(4) `checkpoint`, fine-tune, `checkpoint`. Steps reach the target linearly: after step i of n,
i/n of the ratio (or of the MACs/params reduction) is removed.
"""
from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import Field, model_validator
from torch import nn

from stages.base import StageConfigError, StageError, StrictModel
from stages.context import RunConfig, RunContext, Stage
from stages.data import DataBundle
from stages.io import atomic_torch_save, atomic_write_json
from stages.structured_groups import (
    CLASSIFIER,
    STEM,
    dependency_groups,
    detect_stem_and_classifier,
    measure,
    module_names,
    prunable_channels,
    prune_once,
    resolve_ignored,
    select_channels,
)
from stages.structured_importance import (
    IMPORTANCES,
    NEEDS_DATA,
    BatchSource,
    LossFn,
    MaskTarget,
    ScoreContext,
    cycle,
    default_loss,
)
from stages.structured_plan import (
    PLAN_FORMAT,
    apply_plan,
    channel_table,
    structure_plan,
)
from stages.train import StepHook, TrainConfig, Trainer, load_checkpoint

__all__ = [  # the stage's public API (plan helpers re-exported from stages.structured_plan)
    "PLAN_FORMAT", "FineTune", "ReductionTarget", "StepRecord", "StructuredConfig", "StructuredProgress",
    "StructuredResult", "apply_plan", "batch_source", "channel_table", "detect_stem_and_classifier",
    "prune_channels", "prune_once", "render_structured_markdown", "resolve_ignored", "select_channels",
    "structure_plan", "trainer_finetune",
]

_SEARCH_ITERS = 14
_MAX_RATIO = 0.98


# --------------------------------------------------------------------------- config

class ReductionTarget(StrictModel):
    """A reduction to reach instead of a channel ratio: exactly one of `macs` or `params`,
    the fraction removed (0.5 = half the MACs of the dense model)."""

    macs: float | None = None
    """fraction of the dense model's MACs removed"""
    params: float | None = None
    """fraction of the dense model's parameters removed"""

    @model_validator(mode="after")
    def _exactly_one(self) -> ReductionTarget:
        given = {k: v for k, v in (("macs", self.macs), ("params", self.params)) if v is not None}
        errors = [f"target.{k} must be in (0, 1), got {v}" for k, v in given.items() if not 0 < v < 1]
        if len(given) != 1:
            errors.append(f"target needs exactly one of macs, params; got {sorted(given) or 'none'}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def metric(self) -> Literal["macs", "params"]:
        return "macs" if self.macs is not None else "params"

    @property
    def value(self) -> float:
        return float(self.macs if self.macs is not None else self.params)  # type: ignore[arg-type]


class StructuredConfig(StrictModel):
    """Channel pruning settings (the `structured:` section).

    ratio: fraction of prunable channels removed (global: of all of them; layerwise: of each
        group), or `target: {macs: f}` / `{params: f}`: the fraction of MACs/params removed.
        Exactly one of the two.
    importance: magnitude | taylor | optg (see stages/structured_importance.py).
    optg_steps / optg_lr / optg_train_weights: OptG score learning per pruning step (batches,
        learning rate of weights and scores, whether weights train alongside).
    taylor_batches: batches whose gradients the taylor importance sums.
    iterative_steps: prune in this many equal steps; `finetune_epochs` of fine-tuning follow
        every step (0: none).
    allocation: global (one ranking over all groups) or layerwise (each group loses `ratio`).
    ignore: module-name regexes (re.search) whose output channels are never pruned, plus the
        tokens `@stem` (the first Conv executed) and `@classifier` (the last Conv/Linear
        executed). Default both; an explicit list replaces the default.
    round_to: kept channel counts are multiples of this (8 by default: tensor-core friendly and
        2:4-ready, C % 4 == 0; use 16 for apex/ASP-style 2:4 eligibility); null: no rounding.
        Every group keeps at least `round_to` channels.
    """

    ratio: float | None = None
    target: ReductionTarget | None = None
    importance: str = "magnitude"
    optg_steps: int = Field(100, ge=1)
    optg_lr: float = Field(0.01, gt=0)
    optg_train_weights: bool = True
    taylor_batches: int = Field(8, ge=1)
    iterative_steps: int = Field(1, ge=1)
    finetune_epochs: int = Field(0, ge=0)
    """fine-tuning epochs after every pruning step, with `train`'s optimiser (else `sparsity.train`'s)"""
    allocation: Literal["global", "layerwise"] = "global"
    ignore: list[str] = Field(default_factory=lambda: [STEM, CLASSIFIER])
    round_to: int | None = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> StructuredConfig:
        errors: list[str] = []
        if (self.ratio is None) == (self.target is None):
            errors.append("give exactly one of ratio (fraction of channels removed) or target "
                          "({macs: f} or {params: f})")
        if self.ratio is not None and not 0 < self.ratio < 1:
            errors.append(f"ratio must be in (0, 1), got {self.ratio}")
        if self.importance not in IMPORTANCES:
            errors.append(f"importance: unknown importance {self.importance!r}; "
                          f"valid: {', '.join(IMPORTANCES.names())}")
        for rx in self.ignore:
            if rx.startswith("@"):
                if rx not in (STEM, CLASSIFIER):
                    errors.append(f"ignore: unknown token {rx!r}; valid: {STEM}, {CLASSIFIER}")
                continue
            try:
                re.compile(rx)
            except re.error as exc:
                errors.append(f"ignore: bad regex {rx!r}: {exc}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def needs_data(self) -> bool:
        return self.importance in NEEDS_DATA


# --------------------------------------------------------------------------- progress / result

class StepRecord(StrictModel):
    step: int
    ratio: float
    channels: int
    macs: int
    params: int
    seconds: float


class StructuredProgress(StrictModel):
    """JSON-able state after a pruning step: enough to resume without re-pruning.

    `pruned` steps are done; `finetuned` of them are fine-tuned (`pruned - 1` while a
    fine-tune is under way). `plan` is the architecture after the last pruned step."""

    pruned: int = 0
    finetuned: int = 0
    initial_channels: int
    macs_before: int
    params_before: int
    channels_before: dict[str, dict[str, int]]
    plan: dict[str, Any]
    steps: list[StepRecord] = Field(default_factory=list)


class FineTune(Protocol):
    def __call__(self, model: nn.Module, step: int, epochs: int) -> None: ...


Checkpoint = Callable[[nn.Module, StructuredProgress], None]


@dataclass
class StructuredResult:
    model: nn.Module
    plan: dict[str, Any]
    channels_before: dict[str, dict[str, int]]
    channels_after: dict[str, dict[str, int]]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: list[StepRecord] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The manifest section (`structured`); the plan goes to its own JSON file."""
        return {
            "params": {"before": self.params_before, "after": self.params_after,
                       "reduction": 1 - self.params_after / self.params_before},
            "macs": {"before": self.macs_before, "after": self.macs_after,
                     "reduction": 1 - self.macs_after / self.macs_before if self.macs_before else 0.0},
            "ignored": self.ignored,
            "channels": {name: {"before": before, "after": self.channels_after.get(name, before)}
                         for name, before in self.channels_before.items()},
            "steps": [s.model_dump() for s in self.steps],
        }


# --------------------------------------------------------------------------- data and training hooks

def batch_source(bundle: DataBundle, batch_size: int, seed: int) -> BatchSource:
    """Training batches for pruning step `step`, shuffled by (seed, step) only: a resumed run
    sees the same batches."""
    return lambda step: bundle.loader("train", batch_size, shuffle=True, seed=seed * 100_019 + step)


def trainer_finetune(bundle: DataBundle, train: TrainConfig, *, device: torch.device, seed: int,
                     batch_size: int, log: Callable[[str], None] = print,
                     on_epoch_end: Callable[[Trainer, int], None] | None = None,
                     load_state: Callable[[int], dict[str, Any] | None] | None = None,
                     on_step: StepHook | None = None) -> FineTune:
    """A `FineTune` that runs `stages.train.Trainer` for `epochs` with `train`'s optimiser
    settings, as phase "structured-<step>" (its own seed stream). A fresh Trainer per step:
    pruning replaced the parameters the previous optimiser held. `on_epoch_end(trainer, step)` can
    checkpoint `trainer.state_dict()`; `load_state(step)` returns such a state (or None) to
    resume an interrupted fine-tune; `on_step` is the Trainer's per-step hook. The callbacks get
    the step as a value (never parsed back out of the phase name)."""

    def finetune(model: nn.Module, step: int, epochs: int) -> None:
        cfg = TrainConfig(**{**train.model_dump(), "epochs": epochs,
                             "warmup_epochs": min(train.warmup_epochs, epochs - 1)})
        trainer = Trainer(model, bundle, cfg, phase=f"structured-{step}", device=device,
                          seed=seed + step, batch_size=batch_size, log=log, on_step=on_step)
        state = load_state(step) if load_state is not None else None
        if state is not None:
            trainer.load_state_dict(state)
        if on_epoch_end is None:
            trainer.run()
        else:
            callback = on_epoch_end
            trainer.run(lambda t: callback(t, step))

    return finetune


# --------------------------------------------------------------------------- entry point

def prune_channels(model: nn.Module, cfg: StructuredConfig, example_input: torch.Tensor, *,
                   batches: BatchSource | None = None, loss_fn: LossFn = default_loss,
                   finetune: FineTune | None = None, checkpoint: Checkpoint | None = None,
                   resume: StructuredProgress | None = None, seed: int = 0,
                   log: Callable[[str], None] = print) -> StructuredResult:
    """Prune `model` in place by `cfg` and return the result (the model is `result.model`).

    example_input: a batch on the model's device (Torch-Pruning traces the graph with it).
    batches: `source(step)` -> (x, y) training batches; needed by taylor and optg.
    finetune: `finetune(model, step, epochs)` trains the slimmed model after each step when
        `cfg.finetune_epochs > 0` (build the optimiser inside: pruning replaces parameters).
    checkpoint: `checkpoint(model, progress)` after each step's pruning and after its fine-tune;
        save the weights and `progress.model_dump()` (JSON) to resume.
    resume: the last saved progress; `model` must already have its plan applied
        (`apply_plan`) and the saved weights loaded. Finished steps are not redone.
    """
    if cfg.needs_data and batches is None:
        raise StageError(f"structured.importance {cfg.importance!r} needs training batches")
    if cfg.finetune_epochs > 0 and finetune is None:
        raise StageError("structured.finetune_epochs > 0 but no fine-tune callable was given")
    stem, classifier = detect_stem_and_classifier(model, example_input)
    ignored = resolve_ignored(model, cfg.ignore, stem, classifier)
    if resume is None:
        macs0, params0 = measure(model, example_input)
        progress = StructuredProgress(
            initial_channels=prunable_channels(dependency_groups(model, example_input, ignored)),
            macs_before=macs0, params_before=params0, channels_before=channel_table(model),
            plan=structure_plan(model))
    else:
        progress = resume.model_copy(deep=True)
        if structure_plan(model) != progress.plan:
            raise StageError("resume: the model's architecture differs from the saved plan; "
                             "apply_plan(model, progress.plan) and load the saved weights first")
    if progress.initial_channels == 0:
        raise StageConfigError(f"nothing to prune: every channel group is ignored ({', '.join(ignored)})",
                               field="ignore")
    steps = cfg.iterative_steps
    if progress.finetuned < progress.pruned:  # interrupted during a fine-tune: finish it
        _finetune(model, cfg, finetune, checkpoint, progress, progress.pruned, log)
    for step in range(progress.pruned + 1, steps + 1):
        started = time.perf_counter()
        torch.manual_seed(seed * 1_000 + step)
        groups = dependency_groups(model, example_input, ignored)
        current = prunable_channels(groups)
        want, had = _channel_goal(cfg, step / steps), _channel_goal(cfg, (step - 1) / steps)
        step_ratio = _step_ratio(cfg, want, had, progress.initial_channels, current)
        mask = MaskTarget(total=max(0, current - round(progress.initial_channels * (1 - want)))
                          if cfg.allocation == "global" else None,
                          fraction=step_ratio, min_keep=cfg.round_to or 1)
        ctx = ScoreContext(
            model=model, groups=groups, names=module_names(model),
            batches=cycle(batches, step) if cfg.needs_data and batches is not None else None,
            loss_fn=loss_fn, mask=mask, optg_steps=cfg.optg_steps, optg_lr=cfg.optg_lr,
            optg_train_weights=cfg.optg_train_weights, taylor_batches=cfg.taylor_batches)
        scores = IMPORTANCES.get(cfg.importance)(ctx)
        if cfg.target is None:
            ratio = step_ratio
        else:
            goal = (progress.macs_before if cfg.target.metric == "macs" else progress.params_before)
            ratio = _search_ratio(model, example_input, scores, cfg, ignored,
                                  metric=cfg.target.metric, limit=goal * (1 - cfg.target.value * step / steps))
        prune_once(model, example_input, scores, ratio, cfg, ignored)
        macs, params = measure(model, example_input)
        channels = prunable_channels(dependency_groups(model, example_input, ignored))
        record = StepRecord(step=step, ratio=ratio, channels=channels, macs=macs, params=params,
                            seconds=time.perf_counter() - started)
        progress.steps.append(record)
        progress.pruned, progress.plan = step, structure_plan(model)
        log(f"[structured] step {step}/{steps}: {current} -> {channels} channels, MACs "
            f"{progress.macs_before} -> {macs}, params {progress.params_before} -> {params}")
        if checkpoint is not None:
            checkpoint(model, progress)
        _finetune(model, cfg, finetune, checkpoint, progress, step, log)
    macs, params = measure(model, example_input)
    return StructuredResult(
        model=model, plan=progress.plan, channels_before=progress.channels_before,
        channels_after=channel_table(model), macs_before=progress.macs_before, macs_after=macs,
        params_before=progress.params_before, params_after=params, steps=list(progress.steps),
        ignored=ignored)


def _finetune(model: nn.Module, cfg: StructuredConfig, finetune: FineTune | None,
              checkpoint: Checkpoint | None, progress: StructuredProgress, step: int,
              log: Callable[[str], None]) -> None:
    if cfg.finetune_epochs > 0 and finetune is not None:
        log(f"[structured] fine-tuning after step {step} for {cfg.finetune_epochs} epoch(s)")
        finetune(model, step, cfg.finetune_epochs)
    progress.finetuned = step
    if checkpoint is not None and cfg.finetune_epochs > 0:
        checkpoint(model, progress)


def _channel_goal(cfg: StructuredConfig, done: float) -> float:
    """Cumulative fraction of the initial channels removed once `done` of the steps ran
    (for a MACs/params target, an estimate used only to size OptG's mask: MACs and params
    shrink about quadratically with width)."""
    if cfg.ratio is not None:
        return cfg.ratio * done
    assert cfg.target is not None
    return 1.0 - (1.0 - cfg.target.value * done) ** 0.5


def _step_ratio(cfg: StructuredConfig, want: float, had: float, initial: int, current: int) -> float:
    """This step's ratio of the current channels so that `want` of the initial ones are gone
    (global: from the actual totals, which absorbs rounding; layerwise: per group, from the
    schedule, `had` being gone before this step)."""
    if cfg.allocation == "global":
        ratio = 1.0 - initial * (1.0 - want) / max(current, 1)
    else:
        ratio = 1.0 - (1.0 - want) / (1.0 - had)
    return min(max(ratio, 0.0), _MAX_RATIO)


def _search_ratio(model: nn.Module, example_input: torch.Tensor, scores: dict[str, torch.Tensor],
                  cfg: StructuredConfig, ignored: list[str], *, metric: str, limit: float) -> float:
    """Smallest step ratio whose pruned copy has `metric` <= `limit` (bisection on copies)."""
    index = 0 if metric == "macs" else 1

    def value(ratio: float) -> int:
        trial = copy.deepcopy(model)
        prune_once(trial, example_input, scores, ratio, cfg, ignored)
        return measure(trial, example_input)[index]

    if measure(model, example_input)[index] <= limit:
        return 0.0
    best = value(_MAX_RATIO)
    if best > limit:
        raise StageError(f"structured.target.{metric}: cannot reach {limit:.0f} {metric}; pruning "
                         f"{_MAX_RATIO:.0%} of the prunable channels leaves {best} (ignored: "
                         f"{', '.join(ignored) or 'none'})")
    lo, hi = 0.0, _MAX_RATIO
    for _ in range(_SEARCH_ITERS):
        mid = (lo + hi) / 2
        if value(mid) <= limit:
            hi = mid
        else:
            lo = mid
    return hi


def render_structured_markdown(section: dict[str, Any]) -> str:
    """The report.md section for the manifest's `structured` entry (`StructuredResult.to_dict`):
    params and MACs before/after, then channels per Conv/Linear layer."""
    params, macs = section["params"], section["macs"]
    lines = ["## Structured pruning (channels removed)", "",
             "| | before | after | reduction |", "|---|---|---|---|",
             f"| parameters | {params['before']} | {params['after']} | {params['reduction']:.1%} |",
             f"| MACs per sample | {macs['before']} | {macs['after']} | {macs['reduction']:.1%} |", ""]
    if section.get("ignored"):
        lines += ["Output channels kept whole (ignored): " + ", ".join(f"`{n}`" for n in section["ignored"]), ""]
    lines += ["| layer | in (before -> after) | out (before -> after) |", "|---|---|---|"]
    for name, c in section["channels"].items():
        b, a = c["before"], c["after"]
        lines.append(f"| {name} | {b['in']} -> {a['in']} | {b['out']} -> {a['out']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the pipeline row


STRUCTURED_CHECKPOINT = "structured.pt"  # {"model": state dict, "progress": StructuredProgress JSON}


STRUCTURED_FINETUNE = "structured-finetune.pt"  # {"step": n, "trainer": Trainer.state_dict()}


def _restore_structured_checkpoint(ctx: RunContext) -> StructuredProgress | None:
    """Reshape the freshly built dense model to the saved plan and load the saved weights;
    the saved progress, or None when no structured step has been checkpointed yet."""
    path = ctx.run.checkpoints / STRUCTURED_CHECKPOINT
    if not path.exists():
        return None
    state = load_checkpoint(path, ctx.device)
    progress = StructuredProgress.model_validate_json(state["progress"])
    apply_plan(ctx.model, progress.plan)
    ctx.model.load_state_dict(state["model"], strict=True)
    return progress


def _structured_train_config(cfg: RunConfig) -> TrainConfig:
    """The fine-tune's optimiser settings: the dense phase's (`train`), else `sparsity.train`'s
    (the config check makes sure one exists when the fine-tune has epochs)."""
    base = cfg.train if cfg.train is not None else cfg.sparsity.train
    if base is None:  # no fine-tune epochs: the settings are never used
        return TrainConfig(epochs=1)
    return base


def run_structured(ctx: RunContext) -> None:
    """Remove channels (stages/structured.py), checkpointing after each step's pruning and each
    fine-tune epoch; a resumed run rebuilds the slimmed model from the saved plan and goes on."""
    cfg, data, seed = ctx.cfg.structured, ctx.cfg.data, ctx.cfg.seed
    assert cfg is not None  # enabled only with a structured section
    checkpoint, finetune_path = ctx.run.checkpoints / STRUCTURED_CHECKPOINT, ctx.run.checkpoints / STRUCTURED_FINETUNE
    resume = _restore_structured_checkpoint(ctx)
    if resume is not None:
        ctx.log(f"[structured] resuming after step {resume.pruned} (fine-tuned: {resume.finetuned})")

    def save(model: nn.Module, progress: StructuredProgress) -> None:
        atomic_torch_save({"model": model.state_dict(), "progress": progress.model_dump_json()}, checkpoint)

    def save_finetune(trainer: Trainer, step: int) -> None:
        atomic_torch_save({"step": step, "trainer": trainer.state_dict()}, finetune_path)
        manifest = ctx.run.manifest
        manifest.history = [h for h in manifest.history if h.phase != trainer.phase] + list(trainer.history)

    def load_finetune(step: int) -> dict | None:
        if not finetune_path.exists():
            return None
        state = load_checkpoint(finetune_path, ctx.device)
        return state["trainer"] if state.get("step") == step else None

    finetune = trainer_finetune(
        ctx.bundle, _structured_train_config(ctx.cfg), device=ctx.device, seed=seed, batch_size=data.batch_size,
        log=ctx.log, on_epoch_end=save_finetune, load_state=load_finetune, on_step=ctx.on_step)
    example = ctx.bundle.tensors("train", limit=2)[0].to(ctx.device)
    result = prune_channels(
        ctx.model, cfg, example, batches=batch_source(ctx.bundle, data.batch_size, seed),
        finetune=finetune, checkpoint=save, resume=resume, seed=seed, log=ctx.log)
    ctx.run.manifest.structured = result.to_dict()
    ctx.run.add_artifact("structured_plan.json", atomic_write_json(ctx.run.path / "structured_plan.json", result.plan))
    macs = result.to_dict()["macs"]
    ctx.log(f"[structured] MACs {macs['before']} -> {macs['after']} (-{macs['reduction']:.1%}), "
            f"params {result.params_before} -> {result.params_after}")


def restore_structured(ctx: RunContext) -> None:
    """The slimmed architecture (and its pruned, fine-tuned weights) on a resumed run; later
    restores (sparse checkpoint, baked weights) then load into the right shapes."""
    if _restore_structured_checkpoint(ctx) is None:
        raise StageError(f"structured is recorded done but {ctx.run.checkpoints / STRUCTURED_CHECKPOINT} is "
                         "missing; rerun with --force")


ROW = Stage("structured", run_structured, enabled=lambda c: c.structured is not None, restore=restore_structured,
            state="architecture", section="structured", inputs=("structured",))
