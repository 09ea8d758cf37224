"""OptG and its peers for PyTorch: train sparse (unstructured or N:M), then bake.

    sparsifier = optg.create("optg", model, target=0.9, epochs=30).attach()
    for epoch in range(30):
        sparsifier.start_epoch(epoch)
        for x, y in loader:
            ...; optimizer.step()
            sparsifier.step(lr=optimizer.param_groups[0]["lr"])
    sparsifier.bake()   # plain modules, exact zeros, no hooks left

Plain PyTorch: no YAML, no file I/O.
"""
from optg.criteria import CRITERIA
from optg.methods import METHODS, create
from optg.nm import format_nm, parse_nm
from optg.pattern import Pattern
from optg.patterns import MASK_RULES
from optg.registry import Registry, UnknownNameError
from optg.schedules import SCHEDULES, ConstantSchedule, CubicSchedule, SigmoidSchedule
from optg.sparsifier import LayerReport, LifecycleError, Sparsifier
from optg.targets import LayerPlan, TargetSpec, plan_layers

__version__ = "0.1.0"

__all__ = [
    "CRITERIA", "METHODS", "MASK_RULES", "SCHEDULES", "ConstantSchedule", "CubicSchedule",
    "LayerPlan", "LayerReport", "LifecycleError", "Pattern", "Registry", "SigmoidSchedule", "Sparsifier",
    "TargetSpec", "UnknownNameError", "create", "format_nm", "parse_nm", "plan_layers",
]
