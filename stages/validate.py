"""The validate stage: accuracy of the baked model against the dense reference, gated."""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field

from stages.base import FieldProblem, GateFailure, StrictModel


class ValidateConfig(StrictModel):
    """Gates on the test split. `max_accuracy_drop` is absolute (0.01 = one point) and
    needs a dense reference (a `train` phase or `model.weights`)."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_latency_ratio: float | None = Field(
        None, gt=0, description="worst ONNX Runtime CPU latency ratio final / dense reference over the "
        "benchmark's batch sizes; checked by the benchmark stage (after export), exit 3 when above")


@dataclass
class ValidateResult:
    """The measured accuracies and every gate they failed, each naming its config field."""

    dense_accuracy: float | None
    sparse_accuracy: float
    accuracy_drop: float | None
    failures: list[FieldProblem] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def validate(sparse_accuracy: float, dense_accuracy: float | None, cfg: ValidateConfig) -> ValidateResult:
    """Compare against the configured gates; every failed gate is listed, none is raised here."""
    failures = []
    drop = None if dense_accuracy is None else dense_accuracy - sparse_accuracy
    if cfg.max_accuracy_drop is not None and drop is not None and drop > cfg.max_accuracy_drop:
        failures.append(FieldProblem("max_accuracy_drop", (
            f"accuracy dropped {drop * 100:.2f} points (dense {dense_accuracy:.4f} -> sparse "
            f"{sparse_accuracy:.4f}), over {{field}}={cfg.max_accuracy_drop}")))
    if cfg.min_accuracy is not None and sparse_accuracy < cfg.min_accuracy:
        failures.append(FieldProblem("min_accuracy", (
            f"sparse accuracy {sparse_accuracy:.4f} is below {{field}}={cfg.min_accuracy}")))
    return ValidateResult(dense_accuracy, sparse_accuracy, drop, failures)


def raise_on_failure(result: ValidateResult) -> None:
    """GateFailure("accuracy") naming every failed gate; the pipeline adds the config section."""
    if not result.passed:
        raise GateFailure("accuracy", problems=result.failures)


def check_latency(max_ratio: float, cfg: ValidateConfig) -> None:
    """GateFailure("latency") when the measured worst latency ratio (final / dense reference,
    ONNX Runtime CPU) is above `max_latency_ratio`; nothing when the gate is unset."""
    if cfg.max_latency_ratio is not None and max_ratio > cfg.max_latency_ratio:
        raise GateFailure("latency", problems=[FieldProblem("max_latency_ratio", (
            f"the final model runs at {max_ratio:.3f}x the dense reference's latency (worst batch "
            f"size, ONNX Runtime CPU), over {{field}}={cfg.max_latency_ratio}"))])
