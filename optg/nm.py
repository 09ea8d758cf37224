"""N:M text helpers and the reduction-axis grouping that sparse tensor cores need.

Hardware N:M means: in every group of M consecutive elements along the *reduction* axis
(the input-features axis of a Linear, the input-channels axis of a ConvNd at each output
channel and kernel position) at most N are nonzero. Grouping in memory order (along the
kernel width) is not hardware N:M; `to_groups` never does that.
"""
from __future__ import annotations

import torch

from optg.pattern import parse_nm

__all__ = ["format_nm", "from_groups", "parse_nm", "to_groups"]


def format_nm(n: int, m: int) -> str:
    return f"{n}:{m}"


def to_groups(weight: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """View a weight as [-1, m] groups of M consecutive elements along its reduction `axis`
    (1: a Linear [out, in] or ConvNd [K, C, *kernel]; 0: a transformers Conv1D [in, out]).

    Moves the reduction axis last, so each row of the result is M consecutive input features
    at one (output channel, kernel position). Requires weight.shape[axis] % m == 0.
    """
    if weight.dim() < 2:
        raise ValueError(f"N:M needs a weight of rank >= 2, got shape {tuple(weight.shape)}")
    if weight.shape[axis] % m:
        raise ValueError(f"reduction axis {axis} of size {weight.shape[axis]} is not divisible by M={m}")
    return weight.movedim(axis, -1).reshape(-1, m)


def from_groups(groups: torch.Tensor, like: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Inverse of `to_groups`: a [-1, m] tensor back to the layout of `like`."""
    moved_shape = list(like.shape)
    moved_shape.append(moved_shape.pop(axis))
    return groups.reshape(moved_shape).movedim(-1, axis).contiguous()
