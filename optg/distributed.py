"""The little of torch.distributed the sparsifier needs; a no-op in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` in place across ranks, as one flat buffer (one collective)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    size = world_size()
    if size == 1:
        return
    all_reduce_sum(tensors)
    for t in tensors:
        t.div_(size)
