"""How a mask reaches the forward pass, without touching the module's parameters.

Each target weight stays a registered Parameter (state_dict keys unchanged). The module whose
forward reads it (the `owner`: the Linear/Conv itself, or the `nn.MultiheadAttention` around
its projections) gets an instance-level `forward` that computes every masked weight it owns,
puts them in place of the parameters for the duration of the call, runs the class's own
forward, and puts the parameters back: every access in that forward, functional ones and
attention's fused eval fast path included, sees the masked weight, and gradients flow through
it to the Parameter (and to OptG's scores). The only extra forward work is one elementwise op
per target weight (SR-STE also recomputes its N:M mask, which is what that method is). Baking
removes the override again.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from optg.nm import from_groups, to_groups


class _ScoreSTE(torch.autograd.Function):
    """OptG's straight-through estimator: forward `w * m`;
    backward `dL/dw = g * m` and `dL/ds = g * w` at every position, pruned ones included."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.scores_dtype = scores.dtype
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad * mask, (grad * weight).to(ctx.scores_dtype), None


def nm_magnitude_mask(weight: torch.Tensor, n: int, m: int, axis: int = 1) -> torch.Tensor:
    """Keep the N largest |w| of every M along the reduction `axis` (ties: lowest index); bool."""
    groups = to_groups(weight.detach().abs(), m, axis)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return from_groups(keep, weight, axis)


class _SRSTE(torch.autograd.Function):
    """SR-STE (Zhou et al. 2021): N:M by magnitude at every forward; the gradient passes
    straight through to the dense weight, plus `decay * (1 - m) * w` on the pruned ones."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, n: int, m: int, decay: float, axis: int) -> torch.Tensor:
        mask = nm_magnitude_mask(weight, n, m, axis)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask) * weight, None, None, None, None


class HasEffectiveWeight(Protocol):
    def effective_weight(self) -> torch.Tensor: ...


def _holder(owner: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    module = owner
    for part in parents:
        module = getattr(module, part)
    return module, leaf


class MaskedForward:
    """Callable installed as `owner.forward`: the class forward, run with each owned
    parameter replaced by `layer.effective_weight()`.

    Holds references, not closures, so `copy.deepcopy(model)` yields a working copy.
    """

    def __init__(self, owner: nn.Module, layers: Mapping[str, HasEffectiveWeight]) -> None:
        self.owner = owner
        self.layers = dict(layers)  # path relative to the owner -> layer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        swapped = [(*_holder(self.owner, path), layer.effective_weight()) for path, layer in self.layers.items()]
        saved = []
        try:
            for holder, leaf, weight in swapped:
                saved.append((holder, leaf, holder._parameters[leaf]))
                holder._parameters[leaf] = weight  # type: ignore[assignment]
            return type(self.owner).forward(self.owner, *args, **kwargs)
        finally:
            for holder, leaf, param in saved:
                holder._parameters[leaf] = param


def install(owner: nn.Module, layers: Mapping[str, HasEffectiveWeight]) -> None:
    if "forward" in owner.__dict__:
        raise RuntimeError(f"{type(owner).__name__} already has a forward override "
                           "(attached twice, or another tool patched it)")
    owner.forward = MaskedForward(owner, layers)  # instance attribute shadows the class


def uninstall(owner: nn.Module) -> None:
    owner.__dict__.pop("forward", None)


def optg_masked(weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _ScoreSTE.apply(weight, scores, mask)


def srste_masked(weight: torch.Tensor, n: int, m: int, decay: float, axis: int = 1) -> torch.Tensor:
    return _SRSTE.apply(weight, n, m, decay, axis)
