"""The shipped files are gated on themselves: ONNX Runtime over the whole test split, the
metric per file in the manifest, and a file whose predictions disagree fails the gate (exit 3)
naming the file."""
import json

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.cli import main
from stages.data import DataConfig, load_data
from stages.onnx_eval import evaluate_onnx
from stages.tasks import ClassificationTask


def test_each_shipped_file_is_measured_in_onnx_runtime(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["run", str(tiny_config()), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    m = json.loads((run / "manifest.json").read_text())
    rows = {r["file"]: r for r in m["metrics"]["onnx"]}
    assert set(rows) == {"model.onnx"}
    row = rows["model.onnx"]
    assert row["metric"] == "accuracy" and row["dtype"] == "fp32"
    assert row["value"] == m["metrics"]["sparse_accuracy"] and row["difference"] == 0.0  # fp32: same predictions
    assert m["stages"]["onnx_validate"]["status"] == "done"


def test_a_file_that_disagrees_is_measured_as_such(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["run", str(tiny_config()), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    bundle = load_data(DataConfig(name="synthetic", options={"shape": [8, 6, 6], "num_classes": 3, "num_samples": 240}),
                       seed=0)
    good = evaluate_onnx(run / "model.onnx", bundle, ClassificationTask())
    proto = onnx.load(str(run / "model.onnx"))
    for init in proto.graph.initializer:  # plant: every weight scrambled
        values = numpy_helper.to_array(init)
        if values.dtype == np.float32 and values.size > 1:
            init.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(values.reshape(-1))
                                                  .reshape(values.shape), init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    bad = evaluate_onnx(tmp_path / "bad.onnx", bundle, ClassificationTask())
    assert good == json.loads((run / "manifest.json").read_text())["metrics"]["sparse_accuracy"]
    assert bad != good


def test_a_disagreeing_file_fails_the_gate_with_exit_3_naming_it(tmp_path, tiny_config, capsys, monkeypatch):
    from stages import onnx_eval

    real = onnx_eval.evaluate_onnx
    monkeypatch.setattr(onnx_eval, "evaluate_onnx",
                        lambda path, *a, **k: real(path, *a, **k) - 0.6)  # the file loses 60 points
    run = tmp_path / "run"
    assert main(["run", str(tiny_config()), "--out", str(run), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "gate failed (accuracy)" in err and "model.onnx (ONNX Runtime, whole test split)" in err
    assert "validate.max_accuracy_drop" in err
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "gate_failed" and m["error"]["gate"] == "accuracy"
    assert m["metrics"]["onnx"][0]["difference"] < -0.5  # what the file measured is recorded
