"""Forward rules: how a target layer's forward weight is made from its weight, mask and scores.

A rule is a plug-in like a criterion, schedule or mask rule; a method names one:

- `mask`:  `w * m` with the mask the criterion and schedule chose (GMP, SNIP, random, ASP);
- `ste`:   OptG's straight-through estimator: forward `w * m`, and the learned scores get
           `dL/d(w*m) * w` at every position (needs a criterion with learned scores);
- `srste`: SR-STE: N:M by magnitude at every forward, gradient straight through to the dense
           weight plus `decay * (1 - m) * w` on the pruned ones (N:M only; makes its own mask).

The lifecycle asks a rule three things, never its name: `trains_scores` (it feeds learned
scores), `scheduled` (masks come from criterion + schedule; False: the rule makes the mask
itself from the weights) and `nm_only`. A registered rule class is built by
`build(spec)` if it defines that classmethod (to read its settings from the spec), else with
no arguments; pass a configured instance to `optg.create(forward=...)` for anything else.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from optg import masking
from optg.registry import Registry
from optg.targets import LayerPlan
from optg.weights import get_path

if TYPE_CHECKING:
    from optg.spec import SparsitySpec


class LayerState:
    """Runtime state of one target layer: plan, module, mask, learned scores (or None), and
    the forward rule that turns them into the forward weight."""

    def __init__(self, plan: LayerPlan, module: nn.Module, rule: ForwardRule,
                 scores: torch.Tensor | None) -> None:
        """`module`: the plan's owner (whose forward reads the weight at `plan.path`). The
        mask is bool: a quarter of an fp32 mask's bytes, and `w * m` promotes it for free."""
        self.plan, self.module, self.rule, self.scores = plan, module, rule, scores
        self.mask = torch.ones_like(self.weight, dtype=torch.bool, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The Parameter itself (outside the owner's forward, where the masked value stands in)."""
        weight = get_path(self.module, self.plan.path)
        if weight is None:
            raise RuntimeError(f"layer {self.plan.name}: {type(self.module).__name__} has no parameter "
                               f"{self.plan.path!r}")
        return weight

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (called by the installed forward override)."""
        if self.mask.device != self.weight.device:  # the model was moved after attach
            self.mask = self.mask.to(self.weight.device)
        return self.rule.weight(self)

    def keep_mask(self) -> torch.Tensor:
        """The mask in force now: what `masks()`, `report()` and `bake()` use."""
        return self.rule.keep_mask(self)


@runtime_checkable
class ForwardRule(Protocol):
    trains_scores: bool  # its backward feeds learned scores (pairs with a learned criterion)
    scheduled: bool      # masks come from criterion + schedule; False: `keep_mask` makes them
    nm_only: bool        # works on N:M layers only

    def weight(self, layer: LayerState) -> torch.Tensor: ...

    def keep_mask(self, layer: LayerState) -> torch.Tensor: ...


FORWARD_RULES: Registry[type] = Registry("forward rule")


@FORWARD_RULES.register("mask")
class MaskForward:
    """`w * m`: the loss gradient reaches kept weights only."""

    trains_scores = False
    scheduled = True
    nm_only = False

    def weight(self, layer: LayerState) -> torch.Tensor:
        return layer.weight * layer.mask

    def keep_mask(self, layer: LayerState) -> torch.Tensor:
        return layer.mask


@FORWARD_RULES.register("ste")
class ScoreSTE:
    """OptG: forward `w * m`; backward `dL/dw = g * m`, `dL/ds = g * w` (pruned positions too)."""

    trains_scores = True
    scheduled = True
    nm_only = False

    def weight(self, layer: LayerState) -> torch.Tensor:
        if layer.scores is None:
            raise RuntimeError(f"layer {layer.plan.name}: the 'ste' forward needs learned scores")
        return masking.optg_masked(layer.weight, layer.scores, layer.mask)

    def keep_mask(self, layer: LayerState) -> torch.Tensor:
        return layer.mask


@FORWARD_RULES.register("srste")
class SRSTE:
    """SR-STE (Zhou et al. 2021): the N largest |w| of every M at every forward, the gradient
    straight through to the dense weight plus `decay * (1 - m) * w` on the pruned ones."""

    trains_scores = False
    scheduled = False
    nm_only = True

    def __init__(self, decay: float = 2e-4) -> None:
        if decay < 0:
            raise ValueError(f"SR-STE decay must be >= 0, got {decay}")
        self.decay = decay

    @classmethod
    def build(cls, spec: SparsitySpec) -> SRSTE:
        return cls(decay=spec.srste_decay)

    def weight(self, layer: LayerState) -> torch.Tensor:
        return masking.srste_masked(layer.weight, layer.plan.n, layer.plan.m, self.decay, layer.plan.axis)

    def keep_mask(self, layer: LayerState) -> torch.Tensor:
        return masking.nm_magnitude_mask(layer.weight, layer.plan.n, layer.plan.m, layer.plan.axis)
