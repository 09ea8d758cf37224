"""The runner: config -> stages -> artifacts, with a manifest and resume.

It walks the stage table (`pipeline.stage_table.STAGES`, the rows the stage modules declare:
data, model, train (dense, optional), reference, reference_onnx, structured, sparsify, bake,
validate, export, verify, onnx_validate, benchmark, report) and knows nothing about any one
stage. A stage recorded as done in the manifest is not run again: it restores what later
stages need, or reruns when it is cheap; the training stages also resume mid-phase from their
last epoch checkpoint. Outcomes map to exit codes in cli.py: 0 ok, 2 config/usage, 3 gate
failed, 1 anything else.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline import reuse
from pipeline.config import ConfigError, PipelineConfig, config_hash, dump_yaml, resolved_dict
from pipeline.distributed import DistInfo, broadcast_object
from pipeline.manifest import DistributedRecord, Environment, ErrorRecord, Manifest, Status
from pipeline.rundir import RunDir, RunDirConflict
from pipeline.stage_table import STAGES, RunContext, Stage
from pipeline.tracking import build_tracking, record_metrics
from stages.base import ConfigFieldError, GateFailure, StageConfigError, StageError
from stages.io import WriteError, atomic_write_text
from stages.train import EpochRecord, StepHook


class UserExit(StageError):
    """Code run by a stage (a model or data plugin) called `sys.exit`: the run failed (exit 1)."""


@dataclass
class RunOptions:
    out: Path | None = None
    force: bool = False
    quiet: bool = False
    progress: bool = False
    dist: DistInfo = DistInfo()  # this process's rank; rank 0 alone writes the run directory
    command: list[str] | None = None  # the command line for the manifest (default sys.argv)
    # called after every training step (trainer, epoch, step; both 1-based): for a caller that
    # embeds the runner, e.g. the tests' deterministic interrupts (tests/interrupt.py)
    on_step: StepHook | None = None


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the outcome is written: torchrun repeats a Ctrl-C to the ranks
    and sends SIGTERM when another rank failed, and neither may cut the manifest short (a held
    signal is raised again afterwards and still ends the process). Python-level handlers, not a
    thread signal mask: torch's own threads would still take a signal the main thread blocks."""
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        yield
        return
    caught: list[int] = []
    held = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def record_run_facts(manifest: Manifest, cfg: PipelineConfig, device: torch.device,
                     command: list[str] | None) -> None:
    """The manifest's top-level method/pattern/target (what a release step branches on) and the
    environment of this invocation."""
    manifest.method, manifest.pattern = cfg.sparsity.method, cfg.sparsity.as_pattern
    manifest.target = manifest.pattern.target
    manifest.environment = Environment.current(device, command)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device: 'cuda' requested but torch sees no CUDA device; use --device cpu or auto"])
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Runner:
    """Runs the enabled stages of `stages` (default: the pipeline's table) for one config."""

    def __init__(self, cfg: PipelineConfig, options: RunOptions, log: Callable[[str], None] | None = None,
                 stages: Sequence[Stage] = STAGES) -> None:
        self.cfg, self.options = cfg, options
        self.log = log or ((lambda msg: None) if options.quiet else (lambda msg: print(msg, file=sys.stderr)))
        self.run = RunDir(options.out or Path("runs") / cfg.name, writer=options.dist.writer,
                          results={stage.name: stage.results for stage in stages})
        self.table = list(stages)
        self.stages = [stage for stage in stages if stage.enabled(cfg)
                       and (stage.all_ranks or options.dist.writer)]
        writer = options.dist.writer  # tracking, like every file, is rank 0's
        self.ctx = RunContext(cfg, self.run, resolve_device(cfg.device), self.log, progress=options.progress,
                              on_step=options.on_step, on_epoch=self._log_epoch if writer else None,
                              dist=options.dist, broadcast=lambda value: broadcast_object(value, options.dist))
        self.tracking = build_tracking(cfg.tracking, self.log)  # used on rank 0 only
        self.failed_stage: str | None = None

    def _log_epoch(self, record: EpochRecord) -> None:
        self.tracking.log_epoch(record.phase, record.epoch, record_metrics(record))

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, stage: Stage) -> None:
        """Run `stage`, record it done (or failed, then re-raise) with its seconds."""
        started = time.perf_counter()
        self.log(f"[{stage.name}] ...")
        self.run.current_stage = stage.name
        try:
            stage.run(self.ctx)
        except BaseException as exc:
            self.failed_stage = stage.name
            self.run.record_stage(stage.name, "failed", time.perf_counter() - started)
            if stage.section and isinstance(exc, (ConfigFieldError, GateFailure)):
                exc.locate(stage.section)
            if isinstance(exc, StageConfigError):  # typed: the stage names its field, nobody reads the text
                where = exc.section or stage.section or stage.name
                if exc.field:
                    where = f"{where}.{exc.field}"
                raise ConfigError([f"{where}: {message}" for message in exc.messages], str(self.cfg.name)) from None
            if isinstance(exc, SystemExit):  # a plugin's sys.exit(0) must not end the run as a success
                raise UserExit(f"stage {stage.name!r}: code it ran called sys.exit({exc.code!r}); the run "
                               "stopped there and failed (a stage never ends the process)") from exc
            raise
        finally:
            self.run.current_stage = None
        seconds = time.perf_counter() - started
        if not self.run.stage_done(stage.name):
            self.run.record_stage(stage.name, "done", seconds)
        self.log(f"[{stage.name}] done in {seconds:.1f}s")

    def _restorers(self) -> set[str]:
        """Done stages whose restore runs: per state, the last done stage that rebuilds it."""
        last: dict[str, str] = {}
        for stage in self.stages:
            if stage.restore is not None and self.run.stage_done(stage.name):
                last[stage.state or stage.name] = stage.name
        return set(last.values())

    # ------------------------------------------------------------------ main
    def execute(self) -> Manifest:
        """Run every stage not yet done. Raises GateFailure / StageError after recording them.
        The run directory is locked (`RunDir.lock`) from opening it until this returns."""
        try:
            return self._execute()
        finally:
            self.run.unlock()

    def _execute(self) -> Manifest:
        cfg, info = self.cfg, self.options.dist
        resolved = resolved_dict(cfg)
        resumed = self._open(resolved)
        record_run_facts(self.run.manifest, cfg, self.ctx.device, self.options.command)
        self.run.manifest.distributed = DistributedRecord(**info.record())
        where = f" ({info.world_size} processes, {info.backend})" if info.world_size > 1 else ""
        self.log(f"{'resuming' if resumed else 'starting'} run {cfg.name!r} in {self.run.path} on "
                 f"{self.ctx.device}{where}")
        for rerun in self.run.new_reruns:
            self.log(f"redoing {', '.join(rerun.stages)}: {rerun.reason}")
        if info.writer:
            atomic_write_text(self.run.path / "config.yaml", dump_yaml(cfg))
            self.run.add_artifact("config.yaml", self.run.path / "config.yaml")
            self.run.write_metrics_csv()
            self.run.save()
        if self.tracking.enabled and info.writer:
            self.run.manifest.tracking = self.tracking.start(resolved, self.run.path)
            self.run.save()
        restorers = self._restorers()
        try:
            for stage in self.stages:
                if stage.epilogue:
                    continue
                if not self.run.stage_done(stage.name) or stage.rerun:
                    self._run_stage(stage)
                elif stage.name in restorers:
                    assert stage.restore is not None
                    stage.restore(self.ctx)
                    self.log(f"[{stage.name}] done earlier, restored")
                else:
                    self.log(f"[{stage.name}] done earlier, skipped")
            self.run.manifest.status = "succeeded"  # every gate passed; the epilogue says so
            for stage in self.stages:
                if stage.epilogue:
                    self._run_stage(stage)
            if self.options.dist.writer:
                self.tracking.log_final(self.run.manifest.metrics.model_dump(mode="json"))
        except GateFailure as exc:
            with _signals_held():
                self._fail("gate_failed", exc, gate=exc.gate)
            raise
        except KeyboardInterrupt as exc:
            with _signals_held():
                self._fail("interrupted", exc)
            raise
        except SystemExit as exc:  # from a restore: user code never ends a run as a success
            error = UserExit(f"code run while restoring called sys.exit({exc.code!r}); the run failed")
            self._fail("failed", error)
            raise error from exc
        except Exception as exc:
            with _signals_held():
                self._fail("failed", exc)
            raise
        finally:
            with _signals_held():
                self.run.save()
                if self.tracking.enabled and self.options.dist.writer:
                    self._finish_tracking()
        return self.run.manifest

    def _open(self, resolved: dict) -> bool:
        """Open the run directory on rank 0 (and re-check its artifacts on a resume), then hand
        its manifest to the other ranks, which never read or write the directory themselves;
        an error there stops every rank."""
        info, cfg = self.options.dist, self.cfg
        outcome: tuple[bool, dict | None, str | None, str | None] = (False, None, None, None)
        error: Exception | None = None
        if info.writer:
            try:
                resumed = self.run.open(cfg.name, config_hash(cfg), self.options.force,
                                        fingerprints=reuse.fingerprints(resolved, self.table),
                                        redoable={s.name for s in self.table if s.redoable},
                                        resolved=resolved)
                if resumed:
                    self.run.check_artifacts([s.name for s in self.table])
                outcome = (resumed, self.run.manifest.to_json(), None, None)
            except Exception as exc:
                error, outcome = exc, (False, None, type(exc).__name__, str(exc))
        outcome = broadcast_object(outcome, info)
        if error is not None:
            raise error
        resumed, manifest, kind, message = outcome
        if kind is not None:
            raise (RunDirConflict if kind == "RunDirConflict" else RuntimeError)(f"rank 0: {message}")
        if not info.writer:
            assert manifest is not None
            self.run.adopt(manifest)
        return resumed

    def _finish_tracking(self) -> None:
        """Send the artifacts and the status to the trackers; never changes the outcome."""
        files = [self.run.path / a.path for a in self.run.manifest.artifacts.values()]
        self.tracking.log_artifacts([f for f in files if f.is_file()] + [self.run.manifest_path])
        self.run.manifest.tracking = self.tracking.finish(self.run.manifest.status)
        self.run.save()

    def _relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.run.path.resolve()))
        except ValueError:
            return str(path)

    def _fail(self, status: Status, exc: BaseException, gate: str | None = None) -> None:
        self.run.manifest.status = status
        write = exc if isinstance(exc, WriteError) else None
        where = {"stage": self.failed_stage} if self.failed_stage else {}
        if write is not None:
            where["file"] = self._relative(write.path)
        self.run.manifest.error = ErrorRecord(type=type(exc).__name__, gate=gate, message=str(exc), **where)
        if status != "gate_failed" or not self.options.dist.writer:
            return
        self.tracking.log_final(self.run.manifest.metrics.model_dump(mode="json"))
        for stage in self.stages:  # a failed gate still leaves a readable report of what was measured
            if stage.epilogue:
                try:
                    stage.run(self.ctx)
                except Exception as epilogue_exc:  # noqa: BLE001
                    self.log(f"[{stage.name}] could not be written: {epilogue_exc}")
