"""The model stage: resolve a model name to a factory, build it for the data, load weights.

Names resolve in this order: `torchvision:<name>` (optional extra), `package.module:callable`
(a user factory), else a built-in from `pipeline.models.MODELS`. Every factory is called as
`factory(input_shape, num_classes, **options)`.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from optg.registry import UnknownNameError
from pipeline.models import MODELS, torchvision_model
from stages.base import StageError, StrictModel

TORCHVISION_PREFIX = "torchvision:"
_SHOW = 5  # how many offending keys an error message lists


class ModelConfig(StrictModel):
    """Which model to build and, optionally, which state dict to start from.

    name: a built-in (see `pipeline.models.MODELS`), "package.module:callable", or
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


def import_callable(spec: str, kind: str) -> Callable[..., Any]:
    """Resolve "package.module:attr[.attr]" to a callable; StageError says exactly what failed.

    Shared by the model and data stages for user-supplied factories.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise StageError(f"{kind} {spec!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StageError(f"{kind} {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise StageError(
                f"{kind} {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise StageError(
            f"{kind} {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable"
        )
    return obj


def check_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    what: str,
    skip: int = 0,
    reserved: Sequence[str] = (),
) -> None:
    """Reject option names the factory does not accept, listing the ones it does.

    `skip` is how many leading positional parameters the caller fills itself; `reserved`
    names keyword arguments the caller passes (e.g. `seed`), which options may not set.
    Factories that take **kwargs accept any other name, so only `reserved` is checked for them.
    """
    clash = sorted(set(options) & set(reserved))
    if clash:
        raise StageError(
            f"{what}: option(s) {', '.join(clash)} are set by the pipeline, not options"
        )
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # builtins/C callables without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [
        p.name
        for p in params[skip:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in reserved
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise StageError(
            f"{what}: unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(valid) if valid else '(none)'}"
        )


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
