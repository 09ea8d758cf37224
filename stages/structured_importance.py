"""Channel importance for structured pruning, on Torch-Pruning's dependency groups.

A Torch-Pruning group couples every slice that must go together when one channel goes: the
producer's output rows, BatchNorm entries, the consumers' input columns, residual adds and
depthwise convolutions. An importance maps a group to one score per channel of its root;
lower scores are removed first. Three are registered (`IMPORTANCES`):

- `magnitude`: Torch-Pruning's `GroupMagnitudeImportance(p=2)`: the group L2 norm, mean over
  the group's layers, normalised by its mean (Torch-Pruning's defaults);
- `taylor`: Torch-Pruning's `GroupTaylorImportance`: |w * dL/dw| on gradients accumulated over
  `taylor_batches` batches (model in eval mode, so BatchNorm statistics are not touched);
- `optg`: OptG's learned scores (`OptGImportance`, written here: Torch-Pruning has no learned
  importance). `learn_optg_scores` trains a score per weight of every Conv/Linear exactly as
  OptG's supermask training does (docs/library.md, "OptG as implemented"): zero-initialised, updated by
  SGD (momentum 0.9, no weight decay, learning rate `lr * p(t)`), with the straight-through
  gradient `dL/ds = dL/d(w*m) * w` at every position, masked ones included, while the weights
  train with `dL/dw = dL/d(w*m) * m`. The mask is structured: a channel is masked by zeroing its
  input columns in every consuming Conv/Linear (exactly what removing it does to the network's
  output); the channels masked are those with the lowest group score, ramped by OptG's sigmoid
  schedule (`optg.SigmoidSchedule`, training steps as its time unit) up to the fraction this
  pruning step removes. A channel's importance is the sum of the scores of every weight in its
  group slices (output rows, input columns, depthwise rows); no normalisation, since a signed
  sum of `-lr * w * g` already estimates the loss increase of removing that channel and so
  compares across groups. Higher score = keep, as in OptG.

Why not `optg.create(...)`: the library's masks are per weight (unstructured or N:M) and its
score learning rate is tied to its own sparsity schedule; a channel mask over dependency groups
needs neither. The score update is three lines of autograd, so it is computed here, on exactly
the quantity OptG learns, instead of coupling to the library's internals.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp  # type: ignore[import-untyped]
from torch import nn
from torch.func import functional_call

from optg import Registry, SigmoidSchedule
from stages.base import StageError, eval_mode
from stages.structured_plan import WEIGHTED

Batch = tuple[torch.Tensor, torch.Tensor]
BatchSource = Callable[[int], Iterable[Batch]]
"""`source(step)` yields the (x, y) training batches for pruning step `step`; called again when
exhausted. It should depend only on `step` (a seeded loader) so a resumed run is identical."""
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
_DW_FNS = (tp.prune_depthwise_conv_out_channels, tp.prune_depthwise_conv_in_channels)


# --------------------------------------------------------------------------- group slices

@dataclass
class Slice:
    """The positions of one weight that belong to a group: `kind` 'out' (rows), 'in' (input
    columns) or 'dw' (a depthwise conv's rows, its input and output at once); `idxs` along that
    axis, `root_idxs` the group channel of each position (a Linear after Flatten reads several
    positions per channel)."""

    name: str
    module: nn.Module
    kind: Literal["out", "in", "dw"]
    idxs: torch.Tensor
    root_idxs: torch.Tensor


@dataclass
class GroupSlices:
    root: str
    channels: int
    slices: list[Slice]


def group_slices(group: tp.Group, names: Mapping[nn.Module, str]) -> GroupSlices:
    """The Conv/Linear weight slices of a (full-index) group, each weight axis counted once."""
    root = group[0].dep.target.module
    slices: list[Slice] = []
    seen: set[tuple[int, str]] = set()
    channels = 0
    for item in group:
        dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
        layer = dep.target.module
        if not isinstance(layer, WEIGHTED) or root_idxs is None or any(r is None for r in root_idxs):
            continue
        if getattr(layer, "transposed", False):
            raise StageError(f"optg importance does not support transposed convolutions "
                             f"({names[layer]}); use importance 'magnitude' or 'taylor'")
        handler = dep.handler
        kind: Literal["out", "in", "dw"]
        if handler in _DW_FNS:
            kind = "dw"
        elif handler in _OUT_FNS:
            kind = "out"
        elif handler in _IN_FNS:
            kind = "in"
        else:
            continue
        if (id(layer), kind) in seen:
            continue
        seen.add((id(layer), kind))
        ridx = torch.as_tensor([int(r) for r in root_idxs], dtype=torch.long)
        slices.append(Slice(names[layer], layer, kind, torch.as_tensor([int(i) for i in idxs], dtype=torch.long), ridx))
        channels = max(channels, int(ridx.max()) + 1 if len(ridx) else 0)
    return GroupSlices(names[root], channels, slices)


def _grouped_view(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[K, C/g, *k] -> [g, K/g, C/g, prod(k)]: axis 2 indexes the input channels of a group."""
    return t.reshape(groups, t.shape[0] // groups, t.shape[1], -1)


def position_sums(t: torch.Tensor, module: nn.Module, kind: str) -> torch.Tensor:
    """Sum of `t` (weight-shaped) over each position of the slice's axis: rows for 'out'/'dw',
    input channels for 'in' (grouped convs: channel c lives in group c // (C/g), column c % (C/g))."""
    if kind in ("out", "dw"):
        return t.reshape(t.shape[0], -1).sum(1)
    if isinstance(module, nn.Linear):
        return t.sum(0)
    return _grouped_view(t, int(getattr(module, "groups", 1))).sum(dim=(1, 3)).reshape(-1)


def channel_scores(gs: GroupSlices, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per group channel: the sum over all slices of `tensors[name]` (weight-shaped)."""
    total: torch.Tensor | None = None
    for s in gs.slices:
        if s.name not in tensors:
            continue
        t = tensors[s.name]
        local = position_sums(t, s.module, s.kind)[s.idxs.to(t.device)]
        if total is None:
            total = torch.zeros(gs.channels, dtype=torch.float32, device=t.device)
        total.scatter_add_(0, s.root_idxs.to(t.device), local.float())
    if total is None:
        raise StageError(f"group rooted at {gs.root!r} has no scored Conv/Linear weight")
    return total


# --------------------------------------------------------------------------- importances

class OptGImportance(tp.importance.Importance):
    """Torch-Pruning importance from per-weight OptG scores: the sum of the scores over every
    Conv/Linear slice of the group (see module docstring). `scores` maps module names to
    weight-shaped tensors; `names` maps the modules of the model being pruned to their names."""

    def __init__(self, scores: Mapping[str, torch.Tensor], names: Mapping[nn.Module, str]) -> None:
        self.scores = scores
        self.names = names

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor:
        return channel_scores(group_slices(group, self.names), self.scores)


class PrecomputedImportance(tp.importance.Importance):
    """Scores computed once per pruning step, looked up by the name of the group's root module.

    Lets the same ranking be applied to deep copies (the MACs/params target search) and keeps
    gradient-based scores valid after `zero_grad`. Torch-Pruning yields the same groups, with
    the same roots, for the same architecture."""

    def __init__(self, by_root: Mapping[str, torch.Tensor], names: Mapping[nn.Module, str]) -> None:
        self.by_root = by_root
        self.names = names

    def __call__(self, group: tp.Group) -> torch.Tensor:
        root = self.names[group[0].dep.target.module]
        if root not in self.by_root:
            raise StageError(f"internal: no importance computed for the group rooted at {root!r}")
        scores = self.by_root[root]
        if len(scores) != len(group[0].idxs):
            raise StageError(f"internal: group {root!r} has {len(group[0].idxs)} channels, "
                             f"its importance {len(scores)}")
        return scores.clone()


@dataclass
class ScoreContext:
    """What an importance needs for one pruning step."""

    model: nn.Module
    groups: list[tp.Group]
    names: dict[nn.Module, str]
    batches: Iterator[Batch] | None
    loss_fn: LossFn
    mask: MaskTarget
    optg_steps: int
    optg_lr: float
    optg_train_weights: bool
    taylor_batches: int


@dataclass
class MaskTarget:
    """How many channels the OptG mask removes at full ramp: `total` over all groups (global
    allocation, when set) or `fraction` of each group. `min_keep` channels stay in every group."""

    total: int | None
    fraction: float | None
    min_keep: int


def _need_batches(ctx: ScoreContext, what: str) -> Iterator[Batch]:
    if ctx.batches is None:
        raise StageError(f"importance {what!r} needs training batches; none were given")
    return ctx.batches


def _magnitude(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    return _by_root(ctx, imp)


def _taylor(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    batches = _need_batches(ctx, "taylor")
    model = ctx.model
    model.zero_grad(set_to_none=True)
    device = _device(model)
    with eval_mode(model):
        for x, y in itertools.islice(batches, ctx.taylor_batches):
            ctx.loss_fn(model(x.to(device)), y.to(device)).backward()
    try:
        return _by_root(ctx, tp.importance.GroupTaylorImportance())
    finally:
        model.zero_grad(set_to_none=True)


def _optg(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    batches = _need_batches(ctx, "optg")
    slices = [group_slices(g, ctx.names) for g in ctx.groups]
    scores = learn_optg_scores(ctx.model, slices, batches, ctx.loss_fn, steps=ctx.optg_steps,
                               lr=ctx.optg_lr, target=ctx.mask,
                               train_weights=ctx.optg_train_weights)
    return {gs.root: channel_scores(gs, scores).cpu() for gs in slices}


def _by_root(ctx: ScoreContext, imp: tp.importance.Importance) -> dict[str, torch.Tensor]:
    out = {}
    for group in ctx.groups:
        scores = imp(group)
        if scores is not None:
            out[ctx.names[group[0].dep.target.module]] = scores.detach().float().cpu()
    return out


IMPORTANCES: Registry[Callable[[ScoreContext], dict[str, torch.Tensor]]] = Registry("importance")
IMPORTANCES.add("magnitude", _magnitude)
IMPORTANCES.add("taylor", _taylor)
IMPORTANCES.add("optg", _optg)
NEEDS_DATA = frozenset({"taylor", "optg"})


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- OptG score learning

def channel_masks(slices: Sequence[GroupSlices], scores: Mapping[str, torch.Tensor],
                  target: MaskTarget, fraction: float) -> list[torch.Tensor]:
    """Boolean keep-vector per group: the lowest-scoring `fraction` of the target removed."""
    sums = [channel_scores(gs, scores) for gs in slices]
    keeps = [torch.ones(gs.channels, dtype=torch.bool, device=s.device) for gs, s in zip(slices, sums)]
    if fraction <= 0 or not sums:
        return keeps
    if target.total is not None:  # global: one threshold over every group's channels
        n = round(fraction * target.total)
        if n > 0:
            flat = torch.cat(sums)
            n = min(n, flat.numel())
            drop = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            drop[torch.topk(flat, n, largest=False).indices] = True
            keeps = [~d for d in drop.split([gs.channels for gs in slices])]
    else:
        for keep, s in zip(keeps, sums):
            n = round(fraction * (target.fraction or 0.0) * s.numel())
            if n > 0:
                keep[torch.topk(s, min(n, s.numel()), largest=False).indices] = False
    for keep, s in zip(keeps, sums):  # never mask a whole group: its best `min_keep` stay
        keep[torch.topk(s, min(target.min_keep, s.numel())).indices] = True  # no host sync
    return keeps


def weight_masks(slices: Sequence[GroupSlices], keeps: Sequence[torch.Tensor],
                 weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per weight: zero the input columns of masked channels in every consumer ('in' slices)."""
    masks = {name: torch.ones_like(w) for name, w in weights.items()}
    for gs, keep in zip(slices, keeps):
        for s in gs.slices:
            if s.kind != "in" or s.name not in masks:
                continue
            mask = masks[s.name]
            axis = torch.ones(mask.shape[1] * getattr(s.module, "groups", 1), device=mask.device)
            axis[s.idxs.to(mask.device)] = keep[s.root_idxs.to(keep.device)].to(mask.dtype).to(mask.device)
            if isinstance(s.module, nn.Linear):
                mask.mul_(axis.view(1, -1))
            else:
                g = int(getattr(s.module, "groups", 1))
                _grouped_view(mask, g).mul_(axis.view(g, 1, -1, 1))
    return masks


def learn_optg_scores(model: nn.Module, slices: Sequence[GroupSlices], batches: Iterator[Batch],
                      loss_fn: LossFn, *, steps: int, lr: float, target: MaskTarget,
                      train_weights: bool = True) -> dict[str, torch.Tensor]:
    """OptG supermask training over channel masks for `steps` batches; returns the learned
    per-weight scores (weight-shaped, by module name). The model's weights are trained too when
    `train_weights` (as OptG does), with SGD (momentum 0.9) at `lr`; BatchNorm statistics update."""
    names = sorted({s.name for gs in slices for s in gs.slices})
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names}
    scores = {n: torch.zeros_like(w, requires_grad=True) for n, w in weights.items()}
    score_opt = torch.optim.SGD(list(scores.values()), lr=0.0, momentum=0.9, weight_decay=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    weight_opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if train_weights else None
    schedule = SigmoidSchedule(epochs=steps)
    device = _device(model)
    was_training = model.training
    model.train()
    weight_ids = {id(w) for w in weights.values()}
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in weight_ids and p.requires_grad]
    try:
        for step in range(steps):
            fraction = schedule.fraction(float(step))
            with torch.no_grad():
                keeps = channel_masks(slices, scores, target, fraction)
                masks = weight_masks(slices, keeps, weights)
            x, y = next(batches)
            effective = {f"{n}.weight": (w.detach() * masks[n]).requires_grad_(True) for n, w in weights.items()}
            loss = loss_fn(functional_call(model, effective, (x.to(device),)), y.to(device))
            inputs = list(effective.values()) + [p for _, p in others]
            grads = torch.autograd.grad(loss, inputs)
            with torch.no_grad():
                for n, g in zip(names, grads):  # STE: dL/ds = g * w everywhere, dL/dw = g * m
                    scores[n].grad = g * weights[n]
                    weights[n].grad = g * masks[n]
                for (_, p), g in zip(others, grads[len(names):]):
                    p.grad = g
            for group in score_opt.param_groups:
                group["lr"] = lr * fraction
            score_opt.step()
            score_opt.zero_grad(set_to_none=True)
            if weight_opt is not None:
                weight_opt.step()
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return {n: s.detach() for n, s in scores.items()}


def cycle(source: BatchSource, step: int) -> Iterator[Batch]:
    """Endless batches for pruning step `step`: re-reads `source(step)` when it runs out."""
    while True:
        empty = True
        for batch in source(step):
            empty = False
            yield batch
        if empty:
            raise StageError(f"the batch source yielded no batches for pruning step {step}")


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target)
