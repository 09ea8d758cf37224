"""The little of torch.distributed the sparsifier needs; a no-op in a single process."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_HASH = 2654435761  # Knuth's multiplicative hash: positions -> well-spread 31-bit weights


class MaskDivergence(RuntimeError):
    """Ranks of one job hold different masks: their models are no longer the same model."""


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` in place across ranks, as one flat buffer (one collective)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if flat.dtype in (torch.bfloat16, torch.float16):  # sum in float32 (and gloo has no bf16 sum)
        flat = flat.float()
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


def mask_digest(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """[layers, 2] int64 on the masks' device: per mask, the number of kept entries and the
    sum of a hash of their positions. Computed on the device, no host sync; two masks with
    the same digest are equal but for a hash collision (sums stay below 2**63)."""
    rows = []
    for mask in masks:
        keep = mask.reshape(-1) != 0
        weight = torch.arange(keep.numel(), device=keep.device, dtype=torch.int64)
        weight.mul_(_HASH).remainder_(2**31)
        rows.append(torch.stack([keep.sum(), (weight * keep).sum()]))
    return torch.stack(rows)


def check_masks_identical(names: Sequence[str], masks: Sequence[torch.Tensor]) -> None:
    """Raise MaskDivergence naming the first layer whose mask differs between ranks.

    One all-gather of the per-layer digests (16 bytes a layer) and one host sync; called at
    every mask update of a distributed run, so identical masks are checked, not assumed.
    """
    size = world_size()
    if size == 1 or not masks:
        return
    local = mask_digest(masks)
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()  # [ranks, layers, 2]
    differs = (table != table[0]).any(dim=2)  # [ranks, layers]
    if not bool(differs.any()):
        return
    layer = int(differs.any(dim=0).nonzero()[0])
    ranks = [r for r in range(size) if bool(differs[r, layer])]
    kept = ", ".join(f"rank {r} keeps {int(table[r, layer, 0])}" for r in [0, *ranks])
    raise MaskDivergence(
        f"masks differ across ranks at layer {names[layer]!r} ({kept} of {masks[layer].numel()}); "
        "every rank must compute the same mask from the same scores: check that all ranks run the "
        "same config and code, and that nothing rank-dependent changes weights or scores")
