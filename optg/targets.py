"""Which layers are sparsified, and how: selection by type and name regex, per-layer
overrides, and the N:M eligibility rules (a layer that cannot carry the pattern stays
dense, with the reason recorded)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from optg.masking import SUPPORTED_TYPES
from optg.nm import parse_nm

TYPE_NAMES: dict[str, type[nn.Module]] = {t.__name__: t for t in SUPPORTED_TYPES}
Allocation = Literal["global", "layerwise"]


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is treated. kind: 'global' (shares the global threshold), 'layerwise'
    (own threshold at `target`), 'nm' (N:M along the reduction axis) or 'dense' (skipped,
    `reason` says why)."""

    name: str
    kind: Literal["global", "layerwise", "nm", "dense"]
    target: float = 0.0
    n: int = 0
    m: int = 0
    reason: str = ""

    @property
    def pattern(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return "dense" if self.kind == "dense" else "unstructured"


@dataclass
class TargetSpec:
    """Selection rules. `include`/`exclude` are regexes searched in module names (empty
    include = all). `overrides` maps a name regex to 'dense', 'N:M', or a sparsity in [0, 1)
    applied to that layer alone; the first matching override wins."""

    types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, str | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        errors = [f"unknown layer type {t!r}; valid: {', '.join(TYPE_NAMES)}"
                  for t in self.types if t not in TYPE_NAMES]
        for rx in [*self.include, *self.exclude, *self.overrides]:
            try:
                re.compile(rx)
            except re.error as exc:
                errors.append(f"bad regex {rx!r}: {exc}")
        for rx, value in self.overrides.items():
            try:
                _parse_override(value)
            except ValueError as exc:
                errors.append(f"override {rx!r}: {exc}")
        if errors:
            raise ValueError("; ".join(errors))


def _parse_override(value: str | float) -> tuple[str, float, int, int]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value}")
        return "layerwise", float(value), 0, 0
    if value == "dense":
        return "dense", 0.0, 0, 0
    n, m = parse_nm(str(value))  # raises a clear ValueError otherwise
    return "nm", 0.0, n, m


def nm_ineligibility(module: nn.Module, m: int) -> str:
    """Why `module` cannot carry an N:M pattern with this M ('' if it can)."""
    groups = getattr(module, "groups", 1)
    if groups > 1:
        return f"grouped conv (groups={groups}) has no shared reduction axis for N:M"
    channels = module.weight.shape[1]
    if channels < m:
        return f"input channels C={channels} < M={m} (stem)"
    if channels % m:
        return f"input channels C={channels} not divisible by M={m}"
    return ""


def plan_layers(model: nn.Module, spec: TargetSpec, pattern: str,
                target: float, allocation: Allocation = "global") -> list[LayerPlan]:
    """One LayerPlan per module of a supported type (dense ones included, with a reason)."""
    if pattern != "unstructured":
        n, m = parse_nm(pattern)
    types = tuple(TYPE_NAMES[t] for t in spec.types)
    parents_with_functional_weights = {
        name for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)
    }
    seen_weights: dict[int, str] = {}
    plans: list[LayerPlan] = []
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_TYPES):
            continue

        def dense(reason: str) -> LayerPlan:
            return LayerPlan(name, "dense", reason=reason)

        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if not isinstance(module, types):
            plans.append(dense(f"type {type(module).__name__} not in targets"))
            continue
        if parent in parents_with_functional_weights:
            plans.append(dense("used functionally by nn.MultiheadAttention; cannot be masked"))
            continue
        if id(module.weight) in seen_weights:
            plans.append(dense(f"weight shared with {seen_weights[id(module.weight)]}"))
            continue
        seen_weights[id(module.weight)] = name
        if spec.include and not any(re.search(rx, name) for rx in spec.include):
            plans.append(dense("not matched by include"))
            continue
        excluded_by = next((rx for rx in spec.exclude if re.search(rx, name)), None)
        if excluded_by is not None:
            plans.append(dense(f"excluded by {excluded_by!r}"))
            continue
        override = next((v for rx, v in spec.overrides.items() if re.search(rx, name)), None)
        if override is not None:
            kind, layer_target, on, om = _parse_override(override)
            if kind == "dense":
                plans.append(dense("override: dense"))
            elif kind == "layerwise":
                plans.append(LayerPlan(name, "layerwise", target=layer_target))
            else:
                why = nm_ineligibility(module, om)
                plans.append(dense(why) if why else
                             LayerPlan(name, "nm", target=1 - on / om, n=on, m=om))
            continue
        if pattern == "unstructured":
            plans.append(LayerPlan(name, allocation, target=target))
        else:
            why = nm_ineligibility(module, m)
            plans.append(dense(why) if why else LayerPlan(name, "nm", target=1 - n / m, n=n, m=m))
    return plans
