"""The report stage: `report.md` (summary, per-layer table, TensorRT eligibility) and a
PNG of validation accuracy and sparsity over the epochs of both phases."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.base import StrictModel
from stages.io import atomic_write, atomic_write_text


class ReportConfig(StrictModel):
    plot: bool = True


def count_macs_and_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Dense MACs and parameters for one sample (torch-pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
    model.train(was_training)
    return int(macs), int(params)


def nonzero_params(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


def plot_history(history: list[dict[str, Any]], path: Path) -> Path:
    """Validation accuracy (left axis) and sparsity (right axis) against epoch, both phases;
    below, when the mask-update guard ran, the loss rise it measured at each epoch's mask
    updates (`mask_update_loss_delta`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(1, len(history) + 1))
    deltas = [h.get("mask_update_loss_delta") for h in history]
    if any(d is not None for d in deltas):
        fig, (ax, guard_ax) = plt.subplots(2, 1, figsize=(7, 5.6), dpi=110, sharex=True,
                                           gridspec_kw={"height_ratios": [3, 1.4]})
        guard_ax.bar(xs, [float("nan") if d is None else d for d in deltas], color="tab:orange")
        guard_ax.axhline(0, color="gray", lw=0.8)
        guard_ax.set_ylabel("loss rise at\nmask update", color="tab:orange")
        guard_ax.set_xlabel("epoch (dense phase, then sparse phase)")
        guard_ax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(xs, [float("nan") if h["val_accuracy"] is None else h["val_accuracy"] for h in history], "o-", color="tab:blue", label="val accuracy")
    ax.set_xlabel("epoch (dense phase, then sparse phase)")
    ax.set_ylabel("validation accuracy", color="tab:blue")
    ax.set_ylim(0, 1.02)
    twin = ax.twinx()
    twin.plot(xs, [h["sparsity"] for h in history], "s--", color="tab:red", label="sparsity")
    twin.set_ylabel("sparsity of targeted weights", color="tab:red")
    twin.set_ylim(0, 1.02)
    dense_epochs = sum(1 for h in history if h["phase"] == "dense")
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


def _largest_rise(history: list[dict[str, Any]]) -> str | None:
    """'0.0123 (sparse epoch 4)': the guard's largest measured loss rise, None if it did not run."""
    rises = [(h["mask_update_loss_delta"], h["epoch"]) for h in history
             if h.get("mask_update_loss_delta") is not None]
    if not rises:
        return None
    delta, epoch = max(rises)
    return f"{delta:.4f} (sparse epoch {epoch + 1})"


def render_markdown(manifest: dict[str, Any], plot_name: str | None) -> str:
    """The human summary of a run, from its manifest (one source of truth)."""
    m = manifest.get("metrics", {})
    lines = [f"# Run `{manifest['name']}`: {manifest['status']}", ""]
    if manifest.get("error"):
        lines += [f"**{manifest['error'].get('gate') or 'error'}**: {manifest['error']['message']}", ""]
    cfg = manifest.get("summary", {})
    lines += ["| | |", "|---|---|"]
    for key, value in [
        ("method / pattern", f"{cfg.get('method')} / {cfg.get('pattern')}"),
        ("target sparsity", cfg.get("target") if cfg.get("target") is not None
         else f"{cfg.get('pattern')} on eligible layers"),
        ("dense accuracy (test)", m.get("dense_accuracy")),
        ("sparse accuracy (test, baked)", m.get("sparse_accuracy")),
        ("accuracy drop", m.get("accuracy_drop")),
        ("sparsity of targeted weights", m.get("targeted_sparsity")),
        ("sparsity of all Linear/Conv weights", m.get("model_sparsity")),
        ("parameters (dense / nonzero)", f"{m.get('params')} / {m.get('nonzero_params')}"),
        ("MACs per sample (dense)", m.get("macs")),
        ("ONNX parity (max abs error)", m.get("parity_max_abs_error")),
        ("largest loss rise at a mask update (guard)", _largest_rise(manifest.get("history") or [])),
        ("config hash", manifest.get("config_hash", "")[:16]),
    ]:
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for name, info in manifest.get("stages", {}).items():
        lines.append(f"| {name} | {info.get('status')} | {_fmt(info.get('seconds'), 2)} |")
    layers = m.get("layers") or []
    if layers:
        lines += ["", "## Layers (PyTorch, after bake)", "",
                  "| layer | type | shape | pattern | sparsity | note |", "|---|---|---|---|---|---|"]
        for r in layers:
            lines.append(f"| {r['name']} | {r['type']} | {'x'.join(map(str, r['shape']))} | {r['pattern']} "
                         f"| {r['sparsity']:.3f} | {r['reason']} |")
    onnx_layers = (manifest.get("verify") or {}).get("layers") or []
    if onnx_layers:
        lines += ["", "## ONNX weights and TensorRT sparse eligibility (read back from model.onnx)", "",
                  "| tensor | op | shape | reduction axis | sparsity | pattern ok | sparse-eligible | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in onnx_layers:
            lines.append(
                f"| {r.get('name')} | {r.get('op')} | {'x'.join(map(str, r.get('shape', [])))} "
                f"| {r.get('reduction_axis')} | {_fmt(r.get('sparsity'), 3)} | {_fmt(r.get('pattern_ok'))} "
                f"| {_fmt(r.get('eligible'))} | {r.get('reason') or ''} |")
    if manifest.get("artifacts"):
        lines += ["", "## Artifacts", "", "| file | bytes | sha256 |", "|---|---|---|"]
        for name, a in manifest["artifacts"].items():
            lines.append(f"| {a['path']} | {a['bytes']} | `{a['sha256'][:16]}` |")
    if plot_name:
        lines += ["", f"![accuracy and sparsity over epochs]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, manifest: dict[str, Any], history: list[dict[str, Any]],
                 cfg: ReportConfig) -> list[Path]:
    written = []
    plot_name = None
    if cfg.plot and history:
        written.append(plot_history(history, run_dir / "training.png"))
        plot_name = "training.png"
    written.append(atomic_write_text(run_dir / "report.md", render_markdown(manifest, plot_name)))
    return written
