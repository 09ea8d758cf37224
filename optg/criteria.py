"""Criteria: where the scores that masks are ranked by come from.

- `optg`: learned scores, zero-initialised, trained by the straight-through estimator;
- `magnitude`: |w| (GMP, one-shot/ASP, SR-STE);
- `snip`: |w * dL/dw| summed over calibration batches at initialisation;
- `random`: uniform scores from a seeded generator, the same on every rank.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from optg.distributed import all_reduce_sum
from optg.modes import training_mode
from optg.registry import Registry

if TYPE_CHECKING:
    from optg.spec import SparsitySpec

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""`loss_fn(model, batch)`: the scalar loss of `model` on one batch. The library never looks
inside a batch; for `(x, y)` batches and a loss on logits, `optg.supervised(F.cross_entropy)`."""


def supervised(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> LossFn:
    """A `LossFn` for `(x, y)` batches: `criterion(model(x), y)` (e.g. F.cross_entropy)."""
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return criterion(model(x), y)
    return loss


@runtime_checkable
class Criterion(Protocol):
    """Where scores come from. A registered criterion class is built with no arguments; pass
    a configured instance to `optg.create(criterion=...)` for other settings.

    `setup` gets the target weights at attach and the run's seed (criteria that draw random
    numbers use it; the others ignore it). A criterion with `needs_calibration` also has
    `calibrate(model, weights, batches, loss_fn) -> int`."""

    learned: bool            # scores are trained (need a score optimiser and `step(lr)`)
    needs_calibration: bool  # scores need data before the first mask (`calibrate`)

    def setup(self, weights: dict[str, torch.Tensor], *, seed: int) -> None: ...

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor: ...


CRITERIA: Registry[type] = Registry("criterion")


@CRITERIA.register("optg")
class LearnedScores:
    """OptG: a score per weight, same shape. Its gradient is `dL/d(w*m) * w` (see
    masking._ScoreSTE) and it lives outside the model's parameters.

    init `zeros` (the authors'); `magnitude`: a prior from the weights it starts from,
    `scale * |w| / mean(|w0|)`, the mean over every target weight at attach (so the prior
    averages `scale` and ranks like global magnitude pruning), so that on a trained network
    removing a large weight takes accumulated evidence rather than one epoch of noise.
    `live`: the same prior, but of the current weights at every mask update: masks rank
    `s + scale * |w| / mean(|w0|)` with `s` the learned score (zero-initialised), so the prior
    follows the weights as they move (a pruned weight, which only decays, loses it).
    """

    learned = True
    needs_calibration = False

    def __init__(self, init: Literal["zeros", "magnitude", "live"] = "zeros", scale: float = 1.0) -> None:
        if init not in ("zeros", "magnitude", "live"):
            raise ValueError(f"score init must be 'zeros', 'magnitude' or 'live', got {init!r}")
        self.init, self.scale, self.unit = init, scale, 1.0
        self.tensors: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, spec: SparsitySpec) -> LearnedScores:
        return cls(init=spec.score_init, scale=spec.score_init_scale)

    def setup(self, weights: dict[str, torch.Tensor], *, seed: int) -> None:
        self.unit = 1.0
        if self.init != "zeros" and weights:
            total = sum(w.detach().abs().sum() for w in weights.values())
            count = sum(w.numel() for w in weights.values())
            self.unit = max(float(total) / count, torch.finfo(torch.float32).tiny)
        self.tensors = {name: self._initial(w).requires_grad_(True) for name, w in weights.items()}

    def _initial(self, weight: torch.Tensor) -> torch.Tensor:
        if self.init != "magnitude":
            return torch.zeros_like(weight)
        return self._prior(weight)

    def _prior(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs() * (self.scale / self.unit)

    def ranking(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """What masks rank: the learned scores, plus the live prior with init `live`."""
        scores = self.tensors[name].detach()
        return scores + self._prior(weight) if self.init == "live" else scores

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.tensors[name]


@CRITERIA.register("magnitude")
class Magnitude:
    learned = False
    needs_calibration = False

    def setup(self, weights: dict[str, torch.Tensor], *, seed: int) -> None:
        pass

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs()


@CRITERIA.register("random")
class RandomScores:
    """Uniform scores from a CPU generator seeded once, layers in model order: identical on
    every rank and every run with the same seed. `seed`: a fixed seed of its own; None (the
    default) uses the run's seed given to `setup`."""

    learned = False
    needs_calibration = False

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.tensors: dict[str, torch.Tensor] = {}

    def setup(self, weights: dict[str, torch.Tensor], *, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed if self.seed is None else self.seed)
        self.tensors = {name: torch.rand(w.shape, generator=generator).to(w.device)
                        for name, w in weights.items()}

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.tensors[name]


@CRITERIA.register("snip")
class Snip:
    """SNIP (Lee et al. 2019): connection sensitivity |w * dL/dw| on a few batches, dense.
    The model is scored in training mode (BatchNorm on batch statistics, as training will run
    it); every module's own mode is restored afterwards."""

    learned = False
    needs_calibration = True

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def setup(self, weights: dict[str, torch.Tensor], *, seed: int) -> None:
        self.tensors = {}

    def calibrate(self, model: nn.Module, weights: dict[str, torch.Tensor],
                  batches: Iterable[Any], loss_fn: LossFn) -> int:
        names = list(weights)
        grads = [torch.zeros_like(w) for w in weights.values()]
        count = 0
        with training_mode(model, True):
            for batch in batches:
                loss = loss_fn(model, batch)
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
