"""The typed manifest: what `manifest.json` holds, one model per section.

The JSON keys are docs/manifest.md's; a key appears once it has been set (a run that
stopped at `validate` has no `export` key), exactly as the manifest grows stage by stage. Stage
results stay typed (`BakedLayer`, `EpochRecord`, `VerifyResult`, the export record) until they
are written.

Schema versions: 1 (first release); 2 adds `metrics.layers[].parameter` and the export record's
`file`, `compact_file`, `inputs` and `outputs`; 3 adds the top-level `method`, `pattern`,
`target`, `environment` and `deployment`; 4 adds `sparsity` (the settings in force); 5 adds
`metrics.task`/`metrics.metric`, the perplexity metrics, `metrics.data.tokenizer` and
`deployment.tokenizer`, and history rows name the task's metric (`val_perplexity`). A
version-1 manifest still loads (to resume a run made by the older release): its layer rows get
the only parameter name version 1 could sparsify, `<module>.weight`, and its export record the
file names version 1 wrote.

The records of stage results are the stages' own (`stages.records`: the data summary and the
metrics; `stages.export`: the export, quantization and deployment records); this module
composes them with the run's own records (stages, artifacts, errors, environment).
"""
from __future__ import annotations

import platform
import sys
from typing import Any, Literal

import torch as _torch
from pydantic import (
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from optg.pattern import Pattern, unstructured_from_row
from stages.export import Deployment, ExportRecord
from stages.records import GrowingRecord as _Growing
from stages.records import Metrics
from stages.records import Record as _Record
from stages.train import EpochRecord
from stages.verify import VerifyResult

SCHEMA_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)

Status = Literal["running", "succeeded", "gate_failed", "failed", "interrupted"]


class StageRecord(_Record):
    status: Literal["done", "failed"]
    seconds: float


class Artifact(_Growing):
    path: str      # relative to the run directory
    bytes: int
    sha256: str
    stage: str | None = None  # the stage that wrote it (a rerun redoes it when the file changed)


class Rerun(_Record):
    """Why a rerun of the same run directory redid finished stages (config or artifact changed)."""

    at: str
    stages: list[str]
    reason: str


class DistributedRecord(_Record):
    """How the run was launched: processes, their backend (None: one process), nodes."""

    world_size: int
    backend: Literal["nccl", "gloo"] | None
    nnodes: int


class Environment(_Record):
    """Where and how the latest invocation ran (a resumed run records the resuming one)."""

    python: str
    torch: str
    cuda_available: bool
    device: str         # the training device: "cpu", or "cuda: <device name>"
    cpu_threads: int    # torch's intra-op threads
    os: str
    command: list[str]  # the command line, argv[0] first

    @classmethod
    def current(cls, device: _torch.device, command: list[str] | None = None) -> "Environment":
        name = str(device)
        if device.type == "cuda" and _torch.cuda.is_available():
            name = f"{device}: {_torch.cuda.get_device_name(device)}"
        return cls(python=platform.python_version(), torch=_torch.__version__,
                   cuda_available=_torch.cuda.is_available(), device=name, cpu_threads=_torch.get_num_threads(),
                   os=f"{platform.system()} {platform.release()} ({platform.machine()})",
                   command=list(sys.argv if command is None else command))


class ErrorRecord(_Growing):
    type: str
    gate: str | None
    message: str
    stage: str | None = None  # the stage that failed, where one did
    file: str | None = None   # the file a failed write was writing


class Manifest(_Growing):
    schema_version: int = Field(SCHEMA_VERSION, alias="schema")
    name: str
    status: Status
    method: str | None = None
    pattern: Pattern | None = None  # JSON: its text, '2:4', 'unstructured' (see `target`) or 'dense'
    target: float | None = None  # the sparsity the pattern implies or the config asks for
    sparsity: dict[str, Any] | None = None  # stages.sparsify.settings_in_force(): start mode, schedule, scores
    config_hash: str
    created: str
    updated: str
    resumed: int = 0
    versions: dict[str, str]
    versions_before_resume: list[dict[str, str] | None] = Field(default_factory=list)
    distributed: DistributedRecord | None = None
    environment: Environment | None = None
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    metrics: Metrics = Field(default_factory=Metrics)
    structured: dict[str, Any] | None = None  # stages.structured.StructuredResult.to_dict()
    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    history: list[EpochRecord] = Field(default_factory=list)  # rows as EpochRecord.to_dict()
    export: ExportRecord | None = None
    deployment: Deployment | None = None
    verify: VerifyResult | None = None
    error: ErrorRecord | None = None
    fingerprints: dict[str, str] = Field(default_factory=dict)  # stage -> its inputs' hash (pipeline.reuse)
    reruns: list[Rerun] = Field(default_factory=list)
    tracking: dict[str, Any] | None = None

    @classmethod
    def start(cls, name: str, config_hash: str, now: str, versions: dict[str, str]) -> "Manifest":
        """A new run's manifest, with the keys every manifest has from the start."""
        return cls(schema_version=SCHEMA_VERSION, name=name, status="running", config_hash=config_hash,
                   created=now, updated=now, resumed=0, versions=versions, stages={}, metrics=Metrics(),
                   artifacts={}, history=[])

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Read schema 1 (see the module docstring); refuse versions this release cannot read."""
        if not isinstance(data, dict):
            return data
        version = data.get("schema", data.get("schema_version"))
        if version not in READABLE_VERSIONS:
            raise ValueError(f"manifest schema {version!r} is not one this release reads {READABLE_VERSIONS}")
        if version in (2, 3, 4):
            data = dict(data, schema=SCHEMA_VERSION)  # 3, 4 and 5 only add keys
        if version == 1:
            data = dict(data, schema=SCHEMA_VERSION)
            metrics = data.get("metrics")
            if isinstance(metrics, dict) and isinstance(metrics.get("layers"), list):
                data["metrics"] = dict(metrics, layers=[
                    {**row, "parameter": f"{row['name']}.weight"} if isinstance(row, dict) and "name" in row
                    else row for row in metrics["layers"]])
            if isinstance(data.get("export"), dict) and data.get("artifacts", {}).get("model.compact.onnx"):
                data["export"] = dict(data["export"], compact_file="model.compact.onnx")
        return data

    @model_validator(mode="before")
    @classmethod
    def _pattern_with_target(cls, data: Any) -> Any:
        """'unstructured' in the JSON carries its target in the `target` key beside it."""
        return unstructured_from_row(data, "target")

    @field_validator("history", mode="before")
    @classmethod
    def _history_rows(cls, value: Any) -> Any:
        """Rows name the metric (`val_accuracy`, `val_perplexity`): back to EpochRecords."""
        return [EpochRecord.from_dict(row) if isinstance(row, dict) else row for row in value] \
            if isinstance(value, list) else value

    @field_serializer("history")
    def _history_json(self, history: list[EpochRecord]) -> list[dict[str, Any]]:
        return [row.to_dict() for row in history]

    def unset(self, name: str) -> None:
        """Drop a section from the JSON again (a resumed run's old `error`)."""
        setattr(self, name, None)
        self.model_fields_set.discard(name)

    def stage_done(self, stage: str) -> bool:
        record = self.stages.get(stage)
        return record is not None and record.status == "done"

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
