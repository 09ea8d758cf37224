"""The slimmed architecture as plain JSON, and how to rebuild it on a fresh dense model.

`structure_plan(model)` records, for every module with a structural attribute (Conv, Linear,
BatchNorm, LayerNorm, ...), its type, those attributes and the shapes of its own parameters and
buffers. `apply_plan(dense_model, plan)` reshapes a freshly built dense model to it, so
`model.safetensors` then loads with `strict=True`. Unlike `torch_pruning.state_dict`, which
pickles whole module `__dict__`s, nothing here can run code when read.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from stages.base import StageError

PLAN_FORMAT = "optg-structured-plan/1"
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
STRUCTURAL_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features",
                    "num_features", "num_channels", "num_groups", "normalized_shape",
                    "num_parameters", "embedding_dim", "embed_dim", "head_dim", "kdim", "vdim")


def channel_table(model: nn.Module) -> dict[str, dict[str, int]]:
    """{name: {in, out}} for every Conv/Linear (the report's per-layer channels)."""
    table = {}
    for name, m in model.named_modules():
        if isinstance(m, WEIGHTED):
            inn = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            table[name] = {"in": int(inn), "out": int(out)}
    return table


def structure_plan(model: nn.Module) -> dict[str, Any]:
    """Every module with a structural attribute: its type, those attributes and the shapes of
    its own parameters and buffers. Plain JSON; `apply_plan` reproduces the architecture."""
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        attrs = {a: _jsonable(getattr(m, a)) for a in STRUCTURAL_ATTRS
                 if isinstance(getattr(m, a, None), (int, tuple)) and not isinstance(getattr(m, a), bool)}
        if not attrs:
            continue
        own = itertools.chain(m._parameters.items(), m._buffers.items())
        tensors = {n: list(t.shape) for n, t in own if t is not None}
        modules[name] = {"type": type(m).__name__, "attrs": attrs, "tensors": tensors}
    return {"format": PLAN_FORMAT, "modules": modules}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else int(value)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Reshape a freshly built dense `model` in place to the plan's architecture: structural
    attributes set, parameters/buffers replaced by uninitialised tensors of the planned shapes.
    Load the slimmed weights next (`load_state_dict(..., strict=True)`). Mismatches (a module
    missing or of another type) are reported together."""
    if plan.get("format") != PLAN_FORMAT:
        raise StageError(f"not a structured plan (format {plan.get('format')!r}, expected {PLAN_FORMAT!r})")
    modules = dict(model.named_modules())
    errors = []
    for name, spec in plan["modules"].items():
        m = modules.get(name)
        if m is None:
            errors.append(f"{name!r}: no such module")
        elif type(m).__name__ != spec["type"]:
            errors.append(f"{name!r}: plan says {spec['type']}, model has {type(m).__name__}")
        else:
            for t in spec["tensors"]:
                if getattr(m, t, None) is None:
                    errors.append(f"{name!r}: no parameter or buffer {t!r}")
    if errors:
        raise StageError("the structured plan does not fit this model: " + "; ".join(errors))
    for name, spec in plan["modules"].items():
        m = modules[name]
        for attr, value in spec["attrs"].items():
            setattr(m, attr, tuple(value) if isinstance(value, list) else value)
        for tname, shape in spec["tensors"].items():
            old = getattr(m, tname)
            if list(old.shape) == shape:
                continue
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if tname in m._parameters:
                m._parameters[tname] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                m._buffers[tname] = new
    return model
