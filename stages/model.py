"""The model stage: resolve a model name to a factory, build it for the data, load weights.

Names resolve in this order: `torchvision:<name>` or `timm:<name>` (optional extras),
`package.module:callable` (a user factory), else a built-in from `stages.zoo.MODELS`.
Every factory is called as `factory(input_shape, num_classes, **options)`. Weights files are
read by `stages.checkpoints`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

from pydantic import Field, field_validator, model_validator
from torch import nn

from optg.registry import UnknownNameError
from stages.base import StageError, StrictModel
from stages.checkpoints import WeightsReport, load_weights
from stages.plugins import check_options, import_callable
from stages.zoo import MODELS, timm_model, torchvision_model

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
ZOOS: dict[str, Callable[..., nn.Module]] = {TORCHVISION_PREFIX: torchvision_model,
                                             TIMM_PREFIX: timm_model}


class ModelConfig(StrictModel):
    """Which model to build and, optionally, which state dict to start from.

    name: a built-in (see `stages.zoo.MODELS`), "package.module:callable",
        "torchvision:<name>" (needs the `vision` extra) or "timm:<name>" (the `timm` extra).
    options: keyword arguments for the factory; unknown ones are rejected with the valid list.
    weights: a `.safetensors` file or a torch.save checkpoint (.pt .pth .bin .ckpt .tar),
        read safely (weights_only) and loaded strictly; the layouts are listed in
        `stages.checkpoints` (plain, under state_dict/model/..., DDP/compile prefixes).
    weights_key: where the state dict is inside the checkpoint, dotted (e.g.
        "state_dict_ema"); default: found automatically.
    reinit_head: fine-tuning to a new label set: true loads everything but a classifier head
        whose shape differs (the model's last layer); a module name skips that module.
        The re-initialised head is named in the run's manifest.
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    weights_key: str | None = None
    reinit_head: bool | str = False

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model name must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _weights_options_need_weights(self) -> ModelConfig:
        if self.weights is None:
            used = [k for k in ("weights_key", "reinit_head") if getattr(self, k) not in (None, False)]
            if used:
                raise ValueError(f"{' and '.join(used)} need model.weights")
        if isinstance(self.reinit_head, str) and not self.reinit_head.strip():
            raise ValueError("reinit_head must be true, false or a module name")
        return self


@dataclass
class ModelResult:
    """The built model and, when `weights` was given, what was loaded (for the manifest)."""

    model: nn.Module
    weights: WeightsReport | None = None


def resolve_model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory for a model name: torchvision/timm, module:callable, or built-in."""
    for prefix, zoo in ZOOS.items():
        if name.startswith(prefix):
            return partial(zoo, name[len(prefix):])
    if ":" in name:
        return import_callable(name, "model")
    try:
        return MODELS.get(name)
    except UnknownNameError as exc:
        raise StageError(
            f"{exc}; or 'package.module:callable', 'torchvision:<name>' or 'timm:<name>'"
        ) from None


def build_model(
    cfg: ModelConfig, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """`build(...).model`: the model alone."""
    return build(cfg, input_shape, num_classes).model


def build(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> ModelResult:
    """Build the configured model for one-sample `input_shape` and `num_classes`, then load
    `cfg.weights` if given. Seed torch before calling for reproducible initial weights
    (a re-initialised head keeps them)."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise StageError(f"model {cfg.name!r}: invalid input_shape {tuple(input_shape)}")
    if int(num_classes) < 1:
        raise StageError(f"model {cfg.name!r}: num_classes must be >= 1, got {num_classes}")
    factory = resolve_model_factory(cfg.name)
    if not cfg.name.startswith(tuple(ZOOS)):  # zoo kwargs vary per model
        check_options(factory, cfg.options, f"model {cfg.name!r}", skip=2)
    try:
        model = factory(shape, int(num_classes), **cfg.options)
    except StageError:
        raise
    except (TypeError, ValueError) as exc:
        raise StageError(
            f"model {cfg.name!r} could not be built with options {cfg.options}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise StageError(
            f"model {cfg.name!r}: factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    if cfg.weights is None:
        return ModelResult(model)
    report = load_weights(model, cfg.weights, key=cfg.weights_key, reinit_head=cfg.reinit_head)
    return ModelResult(model, report)
