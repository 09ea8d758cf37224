"""What every stage shares: the strict config base class and the errors a stage may raise."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Config base: unknown keys are errors, values are validated on assignment too.

    Types are strict: `true` is not a number, the text "5" is not an int and 4e13 is not an
    int (an int is still a valid float). Floats must be finite: `nan` or `.inf` would turn
    a bound or a gate off (an infinite `verify.atol` accepts any output). A tuple field that
    a YAML list fills opts out with `Field(strict=False)` and strict item types (`StrictFloat`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True,
                              allow_inf_nan=False)


class StageError(RuntimeError):
    """A stage could not do its work (bad data file, export failure...). Exit code 1."""


class GateFailure(RuntimeError):
    """A release gate failed: accuracy drop, ONNX parity, N:M pattern. Exit code 3.

    `gate` names the gate; the message names the node/tensor/metric at fault.
    """

    def __init__(self, gate: str, message: str) -> None:
        super().__init__(message)
        self.gate = gate


def missing_extra(what: str, exc: ImportError, extra: str) -> StageError:
    """The one message for an optional package that is not installed: which package `what`
    needs and which extra of optg-pipeline brings it."""
    package = (exc.name or "").split(".")[0] or extra
    return StageError(
        f"{what} needs {package}, which is not installed; install optg-pipeline[{extra}] "
        f"(pip install \"optg-pipeline[{extra}]\")"
    )
