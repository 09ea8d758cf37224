"""The sparsify stage: build an `optg` sparsifier from the config and train with it."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

import optg
from stages.tasks import ClassificationTask, Task
from stages.train import TrainConfig

# methods whose mask is fixed before training (a constant schedule): with `epochs: 0` the
# pipeline prunes and bakes without training; with epochs > 0 the weights fine-tune under it
ONE_SHOT_METHODS = ("oneshot", "wanda", "sparsegpt", "snip", "random")


class SparsityConfig(TrainConfig, optg.SparsitySpec):
    """Sparse training: the `optg.SparsitySpec` (method, pattern, target, schedule and the
    other sparsity settings, all validated by the spec) plus the training settings of this
    phase (`TrainConfig`). The config is the spec: `optg.create(cfg, model)` takes it as is."""

    epochs: int = Field(ge=0, description="sparse-training epochs; 0: one-shot (prune, bake, no training)")

    @model_validator(mode="after")
    def _zero_epochs_are_one_shot(self) -> "SparsityConfig":
        if self.epochs == 0 and self.method not in ONE_SHOT_METHODS:
            raise ValueError(f"epochs: 0 means one-shot: method {self.method!r} trains its mask; one-shot methods "
                             f"are {', '.join(ONE_SHOT_METHODS)}")
        return self


def plan(model: nn.Module, cfg: SparsityConfig) -> list[optg.LayerPlan]:
    """The target-layer plan without touching the model; raises ValueError if nothing is sparsified.
    The plan does not depend on the start mode; planning as from trained weights lets a spec that
    needs them (`score_init: sparsegpt`) be planned, the config check having required them."""
    return _create(model, cfg, steps_per_epoch=1, seed=0, from_trained=True).plans


def build_sparsifier(model: nn.Module, cfg: SparsityConfig, *, steps_per_epoch: int,
                     seed: int, from_trained: bool = False) -> optg.Sparsifier:
    """Plan target layers and attach. The model must already be on its training device.
    from_trained: the model holds trained weights (a dense phase ran or `model.weights` was
    loaded), which makes `sparsity.start: auto` the pretrained mode."""
    return _create(model, cfg, steps_per_epoch=steps_per_epoch, seed=seed, from_trained=from_trained).attach()


def _create(model: nn.Module, cfg: SparsityConfig, *, steps_per_epoch: int, seed: int,
            from_trained: bool = False) -> optg.Sparsifier:
    return optg.create(cfg, model, steps_per_epoch=steps_per_epoch, seed=seed, from_trained=from_trained)


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
        settings["calibration_batches"] = cfg.calibration_batches_in_force
    settings["guard"] = spec.guard.model_dump() if spec.guard is not None else None
    return settings


def calibrate_if_needed(sparsifier: optg.Sparsifier, loader: Iterable[Any], cfg: SparsityConfig,
                        device: torch.device, task: Task | None = None) -> int:
    """Data-aware criteria (SNIP, Wanda, SparseGPT) score on a few training batches before
    training, with the task's loss; others skip."""
    if sparsifier.calibrated:
        return 0
    task = task or ClassificationTask()
    batches = []
    for batch in loader:
        batches.append(task.to_device(batch, device))
        if len(batches) == cfg.calibration_batches_in_force:
            break
    return sparsifier.calibrate(batches, task.batch_loss)
