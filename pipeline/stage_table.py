"""The stage table: which stages a run has, in which order, when each is enabled, and how a
resumed run gets back the in-memory state a finished stage left behind.

Each row pairs a stage module of `stages/` with a small adapter that feeds it from the run
context and puts its typed result into the manifest. The runner (`pipeline.runner`) walks the
table and knows nothing about any particular stage. Adding a stage is one adapter here plus one
row in `STAGES` (and its module in `stages/`, its config section in `pipeline.config` and, if it
has a result to keep, a field in `pipeline.manifest`).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

import optg
from pipeline.config import ConfigError, PipelineConfig
from pipeline.manifest import DataSummary, Deployment, ExportRecord
from pipeline.rundir import RunDir
from stages import bake as bake_stage
from stages import report as report_stage
from stages import sparsify as sparsify_stage
from stages import validate as validate_stage
from stages import verify as verify_stage
from stages.base import StageError
from stages.data import DataBundle, load_data
from stages.export import export_onnx
from stages.io import atomic_torch_save, safe_torch_load
from stages.model import build_model
from stages.train import EpochRecord, StepHook, TrainConfig, Trainer, evaluate

DEBUG_SIGNAL_ENV = "OPTG_DEBUG_SIGNAL_AT"


@dataclass
class RunContext:
    """What the stages of one run share in memory; the manifest (via `run`) is what they share on disk."""

    cfg: PipelineConfig
    run: RunDir
    device: torch.device
    log: Callable[[str], None]
    progress: bool = False
    on_step: StepHook | None = None
    on_epoch: Callable[[EpochRecord], None] | None = None  # after each epoch's checkpoint (tracking)
    bundle_: DataBundle | None = None
    model_: nn.Module | None = None
    sparsifier_: optg.Sparsifier | None = None

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


def _always(cfg: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

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
    inputs: the config keys (dotted) its result depends on, besides the stages before it; a
        rerun of the run directory with a config that changes them redoes it (`pipeline.reuse`).
    redoable: a changed config may redo it on the same run directory without `--force`; a
        change that reaches a stage that is not redoable (training, the data) is refused.
    """

    name: str
    run: Callable[[RunContext], None]
    enabled: Callable[[PipelineConfig], bool] = _always
    restore: Callable[[RunContext], None] | None = None
    state: str | None = None
    rerun: bool = False
    epilogue: bool = False
    section: str | None = None
    inputs: tuple[str, ...] = ()
    redoable: bool = False


# --------------------------------------------------------------------------- adapters


def run_data(ctx: RunContext) -> None:
    bundle = ctx.bundle_ = load_data(ctx.cfg.data, ctx.cfg.seed)
    ctx.run.manifest.metrics.data = DataSummary(
        name=bundle.name, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes,
        sizes={s: len(bundle.split(s)) for s in ("train", "val", "test")})  # type: ignore[arg-type]


def run_model(ctx: RunContext) -> None:
    torch.manual_seed(ctx.cfg.seed)
    ctx.model_ = build_model(ctx.cfg.model, ctx.bundle.input_shape, ctx.bundle.num_classes).to(ctx.device)
    example = ctx.bundle.tensors("val", limit=1)[0].to(ctx.device)
    metrics = ctx.run.manifest.metrics
    metrics.macs, metrics.params = report_stage.count_macs_and_params(ctx.model, example)
    try:  # plan the target layers now: a config that sparsifies nothing fails before training
        sparsify_stage.plan(ctx.model, ctx.cfg.sparsity)
    except ValueError as exc:
        raise ConfigError([f"sparsity: {exc}"], str(ctx.cfg.name)) from None


def _trainer(ctx: RunContext, phase: str, cfg: TrainConfig, sparsifier: optg.Sparsifier | None = None) -> Trainer:
    return Trainer(ctx.model, ctx.bundle, cfg, phase=phase, device=ctx.device, seed=ctx.cfg.seed,
                   batch_size=ctx.cfg.data.batch_size, eval_batch_size=ctx.cfg.data.eval_batch_size,
                   sparsifier=sparsifier, progress=ctx.progress, log=ctx.log, on_step=ctx.on_step)


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    return safe_torch_load(path, map_location=device)


def _run_phase(ctx: RunContext, trainer: Trainer, checkpoint: Path) -> None:
    """Train one phase from its last epoch checkpoint (if any), saving one after every epoch."""
    if checkpoint.exists():
        trainer.load_state_dict(_load_checkpoint(checkpoint, ctx.device))
        ctx.log(f"[{trainer.phase}] resuming at epoch {trainer.next_epoch + 1}/{trainer.cfg.epochs}")
    manifest = ctx.run.manifest
    for record in trainer.history:  # epochs of an earlier session (tracking skips those it has)
        if ctx.on_epoch is not None:
            ctx.on_epoch(record)

    def save(t: Trainer) -> None:
        """Checkpoint, then the manifest's history and metrics.csv: a long run can be followed."""
        atomic_torch_save(t.state_dict(), checkpoint)
        manifest.history = [h for h in manifest.history if h.phase != t.phase] + list(t.history)
        ctx.run.write_metrics_csv()
        ctx.run.save()
        if ctx.on_epoch is not None and t.history:
            ctx.on_epoch(t.history[-1])

    trainer.run(on_epoch_end=save)
    manifest.history = [h for h in manifest.history if h.phase != trainer.phase] + list(trainer.history)


def run_dense(ctx: RunContext) -> None:
    assert ctx.cfg.train is not None  # enabled only with a train section
    _run_phase(ctx, _trainer(ctx, "dense", ctx.cfg.train), ctx.run.checkpoints / "dense.pt")


def restore_dense(ctx: RunContext) -> None:
    ctx.model.load_state_dict(_load_checkpoint(ctx.run.checkpoints / "dense.pt", ctx.device)["model"])


def run_reference(ctx: RunContext) -> None:
    accuracy = evaluate(ctx.model, ctx.bundle, "test", ctx.device, ctx.cfg.data.eval_batch_size)
    ctx.run.manifest.metrics.dense_accuracy = accuracy
    ctx.log(f"[reference] dense test accuracy {accuracy:.4f}" if accuracy is not None
            else "[reference] empty test split: no dense accuracy")


def run_sparsify(ctx: RunContext) -> None:
    """Attach the sparsifier and train; resumed mid-phase from the last sparse checkpoint. Also
    the restore: with every epoch checkpointed it trains zero epochs and leaves the sparsifier."""
    cfg, data = ctx.cfg.sparsity, ctx.cfg.data
    steps = len(ctx.bundle.loader("train", data.batch_size, shuffle=True))
    sparsifier = ctx.sparsifier_ = sparsify_stage.build_sparsifier(
        ctx.model, cfg, steps_per_epoch=steps, seed=ctx.cfg.seed,
        from_trained=ctx.cfg.train is not None or ctx.cfg.model.weights is not None)
    checkpoint = ctx.run.checkpoints / "sparse.pt"
    trainer = _trainer(ctx, "sparse", cfg, sparsifier)
    if not checkpoint.exists():
        sparsify_stage.calibrate_if_needed(
            sparsifier, ctx.bundle.loader("train", data.batch_size, shuffle=True, seed=ctx.cfg.seed), cfg, ctx.device)
    _run_phase(ctx, trainer, checkpoint)


def run_bake(ctx: RunContext) -> None:
    result = bake_stage.bake(ctx.sparsifier)
    metrics = ctx.run.manifest.metrics
    metrics.targeted_sparsity, metrics.model_sparsity = result.targeted_sparsity, result.model_sparsity
    metrics.layers = result.layers
    path = bake_stage.save_safetensors(ctx.model, ctx.run.path / "model.safetensors",
                                       {"config_hash": ctx.run.manifest.config_hash})
    ctx.run.add_artifact("model.safetensors", path)


def restore_baked(ctx: RunContext) -> None:
    ctx.model.load_state_dict(load_file(str(ctx.run.path / "model.safetensors"), device=str(ctx.device)))


def run_validate(ctx: RunContext) -> None:
    sparse = evaluate(ctx.model, ctx.bundle, "test", ctx.device, ctx.cfg.data.eval_batch_size)
    if sparse is None:
        raise StageError("the test split is empty: nothing to validate on (lower data.val_fraction or add data)")
    metrics = ctx.run.manifest.metrics
    result = validate_stage.validate(sparse, metrics.dense_accuracy, ctx.cfg.validate)
    metrics.sparse_accuracy, metrics.accuracy_drop = sparse, result.accuracy_drop
    metrics.nonzero_params = report_stage.nonzero_params(ctx.model)
    ctx.log(f"[validate] sparse test accuracy {sparse:.4f}"
            + (f", drop {result.accuracy_drop * 100:.2f} points" if result.accuracy_drop is not None else ""))
    validate_stage.raise_on_failure(result)


def _onnx_inputs(ctx: RunContext) -> torch.Tensor:
    return ctx.bundle.tensors("val", limit=ctx.cfg.verify.num_samples)[0]


def run_export(ctx: RunContext) -> None:
    s, manifest = ctx.cfg.sparsity, ctx.run.manifest
    target = s.as_pattern.target
    metadata = {"optg.config_hash": manifest.config_hash, "optg.method": s.method, "optg.pattern": str(s.pattern),
                "optg.target": str(target),
                "optg.targeted_sparsity": f"{manifest.metrics.targeted_sparsity or 0:.6f}",
                "optg.version": manifest.versions["optg-pipeline"]}
    bundle = ctx.bundle
    if bundle.class_names is not None:
        metadata["optg.class_names"] = json.dumps(bundle.class_names)
    if bundle.preprocessing is not None:
        metadata["optg.preprocessing"] = json.dumps(bundle.preprocessing)
    ctx.model.eval().cpu()
    result = export_onnx(ctx.model, _onnx_inputs(ctx)[:2], ctx.run.path / "model.onnx", ctx.cfg.export, metadata)
    manifest.deployment = Deployment(inputs=result.inputs, outputs=result.outputs,  # type: ignore[arg-type]
                                     class_names=bundle.class_names, preprocessing=bundle.preprocessing)
    ctx.run.add_artifact("model.onnx", result.path)
    if result.compact_path is not None:
        ctx.run.add_artifact("model.compact.onnx", result.compact_path)
    for sidecar in result.data_paths:  # weights of a model over ~1.8 GB, beside the .onnx
        ctx.run.add_artifact(sidecar.name, sidecar)
    manifest.export = ExportRecord.of(result, ctx.run.path)
    for note in result.warnings:
        ctx.log(f"[export] note: {note}")


def run_verify(ctx: RunContext) -> None:
    manifest = ctx.run.manifest
    if manifest.export is None:
        raise StageError("verify needs the export stage's result, and the manifest has none")
    ctx.model.eval().cpu()
    expectations = [verify_stage.LayerExpectation(layer.parameter, layer.pattern, layer.sparsity)
                    for layer in manifest.metrics.layers]
    result = verify_stage.verify_onnx(manifest.export.result(ctx.run.path), ctx.model, _onnx_inputs(ctx),
                                      expectations, ctx.cfg.verify)
    manifest.verify = result
    manifest.metrics.parity_max_abs_error = result.parity_max_abs_error
    verify_stage.raise_on_failure(result)


def report_input(ctx: RunContext) -> report_stage.ReportInput:
    """The report's typed input, from the manifest and the sparsity config."""
    m, s = ctx.run.manifest, ctx.cfg.sparsity
    shown = ("dense_accuracy", "sparse_accuracy", "accuracy_drop", "targeted_sparsity", "model_sparsity",
             "params", "nonzero_params", "macs", "parity_max_abs_error")
    return report_stage.ReportInput(
        name=m.name, status=m.status, failed_gate=m.error.gate if m.error else None,
        error=m.error.message if m.error else None, method=s.method, pattern=s.pattern, target=s.target,
        config_hash=m.config_hash, **{k: getattr(m.metrics, k) for k in shown},
        max_accuracy_drop=ctx.cfg.validate.max_accuracy_drop, min_accuracy=ctx.cfg.validate.min_accuracy,
        stages=[report_stage.StageRow(name=k, status=v.status, seconds=v.seconds) for k, v in m.stages.items()],
        layers=m.metrics.layers, onnx_layers=m.verify.layers if m.verify else [],
        artifacts=[report_stage.ArtifactRow(**a.model_dump()) for a in m.artifacts.values()],
        history=m.history)


def run_report(ctx: RunContext) -> None:
    for path in report_stage.write_report(ctx.run.path, report_input(ctx), ctx.cfg.report):
        ctx.run.add_artifact(path.name, path)


# --------------------------------------------------------------------------- the table


STAGES: tuple[Stage, ...] = (
    Stage("data", run_data, rerun=True, inputs=("seed", "device", "data")),
    Stage("model", run_model, rerun=True, inputs=("model",)),
    Stage("train", run_dense, enabled=lambda c: c.train is not None, restore=restore_dense, state="weights",
          section="train", inputs=("train",)),
    Stage("reference", run_reference, enabled=lambda c: c.train is not None or c.model.weights is not None),
    Stage("sparsify", run_sparsify, restore=run_sparsify, state="weights", section="sparsity", inputs=("sparsity",)),
    Stage("bake", run_bake, restore=restore_baked, state="weights"),
    Stage("validate", run_validate, section="validate", inputs=("validate",), redoable=True),
    Stage("export", run_export, enabled=lambda c: c.export.enabled, section="export", inputs=("export",),
          redoable=True),
    Stage("verify", run_verify, enabled=lambda c: c.verify.enabled, section="verify", inputs=("verify",),
          redoable=True),
    Stage("report", run_report, epilogue=True, section="report", inputs=("report",), redoable=True),
)


# --------------------------------------------------------------------------- debug hook


def debug_signal_hook(spec: str | None = None) -> StepHook | None:
    """`OPTG_DEBUG_SIGNAL_AT=PHASE:EPOCH:STEP[:SIGNAL]` (README, "The tests"): after training step
    STEP of epoch EPOCH (both 1-based) of PHASE (dense or sparse), the process sends itself
    SIGNAL (INT, the default, behaves like Ctrl-C; KILL like a hard kill). The resume tests use it
    to interrupt a run at an exact point; unset, nothing is installed."""
    spec = os.environ.get(DEBUG_SIGNAL_ENV) if spec is None else spec
    if not spec:
        return None
    parts = spec.split(":")
    try:
        phase, epoch, step = parts[0], int(parts[1]), int(parts[2])
        sig = signal.Signals[f"SIG{parts[3] if len(parts) > 3 else 'INT'}"]
        if len(parts) > 4 or phase not in ("dense", "sparse") or epoch < 1 or step < 1:
            raise ValueError(spec)
    except (IndexError, KeyError, ValueError):
        raise ConfigError([f"{DEBUG_SIGNAL_ENV}={spec!r}: expected PHASE:EPOCH:STEP[:SIGNAL], "
                           "e.g. sparse:3:5:INT (phase dense or sparse, epoch and step from 1)"],
                          "environment") from None

    def hook(trainer: Trainer, at_epoch: int, at_step: int) -> None:
        if (trainer.phase, at_epoch, at_step) == (phase, epoch, step):
            print(f"[debug] {DEBUG_SIGNAL_ENV}: sending {sig.name} at {phase} epoch {epoch} step {step}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), sig)
    return hook

