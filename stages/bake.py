"""The bake stage: masks into plain weights (exact zeros), saved as safetensors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

import optg
from optg.pattern import Pattern, unstructured_from_row
from stages.context import RunContext, Stage
from stages.io import atomic_write


class BakedLayer(BaseModel):
    """One layer after bake: the library's report plus `parameter`, the state-dict name of the
    weight the pattern applies to (what the ONNX file is checked against)."""

    model_config = ConfigDict(extra="forbid")

    name: str            # module name
    type: str            # module class, e.g. "Conv2d"
    shape: list[int]
    numel: int
    targeted: bool
    pattern: Pattern     # the layer's own: N:M, unstructured (its target) or dense; JSON: its text
    sparsity: float
    reason: str
    parameter: str       # e.g. "features.0.weight"

    @model_validator(mode="before")
    @classmethod
    def _unstructured_from_text(cls, data: Any) -> Any:
        """A manifest row says 'unstructured' without the layer's planned target: the row's
        achieved sparsity stands for it (what verify checks the file against)."""
        return unstructured_from_row(data, "sparsity")


class BakeResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[BakedLayer]
    targeted_sparsity: float   # zeros / weights over the sparsified layers
    model_sparsity: float      # zeros / weights over every Linear/Conv weight


def bake(sparsifier: optg.Sparsifier) -> BakeResult:
    """Bake in place; the model is plain afterwards (no overrides, no extra tensors)."""
    sparsifier.bake()
    return summarize(sparsifier.report(), sparsifier.model)


def summarize(rows: list[optg.LayerReport], model: nn.Module) -> BakeResult:
    """Typed layer rows with their weight's parameter name, and the weighted sparsities."""
    layers = [BakedLayer(name=r.name, type=r.type, shape=list(r.shape), numel=r.numel, targeted=r.targeted,
                         pattern=r.pattern, sparsity=r.sparsity, reason=r.reason,
                         parameter=weight_name(model, r.parameter or f"{r.name}.weight")) for r in rows]
    return BakeResult(layers=layers, targeted_sparsity=optg.weighted_sparsity([r for r in rows if r.targeted]),
                      model_sparsity=optg.weighted_sparsity(rows))


def weight_name(model: nn.Module, parameter: str) -> str:
    """The state-dict name under which `model` holds the weight at `parameter` (found by
    identity: a tied weight is saved once, under its first name)."""
    weight = model.get_parameter(parameter)
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is weight:
            return name
    raise ValueError(f"{parameter!r} is not a registered parameter")


def save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    """Atomically write the baked state dict (contiguous CPU tensors). A tensor registered
    under several names (tied weights: a language model's lm_head and token embedding) is
    stored once, under its first name; `load_safetensors` ties it back."""
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen[id(value)] = key
        state[key] = value.detach().cpu().contiguous()
    return atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_safetensors(model: nn.Module, path: Path, device: str = "cpu") -> None:
    """Load `save_safetensors`'s file strictly: every key of the model's state dict is in the
    file, except the second names of tied weights, which share the stored tensor."""
    state = load_file(str(path), device=device)
    names: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(key)
    for aliases in names.values():
        stored = next((k for k in aliases if k in state), None)
        for alias in aliases:
            if stored is not None and alias not in state:
                state[alias] = state[stored]
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- the pipeline row


def run_bake(ctx: RunContext) -> None:
    result = bake(ctx.sparsifier)
    metrics = ctx.run.manifest.metrics
    metrics.targeted_sparsity, metrics.model_sparsity = result.targeted_sparsity, result.model_sparsity
    metrics.layers = result.layers
    if not ctx.dist.writer:
        return
    path = save_safetensors(ctx.model, ctx.run.path / "model.safetensors",
                                       {"config_hash": ctx.run.manifest.config_hash})
    ctx.run.add_artifact("model.safetensors", path)


def restore_baked(ctx: RunContext) -> None:
    load_safetensors(ctx.model, ctx.run.path / "model.safetensors", device=str(ctx.device))


ROW = Stage("bake", run_bake, restore=restore_baked, state="weights")
