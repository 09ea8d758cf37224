"""Tasks: what a batch means, how the model is called, the loss and the metric.

A run has one task (the config's top-level `task:`). Everything that used to assume "a float
tensor `x` and one class label `y`" asks the task instead: the trainer (loss, train metric),
evaluation (the metric over a split), the mask-update guard and SNIP calibration (the loss of
the model on a batch), structured pruning (the loss), export and verify (the model's named
inputs, their dtypes and dynamic axes, reading logits out of the model's output) and the
benchmark (what input to time). A task is a plug-in, not a branch in every stage:

- `classification` (the default): batches `(x, y)`, the model is called `model(x)`, loss
  cross-entropy, metric top-1 accuracy; one float input (`export.input_name`) with a dynamic
  batch. Every existing config means what it meant.
- `sequence_classification`: batches `{"input_ids", "attention_mask", "labels"}`, the model is
  called `model(input_ids=..., attention_mask=...)` (a Hugging Face model, or a user factory
  with those keywords), loss cross-entropy on `labels`, metric accuracy.
- `causal_lm`: batches `{"input_ids", "attention_mask"}`, next-token loss over the positions
  whose target is a real token (padding never counts), metric perplexity
  (exp of the mean next-token loss over every real target token of the split).
- `package.module:callable`: a user's own task, the callable returns a `Task` instance.

Text tasks export two int64 inputs, `input_ids` and `attention_mask`, with dynamic `batch` and
`sequence` axes, and the output `logits`.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from optg.registry import Registry, UnknownNameError
from stages.base import StageError
from stages.plugins import import_callable

Batch = Any  # (x, y) for classification, a dict of tensors for the text tasks
ModelCall = Callable[..., Any]  # an nn.Module, a DDP wrapper, or functional_call bound to weights
TextLayout = Literal["blocks", "labelled"]
GateKind = Literal["accuracy", "perplexity"]


@dataclass(frozen=True)
class Metric:
    """A task's metric: its name (manifest keys, CSV columns `train_<name>`/`val_<name>`, log
    lines), whether higher is better, and which family of `validate` gates applies to it
    (`accuracy`: max_accuracy_drop / min_accuracy; `perplexity`: max_perplexity_increase /
    max_perplexity)."""

    name: str
    higher_is_better: bool
    gates: GateKind

    def format(self, value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"


ACCURACY = Metric("accuracy", True, "accuracy")
PERPLEXITY = Metric("perplexity", False, "perplexity")


@dataclass(frozen=True)
class InputSpec:
    """One named model input as exported: dtype and dims, a symbolic dim by its name."""

    name: str
    dtype: str  # numpy name: "float32", "int64"
    dims: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor as is, a Hugging Face `ModelOutput` (or any
    object or mapping) by its `logits`, a tuple by its first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StageError(f"the model returned {type(output).__name__}; the task needs a tensor of logits, "
                     "an output with a `logits` tensor, or a tuple whose first element is the logits")


class Task:
    """The task protocol, with the parts every task shares. Subclasses set `name`, `metric`
    and the methods that differ; see the module docstring for the built-in ones.

    `text_layout`: how a text data source is tokenised for this task (`blocks`: documents
    concatenated and cut into `seq_len` blocks; `labelled`: one `(text, label)` per sample), or
    None for a task on tensor data. `loss_per_token`: the loss averages over a count that
    varies between batches of the same size (tokens), so a distributed step weights each rank
    by its share of the global count. `hf_auto_class`: the `transformers` auto class a
    `model.name: hf:<dir>` folder loads with for this task.
    """

    name: ClassVar[str] = "task"
    metric: ClassVar[Metric] = ACCURACY
    text_layout: ClassVar[TextLayout | None] = None
    loss_per_token: ClassVar[bool] = False
    hf_auto_class: ClassVar[str | None] = None

    # ------------------------------------------------------------------ batches
    def to_device(self, batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
        """The batch on `device`, copied without waiting (pinned memory makes it asynchronous)."""
        if isinstance(batch, Mapping):
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        x, y = batch
        if channels_last and x.dim() == 4:
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        else:
            x = x.to(device, non_blocking=True)
        return x, y.to(device, non_blocking=True)

    def num_samples(self, batch: Batch) -> int:
        """Samples in the batch (from a shape: no device sync)."""
        return int(self.inputs(batch)[0].shape[0])

    def inputs(self, batch: Batch) -> list[torch.Tensor]:
        """The model's inputs in the order of `input_names` (what export traces with)."""
        raise NotImplementedError

    def input_names(self, default: str) -> list[str]:
        """Exported input names; `default` is `export.input_name` for single-input tasks."""
        raise NotImplementedError

    def input_specs(self, inputs: Sequence[torch.Tensor], default: str) -> list[InputSpec]:
        """Names, dtypes and dims (symbolic ones by name) of the exported inputs."""
        raise NotImplementedError

    def call(self, model: ModelCall, inputs: Sequence[torch.Tensor]) -> Any:
        """Call the model on its inputs (the raw output; `forward` reads the logits)."""
        raise NotImplementedError

    def forward(self, model: ModelCall, batch: Batch) -> torch.Tensor:
        """The model's logits on a batch."""
        return logits_of(self.call(model, self.inputs(batch)))

    def shorten(self, batch: Batch, length: int) -> Batch:
        """The batch cut to `length` positions (token tasks; verify checks two lengths)."""
        return batch

    # ------------------------------------------------------------------ loss and metric
    def loss(self, logits: torch.Tensor, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
        """The mean training loss over the batch's loss units."""
        raise NotImplementedError

    def loss_units(self, batch: Batch) -> torch.Tensor:
        """How many units the loss averages over (samples, or real target tokens), int64."""
        raise NotImplementedError

    def metric_sums(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Sums that add up over batches and ranks and give the metric (`metric_value`)."""
        raise NotImplementedError

    def train_metric_sums(self, logits: torch.Tensor, batch: Batch, loss: torch.Tensor,
                          label_smoothing: float) -> torch.Tensor:
        """`metric_sums` on a training batch; a task may reuse the loss it already computed."""
        return self.metric_sums(logits.detach(), batch)

    def metric_value(self, sums: Sequence[float]) -> float | None:
        """The metric from summed `metric_sums`; None when nothing was counted."""
        raise NotImplementedError

    def empty_sums(self, device: torch.device) -> torch.Tensor:
        """Zero sums of the right dtype, to accumulate into."""
        raise NotImplementedError

    def batch_loss(self, model: ModelCall, batch: Batch) -> torch.Tensor:
        """The loss of `model` on `batch` (float32): what the guard and SNIP calibration take."""
        return self.loss(self.forward(model, batch).float(), batch)


# ---------------------------------------------------------------------- classification


class _LabelAccuracy(Task):
    """Accuracy over one label per sample; the parts the two accuracy tasks share."""

    metric = ACCURACY

    def labels(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits.float(), self.labels(batch), label_smoothing=label_smoothing)

    def loss_units(self, batch: Batch) -> torch.Tensor:
        labels = self.labels(batch)
        return labels.new_full((), labels.numel(), dtype=torch.long)

    def metric_sums(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = self.labels(batch)
        correct = (logits.argmax(1) == labels).sum()
        return torch.stack([correct, correct.new_full((), labels.numel())])

    def metric_value(self, sums: Sequence[float]) -> float | None:
        correct, total = (int(v) for v in sums)
        return correct / total if total else None

    def empty_sums(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.long, device=device)


class ClassificationTask(_LabelAccuracy):
    """`(x, y)` batches, `model(x)`, cross-entropy, top-1 accuracy (today's behaviour)."""

    name = "classification"
    hf_auto_class = "AutoModelForImageClassification"

    def labels(self, batch: Batch) -> torch.Tensor:
        return batch[1]

    def inputs(self, batch: Batch) -> list[torch.Tensor]:
        return [batch[0]]

    def input_names(self, default: str) -> list[str]:
        return [default]

    def input_specs(self, inputs: Sequence[torch.Tensor], default: str) -> list[InputSpec]:
        x = inputs[0]
        return [InputSpec(default, _np_name(x.dtype), ("batch", *(int(d) for d in x.shape[1:])))]

    def call(self, model: ModelCall, inputs: Sequence[torch.Tensor]) -> Any:
        return model(*inputs)


# ---------------------------------------------------------------------- text tasks

TOKEN_INPUTS = ("input_ids", "attention_mask")


class _TokenTask(Task):
    """Token-id inputs: `input_ids` and `attention_mask` (int64, [batch, sequence])."""

    def inputs(self, batch: Batch) -> list[torch.Tensor]:
        return [batch["input_ids"], batch["attention_mask"]]

    def input_names(self, default: str) -> list[str]:
        return list(TOKEN_INPUTS)

    def input_specs(self, inputs: Sequence[torch.Tensor], default: str) -> list[InputSpec]:
        return [InputSpec(name, "int64", ("batch", "sequence")) for name in TOKEN_INPUTS]

    def call(self, model: ModelCall, inputs: Sequence[torch.Tensor]) -> Any:
        input_ids, attention_mask = inputs
        return model(input_ids=input_ids, attention_mask=attention_mask)

    def shorten(self, batch: Batch, length: int) -> Batch:
        return {k: v[:, :length] if k in TOKEN_INPUTS else v for k, v in batch.items()}


class SequenceClassificationTask(_TokenTask, _LabelAccuracy):
    """Token ids + attention mask -> one label (`labels`); accuracy."""

    name = "sequence_classification"
    text_layout = "labelled"
    hf_auto_class = "AutoModelForSequenceClassification"

    def labels(self, batch: Batch) -> torch.Tensor:
        return batch["labels"]


class CausalLMTask(_TokenTask):
    """Next-token prediction: position t predicts token t+1 wherever both are real tokens
    (attention_mask 1); padding never enters the loss or the metric. Perplexity."""

    name = "causal_lm"
    metric = PERPLEXITY
    text_layout = "blocks"
    loss_per_token = True
    hf_auto_class = "AutoModelForCausalLM"

    @staticmethod
    def _targets(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [N, V], target ids [N], real-target mask [N]) of every predicting position."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        real = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        return logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), real.reshape(-1)

    def _nll(self, logits: torch.Tensor, batch: Batch, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        flat, targets, real = self._targets(logits.float(), batch)
        per = F.cross_entropy(flat, targets, reduction="none", label_smoothing=label_smoothing)
        return (per * real).sum(), real.sum()

    def loss(self, logits: torch.Tensor, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
        total, count = self._nll(logits, batch, label_smoothing)
        return total / count.clamp_min(1)

    def loss_units(self, batch: Batch) -> torch.Tensor:
        mask = batch["attention_mask"]
        return ((mask[:, 1:] != 0) & (mask[:, :-1] != 0)).sum()

    def metric_sums(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        total, count = self._nll(logits, batch, 0.0)
        return torch.stack([total.double(), count.double()])

    def train_metric_sums(self, logits: torch.Tensor, batch: Batch, loss: torch.Tensor,
                          label_smoothing: float) -> torch.Tensor:
        if label_smoothing:  # the loss is not the plain next-token loss then
            return self.metric_sums(logits.detach(), batch)
        count = self.loss_units(batch).double()
        return torch.stack([loss.detach().double() * count, count])

    def metric_value(self, sums: Sequence[float]) -> float | None:
        total, count = (float(v) for v in sums)
        if not count:
            return None
        mean = total / count
        return math.exp(mean) if mean < 700 else math.inf

    def empty_sums(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64, device=device)


TASKS: Registry[type[Task]] = Registry("task")
TASKS.add("classification", ClassificationTask)
TASKS.add("sequence_classification", SequenceClassificationTask)
TASKS.add("causal_lm", CausalLMTask)


def resolve_task(name: str) -> Task:
    """A task by registered name or `package.module:callable` (called with no arguments, it
    returns a `Task`). StageError says what is wrong."""
    if ":" in name:
        factory = import_callable(name, "task")
        try:
            task = factory()
        except Exception as exc:  # noqa: BLE001 - the user's factory failed: say so
            raise StageError(f"task {name!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(task, Task):
            raise StageError(f"task {name!r} returned {type(task).__name__}; it must return an instance of "
                             "stages.tasks.Task (see its docstring for what a task provides)")
        return task
    try:
        return TASKS.get(name)()
    except UnknownNameError as exc:
        raise StageError(f"{exc}; or 'package.module:callable'") from None


def task_problem(name: str) -> str | None:
    """Why `name` is not a usable task (None when it is), for `optg check`."""
    try:
        resolve_task(name)
    except StageError as exc:
        return str(exc)
    return None


def _np_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def export_view(model: nn.Module, task: Task) -> Iterator[nn.Module]:
    """`model` with a forward that takes the task's inputs positionally and returns the logits
    alone, for the exporter and the parity check: parameter names stay the model's own (a
    wrapper module would prefix them). The override is removed afterwards."""
    if "forward" in model.__dict__:
        raise StageError(f"{type(model).__name__} already has an instance-level forward; bake the model "
                         "before exporting it")
    bound = type(model).forward

    def forward(self: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(task.call(lambda *a, **k: bound(self, *a, **k), inputs))

    # torch.export reads the signature: one named parameter per input (a bare *inputs would be a
    # single argument, and per-input dynamic shapes would not line up with it).
    names = task.input_names("input")
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
    try:
        yield model
    finally:
        del model.forward
