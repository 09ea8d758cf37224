"""End-to-end runs of tiny configs on CPU: artifacts and manifest, gate failure (exit 3),
refusal of another config's directory, and resume after SIGKILL / Ctrl-C reaching the same
result as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.config import ConfigError
from tests.interrupt import interrupt_env, signal_hook
from stages.io import sha256_file


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_tiny_run_leaves_verified_artifacts_and_manifest(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["run", str(tiny_config()), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    m = _manifest(run)
    assert m["status"] == "succeeded"
    for stage in ("data", "model", "train", "reference", "sparsify", "bake", "validate", "export", "verify", "report"):
        assert m["stages"][stage]["status"] == "done", stage
        assert m["stages"][stage]["seconds"] >= 0
    metrics = m["metrics"]
    assert 0 <= metrics["sparse_accuracy"] <= 1 and 0 <= metrics["dense_accuracy"] <= 1
    assert metrics["targeted_sparsity"] == 0.5
    assert metrics["parity_max_abs_error"] < 1e-4
    layers = {l["name"]: l for l in metrics["layers"]}
    assert any(l["pattern"] == "2:4" for l in layers.values())
    assert set(m["versions"]) == {"python", "torch", "onnx", "onnxruntime", "optg-pipeline"}
    assert len(m["config_hash"]) == 64
    for key in ("config.yaml", "model.safetensors", "model.onnx", "report.md", "training.png"):
        art = m["artifacts"][key]
        assert sha256_file(run / art["path"]) == art["sha256"], key
    assert m["verify"]["passed"] is True
    # the baked weights hold exact 2:4 zeros and the ONNX file carries the metadata
    state = load_file(str(run / "model.safetensors"))
    for name, layer in layers.items():
        if layer["pattern"] == "2:4":
            w = state[f"{name}.weight"]
            assert (w.movedim(1, -1).reshape(-1, 4) != 0).sum(1).max() <= 2
    props = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert props["optg.pattern"] == "2:4" and props["optg.config_hash"] == m["config_hash"]
    report = (run / "report.md").read_text()
    assert "succeeded" in report and "| 2:4 |" in report and "sparse-eligible" in report
    # running again is a no-op resume that keeps the result
    assert main(["run", str(tiny_config()), "--out", str(run), "--quiet"]) == 0
    assert _manifest(run)["resumed"] == 1
    assert sha256_file(run / "model.onnx") == m["artifacts"]["model.onnx"]["sha256"]


def test_accuracy_gate_failure_exits_3_and_still_reports(tmp_path, tiny_config, capsys):
    cfg = tiny_config(sparsity={"method": "random", "pattern": "unstructured", "target": 0.99, "train": {"epochs": 1}},
                      validate={"max_accuracy_drop": 0.0, "min_accuracy": 0.99})
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "gate failed (accuracy)" in err and "max_accuracy_drop=0.0" in err
    m = _manifest(run)
    assert m["status"] == "gate_failed" and m["error"]["gate"] == "accuracy"
    assert m["stages"]["validate"]["status"] == "failed"
    assert "export" not in m["stages"] and not (run / "model.onnx").exists()
    assert "gate_failed" in (run / "report.md").read_text()


def test_other_configs_run_directory_is_refused_unless_forced(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(export={"enabled": False}, verify={"enabled": False})
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0
    assert main(["run", str(cfg), "--out", str(run), "--quiet", "--set", "seed=1"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["run", str(cfg), "--out", str(run), "--quiet", "--set", "seed=1", "--force"]) == 0
    assert _manifest(run)["resumed"] == 0


def _resume_config(tiny_config):
    return tiny_config(
        data={"name": "synthetic", "options": {"shape": [8, 12, 12], "num_classes": 3, "num_samples": 1600},
              "batch_size": 16},
        sparsity={"method": "optg", "pattern": "unstructured", "target": 0.8,
                  "train": {"epochs": 6, "optimizer": {"lr": 0.05}}},
        export={"enabled": False}, verify={"enabled": False})


def _cli(cfg: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--out", str(run), "--quiet"]


INTERRUPT_EPOCH, INTERRUPT_STEP = 3, 5  # sparse phase: 6 epochs of 72 steps each


@pytest.mark.parametrize("how", ["KILL", "INT"], ids=["sigkill", "ctrl-c"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_config, how):
    """The run signals itself after step 5 of sparse epoch 3 (the tests' interrupt hook), so the
    interruption lands mid-epoch every time; the resumed run equals an uninterrupted one."""
    cfg = _resume_config(tiny_config)
    env = interrupt_env(tmp_path, None, {**os.environ, "PYTHONHASHSEED": "0"})
    reference = tmp_path / "reference"
    subprocess.run(_cli(cfg, reference), check=True, env=env, cwd=tmp_path)

    run = tmp_path / "run"
    at = f"sparse:{INTERRUPT_EPOCH}:{INTERRUPT_STEP}:{how}"
    proc = subprocess.run(_cli(cfg, run), env=interrupt_env(tmp_path, at, env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert f"sending SIG{how} at sparse epoch {INTERRUPT_EPOCH} step {INTERRUPT_STEP}" in proc.stderr
    if how == "INT":
        assert proc.returncode == 130, proc.stderr
        m = _manifest(run)
        assert m["status"] == "interrupted" and m["stages"]["sparsify"]["status"] == "failed"
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert _manifest(run)["status"] == "running"  # nobody could write anything after SIGKILL
    # mid-epoch: epochs 1-2 are checkpointed, epoch 3 had started (step 5 of 72) and is lost
    checkpoint = torch.load(run / "checkpoints" / "sparse.pt", weights_only=True)
    assert checkpoint["next_epoch"] == INTERRUPT_EPOCH - 1
    assert [h["epoch"] for h in checkpoint["history"]] == [0, 1]
    assert not (run / "model.safetensors").exists()
    assert not list(run.rglob("*.tmp")) or how == "KILL"  # temp files only from a hard kill

    subprocess.run(_cli(cfg, run), check=True, env=env, cwd=tmp_path)
    assert not list(run.rglob("*.tmp"))  # no half-written file survives the resume
    m, ref = _manifest(run), _manifest(reference)
    assert m["status"] == "succeeded" and m["resumed"] == 1
    assert sha256_file(run / "model.safetensors") == sha256_file(reference / "model.safetensors")
    assert m["metrics"]["sparse_accuracy"] == ref["metrics"]["sparse_accuracy"]
    assert [h["val_accuracy"] for h in m["history"]] == [h["val_accuracy"] for h in ref["history"]]


def test_the_tests_interrupt_spec_is_checked():
    assert signal_hook("sparse:1:1:INT:7") is None  # another rank's
    for bad in ("", "sparse:0:1", "warmup:1:1:INT", "sparse:1:1:NOPE"):
        with pytest.raises(ValueError, match="expected PHASE:EPOCH:STEP"):
            signal_hook(bad)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_one_shot_data_aware_method_without_a_sparse_phase_trains_nothing(tmp_path, tiny_config, capsys, method):
    run = tmp_path / "run"
    cfg = tiny_config(sparsity__method=method, sparsity__train=None)
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    m = _manifest(run)
    assert m["sparsity"]["calibration_batches"] == 8 and m["sparsity"]["method"] == method
    assert not any(h.get("phase") == "sparse" for h in m["history"])
    assert m["verify"]["passed"] and m["metrics"]["pattern_coverage"] == 1.0
    assert main(["inspect", str(run / "model.onnx"), "--pattern", "2:4"]) == 0


def test_no_sparse_phase_needs_a_one_shot_method(tmp_path, tiny_config, capsys):
    assert main(["check", str(tiny_config(sparsity__train=None))]) == 2
    err = capsys.readouterr().err  # optg trains its mask: without sparsity.train it is refused
    assert "sparsity.train: method 'optg' trains its mask: add sparsity.train" in err
