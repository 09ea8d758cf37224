"""The report stage: `report.md` (summary, per-layer table, TensorRT eligibility) and a
PNG of validation accuracy and sparsity over the epochs of both phases."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from stages.bake import BakedLayer
from stages.base import StrictModel, eval_mode
from stages.io import atomic_write, atomic_write_text
from stages.train import EpochRecord


class ReportConfig(StrictModel):
    plot: bool = True


class StageRow(BaseModel):
    name: str
    status: str
    seconds: float | None = None


class ArtifactRow(BaseModel):
    path: str
    bytes: int
    sha256: str


class ReportInput(BaseModel):
    """Everything the report shows, typed; the pipeline fills it from its manifest and config."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: str
    failed_gate: str | None = None
    error: str | None = None
    method: str
    pattern: str
    target: float | None = None
    config_hash: str = ""
    dense_accuracy: float | None = None
    sparse_accuracy: float | None = None
    accuracy_drop: float | None = None
    targeted_sparsity: float | None = None
    model_sparsity: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    macs: int | None = None
    parity_max_abs_error: float | None = None
    stages: list[StageRow] = Field(default_factory=list)
    layers: list[BakedLayer] = Field(default_factory=list)
    onnx_layers: list[dict[str, Any]] = Field(default_factory=list)  # verify's read-back rows
    artifacts: list[ArtifactRow] = Field(default_factory=list)
    history: list[EpochRecord] = Field(default_factory=list)
    sections: list[str] = Field(default_factory=list)  # extra markdown sections (structured, latency)


def count_macs_and_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Dense MACs and parameters for one sample (torch-pruning's counter)."""
    import torch_pruning as tp

    with eval_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
    return int(macs), int(params)


def nonzero_params(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


def plot_history(history: list[EpochRecord], path: Path) -> Path:
    """Validation accuracy (left axis) and sparsity (right axis) against epoch, both phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(1, len(history) + 1))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(xs, [float("nan") if h.val_accuracy is None else h.val_accuracy for h in history], "o-",
            color="tab:blue", label="val accuracy")
    ax.set_xlabel("epoch (dense phase, then sparse phase)")
    ax.set_ylabel("validation accuracy", color="tab:blue")
    ax.set_ylim(0, 1.02)
    twin = ax.twinx()
    twin.plot(xs, [h.sparsity for h in history], "s--", color="tab:red", label="sparsity")
    twin.set_ylabel("sparsity of targeted weights", color="tab:red")
    twin.set_ylim(0, 1.02)
    dense_epochs = sum(1 for h in history if h.phase == "dense")
    if 0 < dense_epochs < len(history):
        ax.axvline(dense_epochs + 0.5, color="gray", linestyle=":")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: ReportInput, plot_name: str | None) -> str:
    """The human summary of a run."""
    r = report
    lines = [f"# Run `{r.name}`: {r.status}", ""]
    if r.error is not None:
        lines += [f"**{r.failed_gate or 'error'}**: {r.error}", ""]
    lines += ["| | |", "|---|---|"]
    for key, value in [
        ("method / pattern", f"{r.method} / {r.pattern}"),
        ("target sparsity", r.target if r.target is not None else f"{r.pattern} on eligible layers"),
        ("dense accuracy (test)", r.dense_accuracy),
        ("sparse accuracy (test, baked)", r.sparse_accuracy),
        ("accuracy drop", r.accuracy_drop),
        ("sparsity of targeted weights", r.targeted_sparsity),
        ("sparsity of all Linear/Conv weights", r.model_sparsity),
        ("parameters (dense / nonzero)", f"{r.params} / {r.nonzero_params}"),
        ("MACs per sample (dense)", r.macs),
        ("ONNX parity (max abs error)", r.parity_max_abs_error),
        ("config hash", r.config_hash[:16]),
    ]:
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for stage in r.stages:
        lines.append(f"| {stage.name} | {stage.status} | {_fmt(stage.seconds, 2)} |")
    if r.layers:
        lines += ["", "## Layers (PyTorch, after bake)", "",
                  "| layer | type | shape | pattern | sparsity | note |", "|---|---|---|---|---|---|"]
        for layer in r.layers:
            lines.append(f"| {layer.name} | {layer.type} | {'x'.join(map(str, layer.shape))} | {layer.pattern} "
                         f"| {layer.sparsity:.3f} | {layer.reason} |")
    if r.onnx_layers:
        lines += ["", "## ONNX weights and TensorRT sparse eligibility (read back from model.onnx)", "",
                  "| tensor | op | shape | reduction axis | sparsity | pattern ok | sparse-eligible | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r.onnx_layers:
            lines.append(
                f"| {row.get('name')} | {row.get('op')} | {'x'.join(map(str, row.get('shape', [])))} "
                f"| {row.get('reduction_axis')} | {_fmt(row.get('sparsity'), 3)} | {_fmt(row.get('pattern_ok'))} "
                f"| {_fmt(row.get('eligible'))} | {row.get('reason') or ''} |")
    for section in r.sections:
        lines += ["", section.rstrip("\n")]
    if r.artifacts:
        lines += ["", "## Artifacts", "", "| file | bytes | sha256 |", "|---|---|---|"]
        for a in r.artifacts:
            lines.append(f"| {a.path} | {a.bytes} | `{a.sha256[:16]}` |")
    if plot_name:
        lines += ["", f"![accuracy and sparsity over epochs]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, report: ReportInput, cfg: ReportConfig) -> list[Path]:
    """Write `report.md` (and `training.png` when enabled and there is history); returns the paths."""
    written = []
    plot_name = None
    if cfg.plot and report.history:
        written.append(plot_history(report.history, run_dir / "training.png"))
        plot_name = "training.png"
    written.append(atomic_write_text(run_dir / "report.md", render_markdown(report, plot_name)))
    return written
