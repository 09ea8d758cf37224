"""The sparsify stage: build an `optg` sparsifier from the config and train with it."""
from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

import optg
from optg.targets import TYPE_NAMES
from stages.base import StrictModel
from stages.train import TrainConfig

SCHEDULE_FIELDS = {"sigmoid": ("beta", "center", "final_epochs"), "cubic": ("start", "end"), "constant": ()}


class ScheduleConfig(StrictModel):
    """Schedule plug-in and its settings. Unset values use the schedule's documented
    defaults (sigmoid: beta = 20/epochs, center = 0.4*epochs, final_epochs = ceil(epochs/4);
    cubic: start = 0, end = 0.75*epochs)."""

    name: Literal["sigmoid", "cubic", "constant"] | None = None
    beta: float | None = Field(None, gt=0)
    center: float | None = None
    final_epochs: int | None = Field(None, ge=1)
    start: float | None = Field(None, ge=0)
    end: float | None = Field(None, gt=0)

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


class SparsityConfig(TrainConfig):
    """Sparse training: method, pattern and target, plus the training settings of this phase."""

    method: str
    pattern: str = "unstructured"
    target: float | None = Field(None, gt=0, lt=1, description="fraction of zeros; unstructured only")
    allocation: Literal["global", "layerwise"] = "global"
    schedule: ScheduleConfig = ScheduleConfig()
    update_every_steps: int | None = Field(None, ge=1, description="also recompute masks every k steps")
    types: list[str] = Field(default_factory=lambda: list(TYPE_NAMES))
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    overrides: dict[str, str | float] = Field(default_factory=dict)
    calibration_batches: int = Field(4, ge=1, description="SNIP: batches scored at initialisation")
    srste_decay: float = Field(2e-4, ge=0)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in optg.METHODS:
            raise ValueError(f"unknown method {value!r}; valid: {', '.join(optg.METHODS.names())}")
        return value

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_text(cls, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, str):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {value!r}")
        if value != "unstructured":
            n, m = optg.parse_nm(value)
            return optg.format_nm(n, m)
        return value

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if t not in TYPE_NAMES]
        if bad:
            raise ValueError(f"unknown layer types {bad}; valid: {', '.join(TYPE_NAMES)}")
        return value

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for rx in value:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"bad regex {rx!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SparsityConfig":
        errors = []
        method = optg.METHODS.get(self.method)
        if self.pattern == "unstructured":
            if self.target is None:
                errors.append("pattern 'unstructured' needs target (fraction of zeros, e.g. 0.9)")
            if method.nm_only:
                errors.append(f"method {self.method!r} trains N:M patterns only; set pattern: '2:4'")
        elif self.target is not None:
            errors.append(f"target is implied by pattern {self.pattern!r}; remove target")
        schedule = self.schedule.name or method.schedule
        allowed = SCHEDULE_FIELDS[schedule]
        extra = [k for k in self.schedule.options() if k not in allowed]
        if extra:
            errors.append(f"schedule {schedule!r} takes {list(allowed) or 'no settings'}, got {extra}")
        else:
            try:  # values against the epoch count, exactly as `optg.create` will build it
                optg.SCHEDULES.get(schedule)(epochs=self.epochs, **self.schedule.options())
            except ValueError as exc:
                errors.append(f"schedule: {exc}")
        try:
            optg.TargetSpec(types=tuple(self.types), include=self.include, exclude=self.exclude,
                            overrides=self.overrides)
        except ValueError as exc:
            errors.append(str(exc))
        if errors:
            raise ValueError("; ".join(errors))
        return self


def plan(model: nn.Module, cfg: SparsityConfig) -> list[optg.LayerPlan]:
    """The target-layer plan without touching the model; raises ValueError if nothing is sparsified."""
    return _create(model, cfg, steps_per_epoch=1, seed=0).plans


def build_sparsifier(model: nn.Module, cfg: SparsityConfig, *, steps_per_epoch: int,
                     seed: int) -> optg.Sparsifier:
    """Plan target layers and attach. The model must already be on its training device."""
    return _create(model, cfg, steps_per_epoch=steps_per_epoch, seed=seed).attach()


def _create(model: nn.Module, cfg: SparsityConfig, *, steps_per_epoch: int, seed: int) -> optg.Sparsifier:
    return optg.create(
        cfg.method, model, pattern=cfg.pattern, target=cfg.target, epochs=cfg.epochs,
        allocation=cfg.allocation, types=tuple(cfg.types), include=cfg.include, exclude=cfg.exclude,
        overrides=cfg.overrides, schedule=cfg.schedule.name, schedule_options=cfg.schedule.options(),
        update_every_steps=cfg.update_every_steps,
        steps_per_epoch=steps_per_epoch if cfg.update_every_steps else None,
        seed=seed, srste_decay=cfg.srste_decay,
    )


def calibrate_if_needed(sparsifier: optg.Sparsifier, loader, cfg: SparsityConfig,
                        device: torch.device) -> int:
    """SNIP scores connections on a few training batches before training; others skip."""
    if sparsifier.calibrated:
        return 0
    batches = []
    for x, y in loader:
        batches.append((x.to(device), y.to(device)))
        if len(batches) == cfg.calibration_batches:
            break
    return sparsifier.calibrate(batches, F.cross_entropy)
