"""The contract between a stage and the runner: the `Stage` row a stage module declares, and the
`RunContext` its `run(ctx)` / `restore(ctx)` receive.

A stage module (stages/bake.py, stages/export.py, ...) ends with its row: `ROW = Stage("bake",
run_bake, restore=restore_baked, ...)`. `pipeline.stage_table.STAGES` lists the rows in order and
`pipeline.runner` walks them, knowing nothing about any one stage. Stages do not import
`pipeline` (data flows config -> stages -> artifacts), so the context is typed here by what a stage
may use of the pipeline's objects: the resolved config (`RunConfig`, whose sections are the
stages' own config types), the run directory (`RunFiles`) and the manifest (`RunRecord`, whose
sections are the stages' result types); `pipeline` passes its `PipelineConfig`, `RunDir` and
`Manifest`, which have those members.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    import optg
    from stages.benchmark import BenchmarkConfig
    from stages.data import DataBundle, DataConfig
    from stages.export import Deployment, ExportConfig, ExportRecord
    from stages.model import ModelConfig
    from stages.records import Metrics
    from stages.report import ReportConfig
    from stages.sparsify import SparsityConfig
    from stages.structured import StructuredConfig
    from stages.tasks import Task
    from stages.train import EpochRecord, StepHook, TrainConfig
    from stages.validate import ValidateConfig
    from stages.verify import VerifyConfig, VerifyResult


class RunConfig(Protocol):
    """The resolved config as stages read it (`pipeline.config.PipelineConfig`)."""

    @property
    def name(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def task(self) -> str: ...
    @property
    def data(self) -> DataConfig: ...
    @property
    def model(self) -> ModelConfig: ...
    @property
    def train(self) -> TrainConfig | None: ...
    @property
    def structured(self) -> StructuredConfig | None: ...
    @property
    def sparsity(self) -> SparsityConfig: ...
    @property
    def validate(self) -> ValidateConfig: ...
    @property
    def export(self) -> ExportConfig: ...
    @property
    def verify(self) -> VerifyConfig: ...
    @property
    def benchmark(self) -> BenchmarkConfig: ...
    @property
    def report(self) -> ReportConfig: ...
    @property
    def has_reference(self) -> bool: ...
    @property
    def benchmark_active(self) -> bool: ...


class ErrorView(Protocol):
    @property
    def gate(self) -> str | None: ...
    @property
    def message(self) -> str: ...


class StageView(Protocol):
    @property
    def status(self) -> str: ...
    @property
    def seconds(self) -> float: ...


class ArtifactView(Protocol):
    def model_dump(self) -> dict[str, Any]: ...


class RunRecord(Protocol):
    """The manifest's sections stages write (their typed results) and the run facts they read
    (`pipeline.manifest.Manifest`)."""

    metrics: Metrics
    sparsity: dict[str, Any] | None
    structured: dict[str, Any] | None
    export: ExportRecord | None
    verify: VerifyResult | None
    deployment: Deployment | None
    history: list[EpochRecord]

    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def config_hash(self) -> str: ...
    @property
    def versions(self) -> dict[str, str]: ...
    @property
    def error(self) -> ErrorView | None: ...
    @property
    def stages(self) -> Mapping[str, StageView]: ...
    @property
    def artifacts(self) -> Mapping[str, ArtifactView]: ...


class RunFiles(Protocol):
    """The run directory (`pipeline.rundir.RunDir`): where files go and how they are recorded."""

    @property
    def path(self) -> Path: ...
    @property
    def checkpoints(self) -> Path: ...
    @property
    def manifest(self) -> RunRecord: ...
    def add_artifact(self, name: str, path: Path) -> None: ...
    def write_metrics_csv(self) -> None: ...
    def save(self) -> None: ...


class Ranks(Protocol):
    """This process's place in a distributed job (`pipeline.distributed.DistInfo`)."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def writer(self) -> bool: ...


@dataclass(frozen=True)
class _OneProcess:
    rank: int = 0
    world_size: int = 1

    @property
    def writer(self) -> bool:
        return self.rank == 0


def _identity(value: Any) -> Any:
    return value


@dataclass
class RunContext:
    """What the stages of one run share in memory; the manifest (via `run`) is what they share on
    disk. `broadcast` gives every rank rank 0's value (the identity in one process)."""

    cfg: RunConfig
    run: RunFiles
    device: torch.device
    log: Callable[[str], None]
    progress: bool = False
    on_step: StepHook | None = None
    dist: Ranks = _OneProcess()
    broadcast: Callable[[Any], Any] = _identity
    on_epoch: Callable[[EpochRecord], None] | None = None  # after each epoch's checkpoint (tracking)
    bundle_: DataBundle | None = None
    model_: nn.Module | None = None
    sparsifier_: optg.Sparsifier | None = None
    task_: Task | None = None

    @property
    def task(self) -> Task:
        """The run's task (`task:`), resolved once."""
        if self.task_ is None:
            from stages.tasks import resolve_task

            self.task_ = resolve_task(self.cfg.task)
        return self.task_

    @property
    def bundle(self) -> DataBundle:
        if self.bundle_ is None:
            raise RuntimeError("the data stage has not run")
        return self.bundle_

    @property
    def model(self) -> nn.Module:
        if self.model_ is None:
            raise RuntimeError("the model stage has not run")
        return self.model_

    @property
    def sparsifier(self) -> optg.Sparsifier:
        if self.sparsifier_ is None:
            raise RuntimeError("the sparsify stage has not run")
        return self.sparsifier_

    def on_disk(self, path: Path) -> bool:
        """Whether rank 0 sees `path`: every rank takes the same branch (resume or not)."""
        return bool(self.broadcast(path.exists() if self.dist.writer else None))

    def example(self, limit: int) -> list[torch.Tensor]:
        """The model's inputs on the first `limit` validation samples, on the CPU (export traces
        with 2, verify compares `verify.num_samples`)."""
        return self.task.inputs(self.bundle.batch("val", limit))

    def export_interface(self, example: Sequence[torch.Tensor]) -> tuple[list[str], list[dict[int, str]]]:
        """The ONNX input names and dynamic axes of the task's inputs."""
        specs = self.task.input_specs(list(example), self.cfg.export.input_name)
        return [s.name for s in specs], [s.dynamic_axes for s in specs]


def _always(cfg: RunConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One row of the stage table, declared by the stage's module.

    name: the key in manifest `stages` and in log lines.
    run: does the work, reading and writing the context and the manifest.
    enabled: whether a config has this stage at all (a disabled stage is not recorded).
    restore: on a resumed run where this stage is done, rebuilds the in-memory state later
        stages need from what it left on disk; None when its results live in the manifest only.
    state: the in-memory state `restore` rebuilds; of several done stages with the same state,
        only the last restores (the baked weights make the dense weights moot).
    rerun: run again on every resume instead of restoring (cheap stages that build state).
    epilogue: runs once the outcome is known: after every other stage succeeded, and after a
        failed gate too (unrecorded then), so its output says how the run ended.
    section: the config section whose fields the stage's errors name ("validate" turns
        `max_accuracy_drop` into `validate.max_accuracy_drop`).
    all_ranks: False for stages only rank 0 runs in a distributed run (they write files and
        need no other rank: export, verify, report).
    inputs: the config keys (dotted) its result depends on, besides the stages before it; a
        rerun of the run directory with a config that changes them redoes it (`pipeline.reuse`).
    redoable: a changed config may redo it on the same run directory without `--force`; a
        change that reaches a stage that is not redoable (training, the data) is refused.
    results: the manifest sections that are this stage's result alone (`export`); a redone
        stage, or one a changed config disabled, drops them.
    """

    name: str
    run: Callable[[RunContext], None]
    enabled: Callable[[RunConfig], bool] = _always
    restore: Callable[[RunContext], None] | None = None
    state: str | None = None
    rerun: bool = False
    epilogue: bool = False
    section: str | None = None
    all_ranks: bool = True
    inputs: tuple[str, ...] = ()
    redoable: bool = False
    results: tuple[str, ...] = ()
