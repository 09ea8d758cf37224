"""How a mask reaches the forward pass, without touching the module's parameters.

Each target module keeps its `weight` Parameter (state_dict keys unchanged) and gets an
instance-level `forward` that calls the functional op with a masked weight. The only
extra forward work is one elementwise multiply per target weight (SR-STE also recomputes
its N:M mask, which is what that method is). Baking removes the override again.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from optg.nm import from_groups, to_groups

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _ScoreSTE(torch.autograd.Function):
    """OptG's straight-through estimator: forward `w * m`;
    backward `dL/dw = g * m` and `dL/ds = g * w` at every position, pruned ones included."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad * mask, grad * weight, None


def nm_magnitude_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N largest |w| of every M along the reduction axis (ties: lowest index)."""
    groups = to_groups(weight.detach().abs(), m)
    keep = torch.zeros_like(groups)
    keep.scatter_(1, groups.topk(n, dim=1).indices, 1.0)
    return from_groups(keep, weight)


class _SRSTE(torch.autograd.Function):
    """SR-STE (Zhou et al. 2021): N:M by magnitude at every forward; the gradient passes
    straight through to the dense weight, plus `decay * (1 - m) * w` on the pruned ones."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, n: int, m: int, decay: float) -> torch.Tensor:
        mask = nm_magnitude_mask(weight, n, m).to(weight.dtype)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (1.0 - mask) * weight, None, None, None


def functional_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's own op with a substituted weight."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(x, weight, module.bias)
    raise TypeError(f"cannot run a {type(module).__name__} with a substituted weight")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The `weight` of a supported module, typed (raises TypeError for other modules)."""
    check_supported(module)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def check_supported(module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED_TYPES):
        raise TypeError(f"cannot mask a {type(module).__name__}; supported: "
                        + ", ".join(t.__name__ for t in SUPPORTED_TYPES))


class MaskedForward:
    """Callable installed as `module.forward`; `layer.effective_weight()` gives the weight.

    Holds references, not closures, so `copy.deepcopy(model)` yields a working copy.
    """

    def __init__(self, module: nn.Module, layer: HasEffectiveWeight) -> None:
        check_supported(module)
        self.module = module
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self.module, x, self.layer.effective_weight())


class HasEffectiveWeight(Protocol):
    def effective_weight(self) -> torch.Tensor: ...


def install(module: nn.Module, layer: HasEffectiveWeight) -> None:
    if "forward" in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} already has a forward override "
                           "(attached twice, or another tool patched it)")
    module.forward = MaskedForward(module, layer)  # instance attribute shadows the class


def uninstall(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


def optg_masked(weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _ScoreSTE.apply(weight, scores, mask)


def srste_masked(weight: torch.Tensor, n: int, m: int, decay: float) -> torch.Tensor:
    return _SRSTE.apply(weight, n, m, decay)
