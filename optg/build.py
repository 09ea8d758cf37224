"""`create`: a spec (or keyword settings) and a model -> an unattached Sparsifier."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from torch import nn

from optg.calibrated import input_problems
from optg.sparsifier import Sparsifier
from optg.spec import SparsitySpec, spec_problems
from optg.targets import plan_layers


def create(spec_or_method: SparsitySpec | str, model: nn.Module, *, steps_per_epoch: int | None = None,
           seed: int = 0, schedule_options: dict[str, Any] | None = None, from_trained: bool = False,
           **settings: Any) -> Sparsifier:
    """Plan the target layers and build an (unattached) Sparsifier.

    Either a `SparsitySpec`, or a method name and the spec's fields as keywords:
    `create("optg", model, pattern="2:4", epochs=30)`, `create("gmp", model, target=0.9,
    epochs=30, schedule="cubic", schedule_options={"end": 20})`. Plug-ins (`criterion`,
    `schedule`, `forward`) are registered names or configured instances.
    pattern: 'unstructured' (needs `target`, the fraction of zeros) or 'N:M' (any 1 <= N < M).
    steps_per_epoch: needed with `update_every_steps`. seed: for criteria that draw random
    numbers (`random`), the same on every rank. from_trained: the model holds trained weights
    (`start: auto` then means pretrained; see `SparsitySpec.for_start`).
    All problems with the settings are reported together in one ValueError.
    """
    if isinstance(spec_or_method, SparsitySpec):
        if settings or schedule_options:
            raise TypeError("pass either a SparsitySpec or keyword settings, not both: "
                            f"got {sorted([*settings, *(['schedule_options'] if schedule_options else [])])}")
        spec = spec_or_method
    else:
        if schedule_options:
            schedule = settings.get("schedule")
            if schedule is not None and not isinstance(schedule, str):
                raise TypeError("schedule_options go with a schedule name; configure a Schedule instance directly")
            settings["schedule"] = {"name": schedule, **schedule_options}
        try:
            spec = SparsitySpec(method=spec_or_method, **settings)
        except ValidationError as exc:
            raise ValueError("invalid sparsity settings:\n  - " + "\n  - ".join(spec_problems(exc))) from None
    spec = spec.for_start(from_trained, steps_per_epoch)
    if spec.score_init in ("wanda", "sparsegpt") and spec.start != "pretrained":
        raise ValueError(f"score_init {spec.score_init!r} starts OptG from that one-shot method's mask of a trained "
                         "model: it needs start 'pretrained' (or 'auto' with from_trained=True)")
    resolved = spec.resolve()
    plans = plan_layers(model, spec.selection, resolved.pattern, spec.allocation)
    if not any(p.kind != "dense" for p in plans):
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in plans) or "model has no Linear/Conv layers"
        raise ValueError(f"no layer can be sparsified ({reasons})")
    if spec.method in ("wanda", "sparsegpt") or getattr(resolved.criterion, "reads_inputs", False):
        label = spec.method if spec.method in ("wanda", "sparsegpt") else \
            f"{spec.method} (score_init {spec.score_init})"
        problems = input_problems(label, plans)
        if problems:
            raise ValueError("; ".join(problems))
    freeze_from = spec.epochs - spec.freeze_scores_last if spec.freeze_scores_last and spec.epochs else None
    sparsifier = Sparsifier(model, plans, resolved.criterion, resolved.schedule, resolved.forward,
                      method=spec.method, update_every_steps=spec.update_every_steps,
                      steps_per_epoch=steps_per_epoch, seed=seed, score_momentum=spec.score_momentum,
                      score_lr_factor=spec.score_lr_factor, score_freeze_epoch=freeze_from,
                      score_warmup_steps=spec.score_warmup_steps, score_lr_coupled=spec.score_lr_coupled,
                      total_epochs=spec.epochs, score_normalization=spec.score_normalization,
                      max_swap_fraction=spec.max_swap_fraction)
    sparsifier.spec = spec  # the settings in force, start mode applied
    return sparsifier
