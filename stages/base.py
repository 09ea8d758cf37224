"""What every stage shares: the strict config base class, the errors a stage may raise, and the
eval-mode helper every stage that runs a model for inference uses."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from pydantic import BaseModel, ConfigDict
from torch import nn


class StrictModel(BaseModel):
    """Config base: unknown keys are errors, values are validated on assignment too.

    Types are strict: `true` is not a number, the text "5" is not an int and 4e13 is not an
    int (an int is still a valid float). Floats must be finite: `nan` or `.inf` would turn
    a bound or a gate off (an infinite `verify.atol` accepts any output). A tuple field that
    a YAML list fills opts out with `Field(strict=False)` and strict item types (`StrictFloat`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True,
                              allow_inf_nan=False, use_attribute_docstrings=True)


@dataclass(frozen=True)
class FieldProblem:
    """One problem traced to a field of a stage's config.

    `field` is dotted inside the stage's own config ("optimizer.lr"); `text` says what is wrong and
    writes "{field}" where the field is named. Stages do not know where their config sits in the
    YAML file; the pipeline renders the problem with the section ("sparsity.optimizer.lr").
    """

    field: str
    text: str

    def render(self, section: str | None = None) -> str:
        return self.text.replace("{field}", f"{section}.{self.field}" if section else self.field)


class _Locatable:
    """Mixin for errors whose message names config fields: `locate(section)` re-renders it with
    the config section the pipeline knows the stage's config lives under."""

    problems: tuple[FieldProblem, ...]
    preamble: str
    section: str | None

    def _render(self) -> str:
        parts = [p.render(self.section) for p in self.problems]
        if self.preamble:
            parts.insert(0, self.preamble)
        return "; ".join(parts)

    def locate(self, section: str) -> None:
        self.section = section
        self.args = (self._render(),)

    def nest(self, key: str) -> None:
        """The config the problems name sits under `key` of the stage's own config (the sparse
        phase's TrainConfig is `train` of the sparsity section): 'optimizer.lr' -> 'train.optimizer.lr'."""
        self.problems = tuple(FieldProblem(f"{key}.{p.field}", p.text) for p in self.problems)
        self.args = (self._render(),)


class StageError(RuntimeError):
    """A stage could not do its work (bad data file, export failure...). Exit code 1."""


class StageConfigError(StageError):
    """A stage found, before any training, that the config cannot work with what it names (a
    model folder that does not fit the task, a class count the model's config contradicts, a
    layer plan that sparsifies nothing). The pipeline reports it as a config error: exit 2.

    `field`, where one setting is at fault, is its dotted key in the stage's own config (e.g.
    'ignore' for `structured.ignore`); the pipeline prefixes the stage's section, or `section`
    where the problem is in another one (the model stage finding that `sparsity:` selects no
    layer of the model). Several problems found together are several `messages`, each reported."""

    def __init__(self, message: str | Sequence[str], field: str | None = None, section: str | None = None) -> None:
        self.messages = [message] if isinstance(message, str) else list(message)
        super().__init__("; ".join(self.messages))
        self.field, self.section = field, section


class ConfigFieldError(_Locatable, StageError):
    """A stage failed because of one of its config values (e.g. a learning rate that makes the
    loss diverge). Exit code 1, like any StageError; the message names the field."""

    def __init__(self, problem: FieldProblem) -> None:
        self.problems, self.preamble, self.section = (problem,), "", None
        super().__init__(self._render())

    @property
    def field(self) -> str:
        return self.problems[0].field


class GateFailure(_Locatable, RuntimeError):
    """A release gate failed: accuracy drop, ONNX parity, N:M pattern. Exit code 3.

    `gate` names the gate; the message names the node/tensor/metric at fault, and `problems`
    the config fields (limits) that were exceeded, if any.
    """

    def __init__(self, gate: str, message: str = "", problems: Sequence[FieldProblem] = ()) -> None:
        self.gate = gate
        self.problems, self.preamble, self.section = tuple(problems), message, None
        super().__init__(self._render())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of `model` in eval mode for the block, then give each module back the
    mode it had (a model may mix modes, e.g. frozen BatchNorm inside a training model), also
    when the block raises."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.train(training)


def missing_extra(what: str, exc: ImportError, extra: str) -> StageError:
    """The one message for an optional package that is not installed: which package `what`
    needs and which extra of optg-pipeline brings it."""
    package = (exc.name or "").split(".")[0] or extra
    return StageError(
        f"{what} needs {package}, which is not installed; install optg-pipeline[{extra}] "
        f"(pip install \"optg-pipeline[{extra}]\")"
    )
