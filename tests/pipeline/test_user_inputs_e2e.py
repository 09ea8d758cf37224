"""Users' own data (.npz) and model (module:callable) with `.pt` weights as the dense
reference, a non-finite loss stopping the run (exit 1), and `optg inspect` through the CLI."""
import json
import textwrap

import numpy as np
import torch

from pipeline.cli import main

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    def make(input_shape, num_classes, hidden=32):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1], hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))
''')


def _user_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 3
    y = rng.integers(0, 3, size=300)
    x = (centers[y] + rng.normal(size=(300, 16))).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    (tmp_path / "my_models.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("my_models", None)
    importlib.invalidate_caches()
    torch.manual_seed(0)
    model = importlib.import_module("my_models").make((1, 16), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)
    for _ in range(100):  # a trained model whose weights the user brings
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad(); loss.backward(); opt.step()
    torch.save(model.state_dict(), tmp_path / "weights.pt")


def _config(tmp_path, **sparsity):
    cfg = {
        "name": "mine", "data": {"name": "npz", "path": str(tmp_path / "mine.npz"), "batch_size": 32},
        "model": {"name": "my_models:make", "options": {"hidden": 32}, "weights": str(tmp_path / "weights.pt")},
        "sparsity": {"method": "oneshot", "pattern": "2:4", "train": {"epochs": 2, "optimizer": {"lr": 0.02}}, **sparsity},
        "validate": {"max_accuracy_drop": 0.2}, "verify": {"num_samples": 16},
    }
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_npz_data_plugin_model_and_weights_as_reference(tmp_path, monkeypatch, capsys):
    _user_files(tmp_path, monkeypatch)
    run = tmp_path / "run"
    assert main(["run", str(_config(tmp_path)), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    m = json.loads((run / "manifest.json").read_text())
    assert m["stages"]["reference"]["status"] == "done" and "train" not in m["stages"]
    assert m["metrics"]["dense_accuracy"] > 0.9  # the loaded weights were evaluated
    assert m["metrics"]["data"]["input_shape"] == [1, 16]
    capsys.readouterr()
    assert main(["inspect", str(run / "model.onnx"), "--pattern", "2:4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report  # machine-readable
    assert main(["inspect", str(run / "model.onnx"), "--pattern", "1:4"]) == 3
    assert "1:4" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2


def test_non_finite_loss_stops_with_exit_1(tmp_path, monkeypatch, capsys):
    _user_files(tmp_path, monkeypatch)
    cfg = _config(tmp_path, method="gmp", pattern="unstructured", target=0.5,
                  train={"epochs": 2, "optimizer": {"lr": 1e30, "momentum": 0.0}})
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "loss is" in err and "lower sparsity.train.optimizer.lr (now 1e+30)" in err
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and m["stages"]["sparsify"]["status"] == "failed"
