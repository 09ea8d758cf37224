"""Which layers are sparsified, and how: selection by type and name regex, per-layer
overrides, and the N:M eligibility rules (a layer that cannot carry the pattern stays
dense, with the reason recorded)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from optg.masking import SUPPORTED_TYPES, weight_of
from optg.pattern import Pattern, parse_nm

TYPE_NAMES: dict[str, type[nn.Module]] = {t.__name__: t for t in SUPPORTED_TYPES}
Allocation = Literal["global", "layerwise"]
PlanKind = Literal["global", "layerwise", "nm", "dense"]


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is treated: its `pattern` (unstructured with the layer's target, N:M, or
    dense with `reason` saying why) and, for unstructured layers, whether it shares the global
    threshold (`allocation='global'`) or has its own (`'layerwise'`)."""

    name: str
    pattern: Pattern
    allocation: Allocation = "global"
    reason: str = ""

    @property
    def kind(self) -> PlanKind:
        """The mask rule that serves this layer: 'global', 'layerwise', 'nm' or 'dense'."""
        if self.pattern.kind == "unstructured":
            return self.allocation
        return self.pattern.kind

    @property
    def target(self) -> float:
        return self.pattern.target

    @property
    def n(self) -> int:
        return self.pattern.n

    @property
    def m(self) -> int:
        return self.pattern.m


def check_types(types: list[str] | tuple[str, ...]) -> list[str]:
    """Problems with layer type names ([] if all are supported)."""
    bad = [t for t in types if t not in TYPE_NAMES]
    return [f"unknown layer types {bad}; valid: {', '.join(TYPE_NAMES)}"] if bad else []


def check_regexes(patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Problems with module-name regexes ([] if all compile)."""
    errors = []
    for rx in patterns:
        try:
            re.compile(rx)
        except re.error as exc:
            errors.append(f"bad regex {rx!r}: {exc}")
    return errors


def check_overrides(overrides: dict[str, str | float]) -> list[str]:
    """Problems with per-layer overrides: each key a regex, each value valid for `parse_override`."""
    errors = check_regexes(list(overrides))
    for rx, value in overrides.items():
        try:
            parse_override(value)
        except (ValueError, TypeError) as exc:
            errors.append(f"override {rx!r}: {exc}")
    return errors


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
        errors = [*check_types(self.types), *check_regexes([*self.include, *self.exclude]),
                  *check_overrides(self.overrides)]
        if errors:
            raise ValueError("; ".join(errors))


def parse_override(value: str | float | Pattern) -> Pattern:
    """An override value as the layer's pattern: a number is an unstructured sparsity in
    [0, 1) for that layer alone, 'dense' leaves it dense, 'N:M' gives it that pattern."""
    if isinstance(value, Pattern):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value}")
        return Pattern.unstructured(float(value))
    if value == "dense":
        return Pattern.dense()
    if not isinstance(value, str):
        raise TypeError(f"must be 'dense', 'N:M' or a sparsity in [0, 1), got {value!r}")
    return Pattern.nm(*parse_nm(value))  # raises a clear ValueError for anything else


def nm_ineligibility(module: nn.Module, m: int) -> str:
    """Why `module` cannot carry an N:M pattern with this M ('' if it can)."""
    groups = getattr(module, "groups", 1)
    if groups > 1:
        return f"grouped conv (groups={groups}) has no shared reduction axis for N:M"
    channels = weight_of(module).shape[1]
    if channels < m:
        return f"input channels C={channels} < M={m} (stem)"
    if channels % m:
        return f"input channels C={channels} not divisible by M={m}"
    return ""


def plan_layers(model: nn.Module, spec: TargetSpec, pattern: Pattern,
                allocation: Allocation = "global") -> list[LayerPlan]:
    """One LayerPlan per module of a supported type (dense ones included, with a reason).
    `pattern` is the model's pattern; overrides and N:M eligibility may change it per layer."""
    if pattern.is_dense:
        raise ValueError("the model's pattern must be unstructured or N:M, not dense")
    types = tuple(TYPE_NAMES[t] for t in spec.types)
    parents_with_functional_weights = {
        name for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)
    }
    owners: dict[int, list[str]] = {}  # parameter -> every name it is registered under (tied weights)
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    head = _output_head(model)
    seen_weights: dict[int, str] = {}
    plans: list[LayerPlan] = []
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_TYPES):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        excluded_by = next((rx for rx in spec.exclude if re.search(rx, name)), None)
        override = next((v for rx, v in spec.overrides.items() if re.search(rx, name)), None)
        reason = ""
        if not isinstance(module, types):
            reason = f"type {type(module).__name__} not in targets"
        elif parent in parents_with_functional_weights:
            reason = "used functionally by nn.MultiheadAttention; cannot be masked"
        elif id(module.weight) in seen_weights:
            reason = f"weight shared with {seen_weights[id(module.weight)]}"
        elif tied := [n for n in owners.get(id(module.weight), []) if n != _own(name, "weight")]:
            reason = f"tied to {tied[0]} (masking one would mask the other)"
        elif module is head and not any(re.search(rx, name) for rx in spec.include):
            reason = ("output head: dense by default, as SparseGPT and Wanda leave it; "
                      "name it in include to sparsify it")
        else:
            seen_weights[id(module.weight)] = name
            if spec.include and not any(re.search(rx, name) for rx in spec.include):
                reason = "not matched by include"
            elif excluded_by is not None:
                reason = f"excluded by {excluded_by!r}"
            elif override is not None and parse_override(override).is_dense:
                reason = "override: dense"
        if reason:
            plans.append(LayerPlan(name, Pattern.dense(), reason=reason))
        elif override is not None:
            plans.append(_fit(name, module, parse_override(override), "layerwise"))
        else:
            plans.append(_fit(name, module, pattern, allocation))
    return plans


def _own(module: str, parameter: str) -> str:
    """The state-dict name of `module`'s own `parameter` (the root module has no prefix)."""
    return f"{module}.{parameter}" if module else parameter


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output projection onto the vocabulary of a model that declares one (Hugging Face's
    `get_output_embeddings()`, e.g. a causal LM's `lm_head`), else None."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def _fit(name: str, module: nn.Module, pattern: Pattern, allocation: Allocation) -> LayerPlan:
    """The plan for a selected layer: its pattern, or dense with the reason it cannot carry N:M."""
    if pattern.is_nm:
        why = nm_ineligibility(module, pattern.m)
        if why:
            return LayerPlan(name, Pattern.dense(), reason=why)
    return LayerPlan(name, pattern, allocation)
