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
