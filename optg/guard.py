"""The mask-update guard: does a new mask damage the model?

At every mask update the guard measures the loss on a few fixed batches with the masks from
before the update and with the new ones, as training computes it (training mode: BatchNorm on
batch statistics) but without changing training: no gradients, every buffer (BatchNorm
running statistics) restored, and each measurement starts from the same random state, which
is restored afterwards (dropout draws the same numbers before and after; the training stream
is untouched). A rise above `threshold` is an
event naming the layer that lost the most: the layer whose new mask alone (every other layer
on its previous mask) gives the highest loss. That attribution costs one more pass over the
batches per layer and is only made when the threshold is crossed.

    guard = optg.LossGuard(batches, optg.supervised(F.cross_entropy), threshold=0.5)
    sparsifier.add_mask_hook(guard)
    ...  # guard.events: one MaskUpdateEvent per mask update that changed a mask
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from optg.criteria import LossFn
from optg.modes import training_mode

if TYPE_CHECKING:
    from optg.sparsifier import Sparsifier


@dataclass(frozen=True)
class MaskUpdateEvent:
    """One mask update: progress (epochs), loss before and after on the guard's batches,
    `delta` = after - before, and when `delta > threshold` (`warning`) the layer whose new mask
    alone raised the loss most with that loss's rise (`layer_delta`)."""

    progress: float
    loss_before: float
    loss_after: float
    delta: float
    warning: bool
    layer: str | None = None
    layer_delta: float | None = None

    def message(self) -> str:
        text = (f"mask update at epoch {self.progress:.2f} raised the loss on the guard's fixed batches "
                f"from {self.loss_before:.4f} to {self.loss_after:.4f} (+{self.delta:.4f})")
        if self.layer is not None:
            text += f"; the layer that lost the most: {self.layer} (its new mask alone: +{self.layer_delta:.4f})"
        return text


class LossGuard:
    """A mask hook (`Sparsifier.add_mask_hook`) that records a `MaskUpdateEvent` per mask
    update that changed any mask. `batches`: batches on the model's device, fixed for the whole
    run so that before/after and epoch to epoch compare like with like; `loss_fn(model, batch)`
    gives the loss (see `optg.criteria.LossFn`)."""

    def __init__(self, batches: Sequence[Any], loss_fn: LossFn,
                 threshold: float) -> None:
        if not batches:
            raise ValueError("the guard needs at least one batch")
        if threshold <= 0:
            raise ValueError(f"guard threshold must be > 0, got {threshold}")
        self.batches, self.loss_fn, self.threshold = list(batches), loss_fn, threshold
        self.events: list[MaskUpdateEvent] = []

    @torch.no_grad()
    def _loss(self, sparsifier: Sparsifier) -> torch.Tensor:
        model = sparsifier.model
        buffers = [(b, b.clone()) for b in model.buffers()]
        devices = sorted({t.device.index or 0 for t in _tensors(self.batches) if t.device.type == "cuda"})
        total = torch.zeros(())
        with torch.random.fork_rng(devices=devices), training_mode(model, True):
            for batch in self.batches:
                total = total + self.loss_fn(model, batch).float().cpu()
        for buffer, saved in buffers:
            buffer.copy_(saved)
        return total / len(self.batches)

    @torch.no_grad()
    def __call__(self, sparsifier: Sparsifier, before: dict[str, torch.Tensor], progress: float) -> None:
        layers = {l.plan.name: l for l in sparsifier.layers}
        new = {name: layers[name].mask.clone() for name in before}
        changed = [name for name in before if not torch.equal(before[name], new[name].bool())]
        if not changed:
            return
        after = float(self._loss(sparsifier))
        for name, mask in before.items():
            layers[name].mask.copy_(mask)
        loss_before = float(self._loss(sparsifier))
        delta = after - loss_before
        worst, worst_delta = None, None
        if delta > self.threshold:
            for name in changed:  # each changed layer's new mask alone
                layers[name].mask.copy_(new[name])
                alone = float(self._loss(sparsifier)) - loss_before
                layers[name].mask.copy_(before[name].to(new[name].dtype))
                if worst_delta is None or alone > worst_delta:
                    worst, worst_delta = name, alone
        for name, mask in new.items():
            layers[name].mask.copy_(mask)
        self.events.append(MaskUpdateEvent(progress, loss_before, after, delta, delta > self.threshold,
                                           worst, worst_delta))


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) batch."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []
