"""The sparsifier lifecycle: attach -> (calibrate) -> start_epoch/step ... -> bake.

The model stays a normal nn.Module throughout: its parameters and state_dict keys never
change; target modules get a forward override (optg/masking.py) whose weight the method's
forward rule makes (optg/forward.py: `w * m`, OptG's straight-through `w * m`, or SR-STE).
`bake()` writes `w * m` into the weights and removes every trace. Calls out of order raise
LifecycleError. Nothing here depends on which method runs: the plug-ins say what they need
(learned scores, calibration, one-shot, masks made by the forward rule itself).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optg import masking
from optg.criteria import Criterion, LossFn
from optg.distributed import all_reduce_mean, check_masks_identical
from optg.forward import ForwardRule, LayerState
from optg.pattern import Pattern
from optg.patterns import MASK_RULES
from optg.schedules import Schedule
from optg.targets import LayerPlan

STATE_FORMAT = 1


class LifecycleError(RuntimeError):
    """A sparsifier call made in the wrong state (e.g. step before attach, bake twice)."""


@dataclass
class LayerReport:
    """One layer after planning or training: `pattern` is the layer's own (N:M, unstructured
    with its planned target, or dense), `sparsity` the fraction of zeros it holds now."""

    name: str
    type: str
    shape: tuple[int, ...]
    numel: int
    targeted: bool
    pattern: Pattern
    sparsity: float
    reason: str
    parameter: str = ""  # the weight's state-dict name
    axis: int = 1        # its reduction axis

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the pattern as its text ('2:4', 'unstructured', 'dense')."""
        return {**self.__dict__, "shape": list(self.shape), "pattern": str(self.pattern)}


MaskHook = Callable[["Sparsifier", dict[str, torch.Tensor], float], None]


@torch.no_grad()
def bound_swaps(rule: Callable[..., list[torch.Tensor]], plans: Sequence[LayerPlan],
                scores: Sequence[torch.Tensor], fraction: float, before: Sequence[torch.Tensor],
                keep: list[torch.Tensor], max_fraction: float) -> list[torch.Tensor]:
    """`keep` with at most `floor(max_fraction * kept before)` revived positions (pruned in
    `before`, kept now): each revival swaps a kept weight out, so this bounds how much one
    update may change. Ranks `scores + b * before` with the smallest bonus b (bisection) that
    honours the bound; the mask rule itself still sets the pattern and count. If even an
    infinite bonus revives more (the schedule lowered the sparsity), that mask is used."""
    allowed = math.floor(max_fraction * sum(int(b.sum()) for b in before))

    def revived(masks: Sequence[torch.Tensor]) -> int:
        return sum(int((k & ~b).sum()) for k, b in zip(masks, before))

    if revived(keep) <= allowed:
        return keep
    spread = max(float(s.max() - s.min()) for s in scores)
    low, high = 0.0, 2.0 * spread + 1.0

    def with_bonus(bonus: float) -> list[torch.Tensor]:
        return rule(plans, [s.detach() + bonus * b.to(s.dtype) for s, b in zip(scores, before)], fraction)

    best = with_bonus(high)
    for _ in range(30):
        mid = 0.5 * (low + high)
        candidate = with_bonus(mid)
        if revived(candidate) <= allowed:
            high, best = mid, candidate
        else:
            low = mid
    return best


def weighted_sparsity(rows: Sequence[LayerReport]) -> float:
    """Fraction of zeros over all weights of `rows` (each layer weighted by its size); 0.0 for
    no rows. Pass the targeted rows for the targeted sparsity, all rows for the model's."""
    total = sum(r.numel for r in rows)
    return sum(r.sparsity * r.numel for r in rows) / total if total else 0.0


class Sparsifier:
    """Trains a model sparse. Build one with `optg.create(method, model, ...)`.

    criterion: where mask scores come from; schedule: how much of the target applies when;
    forward: how the masked weight enters the forward pass (see optg.forward). Learned scores
    (a criterion with `learned`) get their own SGD with `score_momentum`, stepped at
    `lr * score_lr_factor * fraction` (`score_lr_coupled`; else without `fraction`), and not
    at all from epoch `score_freeze_epoch` on.

    From trained weights (see `SparsitySpec.start`): `score_warmup_steps` optimizer steps of
    score learning (at the decoupled lr) before anything is pruned, the schedule then running
    in the remaining `total_epochs`; `score_normalization='layer'` ranks each layer's scores
    divided by their mean |score|; `max_swap_fraction` bounds how many previously pruned
    weights one mask update may bring back (each one swaps a kept weight out) to that fraction
    of the previously kept count. Hooks added by `add_mask_hook` see every mask update.
    """

    def __init__(self, model: nn.Module, plans: list[LayerPlan], criterion: Criterion,
                 schedule: Schedule, forward: ForwardRule, *, method: str = "custom",
                 update_every_steps: int | None = None, steps_per_epoch: int | None = None,
                 seed: int = 0, score_momentum: float = 0.9, score_lr_factor: float = 1.0,
                 score_freeze_epoch: int | None = None, score_warmup_steps: int = 0,
                 score_lr_coupled: bool = True, total_epochs: int | None = None,
                 score_normalization: str = "none", max_swap_fraction: float | None = None) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if update_every_steps is not None and (update_every_steps < 1 or not steps_per_epoch):
            raise ValueError("update_every_steps needs a value >= 1 and steps_per_epoch")
        if forward.nm_only and any(p.kind not in ("nm", "dense") for p in plans):
            raise ValueError(f"forward rule {type(forward).__name__} trains N:M patterns only; "
                             "some targets are unstructured")
        if forward.trains_scores != criterion.learned:
            raise ValueError(f"forward rule {type(forward).__name__} and criterion "
                             f"{type(criterion).__name__} do not pair: learned scores need a "
                             "forward rule that trains them, and only they")
        if score_warmup_steps and (not steps_per_epoch or not total_epochs
                                   or score_warmup_steps >= steps_per_epoch * (total_epochs - 1)):
            raise ValueError("score_warmup_steps needs steps_per_epoch and total_epochs, and must end "
                             f"before the last epoch starts ({steps_per_epoch} x {total_epochs} steps)")
        if score_normalization not in ("none", "layer"):
            raise ValueError(f"score_normalization must be 'none' or 'layer', got {score_normalization!r}")
        if max_swap_fraction is not None and not 0 <= max_swap_fraction <= 1:
            raise ValueError(f"max_swap_fraction must be in [0, 1], got {max_swap_fraction}")
        self.score_warmup_steps, self.score_lr_coupled = score_warmup_steps, score_lr_coupled
        self.total_epochs, self.score_normalization = total_epochs, score_normalization
        self.max_swap_fraction = max_swap_fraction
        self.mask_hooks: list[MaskHook] = []
        self.spec: Any = None  # the SparsitySpec it was built from (set by optg.create)
        self.model, self.plans, self.criterion, self.schedule = model, plans, criterion, schedule
        self.forward = forward
        self.method, self.seed = method, seed
        self.update_every_steps, self.steps_per_epoch = update_every_steps, steps_per_epoch
        self.score_momentum, self.score_lr_factor = score_momentum, score_lr_factor
        self.score_freeze_epoch = score_freeze_epoch
        self.state = "created"
        self.layers: list[LayerState] = []
        self.score_optimizer: torch.optim.Optimizer | None = None
        self.epoch, self.step_in_epoch, self.global_step = -1, 0, 0
        self.fraction = 0.0
        self.calibrated = not criterion.needs_calibration

    # ---------------------------------------------------------------- lifecycle checks
    def _require(self, *states: str, action: str) -> None:
        if self.state not in states:
            hint = {"created": "call attach() first",
                    "attached": "it is already attached",
                    "baked": "the model is already baked; create a new sparsifier"}
            raise LifecycleError(f"cannot {action}: sparsifier is {self.state!r} "
                                 f"({hint[self.state]})")

    # ---------------------------------------------------------------- attach
    def attach(self) -> Sparsifier:
        """Install masked forwards on the target layers. Move the model to its device first."""
        self._require("created", action="attach")
        modules = dict(self.model.named_modules())
        targets = [p for p in self.plans if p.kind != "dense"]
        weights: dict[str, torch.Tensor] = {p.name: self.model.get_parameter(p.parameter) for p in targets}
        self.criterion.setup(weights, seed=self.seed)
        owned: dict[str, dict[str, LayerState]] = {}  # owner module -> its weights' layers
        for plan in targets:
            scores = self.criterion.scores(plan.name, weights[plan.name]) if self.criterion.learned else None
            layer = LayerState(plan, modules[plan.owner or ""], self.forward, scores)
            owned.setdefault(plan.owner or "", {})[plan.path] = layer
            self.layers.append(layer)
        for owner, layers in owned.items():
            masking.install(modules[owner], layers)
        bind = getattr(self.criterion, "bind", None)  # data-aware criteria hook each target's input
        if callable(bind):
            bind({l.plan.name: l.plan for l in self.layers}, {l.plan.name: l.module for l in self.layers})
        if self.criterion.learned:
            self.score_optimizer = torch.optim.SGD([l.scores for l in self.layers if l.scores is not None],
                                                   lr=0.0, momentum=self.score_momentum, weight_decay=0.0)
        self.state = "attached"
        if self.schedule.one_shot and self.calibrated:
            self._update_masks(0.0)  # one-shot methods fix the mask now and hold it
        return self

    def calibrate(self, batches: Iterable[Any], loss_fn: LossFn) -> int:
        """Data-driven one-shot criteria (SNIP): score on `batches` and fix the mask;
        `loss_fn(model, batch)` is the loss on one batch (`optg.supervised(F.cross_entropy)`
        for `(x, y)` batches)."""
        self._require("attached", action="calibrate")
        if not self.criterion.needs_calibration:
            raise LifecycleError(f"method {self.method!r} needs no calibration")
        if self.calibrated:
            raise LifecycleError("already calibrated: the mask is fixed")
        weights = {l.plan.name: l.weight for l in self.layers}
        calibrate = getattr(self.criterion, "calibrate", None)
        if calibrate is None:
            raise LifecycleError(f"criterion {type(self.criterion).__name__} needs calibration "
                                 "but has no calibrate(model, weights, batches, loss_fn)")
        count: int = calibrate(self.model, weights, batches, loss_fn)
        self.calibrated = True
        self._update_masks(0.0)
        return count

    # ---------------------------------------------------------------- training hooks
    def start_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (0-based): recomputes masks when the method does."""
        self._require("attached", action="start an epoch")
        self._require_calibrated()
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.step_in_epoch = epoch, 0
        if not self.schedule.one_shot:
            self._update_masks(float(epoch))

    def step(self, lr: float | None = None) -> None:
        """Call after every optimizer.step(). `lr`: the weights' current learning rate (OptG
        scores learn at `lr * score_lr_factor * p(e) / p_target`)."""
        self._require("attached", action="step")
        self._require_calibrated()
        if self.epoch < 0:
            raise LifecycleError("call start_epoch(epoch) before step()")
        if self.score_optimizer is not None:
            if lr is None:
                raise ValueError(f"method {self.method!r} learns scores: pass step(lr=current weight lr)")
            grads = [l.scores.grad for l in self.layers if l.scores is not None and l.scores.grad is not None]
            all_reduce_mean(grads)  # every rank applies the same score update
            frozen = self.score_freeze_epoch is not None and self.epoch >= self.score_freeze_epoch
            factor = 0.0 if frozen else self.score_lr_factor
            coupled = self.score_lr_coupled and not self.in_warmup
            for group in self.score_optimizer.param_groups:
                group["lr"] = lr * factor * (self.fraction if coupled else 1.0)
            self.score_optimizer.step()
            self.score_optimizer.zero_grad(set_to_none=True)
        self.step_in_epoch += 1
        self.global_step += 1
        if (self.update_every_steps and self.steps_per_epoch
                and self.global_step % self.update_every_steps == 0
                and self.step_in_epoch < self.steps_per_epoch  # else start_epoch does it next
                and not self.schedule.one_shot):
            self._update_masks(self.epoch + self.step_in_epoch / self.steps_per_epoch)

    @property
    def in_warmup(self) -> bool:
        """True while the score warm-up runs (nothing is pruned yet)."""
        return self.global_step < self.score_warmup_steps

    def schedule_progress(self, progress: float) -> float:
        """The schedule's clock at `progress` epochs: with a warm-up of w epochs it starts at w
        and is stretched so that the last epoch's start maps to itself (E - 1): the schedule's
        fraction there, 1.0 for every schedule, still holds for the final epoch."""
        if not self.score_warmup_steps:
            return progress
        assert self.steps_per_epoch and self.total_epochs
        w = self.score_warmup_steps / self.steps_per_epoch
        last = self.total_epochs - 1
        return max(0.0, progress - w) * last / (last - w)

    def add_mask_hook(self, hook: MaskHook) -> None:
        """`hook(sparsifier, masks_before, progress)` runs after every mask update (the new masks
        are in force); `masks_before`: the keep-masks by layer name before it."""
        self.mask_hooks.append(hook)

    def _require_calibrated(self) -> None:
        if not self.calibrated:
            raise LifecycleError(f"method {self.method!r} needs calibrate(batches, loss_fn) first")

    @torch.no_grad()
    def _update_masks(self, progress: float) -> None:
        """Masks at `progress` (epochs): criterion scores ranked by each layer kind's mask rule;
        in a distributed run the ranks then compare mask digests (MaskDivergence if they
        differ). Nothing to do for a forward rule that makes its masks itself (`scheduled` False)."""
        if not self.forward.scheduled:
            return
        self.fraction = 0.0 if self.in_warmup else self.schedule.fraction(self.schedule_progress(progress))
        before = {l.plan.name: l.mask.clone() for l in self.layers} if self.mask_hooks else {}
        by_kind: dict[str, list[LayerState]] = {}
        for layer in self.layers:
            by_kind.setdefault(layer.plan.kind, []).append(layer)
        for kind, layers in by_kind.items():
            ranking = getattr(self.criterion, "ranking", self.criterion.scores)
            scores = [self._ranked(ranking(l.plan.name, l.weight)) for l in layers]
            rule = MASK_RULES.get(kind)
            plans = [l.plan for l in layers]
            keep = rule(plans, scores, self.fraction)
            if self.max_swap_fraction is not None:
                keep = bound_swaps(rule, plans, scores, self.fraction, [l.mask.bool() for l in layers],
                                   keep, self.max_swap_fraction)
            for layer, k in zip(layers, keep):
                layer.mask.copy_(k)
        check_masks_identical([l.plan.name for l in self.layers], [l.mask for l in self.layers])
        for hook in self.mask_hooks:
            hook(self, before, progress)

    def _ranked(self, scores: torch.Tensor) -> torch.Tensor:
        """What masks rank: the scores, or (`layer` normalisation) scores / mean |score|."""
        if self.score_normalization == "none":
            return scores
        scores = scores.detach()
        return scores / scores.abs().mean().clamp_min(torch.finfo(scores.dtype).tiny)

    # ---------------------------------------------------------------- bake
    @torch.no_grad()
    def bake(self) -> nn.Module:
        """Write `w * m` into every target weight and remove overrides, scores and masks."""
        self._require("attached", action="bake")
        for layer in self.layers:
            layer.weight.mul_(layer.keep_mask().to(layer.weight.device))
        for layer in self.layers:
            masking.uninstall(layer.module)
            layer.scores = None
        self.score_optimizer = None
        self.state = "baked"
        return self.model

    # ---------------------------------------------------------------- state
    def masks(self) -> dict[str, torch.Tensor]:
        """Current boolean keep-masks by layer name (SR-STE: from the current weights)."""
        self._require("attached", action="read masks")
        return {l.plan.name: l.keep_mask().bool() for l in self.layers}

    def state_dict(self) -> dict[str, Any]:
        """Masks, scores, schedule position and score-optimiser state: tensors, numbers,
        strings, lists and dicts only, so `torch.load(..., weights_only=True)` reads it."""
        self._require("attached", action="save state")
        return {
            "format": STATE_FORMAT, "method": self.method, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "fraction": self.fraction, "calibrated": self.calibrated,
            "masks": {l.plan.name: l.mask.to("cpu", copy=True) for l in self.layers},
            "scores": {l.plan.name: l.scores.detach().cpu() for l in self.layers if l.scores is not None},
            "score_optimizer": self.score_optimizer.state_dict() if self.score_optimizer else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks, scores, schedule position and score-optimiser state in place."""
        self._require("attached", action="load state")
        if state.get("format") != STATE_FORMAT or state.get("method") != self.method:
            raise ValueError(f"sparsifier state is for method {state.get('method')!r} "
                             f"(format {state.get('format')}), this is {self.method!r}")
        names = [l.plan.name for l in self.layers]
        if sorted(state["masks"]) != sorted(names):
            missing = sorted(set(names) - set(state["masks"]))
            extra = sorted(set(state["masks"]) - set(names))
            raise ValueError(f"sparsifier state does not match the model: missing {missing}, unexpected {extra}")
        for layer in self.layers:
            mask = state["masks"][layer.plan.name]
            if mask.shape != layer.mask.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape "
                                 f"{tuple(layer.mask.shape)} for {layer.plan.name}")
            layer.mask.copy_(mask)
            if layer.scores is not None:
                layer.scores.copy_(state["scores"][layer.plan.name])
        if self.score_optimizer is not None and state["score_optimizer"] is not None:
            self.score_optimizer.load_state_dict(state["score_optimizer"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.fraction = state["global_step"], state["fraction"]
        self.calibrated = state["calibrated"]

    # ---------------------------------------------------------------- reporting
    @torch.no_grad()
    def report(self) -> list[LayerReport]:
        """Per layer: shape, whether targeted, pattern, achieved sparsity, reason if dense."""
        modules = dict(self.model.named_modules())
        live = {l.plan.name: l for l in self.layers} if self.state == "attached" else {}
        masks = self.masks() if live else {}
        rows = []
        for plan in self.plans:
            w = self.model.get_parameter(plan.parameter)
            zeros = (~masks[plan.name]).sum() if plan.name in masks else (w == 0).sum()
            kind = type(modules[plan.owner]).__name__ if plan.owner in modules else plan.type_name
            rows.append(LayerReport(plan.name, kind, tuple(w.shape), w.numel(), plan.kind != "dense", plan.pattern,
                                    float(zeros) / w.numel(), plan.reason, plan.parameter, plan.axis))
        return rows

    def sparsity(self) -> float:
        """Fraction of zeros over all targeted weights."""
        return weighted_sparsity([r for r in self.report() if r.targeted])
