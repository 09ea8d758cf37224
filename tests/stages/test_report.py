"""The report stage renders a typed ReportInput: exact table rows, the plot only with history."""
import torch
from torch import nn

from stages.bake import BakedLayer
from stages.counting import count_macs_and_params, nonzero_params
from stages.report import (
    ArtifactRow,
    ReportConfig,
    ReportInput,
    StageRow,
    render_markdown,
    write_report,
)
from stages.train import EpochRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(**changes) -> ReportInput:
    base = dict(
        name="tiny", status="succeeded", method="optg", pattern="2:4", config_hash="0123456789abcdef0123",
        dense_accuracy=0.95, sparse_accuracy=0.9375, accuracy_drop=0.0125, targeted_sparsity=0.5,
        model_sparsity=0.25, params=100, nonzero_params=60, macs=1234, parity_max_abs_error=3e-7,
        stages=[StageRow(name="data", status="done", seconds=0.123), StageRow(name="bake", status="failed", seconds=2)],
        layers=[BakedLayer(name="fc", type="Linear", shape=[4, 8], numel=32, targeted=True, pattern="2:4",
                           sparsity=0.5, reason="", parameter="fc.weight")],
        onnx_layers=[{"name": "fc.weight", "op": "Gemm", "shape": [4, 8], "reduction_axis": 1, "sparsity": 0.5,
                      "pattern_ok": True, "eligible": False, "reason": "too small"}],
        artifacts=[ArtifactRow(path="model.onnx", bytes=10, sha256="f" * 64)],
        history=[EpochRecord("dense", 0, 1.0, 0.5, 0.6, 0.0, 0.1, 1.0),
                 EpochRecord("sparse", 0, 0.9, 0.6, None, 0.5, 0.1, 1.0)])
    return ReportInput(**{**base, **changes})


def test_render_markdown_rows():
    text = render_markdown(report(), "training.png")
    lines = text.splitlines()
    assert lines[0] == "# Run `tiny`: succeeded"
    for row in ("| method / pattern | optg / 2:4 |", "| target sparsity | 2:4 on eligible layers |",
                "| dense accuracy (test) | 0.9500 |", "| accuracy drop | 0.0125 |",
                "| parameters (dense / nonzero) | 100 / 60 |", "| MACs per sample (dense) | 1234 |",
                "| ONNX parity (max abs error) | 3.00e-07 |", "| config hash | 0123456789abcdef |",
                "| data | done | 0.12 |", "| bake | failed | 2.00 |",
                "| fc | Linear | 4x8 | 2:4 | 0.500 |  |",
                "| fc.weight | Gemm | 4x8 | 1 | 0.500 | holds 2:4 | 2:4 ok | holds 2:4, not eligible | too small |",
                f"| model.onnx | 10 | `{'f' * 16}` |", "| accuracy gate | no accuracy gate configured |",
                "![accuracy with the gate line, sparsity, training loss and per-layer sparsity](training.png)"):
        assert row in lines, row
    assert "**" not in text  # no error line on success


def test_render_markdown_failure_and_unstructured_target():
    text = render_markdown(report(status="gate_failed", failed_gate="accuracy", error="drop too big",
                                  pattern="unstructured", target=0.9, layers=[], onnx_layers=[], artifacts=[]),
                           None)
    assert text.startswith("# Run `tiny`: gate_failed\n\n**accuracy**: drop too big\n")
    assert "| target sparsity | 0.9000 |" in text
    assert "## Layers" not in text and "## ONNX" not in text and "## Artifacts" not in text and "![" not in text


def test_write_report_plots_only_with_history_and_when_asked(tmp_path):
    written = write_report(tmp_path, report(), ReportConfig())
    assert [p.name for p in written] == ["training.png", "report.md"]
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG_MAGIC
    assert "(training.png)" in (tmp_path / "report.md").read_text()
    other = tmp_path / "no_plot"
    other.mkdir()
    assert [p.name for p in write_report(other, report(), ReportConfig(plot=False))] == ["report.md"]
    assert [p.name for p in write_report(other, report(history=[]), ReportConfig())] == ["report.md"]
    assert sorted(p.name for p in other.iterdir()) == ["report.md"]


def test_macs_params_and_nonzero_counts_are_exact():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2)).train()
    with torch.no_grad():
        model[1].weight[:, :4] = 0
    macs, params = count_macs_and_params(model, torch.randn(3, 8))
    assert params == 8 * 4 + 4 + 4 * 2 + 2
    assert macs == (8 * 4 + 4) + (4 * 2 + 2)  # one sample; torch-pruning counts each bias add as one
    assert model.training  # mode given back
    assert nonzero_params(model) == params - 16


def test_unstructured_rows_say_the_target_was_checked_not_2_4():
    """A 90% unstructured weight whose shape would allow 2:4 (eligible) but whose values break
    2:4 is reported as 'unstructured target met', never as 2:4 sparse-eligible."""
    row = {"name": "fc.weight", "op": "Gemm", "shape": [16, 16], "reduction_axis": 1, "sparsity": 0.9,
           "pattern_ok": True, "eligible": True, "reason": "", "expected_pattern": "unstructured",
           "expected_sparsity": 0.9, "groups": 64, "bad_groups": 12}
    text = render_markdown(report(pattern="unstructured", target=0.9, onnx_layers=[row]), None)
    line = next(x for x in text.splitlines() if x.startswith("| fc.weight | Gemm"))
    assert line == ("| fc.weight | Gemm | 16x16 | 1 | 0.900 | unstructured target 0.900 | unstructured target met "
                    "| no: does not hold 2:4 |  |")
    assert "sparse-eligible" not in text and "True" not in line
    missed = render_markdown(report(pattern="unstructured", target=0.9,
                                    onnx_layers=[dict(row, pattern_ok=False, sparsity=0.5)]), None)
    assert "| target MISSED |" in missed
    # an unstructured weight that happens to hold 2:4 is said to
    holds = render_markdown(report(pattern="unstructured", target=0.5,
                                   onnx_layers=[dict(row, bad_groups=0)]), None)
    assert "| 2:4 sparse-eligible |" in holds
    broken = render_markdown(report(onnx_layers=[dict(row, expected_pattern="2:4", pattern_ok=False)]), None)
    assert "| holds 2:4 | 2:4 BROKEN | no: does not hold 2:4 |" in broken


def test_gate_line_and_figure_panels(tmp_path):
    from stages.report import gate_line

    r = report(max_accuracy_drop=0.02, min_accuracy=0.5)
    assert gate_line(r) == "sparse accuracy >= 0.9300 (dense 0.9500 - max drop 0.02; min 0.5), got 0.9375: passed"
    assert "FAILED" in gate_line(report(max_accuracy_drop=0.001))
    assert "| accuracy gate | sparse accuracy >= 0.9300" in render_markdown(r, None)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from stages.report import plot_history

    created = []
    real = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        created.append(fig)
        return fig, axes

    guarded = [EpochRecord("dense", 0, 1.0, 0.5, 0.6, 0.0, 0.1, 1.0),
               EpochRecord("sparse", 0, 0.9, 0.6, None, 0.5, 0.1, 1.0, mask_update_loss_delta=0.25)]
    plt.subplots = spy
    try:
        plot_history(r.history, tmp_path / "t.png", r)
        plot_history(guarded, tmp_path / "g.png", r)
    finally:
        plt.subplots = real
    fig, with_guard = created
    assert [p.get_height() for p in with_guard.axes[2].patches][-1] == 0.25  # the guard panel
    assert with_guard.axes[3].get_yticklabels()[0].get_text() == "fc"  # the bars stay last
    accuracy, loss, bars = fig.axes[0], fig.axes[1], fig.axes[2]
    assert any(abs(line.get_ydata()[0] - 0.93) < 1e-9 for line in accuracy.get_lines())  # the gate line
    assert list(loss.get_lines()[0].get_ydata()) == [1.0, 0.9]  # train loss per epoch
    assert [p.get_width() for p in bars.patches] == [0.5] and bars.get_yticklabels()[0].get_text() == "fc"
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC
