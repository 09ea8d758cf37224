"""The model stage: resolve a model name to a factory, build it for the data, load weights.

Names resolve in this order: `torchvision:<name>` (optional extra), `package.module:callable`
(a user factory), else a built-in from `stages.zoo.MODELS`. Every factory is called as
`factory(input_shape, num_classes, **options)`.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from optg.registry import UnknownNameError
from stages.base import StageError, StrictModel
from stages.plugins import check_options, import_callable
from stages.zoo import MODELS, torchvision_model

TORCHVISION_PREFIX = "torchvision:"
_SHOW = 5  # how many offending keys an error message lists


class ModelConfig(StrictModel):
    """Which model to build and, optionally, which state dict to start from.

    name: a built-in (see `stages.zoo.MODELS`), "package.module:callable", or
        "torchvision:<name>" (needs the `vision` extra).
    options: keyword arguments for the factory; unknown ones are rejected with the valid list.
    weights: a `.safetensors` or `.pt`/`.pth` state dict, loaded strictly.
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model name must not be empty")
        return value.strip()


def resolve_model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory for a model name: torchvision, module:callable, or built-in."""
    if name.startswith(TORCHVISION_PREFIX):
        return partial(torchvision_model, name[len(TORCHVISION_PREFIX):])
    if ":" in name:
        return import_callable(name, "model")
    try:
        return MODELS.get(name)
    except UnknownNameError as exc:
        raise StageError(
            f"{exc}; or 'package.module:callable', or 'torchvision:<name>'"
        ) from None


def build_model(
    cfg: ModelConfig, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Build the configured model for one-sample `input_shape` and `num_classes`, then load
    `cfg.weights` if given. Seed torch before calling for reproducible initial weights."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise StageError(f"model {cfg.name!r}: invalid input_shape {tuple(input_shape)}")
    if int(num_classes) < 1:
        raise StageError(f"model {cfg.name!r}: num_classes must be >= 1, got {num_classes}")
    factory = resolve_model_factory(cfg.name)
    if not cfg.name.startswith(TORCHVISION_PREFIX):  # torchvision kwargs vary per model
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
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or .pt/.pth (bare, or under a "state_dict" key)."""
    file = Path(path)
    if not file.is_file():
        raise StageError(f"weights file not found: {str(file)!r}")
    suffix = file.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(file), device="cpu")
        elif suffix in (".pt", ".pth"):
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        else:
            raise StageError(
                f"weights file {str(file)!r}: unknown extension {suffix!r}; "
                "use .safetensors, .pt or .pth"
            )
    except StageError:
        raise
    except Exception as exc:  # corrupt file, pickled non-tensor objects, ...
        raise StageError(f"cannot read weights file {str(file)!r}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise StageError(
            f"weights file {str(file)!r} does not hold a state dict of tensors "
            "(expected a name -> tensor mapping, or one under a 'state_dict' key)"
        )
    return dict(state)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict strictly; a mismatch lists missing/unexpected keys and bad shapes."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
    for label, items in found:
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            problems.append(f"{label} ({len(items)}): {', '.join(items[:_SHOW])}{more}")
    if problems:
        raise StageError(
            f"weights file {str(path)!r} does not match the model: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
