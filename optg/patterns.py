"""Mask rules: scores + schedule fraction -> boolean keep-masks, one rule per layer kind.

All rules are vectorised: one exact radix select (`kth_smallest`) over the concatenated
scores for global allocation, `reshape + topk` for N:M. Ties at a threshold are kept, so the result is
deterministic and identical on every rank given identical scores.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import torch

from optg.nm import from_groups, to_groups
from optg.registry import Registry
from optg.targets import LayerPlan

MaskRule = Callable[[Sequence[LayerPlan], Sequence[torch.Tensor], float], list[torch.Tensor]]
MASK_RULES: Registry[MaskRule] = Registry("mask rule")


_HALF = 1 << 15  # bins of the high 16 bits of a float below _HALF hold negative values


def _select(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin (in order) holding the `rank`-th smallest (0-based) and its rank in the bin."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, rank, right=True))
    return b, rank - (int(cum[b - 1]) if b else 0)


def kth_smallest(flat: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of `flat` as float32: the value `flat.float().kthvalue(k)`
    returns (of equal zeros -0.0 counts below +0.0, which `>=` cannot tell apart).

    A two-pass radix select on the IEEE bits: a 65,536-bin histogram of the high 16 bits
    (sign, exponent, 7 mantissa bits) finds the bin of the k-th value, a histogram of the low
    16 bits of the few elements in that bin finds the value. Negative floats order reversed,
    which is one flip of each small histogram, not a pass over the data. Every pass is an
    elementwise op or `bincount`, at memory speed on CPU and CUDA alike (`kthvalue` took
    207 ms on an H100 for 25M scores, and seconds on CPU; benchmarks/overhead.py measures).
    """
    bits = flat.detach().reshape(-1).float().contiguous().view(torch.int32)
    high = (bits >> 16).add_(_HALF)  # arithmetic shift: negatives -> [0, 2^15), others above
    hist = torch.bincount(high, minlength=2 * _HALF)
    b, rank = _select(torch.cat([hist[:_HALF].flip(0), hist[_HALF:]]), k - 1)
    negative = b < _HALF
    h = _HALF - 1 - b if negative else b
    low = bits[high == h] & 0xFFFF
    hist = torch.bincount(low, minlength=2 * _HALF)
    b_low, _ = _select(hist.flip(0) if negative else hist, rank)
    low_bits = 2 * _HALF - 1 - b_low if negative else b_low
    high_bits = h + _HALF if negative else h - _HALF  # the unsigned high 16 bits again
    return float(struct.unpack("<f", struct.pack("<I", (high_bits << 16) | low_bits))[0])


def keep_threshold(flat: torch.Tensor, n_keep: int) -> float:
    """The value t such that `flat >= t` keeps the `n_keep` largest (more only on ties)."""
    total = flat.numel()
    if n_keep >= total:
        return -math.inf
    if n_keep <= 0:
        return math.inf
    return kth_smallest(flat, total - n_keep + 1)


def n_pruned(total: int, sparsity: float) -> int:
    """How many of `total` are removed at `sparsity`; round half up, stable across ranks."""
    return min(total, math.floor(sparsity * total + 0.5))


@MASK_RULES.register("global")
def global_masks(plans: Sequence[LayerPlan], scores: Sequence[torch.Tensor],
                 fraction: float) -> list[torch.Tensor]:
    """One threshold over all scores of all layers: layer sparsities follow from it."""
    if not plans:
        return []
    flat = torch.cat([s.detach().reshape(-1) for s in scores])
    sparsity = plans[0].target * fraction
    threshold = keep_threshold(flat, flat.numel() - n_pruned(flat.numel(), sparsity))
    return [s.detach() >= threshold for s in scores]


@MASK_RULES.register("layerwise")
def layerwise_masks(plans: Sequence[LayerPlan], scores: Sequence[torch.Tensor],
                    fraction: float) -> list[torch.Tensor]:
    """Each layer at its own sparsity (uniform allocation, or a per-layer override)."""
    masks = []
    for plan, s in zip(plans, scores):
        flat = s.detach().reshape(-1)
        keep = flat.numel() - n_pruned(flat.numel(), plan.target * fraction)
        masks.append(s.detach() >= keep_threshold(flat, keep))
    return masks


def nm_candidates(scores: torch.Tensor, n: int, m: int, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of M along the reduction `axis`: the scores of its M-N weakest entries and
    their positions in the group (ties broken by topk, deterministically)."""
    groups = to_groups(scores.detach(), m, axis)
    weakest = groups.topk(m - n, dim=1, largest=False)
    return weakest.values, weakest.indices


@MASK_RULES.register("nm")
def nm_masks(plans: Sequence[LayerPlan], scores: Sequence[torch.Tensor],
             fraction: float) -> list[torch.Tensor]:
    """N:M along the reduction axis. At `fraction` f < 1 only the globally weakest f-share of
    all candidates (the M-N lowest scores of each group) is pruned, lowest first; at f = 1
    every candidate is pruned and each group keeps exactly its N highest scores."""
    if not plans:
        return []
    candidates = [nm_candidates(s, p.n, p.m, p.axis) for p, s in zip(plans, scores)]
    if fraction >= 1.0:
        prune = [torch.ones_like(values, dtype=torch.bool) for values, _ in candidates]
    else:
        flat = torch.cat([values.reshape(-1) for values, _ in candidates])
        n_prune = n_pruned(flat.numel(), fraction)
        # prune candidates strictly below the keep threshold: ties at it are kept
        threshold = keep_threshold(flat, flat.numel() - n_prune)
        prune = [values < threshold for values, _ in candidates]
    masks = []
    for plan, s, (values, index), pruned in zip(plans, scores, candidates, prune):
        keep = torch.ones(index.shape[0], plan.m, dtype=torch.bool, device=s.device)
        keep.scatter_(1, index, ~pruned)
        masks.append(from_groups(keep, s, plan.axis))
    return masks
