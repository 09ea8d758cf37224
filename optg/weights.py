"""What a target weight is, by its math: a parameter, the module whose forward uses it, and the
reduction axis its N:M groups run along.

| module type                   | parameter(s)                              | reduction axis |
|-------------------------------|-------------------------------------------|----------------|
| `nn.Linear`                   | `weight` [out, in]                        | 1              |
| `nn.Conv1d/2d/3d`             | `weight` [K, C, *kernel]                  | 1 (C)          |
| transformers `Conv1D` (GPT-2) | `weight` [in, out]                        | 0              |
| `nn.MultiheadAttention`       | `in_proj_weight` (fused QKV) or           | 1              |
|                               | `q/k/v_proj_weight`, `out_proj.weight`    |                |

`nn.MultiheadAttention` reads its projections functionally (`F.multi_head_attention_forward`,
and its fused fast path in eval mode), so its `out_proj` is never called as a module: the mask
reaches it because the attention module's forward is the one that is wrapped (see
`optg.masking`). `register_weight` adds a user's type: one entry per (type, parameter, axis).
A type is a class, or a dotted class path matched against the module's MRO (how the
`transformers` Conv1D is known without importing `transformers`).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightKind:
    """One registry entry: modules of `module_type` hold a target at `parameter` (a path
    relative to the module, e.g. `out_proj.weight`) with N:M groups along `axis`."""

    module_type: type[nn.Module] | str
    parameter: str
    axis: int
    type_name: str  # what `types:` selects it by

    def matches(self, module: nn.Module) -> bool:
        if isinstance(self.module_type, type):
            return isinstance(module, self.module_type)
        return any(f"{c.__module__}.{c.__qualname__}" == self.module_type for c in type(module).__mro__)


WEIGHT_KINDS: list[WeightKind] = [
    WeightKind(nn.Linear, "weight", 1, "Linear"),
    WeightKind(nn.Conv1d, "weight", 1, "Conv1d"),
    WeightKind(nn.Conv2d, "weight", 1, "Conv2d"),
    WeightKind(nn.Conv3d, "weight", 1, "Conv3d"),
    WeightKind("transformers.pytorch_utils.Conv1D", "weight", 0, "Conv1D"),
    *(WeightKind(nn.MultiheadAttention, p, 1, "MultiheadAttention")
      for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")),
]


def register_weight(module_type: type[nn.Module] | str, parameter: str, axis: int,
                    type_name: str | None = None) -> WeightKind:
    """Make `parameter` of every `module_type` module a target with its N:M groups along
    `axis`; `type_name` (default the class name) is what `types:` selects it by. The module's
    forward must read the parameter as an attribute (`self.<parameter>`): the masked value is
    what it sees during the forward."""
    if not isinstance(axis, int) or axis < 0:
        raise ValueError(f"reduction axis must be an int >= 0, got {axis!r}")
    name = type_name or (module_type.__name__ if isinstance(module_type, type) else module_type.rsplit(".", 1)[-1])
    kind = WeightKind(module_type, parameter, axis, name)
    if kind not in WEIGHT_KINDS:
        WEIGHT_KINDS.append(kind)
    return kind


def type_names() -> list[str]:
    """Every name `types:` accepts, in registry order."""
    return list(dict.fromkeys(k.type_name for k in WEIGHT_KINDS))


@dataclass(frozen=True)
class WeightTarget:
    """One candidate weight in a model. `name` is what plans, masks and reports call it: the
    module name when the parameter is the module's own `weight` (`fc1`, `encoder.0.out_proj`),
    else the parameter's name (`encoder.0.self_attention.in_proj_weight`)."""

    name: str
    parameter: str   # its state-dict name
    owner: str       # the module whose forward is wrapped to mask it
    path: str        # the parameter's path relative to the owner
    axis: int
    type_name: str


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def get_path(module: nn.Module, path: str) -> torch.Tensor | None:
    """The tensor at a dotted `path` below `module` (None when absent or None)."""
    *parents, leaf = path.split(".")
    for part in parents:
        module = getattr(module, part, None)  # type: ignore[assignment]
        if not isinstance(module, nn.Module):
            return None
    value = module._parameters.get(leaf)
    return value if isinstance(value, torch.Tensor) else None


def find_targets(model: nn.Module) -> Iterator[tuple[WeightTarget, nn.Module]]:
    """Every registered weight in `model` (with its owner module), in module order. A module
    whose weight an enclosing module reads functionally (an attention's `out_proj`) is
    reported once, through that enclosing module."""
    claimed: set[str] = set()
    found: list[tuple[WeightTarget, nn.Module]] = []
    for owner_name, module in model.named_modules():
        for kind in WEIGHT_KINDS:
            if not kind.matches(module) or get_path(module, kind.parameter) is None:
                continue
            parameter = _join(owner_name, kind.parameter)
            if parameter in claimed:
                continue
            claimed.add(parameter)
            if kind.parameter == "weight":
                name = owner_name  # the module's own weight: the module's name (as before)
            elif parameter.endswith(".weight"):
                name = parameter[: -len(".weight")]  # a child's weight read by its parent: the child's name
            else:
                name = parameter
            found.append((WeightTarget(name, parameter, owner_name, kind.parameter, kind.axis, kind.type_name),
                          module))
    # an enclosing module claims a child's weight before the child is visited (named_modules
    # is pre-order), so the child's own entry was skipped above
    yield from found
