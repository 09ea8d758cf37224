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
from optg.build import create
from optg.calibrated import SparseGPT, Wanda
from optg.criteria import (
                            CRITERIA,
                            Criterion,
                            LearnedScores,
                            Magnitude,
                            RandomScores,
                            Snip,
                            supervised,
)
from optg.distributed import MaskDivergence
from optg.forward import (
                            FORWARD_RULES,
                            SRSTE,
                            ForwardRule,
                            LayerState,
                            MaskForward,
                            ScoreSTE,
)
from optg.guard import LossGuard, MaskUpdateEvent
from optg.methods import METHODS, Method
from optg.modes import training_mode
from optg.nm import format_nm, parse_nm
from optg.pattern import Pattern
from optg.patterns import MASK_RULES
from optg.registry import Registry, UnknownNameError
from optg.schedules import (
                            SCHEDULES,
                            ConstantSchedule,
                            CubicSchedule,
                            Schedule,
                            SigmoidSchedule,
                            schedule_settings,
)
from optg.sparsifier import LayerReport, LifecycleError, Sparsifier, weighted_sparsity
from optg.spec import (
                            PRETRAINED,
                            PRETRAINED_RAMP,
                            PRETRAINED_UNSTRUCTURED,
                            GuardSpec,
                            Problem,
                            Resolved,
                            ScheduleSpec,
                            SparsitySpec,
                            pretrained_ramp,
                            pretrained_settings,
                            spec_problems,
                            warmup_steps,
)
from optg.targets import LayerPlan, TargetSpec, plan_layers

__version__ = "0.1.0"

__all__ = [
                            "SparseGPT",
                            "Wanda",
                            "CRITERIA",
                            "FORWARD_RULES",
                            "MASK_RULES",
                            "METHODS",
                            "PRETRAINED",
                            "PRETRAINED_RAMP",
                            "PRETRAINED_UNSTRUCTURED",
                            "SCHEDULES",
                            "SRSTE",
                            "ConstantSchedule",
                            "Criterion",
                            "CubicSchedule",
                            "ForwardRule",
                            "GuardSpec",
                            "LayerPlan",
                            "LayerReport",
                            "LayerState",
                            "LearnedScores",
                            "LifecycleError",
                            "MaskDivergence",
                            "LossGuard",
                            "Magnitude",
                            "MaskForward",
                            "MaskUpdateEvent",
                            "Method",
                            "Pattern",
                            "Problem",
                            "RandomScores",
                            "Registry",
                            "Resolved",
                            "Schedule",
                            "ScheduleSpec",
                            "ScoreSTE",
                            "SigmoidSchedule",
                            "Snip",
                            "Sparsifier",
                            "SparsitySpec",
                            "TargetSpec",
                            "UnknownNameError",
                            "create",
                            "format_nm",
                            "parse_nm",
                            "plan_layers",
                            "pretrained_ramp",
                            "pretrained_settings",
                            "schedule_settings",
                            "spec_problems",
                            "supervised",
                            "training_mode",
                            "warmup_steps",
                            "weighted_sparsity",
]
