"""The validate stage: accuracy of the baked model against the dense reference, gated."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from stages.base import GateFailure, StrictModel


class ValidateConfig(StrictModel):
    """Gates on the test split. `max_accuracy_drop` is absolute (0.01 = one point) and
    needs a dense reference (a `train` phase or `model.weights`)."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    min_accuracy: float | None = Field(None, ge=0, le=1)


@dataclass
class ValidateResult:
    dense_accuracy: float | None
    sparse_accuracy: float
    accuracy_drop: float | None
    passed: bool
    failures: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def validate(sparse_accuracy: float, dense_accuracy: float | None, cfg: ValidateConfig) -> ValidateResult:
    failures = []
    drop = None if dense_accuracy is None else dense_accuracy - sparse_accuracy
    if cfg.max_accuracy_drop is not None and drop is not None and drop > cfg.max_accuracy_drop:
        failures.append(f"accuracy dropped {drop * 100:.2f} points (dense {dense_accuracy:.4f} -> sparse "
                        f"{sparse_accuracy:.4f}), over validate.max_accuracy_drop={cfg.max_accuracy_drop}")
    if cfg.min_accuracy is not None and sparse_accuracy < cfg.min_accuracy:
        failures.append(f"sparse accuracy {sparse_accuracy:.4f} is below validate.min_accuracy={cfg.min_accuracy}")
    return ValidateResult(dense_accuracy, sparse_accuracy, drop, not failures, failures)


def raise_on_failure(result: ValidateResult) -> None:
    if not result.passed:
        raise GateFailure("accuracy", "; ".join(result.failures))
