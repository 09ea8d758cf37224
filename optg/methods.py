"""Methods: named combinations of plug-ins. Adding a method is adding one entry here (plus a
module for any new criterion, schedule or forward rule it names)."""
from __future__ import annotations

from dataclasses import dataclass

from optg.registry import Registry


@dataclass(frozen=True)
class Method:
    """Registered names of the method's criterion (optg.CRITERIA), schedule (optg.SCHEDULES)
    and forward rule (optg.FORWARD_RULES); `nm_only`: the method trains N:M patterns only."""

    criterion: str
    schedule: str
    forward: str = "mask"
    nm_only: bool = False


METHODS: Registry[Method] = Registry("method")
# OptG: learned scores through the STE, sigmoid ramp, one global threshold
METHODS.add("optg", Method("optg", "sigmoid", "ste"))
# gradual magnitude pruning (Zhu & Gupta 2017), cubic ramp
METHODS.add("gmp", Method("magnitude", "cubic"))
# SNIP (Lee et al. 2019): |w * g| on a few batches at initialisation, mask fixed
METHODS.add("snip", Method("snip", "constant"))
# a seeded random mask at the target, fixed
METHODS.add("random", Method("random", "constant"))
# NVIDIA ASP: one-shot magnitude of a trained model, mask held while fine-tuning
METHODS.add("oneshot", Method("magnitude", "constant"))
# SR-STE (Zhou et al. 2021): N:M by magnitude at every forward, decay on the pruned weights
METHODS.add("srste", Method("magnitude", "constant", "srste", nm_only=True))
# Wanda (Sun et al. 2023): |W| x ||X_j|| on calibration batches, mask fixed
METHODS.add("wanda", Method("wanda", "constant"))
# SparseGPT (Frantar & Alistarh 2023): layer-wise reconstruction on calibration batches, mask fixed
METHODS.add("sparsegpt", Method("sparsegpt", "constant"))
