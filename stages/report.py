"""The report stage: `report.md` (summary, the accuracy gate, per-layer table, what was checked
on each ONNX weight) and `training.png`: validation accuracy, sparsity and the accuracy gate's
line over the epochs of both phases, the training loss, and per-layer sparsity bars."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optg.pattern import Pattern, unstructured_from_row
from stages import benchmark as benchmark_stage
from stages import onnx_eval
from stages import quantize as quantize_stage
from stages import structured as structured_stage
from stages import tensorrt as tensorrt_stage
from stages.bake import BakedLayer
from stages.base import StrictModel
from stages.context import RunContext, RunRecord, Stage
from stages.io import atomic_write, atomic_write_text
from stages.train import EpochRecord


class ReportConfig(StrictModel):
    plot: bool = True
    """write training.png beside report.md"""


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
    pattern: Pattern  # given as text, 'unstructured' takes `target`
    target: float | None = None
    config_hash: str = ""
    metric: str = "accuracy"  # the task's metric; "perplexity" for a causal LM (lower is better)
    dense_accuracy: float | None = None
    sparse_accuracy: float | None = None
    accuracy_drop: float | None = None
    dense_perplexity: float | None = None
    sparse_perplexity: float | None = None
    perplexity_increase: float | None = None
    targeted_sparsity: float | None = None
    model_sparsity: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    macs: int | None = None
    parity_max_abs_error: float | None = None
    pattern_coverage: float | None = None
    max_accuracy_drop: float | None = None  # validate's gates, for the gate line
    min_accuracy: float | None = None
    max_perplexity_increase: float | None = None
    max_perplexity: float | None = None
    stages: list[StageRow] = Field(default_factory=list)
    layers: list[BakedLayer] = Field(default_factory=list)
    onnx_layers: list[dict[str, Any]] = Field(default_factory=list)  # verify's read-back rows
    artifacts: list[ArtifactRow] = Field(default_factory=list)
    history: list[EpochRecord] = Field(default_factory=list)
    sections: list[str] = Field(default_factory=list)  # extra markdown sections (structured, latency)

    @model_validator(mode="before")
    @classmethod
    def _unstructured_from_text(cls, data: Any) -> Any:
        return unstructured_from_row(data, "target")


def accuracy_gate(report: ReportInput) -> float | None:
    """The bound the validate gates put on the sparse metric: the lowest accuracy, or the
    highest perplexity, they accept (None when no gate applies)."""
    if report.metric == "perplexity":
        ceilings = [report.max_perplexity] if report.max_perplexity is not None else []
        if report.max_perplexity_increase is not None and report.dense_perplexity is not None:
            ceilings.append(report.dense_perplexity * (1 + report.max_perplexity_increase))
        return min(ceilings) if ceilings else None
    bounds = [report.min_accuracy] if report.min_accuracy is not None else []
    if report.max_accuracy_drop is not None and report.dense_accuracy is not None:
        bounds.append(report.dense_accuracy - report.max_accuracy_drop)
    return max(bounds) if bounds else None


def gate_line(report: ReportInput) -> str:
    """One line: what the metric's gate required and whether the run met it."""
    bound = accuracy_gate(report)
    if bound is None:
        return f"no {report.metric} gate configured"
    parts = []
    if report.metric == "perplexity":
        if report.max_perplexity_increase is not None and report.dense_perplexity is not None:
            parts.append(f"dense {report.dense_perplexity:.4f} x (1 + {report.max_perplexity_increase})")
        if report.max_perplexity is not None:
            parts.append(f"max {report.max_perplexity}")
        got_value, relation = report.sparse_perplexity, "<="
        ok = got_value is not None and got_value <= bound + 1e-12
    else:
        if report.max_accuracy_drop is not None and report.dense_accuracy is not None:
            parts.append(f"dense {report.dense_accuracy:.4f} - max drop {report.max_accuracy_drop}")
        if report.min_accuracy is not None:
            parts.append(f"min {report.min_accuracy}")
        got_value, relation = report.sparse_accuracy, ">="
        ok = got_value is not None and got_value >= bound - 1e-12
    verdict = "not measured" if got_value is None else "passed" if ok else "FAILED"
    got = "" if got_value is None else f", got {got_value:.4f}"
    return f"sparse {report.metric} {relation} {bound:.4f} ({'; '.join(parts)}){got}: {verdict}"


def plot_history(history: list[EpochRecord], path: Path, report: ReportInput | None = None) -> Path:
    """Validation accuracy with the accuracy gate's line (left axis) and sparsity (right axis)
    against epoch, both phases; the training loss; when the mask-update guard ran, the loss
    rise it measured at each epoch's mask updates (`mask_update_loss_delta`); and (when layers
    are known) per-layer sparsity bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [layer for layer in (report.layers if report else []) if layer.targeted]
    deltas = [h.mask_update_loss_delta for h in history]
    guard = any(d is not None for d in deltas)
    panels = 2 + guard + bool(layers)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.2 * panels), dpi=110)
    ax, loss_ax = axes[0], axes[1]
    xs = list(range(1, len(history) + 1))
    if guard:
        guard_ax = axes[2]
        guard_ax.bar(xs, [float("nan") if d is None else d for d in deltas], color="tab:orange")
        guard_ax.axhline(0, color="gray", lw=0.8)
        guard_ax.set_ylabel("loss rise at\nmask update", color="tab:orange")
        guard_ax.set_xlabel("epoch (dense phase, then sparse phase)")
        guard_ax.grid(alpha=0.3)
    metric = history[0].metric if history else "accuracy"
    ax.plot(xs, [float("nan") if h.val_metric is None else h.val_metric for h in history], "o-",
            color="tab:blue", label=f"val {metric}")
    gate = accuracy_gate(report) if report else None
    if gate is not None:
        ax.axhline(gate, color="tab:green", linestyle="--", label=f"{metric} gate {gate:.3f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("epoch (dense phase, then sparse phase)")
    ax.set_ylabel(f"validation {metric}", color="tab:blue")
    if metric == "accuracy":
        ax.set_ylim(0, 1.02)
    else:
        ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(xs, [h.sparsity for h in history], "s--", color="tab:red", label="sparsity")
    twin.set_ylabel("sparsity of targeted weights", color="tab:red")
    twin.set_ylim(0, 1.02)
    loss_ax.plot(xs, [h.train_loss for h in history], "o-", color="tab:purple")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    dense_epochs = sum(1 for h in history if h.phase == "dense")
    for axis in (ax, loss_ax):
        if 0 < dense_epochs < len(history):
            axis.axvline(dense_epochs + 0.5, color="gray", linestyle=":")
        axis.grid(alpha=0.3)
    if layers:
        bars = axes[-1]
        bars.barh(range(len(layers)), [layer.sparsity for layer in layers], color="tab:red")
        bars.set_yticks(range(len(layers)), [layer.name for layer in layers], fontsize=7)
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.set_xlabel("sparsity per targeted layer (after bake)")
        bars.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def onnx_check(row: dict[str, Any], run_pattern: str) -> tuple[str, str, str]:
    """(what was checked, its result, the 2:4 hardware verdict) for one read-back ONNX row.

    An unstructured weight is checked against its sparsity target, and is called 2:4 capable
    only if it actually holds 2:4 (its 2:4 check found no bad group), never for its shape alone.
    """
    expected = row.get("expected_pattern", run_pattern)
    ok = row.get("pattern_ok")
    if expected in (None, "dense"):
        checked, result = "not targeted", "-"
    elif expected == "unstructured":
        target = row.get("expected_sparsity")
        checked = "unstructured target" + ("" if target is None else f" {target:.3f}")
        result = "-" if ok is None else "unstructured target met" if ok else "target MISSED"
    else:
        checked = f"holds {expected}"
        result = "-" if ok is None else f"{expected} ok" if ok else f"{expected} BROKEN"
    holds_24 = (row.get("pattern_ok") is True and expected == "2:4") or (
        expected != "2:4" and row.get("groups") and row.get("bad_groups") == 0)
    if not holds_24:
        hardware = "no: does not hold 2:4" if expected not in (None, "dense") or ok is not None else "-"
    else:
        hardware = "2:4 sparse-eligible" if row.get("eligible") else "holds 2:4, not eligible"
    return checked, result, hardware


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _largest_rise(history: list[EpochRecord]) -> str | None:
    """'0.0123 (sparse epoch 4)': the guard's largest measured loss rise, None if it did not run."""
    rises = [(h.mask_update_loss_delta, h.epoch) for h in history if h.mask_update_loss_delta is not None]
    if not rises:
        return None
    delta, epoch = max(rises)
    return f"{delta:.4f} (sparse epoch {epoch + 1})"


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
        *([("dense perplexity (test)", r.dense_perplexity),
           ("sparse perplexity (test, baked)", r.sparse_perplexity),
           ("perplexity increase (relative)", r.perplexity_increase)] if r.metric == "perplexity" else
          [("dense accuracy (test)", r.dense_accuracy),
           ("sparse accuracy (test, baked)", r.sparse_accuracy),
           ("accuracy drop", r.accuracy_drop)]),
        ("sparsity of targeted weights", r.targeted_sparsity),
        ("sparsity of all Linear/Conv weights", r.model_sparsity),
        ("parameters (dense / nonzero)", f"{r.params} / {r.nonzero_params}"),
        ("MACs per sample (dense)", r.macs),
        ("ONNX parity (max abs error)", r.parity_max_abs_error),
        *([(f"{r.pattern} coverage (share of the file's weight MACs on weights holding it)",
            f"{100 * r.pattern_coverage:.1f}%")] if r.pattern_coverage is not None else []),
        (f"{r.metric} gate", gate_line(r)),
        ("largest loss rise at a mask update (guard)", _largest_rise(r.history)),
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
        lines += ["", "## ONNX weights: what was checked (read back from model.onnx)", "",
                  "| tensor | op | shape | reduction axis | sparsity | checked | result | 2:4 hardware | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r.onnx_layers:
            checked, result, hardware = onnx_check(row, str(r.pattern))
            lines.append(
                f"| {row.get('name')} | {row.get('op')} | {'x'.join(map(str, row.get('shape', [])))} "
                f"| {row.get('reduction_axis')} | {_fmt(row.get('sparsity'), 3)} | {checked} | {result} "
                f"| {hardware} | {row.get('reason') or ''} |")
    for section in r.sections:
        lines += ["", section.rstrip("\n")]
    if r.artifacts:
        lines += ["", "## Artifacts", "", "| file | bytes | sha256 |", "|---|---|---|"]
        for a in r.artifacts:
            lines.append(f"| {a.path} | {a.bytes} | `{a.sha256[:16]}` |")
    if plot_name:
        lines += ["", f"![accuracy with the gate line, sparsity, training loss and per-layer sparsity]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, report: ReportInput, cfg: ReportConfig) -> list[Path]:
    """Write `report.md` (and `training.png` when enabled and there is history); returns the paths."""
    written = []
    plot_name = None
    if cfg.plot and report.history:
        written.append(plot_history(report.history, run_dir / "training.png", report))
        plot_name = "training.png"
    written.append(atomic_write_text(run_dir / "report.md", render_markdown(report, plot_name)))
    return written


# --------------------------------------------------------------------------- the pipeline row


def report_input(ctx: RunContext) -> ReportInput:
    """The report's typed input, from the manifest and the sparsity config."""
    m, s = ctx.run.manifest, ctx.cfg.sparsity
    shown = ("dense_accuracy", "sparse_accuracy", "accuracy_drop", "dense_perplexity", "sparse_perplexity",
             "perplexity_increase", "targeted_sparsity", "model_sparsity", "params", "nonzero_params", "macs",
             "parity_max_abs_error", "pattern_coverage")
    return ReportInput(
        name=m.name, status=m.status, failed_gate=m.error.gate if m.error else None,
        error=m.error.message if m.error else None, method=s.method, pattern=s.as_pattern, target=s.target,
        config_hash=m.config_hash, **{k: getattr(m.metrics, k) for k in shown},
        metric=ctx.task.metric.name, max_accuracy_drop=ctx.cfg.validate.max_accuracy_drop,
        min_accuracy=ctx.cfg.validate.min_accuracy, max_perplexity_increase=ctx.cfg.validate.max_perplexity_increase,
        max_perplexity=ctx.cfg.validate.max_perplexity,
        stages=[StageRow(name=k, status=v.status, seconds=v.seconds) for k, v in m.stages.items()],
        layers=m.metrics.layers, onnx_layers=m.verify.layers if m.verify else [],
        artifacts=[ArtifactRow(**a.model_dump()) for a in m.artifacts.values()],
        history=m.history, sections=_report_sections(m))


def _report_sections(m: RunRecord) -> list[str]:
    """The sections other stages' results add to report.md, in reading order."""
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
    for path in write_report(ctx.run.path, report_input(ctx), ctx.cfg.report):
        ctx.run.add_artifact(path.name, path)


ROW = Stage("report", run_report, epilogue=True, section="report", inputs=("report",), redoable=True, all_ranks=False)
