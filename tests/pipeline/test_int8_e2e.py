"""`export.quantize: int8` through the pipeline: model.int8.onnx beside model.onnx, every weighted
GEMM in the INT8-in/INT8-out form with its 2:4 intact (verify and `optg inspect` agree), both
files measured in ONNX Runtime over the whole test split, and a planted disagreement (activations
calibrated on inputs scaled down 10,000x, so every real activation saturates) failing the INT8
file's own gate with exit 3 naming it."""
import json

import numpy as np
import pytest

from pipeline.cli import main


def _manifest(run):
    return json.loads((run / "manifest.json").read_text())


def test_int8_file_is_shipped_placed_verified_and_measured(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(export__quantize="int8", export__calibration_batches=3)
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    m = _manifest(run)
    assert (run / "model.int8.onnx").is_file() and "model.int8.onnx" in m["artifacts"]
    q = m["export"]["quantization"]
    assert q["file"] == "model.int8.onnx" and q["calibration_batches"] == 3 and q["calibration_method"] == "minmax"
    rows = m["verify"]["quantized"]
    required = [r for r in rows if r["required"]]
    assert required and all(r["sparse_int8_form"] and r["pattern_ok"] for r in required)
    files = {r["file"]: r for r in m["metrics"]["onnx"]}
    assert set(files) == {"model.onnx", "model.int8.onnx"} and files["model.int8.onnx"]["dtype"] == "int8"
    assert abs(files["model.int8.onnx"]["difference"]) <= 0.1
    capsys.readouterr()
    assert main(["inspect", str(run / "model.int8.onnx"), "--pattern", "2:4"]) == 0, capsys.readouterr().err
    report = (run / "report.md").read_text()
    assert "INT8 QDQ placement (model.int8.onnx)" in report and "Shipped files in ONNX Runtime" in report
    int8_latency = m["metrics"]["latency"]["int8"]  # the INT8 file joins the latency table
    assert int8_latency["rows"] and all(r["candidate_ms"] > 0 for r in int8_latency["rows"])
    assert "reference.onnx vs model.int8.onnx" in report
    trt = {c["file"]: c for c in m["deployment"]["tensorrt"]}  # the engine-build step, per shipped file
    assert set(trt) == {"model.onnx", "model.int8.onnx"}
    assert trt["model.int8.onnx"]["tensorrt10"].startswith("trtexec --int8 --onnx=model.int8.onnx --sparsity=enable")
    assert "--int8" not in trt["model.int8.onnx"]["tensorrt11"] and "## TensorRT engines" in report


def test_a_disagreeing_int8_file_fails_its_gate_with_exit_3(tmp_path, tiny_config, capsys, monkeypatch):
    from stages import onnx_eval

    real = onnx_eval.calibration_feeds

    def shrunk(*args, **kwargs):  # plant: calibrate on inputs 10,000x smaller than the data
        return [{k: (v * 1e-4 if v.dtype == np.float32 else v) for k, v in feed.items()}
                for feed in real(*args, **kwargs)]

    monkeypatch.setattr(onnx_eval, "calibration_feeds", shrunk)
    run = tmp_path / "run"
    cfg = tiny_config(export__quantize="int8", validate__max_quantized_drop=0.05)
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "model.int8.onnx (ONNX Runtime, whole test split)" in err and "validate.max_quantized_drop" in err
    m = _manifest(run)
    assert m["status"] == "gate_failed" and m["error"]["gate"] == "accuracy"
    files = {r["file"]: r for r in m["metrics"]["onnx"]}
    assert files["model.int8.onnx"]["difference"] < -0.05 and files["model.onnx"]["difference"] == 0.0


@pytest.mark.parametrize("changes, expected", [
    ({"validate__max_quantized_drop": 0.01}, "validate.max_quantized_drop gates the INT8 file"),
    ({"export__quantize": "int4"}, "export.quantize"),
    ({"export__quantize": "int8", "export__calibration_batches": 0}, "export.calibration_batches"),
])
def test_int8_config_errors_exit_2_before_anything_is_written(tmp_path, tiny_config, capsys, changes, expected):
    run = tmp_path / "run"
    assert main(["run", str(tiny_config(**changes)), "--out", str(run), "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    assert not run.exists()
