"""N:M pattern text and the reduction-axis grouping that sparse tensor cores need.

Hardware N:M means: in every group of M consecutive elements along the *reduction* axis
(the input-features axis of a Linear, the input-channels axis of a ConvNd at each output
channel and kernel position) at most N are nonzero. Grouping in memory order (along the
kernel width) is not hardware N:M; `to_groups` never does that.
"""
from __future__ import annotations

import re

import torch

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4). Raises ValueError naming the problem for anything else."""
    match = _NM_RE.match(str(text))
    if not match:
        raise ValueError(f"N:M pattern must look like '2:4', got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern needs 1 <= N < M, got {n}:{m}")
    return n, m


def format_nm(n: int, m: int) -> str:
    return f"{n}:{m}"


def to_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View a Linear [out, in] or ConvNd [K, C, *kernel] weight as [-1, m] groups along dim 1.

    Moves the reduction axis (dim 1) last, so each row of the result is M consecutive input
    channels at one (output channel, kernel position). Requires weight.shape[1] % m == 0.
    """
    if weight.dim() < 2:
        raise ValueError(f"N:M needs a weight of rank >= 2, got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise ValueError(f"reduction axis of size {weight.shape[1]} is not divisible by M={m}")
    moved = weight.movedim(1, -1)  # [K, *kernel, C]
    return moved.reshape(-1, m)


def from_groups(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_groups`: a [-1, m] tensor back to the layout of `like`."""
    moved_shape = (like.shape[0], *like.shape[2:], like.shape[1])
    return groups.reshape(moved_shape).movedim(-1, 1).contiguous()
