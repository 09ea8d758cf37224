"""The runner: config -> stages -> artifacts, with a manifest and resume.

It walks the stage table (`pipeline.stage_table.STAGES`: data, model, train (dense, optional),
reference, reference_onnx, structured, sparsify, bake, validate, export, verify, benchmark,
report). A stage recorded as done in the
manifest is not run again: it restores what later stages need, or reruns when it is cheap; the
training stages also resume mid-phase from their last epoch checkpoint. Outcomes map to exit
codes in cli.py: 0 ok, 2 config/usage, 3 gate failed, 1 anything else.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline.config import ConfigError, PipelineConfig, config_hash, dump_yaml
from pipeline.manifest import ErrorRecord, Manifest, Status
from pipeline.rundir import RunDir
from pipeline.stage_table import STAGES, RunContext, Stage, debug_signal_hook
from stages.base import ConfigFieldError, GateFailure
from stages.io import atomic_write_text


@dataclass
class RunOptions:
    out: Path | None = None
    force: bool = False
    quiet: bool = False
    progress: bool = False


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
        self.run = RunDir(options.out or Path("runs") / cfg.name)
        self.stages = [stage for stage in stages if stage.enabled(cfg)]
        self.ctx = RunContext(cfg, self.run, resolve_device(cfg.device), self.log, progress=options.progress,
                              on_step=debug_signal_hook())

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, stage: Stage) -> None:
        """Run `stage`, record it done (or failed, then re-raise) with its seconds."""
        started = time.perf_counter()
        self.log(f"[{stage.name}] ...")
        try:
            stage.run(self.ctx)
        except BaseException as exc:
            self.run.record_stage(stage.name, "failed", time.perf_counter() - started)
            if stage.section and isinstance(exc, (ConfigFieldError, GateFailure)):
                exc.locate(stage.section)
            raise
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
        """Run every stage not yet done. Raises GateFailure / StageError after recording them."""
        cfg = self.cfg
        resumed = self.run.open(cfg.name, config_hash(cfg), self.options.force)
        self.log(f"{'resuming' if resumed else 'starting'} run {cfg.name!r} in {self.run.path} on {self.ctx.device}")
        atomic_write_text(self.run.path / "config.yaml", dump_yaml(cfg))
        self.run.add_artifact("config.yaml", self.run.path / "config.yaml")
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
        except GateFailure as exc:
            self._fail("gate_failed", exc, gate=exc.gate)
            raise
        except KeyboardInterrupt as exc:
            self._fail("interrupted", exc)
            raise
        except Exception as exc:
            self._fail("failed", exc)
            raise
        finally:
            self.run.save()
        return self.run.manifest

    def _fail(self, status: Status, exc: BaseException, gate: str | None = None) -> None:
        self.run.manifest.status = status
        self.run.manifest.error = ErrorRecord(type=type(exc).__name__, gate=gate, message=str(exc))
        if status != "gate_failed":
            return
        for stage in self.stages:  # a failed gate still leaves a readable report of what was measured
            if stage.epilogue:
                try:
                    stage.run(self.ctx)
                except Exception as epilogue_exc:  # noqa: BLE001
                    self.log(f"[{stage.name}] could not be written: {epilogue_exc}")
