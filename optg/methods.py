"""Methods: named combinations of criterion, schedule and pattern, built by `create`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from optg.criteria import CRITERIA
from optg.nm import parse_nm
from optg.registry import Registry
from optg.schedules import SCHEDULES
from optg.sparsifier import Sparsifier
from optg.targets import Allocation, TargetSpec, plan_layers


@dataclass(frozen=True)
class Method:
    criterion: str
    schedule: str
    nm_only: bool = False
    srste: bool = False
    doc: str = ""


METHODS: Registry[Method] = Registry("sparsity method")
METHODS.add("optg", Method("optg", "sigmoid", doc="OptG: learned scores, STE, sigmoid ramp, global threshold"))
METHODS.add("gmp", Method("magnitude", "cubic", doc="gradual magnitude pruning, cubic ramp"))
METHODS.add("snip", Method("snip", "constant", doc="SNIP: |w*g| at initialisation, fixed mask"))
METHODS.add("random", Method("random", "constant", doc="random fixed mask at the target"))
METHODS.add("oneshot", Method("magnitude", "constant", doc="NVIDIA ASP: one-shot magnitude of a trained model, mask held"))
METHODS.add("srste", Method("magnitude", "constant", nm_only=True, srste=True,
                            doc="SR-STE: N:M by magnitude every forward, decay on pruned weights"))


def create(method: str, model: nn.Module, *, pattern: str = "unstructured",
           target: float | None = None, epochs: int | None = None,
           allocation: Allocation = "global", types: tuple[str, ...] | None = None,
           include: list[str] | None = None, exclude: list[str] | None = None,
           overrides: dict[str, str | float] | None = None,
           criterion: str | None = None, schedule: str | None = None,
           schedule_options: dict[str, Any] | None = None,
           update_every_steps: int | None = None, steps_per_epoch: int | None = None,
           seed: int = 0, srste_decay: float = 2e-4) -> Sparsifier:
    """Plan the target layers and build an (unattached) Sparsifier.

    pattern: 'unstructured' (needs `target`, the fraction of zeros) or 'N:M' (any 1 <= N < M).
    epochs: the sparse-training length, needed by the sigmoid and cubic schedules.
    criterion/schedule: override the method's plug-ins by registered name.
    All problems with the arguments are reported together in one ValueError.
    """
    errors: list[str] = []
    spec_method = _collect(errors, lambda: METHODS.get(method))
    if pattern == "unstructured":
        if target is None or not 0.0 < target < 1.0:
            errors.append(f"unstructured pattern needs target in (0, 1), got {target}")
        if spec_method and spec_method.nm_only:
            errors.append(f"method {method!r} trains N:M patterns only; got pattern 'unstructured'")
    else:
        _collect(errors, lambda: parse_nm(pattern))
    if allocation not in ("global", "layerwise"):
        errors.append(f"allocation must be 'global' or 'layerwise', got {allocation!r}")
    criterion_name = criterion or (spec_method.criterion if spec_method else None)
    schedule_name = schedule or (spec_method.schedule if spec_method else None)
    criterion_cls = _collect(errors, lambda: CRITERIA.get(criterion_name)) if criterion_name else None
    schedule_cls = _collect(errors, lambda: SCHEDULES.get(schedule_name)) if schedule_name else None
    if schedule_name in ("sigmoid", "cubic") and (epochs is None or epochs < 1):
        errors.append(f"schedule {schedule_name!r} needs epochs >= 1, got {epochs}")
    spec = _collect(errors, lambda: TargetSpec(
        types=tuple(types) if types else TargetSpec.types, include=list(include or []),
        exclude=list(exclude or []), overrides=dict(overrides or {})))
    sched = None
    if schedule_cls is not None and not errors:
        sched = _collect(errors, lambda: schedule_cls(epochs=epochs or 0, **(schedule_options or {})))
    if errors:
        raise ValueError("invalid sparsity settings:\n  - " + "\n  - ".join(errors))
    plans = plan_layers(model, spec, pattern, target or 0.0, allocation)
    if not any(p.kind != "dense" for p in plans):
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in plans) or "model has no Linear/Conv layers"
        raise ValueError(f"no layer can be sparsified ({reasons})")
    crit = criterion_cls(seed=seed) if criterion_name == "random" else criterion_cls()
    return Sparsifier(model, plans, crit, sched, method=method,
                      update_every_steps=update_every_steps, steps_per_epoch=steps_per_epoch,
                      srste_decay=srste_decay if spec_method.srste else None)


def _collect(errors: list[str], thunk):
    try:
        return thunk()
    except (ValueError, KeyError, TypeError) as exc:
        errors.append(str(exc) if not isinstance(exc, KeyError) else str(exc.args[0]))
        return None
