"""The stage table: which stages a run has, in which order, when each is enabled, and how a
resumed run gets back the in-memory state a finished stage left behind.

Each row pairs a stage module of `stages/` with a small adapter that feeds it from the run
context and puts its typed result into the manifest. The runner (`pipeline.runner`) walks the
table and knows nothing about any particular stage. Adding a stage is one adapter here plus one
row in `STAGES` (and its module in `stages/`, its config section in `pipeline.config` and, if it
has a result to keep, a field in `pipeline.manifest`).
"""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import optg
from pipeline.config import ConfigError, PipelineConfig
from pipeline.distributed import DistInfo, broadcast_object
from pipeline.manifest import DataSummary, Deployment, ExportRecord, Manifest, QuantizationRecord
from pipeline.rundir import RunDir
from stages import bake as bake_stage
from stages import benchmark as benchmark_stage
from stages import hf as hf_stage
from stages import onnx_eval
from stages import quantize as quantize_stage
from stages import report as report_stage
from stages import sparsify as sparsify_stage
from stages import structured as structured_stage
from stages import tensorrt as tensorrt_stage
from stages import validate as validate_stage
from stages import verify as verify_stage
from stages.base import ConfigFieldError, GateFailure, StageError
from stages.data import DataBundle, TextContext, load_data
from stages.export import ExportResult, export_onnx
from stages.io import atomic_torch_save, atomic_write, atomic_write_json, safe_torch_load
from stages.model import build_model
from stages.tasks import Task, export_view, resolve_task
from stages.train import EpochRecord, StepHook, TrainConfig, Trainer, evaluate


@dataclass
class RunContext:
    """What the stages of one run share in memory; the manifest (via `run`) is what they share on disk."""

    cfg: PipelineConfig
    run: RunDir
    device: torch.device
    log: Callable[[str], None]
    progress: bool = False
    on_step: StepHook | None = None
    dist: DistInfo = DistInfo()
    on_epoch: Callable[[EpochRecord], None] | None = None  # after each epoch's checkpoint (tracking)
    bundle_: DataBundle | None = None
    model_: nn.Module | None = None
    sparsifier_: optg.Sparsifier | None = None
    task_: Task | None = None

    @property
    def task(self) -> Task:
        """The run's task (`task:`), resolved once."""
        if self.task_ is None:
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
        return bool(broadcast_object(path.exists() if self.dist.writer else None, self.dist))

    def evaluate(self, split: str) -> float | None:
        """The task's metric on `split`, each rank counting its shard, summed over the ranks."""
        return evaluate(self.model, self.bundle, split, self.device, self.cfg.data.eval_batch_size,
                        rank=self.dist.rank, world_size=self.dist.world_size, task=self.task)


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
    all_ranks: False for stages only rank 0 runs in a distributed run (they write files and
        need no other rank: export, verify, report).
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
    all_ranks: bool = True
    inputs: tuple[str, ...] = ()
    redoable: bool = False


# --------------------------------------------------------------------------- adapters


def _text_context(ctx: RunContext) -> TextContext | None:
    """What a token task's text source needs besides `data:`: the layout, and the hf: model
    folder (its tokenizer is the default; its config's num_labels and positions bound the data)."""
    layout = ctx.task.text_layout
    if layout is None:
        return None
    folder = hf_stage.hf_dir(ctx.cfg.model.name)
    facts = hf_stage.read_folder(folder) if folder is not None else None
    return TextContext(layout, folder, facts.num_labels if facts else None, facts.max_positions if facts else None)


def run_data(ctx: RunContext) -> None:
    bundle = ctx.bundle_ = load_data(ctx.cfg.data, ctx.cfg.seed, _text_context(ctx))
    metrics = ctx.run.manifest.metrics
    metrics.task, metrics.metric = ctx.task.name, ctx.task.metric.name
    summary = DataSummary(
        name=bundle.name, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes,
        sizes={s: len(bundle.split(s)) for s in ("train", "val", "test")})  # type: ignore[arg-type]
    if bundle.tokenizer is not None:
        summary.tokenizer = bundle.tokenizer.describe()
    metrics.data = summary


def run_model(ctx: RunContext) -> None:
    torch.manual_seed(ctx.cfg.seed)
    bundle, task = ctx.bundle, ctx.task
    pad = bundle.tokenizer.pad_id if bundle.tokenizer is not None else None
    ctx.model_ = build_model(ctx.cfg.model, bundle.input_shape, bundle.num_classes, task, pad).to(ctx.device)
    _check_vocabulary(ctx)
    example = task.to_device(bundle.batch("val", 1), ctx.device)
    metrics = ctx.run.manifest.metrics
    with export_view(ctx.model, task) as view:  # positional inputs, whatever the model's keywords
        metrics.macs, metrics.params = report_stage.count_macs_and_params(view, task.inputs(example))
    try:  # plan the target layers now: a config that sparsifies nothing fails before training
        sparsify_stage.plan(ctx.model, ctx.cfg.sparsity)
    except ValueError as exc:
        raise ConfigError([f"sparsity: {exc}"], str(ctx.cfg.name)) from None
    if ctx.cfg.structured is not None:  # a model channel pruning would break is refused now, not after training
        trial = structured_stage.trial_problems(ctx.model, ctx.cfg.structured,
                                                ctx.bundle.tensors("train", limit=2)[0].to(ctx.device))
        if trial:
            raise ConfigError([f"structured: {p}" for p in trial], str(ctx.cfg.name))


def _check_vocabulary(ctx: RunContext) -> None:
    """Token data whose ids the model's embedding cannot look up fails here, not mid-training."""
    top = ctx.bundle.max_token_id
    embeddings = getattr(ctx.model, "get_input_embeddings", None)
    table = embeddings() if callable(embeddings) else None
    if top is not None and isinstance(table, nn.Embedding) and top >= table.num_embeddings:
        raise ConfigError([f"data: the tokenizer gives token id {top}, the model's embedding has "
                           f"{table.num_embeddings} rows (vocab_size); use the model's own tokenizer"],
                          str(ctx.cfg.name))


def _trainer(ctx: RunContext, phase: str, cfg: TrainConfig, sparsifier: optg.Sparsifier | None = None) -> Trainer:
    return Trainer(ctx.model, ctx.bundle, cfg, phase=phase, device=ctx.device, seed=ctx.cfg.seed,
                   batch_size=ctx.cfg.data.batch_size, eval_batch_size=ctx.cfg.data.eval_batch_size,
                   sparsifier=sparsifier, progress=ctx.progress, log=ctx.log, on_step=ctx.on_step,
                   rank=ctx.dist.rank, world_size=ctx.dist.world_size, task=ctx.task)


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    return safe_torch_load(path, map_location=device)


def _run_phase(ctx: RunContext, trainer: Trainer, checkpoint: Path) -> None:
    """Train one phase from its last epoch checkpoint (if any), saving one after every epoch.
    Rank 0 writes the checkpoints; on a resume every rank loads the one rank 0 found."""
    if ctx.on_disk(checkpoint):
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

    trainer.run(on_epoch_end=save if ctx.dist.writer else None)
    manifest.history = [h for h in manifest.history if h.phase != trainer.phase] + list(trainer.history)


def run_dense(ctx: RunContext) -> None:
    assert ctx.cfg.train is not None  # enabled only with a train section
    _run_phase(ctx, _trainer(ctx, "dense", ctx.cfg.train), ctx.run.checkpoints / "dense.pt")


def restore_dense(ctx: RunContext) -> None:
    ctx.model.load_state_dict(_load_checkpoint(ctx.run.checkpoints / "dense.pt", ctx.device)["model"])


def run_reference(ctx: RunContext) -> None:
    value, metric = ctx.evaluate("test"), ctx.task.metric
    setattr(ctx.run.manifest.metrics, f"dense_{metric.gates}", value)
    ctx.log(f"[reference] dense test {metric.name} {value:.4f}" if value is not None
            else f"[reference] empty test split: no dense {metric.name}")


def run_sparsify(ctx: RunContext) -> None:
    """Attach the sparsifier and train; resumed mid-phase from the last sparse checkpoint. Also
    the restore: with every epoch checkpointed it trains zero epochs and leaves the sparsifier."""
    cfg, data = ctx.cfg.sparsity, ctx.cfg.data
    steps = len(ctx.bundle.loader("train", data.batch_size, shuffle=True, rank=ctx.dist.rank,
                                  world_size=ctx.dist.world_size))
    from_trained = ctx.cfg.has_reference
    sparsifier = ctx.sparsifier_ = sparsify_stage.build_sparsifier(
        ctx.model, cfg, steps_per_epoch=steps, seed=ctx.cfg.seed, from_trained=from_trained)
    settings = ctx.run.manifest.sparsity = sparsify_stage.settings_in_force(sparsifier, cfg, from_trained)
    ctx.log(f"[sparse] start {settings['start']} ({settings['start_reason']}); " + ", ".join(
        f"{k} {v}" for k, v in settings.items() if k not in ("method", "start", "start_reason")))
    checkpoint = ctx.run.checkpoints / "sparse.pt"
    trainer = _trainer(ctx, "sparse", cfg.train, sparsifier) if cfg.train is not None else None
    if not ctx.on_disk(checkpoint):
        sparsify_stage.calibrate_if_needed(
            sparsifier, ctx.bundle.loader("train", data.batch_size, shuffle=True, seed=ctx.cfg.seed), cfg, ctx.device,
            ctx.task)
    if trainer is None:  # one-shot without `sparsity.train`: the calibrated mask is the result
        return
    try:
        _run_phase(ctx, trainer, checkpoint)
    except ConfigFieldError as exc:  # the trainer's fields sit under sparsity.train
        exc.nest("train")
        raise


def run_bake(ctx: RunContext) -> None:
    result = bake_stage.bake(ctx.sparsifier)
    metrics = ctx.run.manifest.metrics
    metrics.targeted_sparsity, metrics.model_sparsity = result.targeted_sparsity, result.model_sparsity
    metrics.layers = result.layers
    if not ctx.dist.writer:
        return
    path = bake_stage.save_safetensors(ctx.model, ctx.run.path / "model.safetensors",
                                       {"config_hash": ctx.run.manifest.config_hash})
    ctx.run.add_artifact("model.safetensors", path)


def restore_baked(ctx: RunContext) -> None:
    bake_stage.load_safetensors(ctx.model, ctx.run.path / "model.safetensors", device=str(ctx.device))


def run_validate(ctx: RunContext) -> None:
    sparse, metric = ctx.evaluate("test"), ctx.task.metric
    if sparse is None:
        raise StageError("the test split is empty: nothing to validate on (lower data.val_fraction or add data)")
    metrics = ctx.run.manifest.metrics
    dense = getattr(metrics, f"dense_{metric.gates}")
    result = validate_stage.validate(sparse, dense, ctx.cfg.validate, metric)
    if metric.gates == "perplexity":
        metrics.sparse_perplexity, metrics.perplexity_increase = sparse, result.change
        change = f", +{result.change * 100:.2f}%" if result.change is not None else ""
    else:
        metrics.sparse_accuracy, metrics.accuracy_drop = sparse, result.change
        change = f", drop {result.change * 100:.2f} points" if result.change is not None else ""
    metrics.nonzero_params = report_stage.nonzero_params(ctx.model)
    ctx.log(f"[validate] sparse test {metric.name} {sparse:.4f}{change}")
    validate_stage.raise_on_failure(result)


def _example(ctx: RunContext, limit: int) -> list[torch.Tensor]:
    """The model's inputs on the first `limit` validation samples, on the CPU (export traces
    with 2, verify compares `verify.num_samples`)."""
    return ctx.task.inputs(ctx.bundle.batch("val", limit))


def _export_interface(ctx: RunContext, example: list[torch.Tensor]) -> tuple[list[str], list[dict[int, str]]]:
    specs = ctx.task.input_specs(example, ctx.cfg.export.input_name)
    return [s.name for s in specs], [s.dynamic_axes for s in specs]


def _feeds(ctx: RunContext) -> list[list[torch.Tensor]]:
    """What verify compares: real validation samples; a token model at two sequence lengths
    (the batch's own and about half of it), so a sequence axis fixed by the exporter is caught."""
    batch = ctx.bundle.batch("val", ctx.cfg.verify.num_samples)
    task = ctx.task
    feeds = [task.inputs(batch)]
    if task.text_layout is not None:
        length = int(feeds[0][0].shape[1])
        shorter = max(2, (length + 1) // 2)
        if shorter < length:
            feeds.append(task.inputs(task.shorten(batch, shorter)))
    return feeds


def _copy_tokenizer(ctx: RunContext) -> list[str]:
    """The tokenizer files beside model.onnx (hashed artifacts): the run directory alone serves."""
    info = ctx.bundle.tokenizer
    if info is None:
        return []
    names = []
    for source in info.files:
        data = Path(source).read_bytes()

        def write(tmp: Path, data: bytes = data) -> None:
            Path(tmp).write_bytes(data)

        path = atomic_write(ctx.run.path / source.name, write)
        ctx.run.add_artifact(source.name, path)
        names.append(source.name)
    return names


def _dense_weights(ctx: RunContext) -> dict[str, str]:
    """The weights this run left dense on purpose (tied, output head, excluded...), with the
    reason: the file records them so `optg inspect --pattern` on it agrees with the run."""
    dense = {layer.parameter: layer.reason for layer in ctx.run.manifest.metrics.layers
             if layer.pattern.is_dense and layer.reason}
    by_id = {id(p): n for n, p in ctx.model.named_parameters()}  # first name of each tensor
    for alias, param in ctx.model.named_parameters(remove_duplicate=False):  # a tied head's own name too
        first = by_id.get(id(param))
        if first in dense and alias not in dense:
            dense[alias] = dense[first]
    return dense


def run_export(ctx: RunContext) -> None:
    s, manifest = ctx.cfg.sparsity, ctx.run.manifest
    target = s.as_pattern.target
    metadata = {"optg.config_hash": manifest.config_hash, "optg.method": s.method, "optg.pattern": str(s.pattern),
                "optg.target": str(target), "optg.task": ctx.task.name,
                "optg.targeted_sparsity": f"{manifest.metrics.targeted_sparsity or 0:.6f}",
                "optg.version": manifest.versions["optg-pipeline"]}
    bundle = ctx.bundle
    if bundle.class_names is not None:
        metadata["optg.class_names"] = json.dumps(bundle.class_names)
    if bundle.preprocessing is not None:
        metadata["optg.preprocessing"] = json.dumps(bundle.preprocessing)
    tokenizer = _copy_tokenizer(ctx)
    if tokenizer:
        metadata["optg.tokenizer"] = json.dumps(tokenizer)
    ctx.model.eval().cpu()
    example = _example(ctx, 2)
    names, axes = _export_interface(ctx, example)
    with export_view(ctx.model, ctx.task) as view:
        result = export_onnx(view, example, ctx.run.path / "model.onnx", ctx.cfg.export, metadata,
                             input_names=names, dynamic_axes=axes, dense_weights=_dense_weights(ctx))
    manifest.deployment = Deployment(inputs=result.inputs, outputs=result.outputs,  # type: ignore[arg-type]
                                     class_names=bundle.class_names, preprocessing=bundle.preprocessing,
                                     tokenizer=tokenizer or None)
    ctx.run.add_artifact("model.onnx", result.path)
    if result.compact_path is not None:
        ctx.run.add_artifact("model.compact.onnx", result.compact_path)
    for sidecar in result.data_paths:  # weights of a model over ~1.8 GB, beside the .onnx
        ctx.run.add_artifact(sidecar.name, sidecar)
    manifest.export = ExportRecord.of(result, ctx.run.path)
    for note in result.warnings:
        ctx.log(f"[export] note: {note}")
    shipped: list[tuple[str, str]] = [(result.path.name, result.dtype)]
    if ctx.cfg.export.quantize == "int8":
        manifest.export.quantization = _export_int8(ctx, result, example, names, axes, metadata)
        shipped.append((manifest.export.quantization.file, "int8"))
    lengths = ctx.cfg.benchmark.sequence_lengths or [int(bundle.input_shape[0])]
    sequence = max(lengths) if ctx.task.text_layout is not None else None
    manifest.deployment.tensorrt = [tensorrt_stage.engine_commands(file, dtype, result.inputs,
                                                                   ctx.cfg.benchmark.batch_sizes, sequence)
                                    for file, dtype in shipped]


def _export_int8(ctx: RunContext, result: ExportResult, example: list[torch.Tensor], names: list[str],
                 axes: list[dict[int, str]], metadata: dict[str, str]) -> QuantizationRecord:
    """model.int8.onnx from the fp32 graph (model.onnx itself, or for an fp16 export a staged
    fp32 export that is removed afterwards), calibrated on the first training batches."""
    cfg = ctx.cfg.export
    dest = ctx.run.path / "model.int8.onnx"
    with tempfile.TemporaryDirectory(dir=ctx.run.path, prefix=".fp32-") as tmp:
        source = result
        if result.dtype != "fp32":
            fp32 = cfg.model_copy(update={"dtype": "fp32", "compact": False, "quantize": "none"})
            with export_view(ctx.model, ctx.task) as view:
                source = export_onnx(view, example, Path(tmp) / "model.fp32.onnx", fp32, metadata, input_names=names,
                                     dynamic_axes=axes, dense_weights=_dense_weights(ctx))
        feeds = onnx_eval.calibration_feeds(ctx.bundle, ctx.task, source.inputs, cfg.calibration_batches,
                                            ctx.cfg.data.batch_size)
        quantized = quantize_stage.quantize_int8(source.path, dest, feeds, cfg.calibration_method)
    ctx.run.add_artifact("model.int8.onnx", dest)
    form = sum(layer.sparse_int8_form for layer in quantized.layers)
    ctx.log(f"[export] model.int8.onnx: {form}/{len(quantized.layers)} weighted GEMMs INT8 in, weight and out; "
            f"{len(feeds)} calibration batches ({cfg.calibration_method}), {quantized.seconds:.1f} s")
    return QuantizationRecord(file=dest.name, bytes=dest.stat().st_size, seconds=quantized.seconds,
                              library=quantized.library, calibration_batches=len(feeds),
                              calibration_method=cfg.calibration_method,
                              layers=[layer.to_dict() for layer in quantized.layers])


def run_verify(ctx: RunContext) -> None:
    manifest = ctx.run.manifest
    if manifest.export is None:
        raise StageError("verify needs the export stage's result, and the manifest has none")
    ctx.model.eval().cpu()
    expectations = [verify_stage.LayerExpectation(layer.parameter, layer.pattern, layer.sparsity)
                    for layer in manifest.metrics.layers]
    with export_view(ctx.model, ctx.task) as view:
        result = verify_stage.verify_onnx(manifest.export.result(ctx.run.path), view, _feeds(ctx),
                                          expectations, ctx.cfg.verify)
    if manifest.export.quantization is not None:
        failures, result.quantized = verify_stage.verify_int8(ctx.run.path / manifest.export.quantization.file)
        result.failures += failures
        result.passed = not result.failures
    manifest.verify = result
    manifest.metrics.parity_max_abs_error = result.parity_max_abs_error
    manifest.metrics.pattern_coverage = result.pattern_coverage
    verify_stage.raise_on_failure(result)


def run_onnx_validate(ctx: RunContext) -> None:
    """Every shipped ONNX file through ONNX Runtime over the whole test split; the run's gate
    applies to the worst of them (exit 3 naming the file)."""
    manifest, metric = ctx.run.manifest, ctx.task.metric
    if manifest.export is None:
        raise StageError("onnx_validate needs the export stage's result, and the manifest has none")
    export = manifest.export.result(ctx.run.path)
    files: list[tuple[Path, str]] = [(Path(export.path), export.dtype)]
    if export.compact_path is not None:
        files.append((Path(export.compact_path), export.dtype))
    if manifest.export.quantization is not None:
        files.append((ctx.run.path / manifest.export.quantization.file, "int8"))
    pytorch = getattr(manifest.metrics, f"sparse_{metric.gates}")
    rows = []
    for path, dtype in files:
        value = onnx_eval.evaluate_onnx(path, ctx.bundle, ctx.task, batch_size=ctx.cfg.data.eval_batch_size)
        rows.append(onnx_eval.FileMetric(
            file=path.name, dtype=dtype, metric=metric.name, value=value, pytorch=pytorch,
            difference=None if value is None or pytorch is None else value - pytorch))
        ctx.log(f"[onnx_validate] {path.name} ({dtype}): test {metric.name} {value:.4f} in ONNX Runtime"
                + (f", PyTorch {pytorch:.4f}" if pytorch is not None else "") if value is not None else
                f"[onnx_validate] {path.name}: empty test split")
    manifest.metrics.onnx = rows
    dense = getattr(manifest.metrics, f"dense_{metric.gates}")
    for quantized in (False, True):
        bad = onnx_eval.worst([r for r in rows if (r.dtype == "int8") == quantized], metric.higher_is_better)
        if bad is None or bad.value is None:
            continue
        gate = validate_stage.validate_quantized if quantized else validate_stage.validate
        result = gate(bad.value, dense, ctx.cfg.validate, metric)
        if not result.passed:
            raise GateFailure(metric.gates, f"{bad.file} (ONNX Runtime, whole test split): ",
                              problems=result.failures)


def run_reference_onnx(ctx: RunContext) -> None:
    """The latency reference: the dense model (after the dense phase / pretrained load, before
    structured pruning and sparse training) exported exactly like the final model."""
    model = copy.deepcopy(ctx.model).cpu().eval()
    cfg = ctx.cfg.export.model_copy(update={"compact": False})
    example = _example(ctx, 2)
    names, axes = _export_interface(ctx, example)
    with export_view(model, ctx.task) as view:
        path = benchmark_stage.export_reference(view, example, ctx.run.path / "reference.onnx", cfg,
                                                input_names=names, dynamic_axes=axes)
    ctx.run.add_artifact("reference.onnx", path)


STRUCTURED_CHECKPOINT = "structured.pt"  # {"model": state dict, "progress": StructuredProgress JSON}
STRUCTURED_FINETUNE = "structured-finetune.pt"  # {"step": n, "trainer": Trainer.state_dict()}


def _restore_structured_checkpoint(ctx: RunContext) -> structured_stage.StructuredProgress | None:
    """Reshape the freshly built dense model to the saved plan and load the saved weights;
    the saved progress, or None when no structured step has been checkpointed yet."""
    path = ctx.run.checkpoints / STRUCTURED_CHECKPOINT
    if not path.exists():
        return None
    state = _load_checkpoint(path, ctx.device)
    progress = structured_stage.StructuredProgress.model_validate_json(state["progress"])
    structured_stage.apply_plan(ctx.model, progress.plan)
    ctx.model.load_state_dict(state["model"], strict=True)
    return progress


def _structured_train_config(cfg: PipelineConfig) -> TrainConfig:
    """The fine-tune's optimiser settings: the dense phase's (`train`), else `sparsity.train`'s
    (the config check makes sure one exists when the fine-tune has epochs)."""
    base = cfg.train if cfg.train is not None else cfg.sparsity.train
    if base is None:  # no fine-tune epochs: the settings are never used
        return TrainConfig(epochs=1)
    return base


def run_structured(ctx: RunContext) -> None:
    """Remove channels (stages/structured.py), checkpointing after each step's pruning and each
    fine-tune epoch; a resumed run rebuilds the slimmed model from the saved plan and goes on."""
    cfg, data, seed = ctx.cfg.structured, ctx.cfg.data, ctx.cfg.seed
    assert cfg is not None  # enabled only with a structured section
    checkpoint, finetune_path = ctx.run.checkpoints / STRUCTURED_CHECKPOINT, ctx.run.checkpoints / STRUCTURED_FINETUNE
    resume = _restore_structured_checkpoint(ctx)
    if resume is not None:
        ctx.log(f"[structured] resuming after step {resume.pruned} (fine-tuned: {resume.finetuned})")

    def save(model: nn.Module, progress: structured_stage.StructuredProgress) -> None:
        atomic_torch_save({"model": model.state_dict(), "progress": progress.model_dump_json()}, checkpoint)

    def save_finetune(trainer: Trainer, step: int) -> None:
        atomic_torch_save({"step": step, "trainer": trainer.state_dict()}, finetune_path)
        manifest = ctx.run.manifest
        manifest.history = [h for h in manifest.history if h.phase != trainer.phase] + list(trainer.history)

    def load_finetune(step: int) -> dict | None:
        if not finetune_path.exists():
            return None
        state = _load_checkpoint(finetune_path, ctx.device)
        return state["trainer"] if state.get("step") == step else None

    finetune = structured_stage.trainer_finetune(
        ctx.bundle, _structured_train_config(ctx.cfg), device=ctx.device, seed=seed, batch_size=data.batch_size,
        log=ctx.log, on_epoch_end=save_finetune, load_state=load_finetune, on_step=ctx.on_step)
    example = ctx.bundle.tensors("train", limit=2)[0].to(ctx.device)
    result = structured_stage.prune_channels(
        ctx.model, cfg, example, batches=structured_stage.batch_source(ctx.bundle, data.batch_size, seed),
        finetune=finetune, checkpoint=save, resume=resume, seed=seed, log=ctx.log)
    ctx.run.manifest.structured = result.to_dict()
    ctx.run.add_artifact("structured_plan.json", atomic_write_json(ctx.run.path / "structured_plan.json", result.plan))
    macs = result.to_dict()["macs"]
    ctx.log(f"[structured] MACs {macs['before']} -> {macs['after']} (-{macs['reduction']:.1%}), "
            f"params {result.params_before} -> {result.params_after}")


def restore_structured(ctx: RunContext) -> None:
    """The slimmed architecture (and its pruned, fine-tuned weights) on a resumed run; later
    restores (sparse checkpoint, baked weights) then load into the right shapes."""
    if _restore_structured_checkpoint(ctx) is None:
        raise StageError(f"structured is recorded done but {ctx.run.checkpoints / STRUCTURED_CHECKPOINT} is "
                         "missing; rerun with --force")


def run_benchmark(ctx: RunContext) -> None:
    """Time reference.onnx against the final ONNX (ONNX Runtime, CPU; CUDA too when installed),
    record `metrics.latency`, then gate on `validate.max_latency_ratio` (exit 3): the gate lives
    here because the ratio exists only once the final file is exported."""
    manifest = ctx.run.manifest
    if manifest.export is None:
        raise StageError("benchmark needs the export stage's result, and the manifest has none")
    bundle, cfg = ctx.bundle, ctx.cfg.benchmark
    tokens = None
    if ctx.task.text_layout is not None:
        vocab = bundle.tokenizer.vocab_size if bundle.tokenizer is not None else bundle.num_classes
        tokens = benchmark_stage.TokenInputs(min(vocab, (bundle.max_token_id or vocab - 1) + 1),
                                             cfg.sequence_lengths or [int(bundle.input_shape[0])])
    result = benchmark_stage.measure_latency(ctx.run.path / "reference.onnx", ctx.run.path / manifest.export.file,
                                             bundle.input_shape, cfg, tokens)
    latency = result.to_dict()
    timed = [("model.onnx", result)]
    if manifest.export.quantization is not None:  # the INT8 file's ORT CPU latency joins the table
        int8 = benchmark_stage.measure_latency(ctx.run.path / "reference.onnx",
                                               ctx.run.path / manifest.export.quantization.file,
                                               bundle.input_shape, cfg, tokens)
        latency["int8"] = int8.to_dict()
        timed.append((manifest.export.quantization.file, int8))
    manifest.metrics.latency = latency
    for file, measured in timed:
        for row in measured.rows:
            at = f" sequence {row.sequence_length}" if row.sequence_length is not None else ""
            ctx.log(f"[benchmark] {row.provider} batch {row.batch_size}{at}: reference {row.reference_ms:.3f} ms, "
                    f"{file} {row.candidate_ms:.3f} ms, ratio {row.ratio:.3f} ({measured.threads} thread(s))")
    validate_stage.check_latency(result.max_ratio(), ctx.cfg.validate)


def report_input(ctx: RunContext) -> report_stage.ReportInput:
    """The report's typed input, from the manifest and the sparsity config."""
    m, s = ctx.run.manifest, ctx.cfg.sparsity
    shown = ("dense_accuracy", "sparse_accuracy", "accuracy_drop", "dense_perplexity", "sparse_perplexity",
             "perplexity_increase", "targeted_sparsity", "model_sparsity", "params", "nonzero_params", "macs",
             "parity_max_abs_error", "pattern_coverage")
    return report_stage.ReportInput(
        name=m.name, status=m.status, failed_gate=m.error.gate if m.error else None,
        error=m.error.message if m.error else None, method=s.method, pattern=s.as_pattern, target=s.target,
        config_hash=m.config_hash, **{k: getattr(m.metrics, k) for k in shown},
        metric=ctx.task.metric.name, max_accuracy_drop=ctx.cfg.validate.max_accuracy_drop,
        min_accuracy=ctx.cfg.validate.min_accuracy, max_perplexity_increase=ctx.cfg.validate.max_perplexity_increase,
        max_perplexity=ctx.cfg.validate.max_perplexity,
        stages=[report_stage.StageRow(name=k, status=v.status, seconds=v.seconds) for k, v in m.stages.items()],
        layers=m.metrics.layers, onnx_layers=m.verify.layers if m.verify else [],
        artifacts=[report_stage.ArtifactRow(**a.model_dump()) for a in m.artifacts.values()],
        history=m.history, sections=_report_sections(m))


def _report_sections(m: Manifest) -> list[str]:
    sections = []
    if m.structured is not None:
        sections.append(structured_stage.render_structured_markdown(m.structured))
    if m.metrics.onnx:
        sections.append(onnx_eval.render_files_markdown(m.metrics.onnx))
    if m.export is not None and m.export.quantization is not None and m.verify is not None:
        q = m.export.quantization
        sections.append(quantize_stage.render_placement_markdown(q.file, m.verify.quantized, q.calibration_method,
                                                                 q.calibration_batches))
    if m.deployment is not None and m.deployment.tensorrt:
        sections.append(tensorrt_stage.render_markdown(m.deployment.tensorrt))
    if m.metrics.latency is not None:
        sections.append(benchmark_stage.render_latency_markdown(m.metrics.latency))
        if isinstance(m.metrics.latency.get("int8"), dict):
            sections.append(benchmark_stage.render_latency_markdown(m.metrics.latency["int8"], "model.int8.onnx"))
    return sections


def run_report(ctx: RunContext) -> None:
    for path in report_stage.write_report(ctx.run.path, report_input(ctx), ctx.cfg.report):
        ctx.run.add_artifact(path.name, path)


# --------------------------------------------------------------------------- the table


STAGES: tuple[Stage, ...] = (
    Stage("data", run_data, rerun=True, inputs=("seed", "device", "data")),
    Stage("model", run_model, rerun=True, inputs=("model",)),
    Stage("train", run_dense, enabled=lambda c: c.train is not None, restore=restore_dense, state="weights",
          section="train", inputs=("train",)),
    Stage("reference", run_reference, enabled=lambda c: c.has_reference),
    Stage("reference_onnx", run_reference_onnx, enabled=lambda c: c.benchmark_active, section="export",
          all_ranks=False),
    Stage("structured", run_structured, enabled=lambda c: c.structured is not None, restore=restore_structured,
          state="architecture", section="structured", inputs=("structured",)),
    Stage("sparsify", run_sparsify, restore=run_sparsify, state="weights", section="sparsity", inputs=("sparsity",)),
    Stage("bake", run_bake, restore=restore_baked, state="weights"),
    Stage("validate", run_validate, section="validate", inputs=("validate",), redoable=True),
    Stage("export", run_export, enabled=lambda c: c.export.enabled, section="export", inputs=("export",),
          redoable=True, all_ranks=False),
    Stage("verify", run_verify, enabled=lambda c: c.verify.enabled, section="verify", inputs=("verify",),
          redoable=True, all_ranks=False),
    Stage("onnx_validate", run_onnx_validate, enabled=lambda c: c.export.enabled, section="validate",
          inputs=("validate",), redoable=True, all_ranks=False),
    Stage("benchmark", run_benchmark, enabled=lambda c: c.benchmark_active, section="validate",
          inputs=("benchmark",), redoable=True, all_ranks=False),
    Stage("report", run_report, epilogue=True, section="report", inputs=("report",), redoable=True,
          all_ranks=False),
)
