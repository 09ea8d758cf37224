"""The records of stage results that the manifest stores (`pipeline.manifest.Manifest` holds
them): the base classes every manifest section uses, the data summary and the run's metrics.
The export stage's own records (`ExportRecord`, `QuantizationRecord`, `Deployment`) live in
stages/export.py. Stages fill them through the run context; the JSON is docs/manifest.md's."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from stages.bake import BakedLayer
from stages.onnx_eval import FileMetric


class Record(BaseModel):
    """A manifest section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class GrowingRecord(Record):
    """A section whose JSON holds only the keys that were set, in the order fields are declared."""

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        keep = set(self.model_fields_set)  # field names, and their aliases for by_alias dumps
        keep |= {info.alias for name, info in type(self).model_fields.items() if name in keep and info.alias}
        return {k: v for k, v in data.items() if k in keep}


class DataSummary(GrowingRecord):
    name: str
    input_shape: list[int]
    num_classes: int  # classes; for a causal LM the vocabulary size
    sizes: dict[str, int]
    tokenizer: dict[str, Any] | None = None  # token data: files, vocab_size, pad_id, eos_id


class Metrics(GrowingRecord):
    task: str | None = None  # the run's task (classification, causal_lm, ...)
    metric: str | None = None  # its metric (accuracy, perplexity)
    data: DataSummary | None = None
    macs: int | None = None
    params: int | None = None
    dense_accuracy: float | None = None
    dense_perplexity: float | None = None
    targeted_sparsity: float | None = None
    model_sparsity: float | None = None
    layers: list[BakedLayer] = Field(default_factory=list)
    sparse_accuracy: float | None = None
    accuracy_drop: float | None = None
    sparse_perplexity: float | None = None
    perplexity_increase: float | None = None  # relative: sparse / dense - 1
    nonzero_params: int | None = None
    parity_max_abs_error: float | None = None
    onnx: list[FileMetric] = Field(default_factory=list)  # each shipped file's metric in ONNX Runtime
    pattern_coverage: float | None = None  # share of the file's weight MACs on weights holding the N:M pattern
    latency: dict[str, Any] | None = None  # stages.benchmark.LatencyResult.to_dict()
