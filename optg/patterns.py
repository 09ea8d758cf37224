"""Mask rules: scores + schedule fraction -> boolean keep-masks, one rule per layer kind.

All rules are vectorised: one `kthvalue` over the concatenated scores for global
allocation, `reshape + topk` for N:M. Ties at a threshold are kept, so the result is
deterministic and identical on every rank given identical scores.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from optg.nm import from_groups, to_groups
from optg.registry import Registry
from optg.targets import LayerPlan

MaskRule = Callable[[Sequence[LayerPlan], Sequence[torch.Tensor], float], list[torch.Tensor]]
MASK_RULES: Registry[MaskRule] = Registry("mask rule")


def keep_threshold(flat: torch.Tensor, n_keep: int) -> float:
    """The value t such that `flat >= t` keeps the `n_keep` largest (more only on ties)."""
    total = flat.numel()
    if n_keep >= total:
        return -math.inf
    if n_keep <= 0:
        return math.inf
    return flat.float().kthvalue(total - n_keep + 1).values.item()


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


def nm_candidates(scores: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of M along the reduction axis: the scores of its M-N weakest entries and
    their positions in the group (ties broken by topk, deterministically)."""
    groups = to_groups(scores.detach(), m)
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
    candidates = [nm_candidates(s, p.n, p.m) for p, s in zip(plans, scores)]
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
        masks.append(from_groups(keep, s))
    return masks
