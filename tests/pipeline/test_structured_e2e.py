"""Structured pruning and the benchmark stage inside the pipeline, end to end on tiny configs:
channel pruning then 2:4 (read back from the ONNX, `optg inspect --pattern 2:4`), the guide's
recipe (docs/guide.md) rebuilding the slimmed model from `structured_plan.json` + `model.safetensors`, resume
after SIGKILL in the structured fine-tune equal to an uninterrupted run, the latency gate
(exit 3), and bad `structured` settings (exit 2, nothing written)."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.cli import main
from tests.interrupt import interrupt_env
from stages.io import sha256_file
from stages.onnx_sparsity import check_nm, collect_weights, load_model, must_hold

ROOT = Path(__file__).resolve().parents[2]
STRUCTURED = {"ratio": 0.5, "importance": "optg", "optg_steps": 4, "finetune_epochs": 2, "round_to": 8}
FAST = {"export__exporter": "torchscript", "benchmark__repeats": 3, "benchmark__warmup": 0,
        "benchmark__batch_sizes": [1, 8]}


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _cli(cfg: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--out", str(run), "--quiet"]


def _config(tiny_config, **changes):
    # small_cnn on 8x6x6: conv 16 (stem, kept) -> conv 32 -> conv 64 -> classifier
    return tiny_config(structured=dict(STRUCTURED), **{**FAST, **changes})


def _readme_recipe() -> str:
    guide = (ROOT / "docs" / "guide.md").read_text()
    block = re.search(r"<!-- snippet: structured-load -->\n```python\n(.*?)```", guide, re.S)
    assert block, "docs/guide.md lost its structured-load recipe"
    return block.group(1)


def test_structured_then_24_run_holds_24_and_rebuilds_from_the_plan(tmp_path, tiny_config):
    run = tmp_path / "run"
    assert main(["run", str(_config(tiny_config)), "--out", str(run), "--quiet"]) == 0
    m = _manifest(run)
    assert list(m["stages"]) == ["data", "model", "train", "reference", "reference_onnx", "structured", "sparsify",
                                 "bake", "validate", "export", "verify", "onnx_validate", "benchmark", "report"]
    s = m["structured"]
    assert s["params"]["after"] < s["params"]["before"] and 0 < s["macs"]["reduction"] < 1
    channels = s["channels"]
    assert channels["0.0"]["after"]["out"] == 16  # the stem is ignored by default
    assert channels["6"]["after"]["out"] == 3  # the classifier too
    pruned = [c["after"]["out"] for n, c in channels.items() if n not in ("0.0", "6")]
    assert all(c % 8 == 0 for c in pruned) and sum(pruned) < 32 + 64
    assert {"reference.onnx", "structured_plan.json", "model.safetensors", "model.onnx"} <= set(m["artifacts"])
    latency = m["metrics"]["latency"]
    assert latency["threads"] == 1 and [r["batch_size"] for r in latency["rows"]] == [1, 8]
    assert all(r["ratio"] > 0 and r["provider"] == "CPUExecutionProvider" for r in latency["rows"])
    report = (run / "report.md").read_text()
    assert "## Structured pruning (channels removed)" in report and "## Latency (ONNX Runtime, measured)" in report

    # 2:4 along the reduction axis of the final file, with the slimmed channel counts
    weights = {w.name: w for w in collect_weights(load_model(run / "model.onnx"))}
    required = [w for w in weights.values() if must_hold(w, 4)[0]]
    assert len(required) >= 3 and all(check_nm(w.values, w.reduction_axis, 2, 4).holds for w in required)
    input_channels = sorted(w.values.shape[1] for w in required)
    assert input_channels == sorted(c["after"]["in"] for c in channels.values() if c["after"]["in"] % 4 == 0)
    assert main(["inspect", str(run / "model.onnx"), "--pattern", "2:4"]) == 0
    reference_channels = sorted(w.values.shape[0] for w in collect_weights(load_model(run / "reference.onnx")))
    assert reference_channels == sorted(c["before"]["out"] for c in channels.values())  # exported before pruning

    # the guide's recipe rebuilds the slimmed model without pruning: same outputs as the ONNX
    namespace: dict = {}
    recipe = _readme_recipe().replace('Path("runs/quickstart_structured")', repr(str(run)).join(("Path(", ")")))
    exec(compile(recipe, "docs/guide.md", "exec"), namespace)
    model = namespace["model"].eval()
    x = torch.randn(4, 8, 6, 6)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), onnx_out, atol=1e-4)


def test_resume_after_sigkill_in_structured_finetune_matches_uninterrupted_run(tmp_path, tiny_config):
    """SIGKILL after step 3 of fine-tune epoch 2 (the tests' interrupt hook, phase structured-1): epoch 1 is
    checkpointed; the resumed run rebuilds the slimmed model from the saved plan, finishes the
    fine-tune, and every artifact equals the uninterrupted run's."""
    cfg = _config(tiny_config)
    env = interrupt_env(tmp_path, None, {**os.environ, "PYTHONHASHSEED": "0"})
    reference = tmp_path / "reference"
    subprocess.run(_cli(cfg, reference), check=True, env=env, cwd=tmp_path, timeout=600)

    run = tmp_path / "run"
    proc = subprocess.run(_cli(cfg, run), env=interrupt_env(tmp_path, "structured-1:2:3:KILL", env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "sending SIGKILL at structured-1 epoch 2 step 3" in proc.stderr
    m = _manifest(run)
    assert m["status"] == "running" and "structured" not in m["stages"]
    state = torch.load(run / "checkpoints" / "structured.pt", weights_only=True)
    progress = json.loads(state["progress"])
    assert (progress["pruned"], progress["finetuned"]) == (1, 0)
    finetune = torch.load(run / "checkpoints" / "structured-finetune.pt", weights_only=True)
    assert finetune["step"] == 1 and finetune["trainer"]["next_epoch"] == 1
    assert not (run / "structured_plan.json").exists()

    subprocess.run(_cli(cfg, run), check=True, env=env, cwd=tmp_path, timeout=600)
    m, ref = _manifest(run), _manifest(reference)
    assert m["status"] == "succeeded" and m["resumed"] == 1
    for name in ("model.safetensors", "structured_plan.json", "reference.onnx", "model.onnx"):
        assert sha256_file(run / name) == sha256_file(reference / name), name
    for step in m["structured"]["steps"] + ref["structured"]["steps"]:
        step.pop("seconds")  # wall time, the only thing allowed to differ
    assert m["structured"] == ref["structured"]
    assert [h["val_accuracy"] for h in m["history"]] == [h["val_accuracy"] for h in ref["history"]]

    # a later stage resumed (bake done, export not): the restore applies the plan before loading
    later = tmp_path / "later"
    assert main(["run", str(cfg), "--out", str(later), "--quiet"]) == 0
    manifest = _manifest(later)
    for stage in ("export", "verify", "benchmark", "report"):
        del manifest["stages"][stage]
    manifest["status"] = "running"
    (later / "manifest.json").write_text(json.dumps(manifest))
    (later / "model.onnx").unlink()
    assert main(["run", str(cfg), "--out", str(later), "--quiet"]) == 0
    assert sha256_file(later / "model.onnx") == sha256_file(reference / "model.onnx")


def test_impossible_latency_bound_fails_the_run_with_exit_3(tmp_path, tiny_config, capsys):
    cfg = _config(tiny_config, validate__max_latency_ratio=0.001, train__epochs=1,
                  structured__finetune_epochs=0, sparsity__train__epochs=2)
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 3
    m = _manifest(run)
    assert m["status"] == "gate_failed" and m["error"]["gate"] == "latency"
    assert "validate.max_latency_ratio=0.001" in m["error"]["message"]
    assert m["stages"]["benchmark"]["status"] == "failed" and m["metrics"]["latency"]["rows"]
    assert "validate.max_latency_ratio" in capsys.readouterr().err
    assert "## Latency (ONNX Runtime, measured)" in (run / "report.md").read_text()


@pytest.mark.parametrize("changes, message", [
    ({"structured__ratio": 1.5}, "ratio must be in (0, 1)"),
    ({"structured__importance": "bogus"}, "unknown importance 'bogus'; valid: "),
    ({"structured__ignore": ["@stem", "(unclosed"]}, "bad regex"),
    ({"structured__ignore": ["@head"]}, "unknown token '@head'"),
    ({"structured__target": {"macs": 0.5}}, "give exactly one of ratio"),
    ({"structured__round_to": 0}, "structured.round_to"),
    ({"structured__steps": 2}, "structured.steps: unknown key"),
    ({"benchmark__enabled": False, "validate__max_latency_ratio": 0.6}, "max_latency_ratio needs the benchmark"),
    ({"benchmark__batch_sizes": [1, 1]}, "batch sizes must be distinct"),
])
def test_bad_structured_and_benchmark_settings_exit_2_before_writing(tmp_path, tiny_config, capsys, changes, message):
    run = tmp_path / "run"
    assert main(["run", str(_config(tiny_config, **changes)), "--out", str(run)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


VIT_SOURCE = '''
import torch
from torch import nn


class Attention(nn.Module):
    """timm's ViT attention: one qkv Linear whose output is reshaped into (3, heads, head_dim)."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TinyViT(nn.Module):
    def __init__(self, input_shape, num_classes, dim=32):
        super().__init__()
        self.patch = nn.Conv2d(input_shape[0], dim, 2, stride=2)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def make(input_shape, num_classes):
    return TinyViT(input_shape, num_classes)
'''


def test_a_model_channel_pruning_would_break_is_refused_before_training(tmp_path, tiny_config, monkeypatch, capsys):
    """timm-style attention: removing qkv output channels breaks its (3, heads, head_dim) reshape.
    The trial prune at the model stage finds it: exit 2 naming the module, nothing trained."""
    (tmp_path / "my_vit.py").write_text(VIT_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    cfg = _config(tiny_config, model={"name": "my_vit:make"})
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "structured: after removing channels the model fails in module 'attn' (Attention)" in err, err
    m = _manifest(run)
    assert "train" not in m["stages"] and not (run / "checkpoints" / "dense.pt").exists()
