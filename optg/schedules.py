"""Sparsity schedules: how much of the target is applied at a point of training.

A schedule maps training progress, in epochs as a float (`epoch + step / steps_per_epoch`),
to a fraction in [0, 1] of the final sparsity. The pattern turns that fraction into masks
(unstructured: sparsity = fraction * target; N:M: the fraction of each group's M-N weakest
candidates that are pruned). Every schedule reaches exactly 1.0 before training ends.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass

from optg.registry import Registry


@runtime_checkable
class Schedule(Protocol):
    """A sparsity schedule. `one_shot` schedules fix the mask once and hold it.

    A registered schedule class is built as `cls(epochs=E, **settings)`: `epochs` is the
    sparse-training length, the settings are its other constructor fields (the keys YAML's
    `sparsity.schedule` accepts, read by `schedule_settings`). Declare them as a pydantic
    dataclass or model so that their types and bounds are checked where they enter.
    """

    one_shot: bool

    def fraction(self, progress: float) -> float: ...

    def describe(self) -> dict[str, float]: ...


SCHEDULES: Registry[type] = Registry("schedule")
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def schedule_settings(cls: type) -> list[str]:
    """The settings a schedule class takes: its constructor fields other than `epochs`."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        names = list(cls.model_fields)
    elif dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
    else:
        names = [p.name for p in inspect.signature(cls).parameters.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [n for n in names if n != "epochs"]


@SCHEDULES.register("sigmoid")
@dataclass(config=_STRICT)
class SigmoidSchedule:
    """OptG's schedule: `p(e) = p_target * sigmoid(beta * (e - center))`, clamped to the target
    for the last `final_epochs` epochs so a run always ends exactly at the target.

    The authors use `beta = 1`, `center = E / 2` with E = 100-180 epochs: about 45% dense,
    a ramp of ~10 epochs, 45% at the target. `beta = 1` does not scale: with E = 20 the ramp
    would take a fifth of training and never settle. Defaults therefore scale with E:
    `beta = 20 / E` (the ramp from 1% to 99% of the target spans ~46% of training),
    `center = 0.4 * E`, `final_epochs = ceil(0.25 * E)`. To reproduce the paper at E >= 100,
    pass `beta = 1` and `center = E / 2` explicitly.
    """

    one_shot: ClassVar[bool] = False
    epochs: int = Field(strict=True, ge=1)
    beta: float | None = Field(strict=True, default=None, gt=0,
                               description="steepness; default 20 / E (E: sparse epochs)")
    center: float | None = Field(strict=True, default=None, description=(
        "epoch of the ramp's midpoint; default 0.4 E (from trained weights: see `sparsity.start`)"))
    final_epochs: int | None = Field(strict=True, default=None, ge=1,
                                     description="last epochs held at the target; default ceil(E / 4)")

    def __post_init__(self) -> None:
        if self.beta is None:
            self.beta = 20.0 / self.epochs
        if self.center is None:
            self.center = 0.4 * self.epochs
        if self.final_epochs is None:
            self.final_epochs = max(1, math.ceil(0.25 * self.epochs))
        if not 1 <= self.final_epochs <= self.epochs:
            raise ValueError(
                f"final_epochs must be in [1, epochs={self.epochs}], got {self.final_epochs}"
            )

    def fraction(self, progress: float) -> float:
        assert self.beta is not None and self.center is not None and self.final_epochs is not None
        if progress >= self.epochs - self.final_epochs:
            return 1.0
        return 1.0 / (1.0 + math.exp(-self.beta * (progress - self.center)))

    def describe(self) -> dict[str, Any]:
        return {"beta": self.beta, "center": self.center, "final_epochs": self.final_epochs}


@SCHEDULES.register("cubic")
@dataclass(config=_STRICT)
class CubicSchedule:
    """GMP (Zhu & Gupta 2017): `p(t) = p_f * (1 - (1 - (t - start) / (end - start))^3)`
    between `start` and `end` (epochs, floats allowed), 0 before, the target after.
    Defaults: start at 0, end at 75% of training, so the last quarter fine-tunes the mask.
    """

    one_shot: ClassVar[bool] = False
    epochs: int = Field(strict=True, ge=1)
    start: float = Field(strict=True, default=0.0, ge=0, description="epoch the ramp starts")
    end: float | None = Field(strict=True, default=None, gt=0,
                              description="epoch the target is reached; default 0.75 E")

    def __post_init__(self) -> None:
        if self.end is None:
            self.end = 0.75 * self.epochs
        if not 0 <= self.start < self.end <= self.epochs:
            raise ValueError(
                f"cubic schedule needs 0 <= start < end <= epochs={self.epochs}, "
                f"got start={self.start}, end={self.end}"
            )

    def fraction(self, progress: float) -> float:
        assert self.end is not None
        if progress <= self.start:
            return 0.0
        if progress >= self.end:
            return 1.0
        remaining = 1.0 - (progress - self.start) / (self.end - self.start)
        return 1.0 - remaining**3

    def describe(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end}


@SCHEDULES.register("constant")
@dataclass(config=_STRICT)
class ConstantSchedule:
    """The full target from the first step, mask fixed once (SNIP, random, one-shot/ASP)."""

    one_shot: ClassVar[bool] = True
    epochs: int = Field(strict=True, default=0, ge=0)

    def fraction(self, progress: float) -> float:
        return 1.0

    def describe(self) -> dict[str, Any]:
        return {}
