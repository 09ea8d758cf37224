"""The metric of the files a run ships, measured on the files: each ONNX file through ONNX
Runtime over the whole test split, batched, with the task's own inputs and metric. The gate
(`stages.validate`) then applies to the worst file too, so an fp16 export, an exporter rewrite
or a runtime difference that changes predictions beyond the few samples verify compares cannot
pass."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict

from stages import validate as validate_stage
from stages.base import GateFailure, StageError
from stages.context import RunContext, Stage
from stages.data import DataBundle
from stages.tasks import Task

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class FileMetric(BaseModel):
    """One shipped file's metric over the split, and its difference from the PyTorch model's."""

    model_config = ConfigDict(extra="forbid")

    file: str
    dtype: str
    metric: str
    value: float | None
    pytorch: float | None
    difference: float | None  # value - pytorch


def evaluate_onnx(path: Path, bundle: DataBundle, task: Task, split: str = "test", batch_size: int = 256,
                  threads: int | None = None) -> float | None:
    """The task's metric of the ONNX file at `path` on `split` (None for an empty split)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    specs = session.get_inputs()
    sums = task.empty_sums(torch.device("cpu"))
    for batch in bundle.loader(split, batch_size, shuffle=False):
        inputs = task.inputs(batch)
        feeds = {s.name: t.detach().cpu().numpy().astype(_NUMPY.get(s.type, np.float32), copy=False)
                 for s, t in zip(specs, inputs)}
        logits = torch.from_numpy(np.asarray(session.run(None, feeds)[0])).float()
        sums += task.metric_sums(logits, batch)
    return task.metric_value(sums.tolist())


def calibration_feeds(bundle: DataBundle, task: Task, inputs: list[dict], batches: int,
                      batch_size: int) -> list[dict[str, np.ndarray]]:
    """The first `batches` training batches (unshuffled: the same on every rerun) as ONNX feeds,
    named and typed after the file's graph inputs (`stages.export.graph_io` specs)."""
    feeds: list[dict[str, np.ndarray]] = []
    for batch in bundle.loader("train", batch_size, shuffle=False):
        if len(feeds) == batches:
            break
        feeds.append({spec["name"]: t.detach().cpu().numpy().astype(spec["dtype"], copy=False)
                      for spec, t in zip(inputs, task.inputs(batch))})
    return feeds


def worst(rows: list[FileMetric], higher_is_better: bool) -> FileMetric | None:
    """The file with the worst metric (None when no file has a value)."""
    valued = [(r.value, r) for r in rows if r.value is not None]
    if not valued:
        return None
    return min(valued, key=lambda pair: pair[0] if higher_is_better else -pair[0])[1]


def render_files_markdown(rows: list[FileMetric]) -> str:
    """report.md's table of the shipped files' metric in ONNX Runtime."""
    lines = ["## Shipped files in ONNX Runtime (whole test split)", "",
             "| file | dtype | metric | ONNX Runtime | PyTorch | difference |", "|---|---|---|---|---|---|"]
    for r in rows:
        def cell(v: float | None, signed: bool = False) -> str:
            return "-" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")
        lines.append(f"| {r.file} | {r.dtype} | {r.metric} | {cell(r.value)} | {cell(r.pytorch)} | "
                     f"{cell(r.difference, True)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the pipeline row


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
        value = evaluate_onnx(path, ctx.bundle, ctx.task, batch_size=ctx.cfg.data.eval_batch_size)
        rows.append(FileMetric(
            file=path.name, dtype=dtype, metric=metric.name, value=value, pytorch=pytorch,
            difference=None if value is None or pytorch is None else value - pytorch))
        ctx.log(f"[onnx_validate] {path.name} ({dtype}): test {metric.name} {value:.4f} in ONNX Runtime"
                + (f", PyTorch {pytorch:.4f}" if pytorch is not None else "") if value is not None else
                f"[onnx_validate] {path.name}: empty test split")
    manifest.metrics.onnx = rows
    dense = getattr(manifest.metrics, f"dense_{metric.gates}")
    for quantized in (False, True):
        bad = worst([r for r in rows if (r.dtype == "int8") == quantized], metric.higher_is_better)
        if bad is None or bad.value is None:
            continue
        gate = validate_stage.validate_quantized if quantized else validate_stage.validate
        result = gate(bad.value, dense, ctx.cfg.validate, metric)
        if not result.passed:
            raise GateFailure(metric.gates, f"{bad.file} (ONNX Runtime, whole test split): ",
                              problems=result.failures)


ROW = Stage("onnx_validate", run_onnx_validate, enabled=lambda c: c.export.enabled, section="validate",
            inputs=("validate",), redoable=True, all_ranks=False)
