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

ScoreInit = Literal["zeros", "magnitude", "live", "wanda", "sparsegpt"]
SCORE_INITS: tuple[str, ...] = ("zeros", "magnitude", "live", "wanda", "sparsegpt")
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
    `wanda` / `sparsegpt` (from trained weights): ranked like `live`, but the scores start where
    the first mask is that one-shot method's mask: calibration runs the method (`optg.calibrated`;
    SparseGPT also leaves its reconstructed weights, pruned ones exact zeros, as its one-shot
    does) and sets `s0 = R - prior(w0)`, so that the first ranking is R: Wanda's
    `scale * |W| ||X|| / mean(|W| ||X||)`, or for SparseGPT `scale * (|w| / mean|w0| + keep)`
    (every kept weight above every pruned one). OptG learns from there.
    """

    learned = True
    needs_calibration = False

    def __init__(self, init: ScoreInit = "zeros", scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, one_shot: Any = None) -> None:
        """`one_shot`: for init `wanda` / `sparsegpt`, that criterion configured (the registered
        `CRITERIA` entry built from the spec, so its settings such as SparseGPT's dampening apply);
        None builds it with its defaults."""
        if init not in SCORE_INITS:
            raise ValueError(f"score init must be one of {', '.join(SCORE_INITS)}, got {init!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"score dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.init, self.scale, self.unit, self.dtype = init, scale, 1.0, dtype
        if init in ("wanda", "sparsegpt") and one_shot is None:
            one_shot = CRITERIA.get(init)()
        self.one_shot = one_shot
        # a one-shot start reads each target's input: calibrate before the first mask
        self.needs_calibration = self.reads_inputs = one_shot is not None
        self.tensors: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, spec: SparsitySpec) -> LearnedScores:
        one_shot = None
        if spec.score_init in ("wanda", "sparsegpt"):
            method = CRITERIA.get(spec.score_init)
            build = getattr(method, "build", None)
            one_shot = build(spec) if callable(build) else method()
        return cls(init=spec.score_init, scale=spec.score_init_scale, dtype=getattr(torch, spec.score_dtype),
                   one_shot=one_shot)

    def setup(self, weights: dict[str, torch.Tensor], *, seed: int) -> None:
        self.unit = 1.0
        if self.init != "zeros" and weights:
            total = sum(w.detach().abs().sum() for w in weights.values())
            count = sum(w.numel() for w in weights.values())
            self.unit = max(float(total) / count, torch.finfo(torch.float32).tiny)
        # the scores' dtype is their momentum's too (SGD keeps its buffer in the parameter's dtype)
        self.tensors = {name: self._initial(w).to(self.dtype).requires_grad_(True) for name, w in weights.items()}

    def bind(self, plans: dict[str, Any], modules: dict[str, nn.Module]) -> None:
        """The targets' plans and owner modules, for a one-shot start that hooks their inputs."""
        if self.one_shot is not None:
            self.one_shot.bind(plans, modules)

    def calibrate(self, model: nn.Module, weights: dict[str, torch.Tensor],
                  batches: Iterable[Any], loss_fn: LossFn) -> int:
        """`wanda` / `sparsegpt` start: run the method, then set the scores so that the first
        ranking is the method's (see the class docstring)."""
        method = self.one_shot
        if method is None:
            raise RuntimeError(f"score init {self.init!r} needs no calibration")
        count: int = method.calibrate(model, weights, batches, loss_fn)
        target: dict[str, torch.Tensor] = {}
        if self.init == "wanda":
            total = sum(t.sum() for t in method.tensors.values())
            mean = max(float(total) / sum(t.numel() for t in method.tensors.values()), torch.finfo(torch.float32).tiny)
            target = {n: t * (self.scale / mean) for n, t in method.tensors.items()}
        else:  # SparseGPT's scores mark its kept weights (1) and its weights are updated in place
            target = {n: self._prior(weights[n]) + self.scale * keep for n, keep in method.tensors.items()}
        with torch.no_grad():
            for name, scores in self.tensors.items():
                scores.copy_(target[name] - self._prior(weights[name]))
        return count

    def _initial(self, weight: torch.Tensor) -> torch.Tensor:
        if self.init != "magnitude":
            return torch.zeros_like(weight)
        return self._prior(weight)

    def _prior(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs() * (self.scale / self.unit)

    def ranking(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """What masks rank: the learned scores, plus the live prior with init `live`."""
        scores = self.tensors[name].detach().float()  # bf16 scores rank in float32 (fewer ties)
        return scores + self._prior(weight) if self.init in ("live", "wanda", "sparsegpt") else scores

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
