"""Which layers are sparsified, and how: selection by type and name regex, per-layer
overrides, and the N:M eligibility rules (a layer that cannot carry the pattern stays
dense, with the reason recorded)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from optg.pattern import Pattern, parse_nm
from optg.weights import find_targets, get_path, type_names

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
    parameter: str = ""    # the weight's state-dict name (default `<name>.weight`)
    owner: str | None = None  # the module whose forward is wrapped (default: `name`, the module itself)
    path: str = "weight"   # the weight's path relative to the owner
    axis: int = 1          # the reduction axis its N:M groups run along
    type_name: str = ""    # the registry type it was selected by (`optg.weights`)

    def __post_init__(self) -> None:
        if not self.parameter:
            object.__setattr__(self, "parameter", f"{self.name}.weight" if self.name else "weight")
        if self.owner is None:
            object.__setattr__(self, "owner", self.name)

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
    """Problems with layer type names ([] if all are registered in `optg.weights`)."""
    valid = type_names()
    bad = [t for t in types if t not in valid]
    return [f"unknown layer types {bad}; valid: {', '.join(valid)}"] if bad else []


def default_types() -> tuple[str, ...]:
    """Every registered type: each weight that runs a matrix product is a target by default."""
    return tuple(type_names())


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

    types: tuple[str, ...] = field(default_factory=default_types)
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


def nm_ineligibility(weight: torch.Tensor, axis: int, m: int, groups: int = 1) -> str:
    """Why a weight with reduction `axis` cannot carry an N:M pattern with this M ('' if it can)."""
    if groups > 1:
        return f"grouped conv (groups={groups}) has no shared reduction axis for N:M"
    channels = weight.shape[axis]
    if channels < m:
        return f"input channels C={channels} < M={m} (stem)"
    if channels % m:
        return f"input channels C={channels} not divisible by M={m}"
    return ""


def plan_layers(model: nn.Module, spec: TargetSpec, pattern: Pattern,
                allocation: Allocation = "global") -> list[LayerPlan]:
    """One LayerPlan per registered weight in the model (`optg.weights`: Linear, ConvNd,
    transformers Conv1D, attention projections, user types), dense ones included with a
    reason. `pattern` is the model's pattern; overrides and N:M eligibility may change it per
    layer. Embeddings are never targets; a weight tied to another name is dense."""
    if pattern.is_dense:
        raise ValueError("the model's pattern must be unstructured or N:M, not dense")
    selected = set(spec.types)
    aliases: dict[int, list[str]] = {}  # parameter -> every name it is registered under (tied weights)
    for pname, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(pname)
    head = _output_head(model)
    head_weight = getattr(head, "weight", None) if head is not None else None
    seen_weights: dict[int, str] = {}
    plans: list[LayerPlan] = []
    for target, owner in find_targets(model):
        name = target.name
        found = get_path(owner, target.path)
        assert found is not None  # find_targets yields present weights only
        weight: torch.Tensor = found
        excluded_by = next((rx for rx in spec.exclude if re.search(rx, name)), None)
        override = next((v for rx, v in spec.overrides.items() if re.search(rx, name)), None)
        where = dict(parameter=target.parameter, owner=target.owner, path=target.path, axis=target.axis,
                     type_name=target.type_name)
        reason = ""
        if target.type_name not in selected:
            reason = f"type {target.type_name} not in targets"
        elif id(weight) in seen_weights:
            reason = f"weight shared with {seen_weights[id(weight)]}"
        elif tied := [n for n in aliases.get(id(weight), []) if n != target.parameter]:
            reason = f"tied to {tied[0]} (masking one would mask the other)"
        elif weight is head_weight and not any(re.search(rx, name) for rx in spec.include):
            reason = ("output head: dense by default, as SparseGPT and Wanda leave it; "
                      "name it in include to sparsify it")
        else:
            seen_weights[id(weight)] = name
            if spec.include and not any(re.search(rx, name) for rx in spec.include):
                reason = "not matched by include"
            elif excluded_by is not None:
                reason = f"excluded by {excluded_by!r}"
            elif override is not None and parse_override(override).is_dense:
                reason = "override: dense"
        if reason:
            plans.append(LayerPlan(name, Pattern.dense(), reason=reason, **where))  # type: ignore[arg-type]
            continue
        chosen, alloc = (parse_override(override), "layerwise") if override is not None else (pattern, allocation)
        why = nm_ineligibility(weight, target.axis, chosen.m, getattr(owner, "groups", 1)) if chosen.is_nm else ""
        if why:
            plans.append(LayerPlan(name, Pattern.dense(), reason=why, **where))  # type: ignore[arg-type]
        else:
            plans.append(LayerPlan(name, chosen, alloc, **where))  # type: ignore[arg-type]
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
