"""Criteria: where the scores that masks are ranked by come from.

- `optg`: learned scores, zero-initialised, trained by the straight-through estimator;
- `magnitude`: |w| (GMP, one-shot/ASP, SR-STE);
- `snip`: |w * dL/dw| summed over calibration batches at initialisation;
- `random`: uniform scores from a seeded generator, the same on every rank.
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from optg.distributed import all_reduce_sum
from optg.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Criterion(Protocol):
    learned: bool            # scores are trained (need a score optimiser and `step(lr)`)
    needs_calibration: bool  # scores need data before the first mask (`calibrate`)

    def setup(self, weights: dict[str, torch.Tensor]) -> None: ...

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor: ...


CRITERIA: Registry[type] = Registry("criterion")


@CRITERIA.register("optg")
class LearnedScores:
    """OptG: a score per weight, same shape, initialised to zeros. Its gradient is
    `dL/d(w*m) * w` (see masking._ScoreSTE) and it lives outside the model's parameters."""

    learned = True
    needs_calibration = False

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def setup(self, weights: dict[str, torch.Tensor]) -> None:
        self.tensors = {name: torch.zeros_like(w, requires_grad=True) for name, w in weights.items()}

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.tensors[name]


@CRITERIA.register("magnitude")
class Magnitude:
    learned = False
    needs_calibration = False

    def setup(self, weights: dict[str, torch.Tensor]) -> None:
        pass

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs()


@CRITERIA.register("random")
class RandomScores:
    """Uniform scores from a CPU generator seeded once, layers in model order: identical on
    every rank and every run with the same seed."""

    learned = False
    needs_calibration = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.tensors: dict[str, torch.Tensor] = {}

    def setup(self, weights: dict[str, torch.Tensor]) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.tensors = {name: torch.rand(w.shape, generator=generator).to(w.device)
                        for name, w in weights.items()}

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.tensors[name]


@CRITERIA.register("snip")
class Snip:
    """SNIP (Lee et al. 2019): connection sensitivity |w * dL/dw| on a few batches, dense."""

    learned = False
    needs_calibration = True

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def setup(self, weights: dict[str, torch.Tensor]) -> None:
        self.tensors = {}

    def calibrate(self, model: nn.Module, weights: dict[str, torch.Tensor],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn) -> int:
        names = list(weights)
        grads = [torch.zeros_like(w) for w in weights.values()]
        count = 0
        for x, y in batches:
            loss = loss_fn(model(x), y)
            for acc, g in zip(grads, torch.autograd.grad(loss, list(weights.values()))):
                acc.add_(g)
            count += 1
        if count == 0:
            raise ValueError("SNIP calibration got no batches")
        all_reduce_sum(grads)  # same saliency on every rank
        self.tensors = {n: (w.detach() * g).abs() for n, w, g in zip(names, weights.values(), grads)}
        return count

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.tensors[name]
