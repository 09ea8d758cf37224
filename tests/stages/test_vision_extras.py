"""The `vision` and `timm` extras against the real libraries: torchvision transformers at 2:4
(every eligible weight, the fused attention projections included, holds the pattern in the
exported file, and the run's own `optg inspect --pattern 2:4` agrees), and channel pruning that
either works or refuses before training.

CI runs this module in a second environment that has torch and torchvision installed as a
matched pair (`.ci/run`, README "Install"), with `OPTG_REQUIRE_EXTRAS=vision,timm` so that a
missing or broken torchvision fails instead of skipping. In the main environment (no
torchvision) the module skips, saying what to install.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from pipeline.cli import main


def _extra(module: str, extra: str) -> ModuleType:
    """Import `module` or skip; where `OPTG_REQUIRE_EXTRAS` names `extra`, fail instead."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as exc:  # ImportError, or torchvision's RuntimeError beside a mismatched torch
        required = {e.strip() for e in os.environ.get("OPTG_REQUIRE_EXTRAS", "").split(",")}
        if extra in required:
            pytest.fail(f"{module} must import here (OPTG_REQUIRE_EXTRAS={extra}): {exc!r}")
        pytest.skip(f"needs {module} ('.[{extra}]', installed as README 'Install' says): {exc!r}")


def _config(tmp_path: Path, model: str, options: dict, size: int, **sections) -> Path:
    cfg = {
        "name": model.replace(":", "_"),
        "seed": 0,
        "data": {"name": "synthetic", "batch_size": 16,
                 "options": {"shape": [3, size, size], "num_classes": 4, "num_samples": 48}},
        "model": {"name": model, "options": options},
        "sparsity": {"method": "optg", "pattern": "2:4",
                     "train": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}},
        "verify": {"num_samples": 16},
        "benchmark": {"enabled": False},
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _inspect(onnx_path: Path) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["inspect", str(onnx_path), "--pattern", "2:4", "--json"])
    return code, json.loads(out.getvalue())


@pytest.mark.parametrize(("model", "options", "size", "stem"), [
    ("vit_b_16", {"image_size": 32}, 32, "conv_proj.weight"),
    ("swin_t", {}, 64, "features.0.0.weight"),
])
def test_torchvision_transformer_at_24_holds_it_on_every_eligible_weight(tmp_path, model, options, size, stem):
    _extra("torchvision.models", "vision")
    run = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, f"torchvision:{model}", options, size)),
                 "--out", str(run), "--quiet"]) == 0
    code, report = _inspect(run / "model.onnx")
    assert code == 0 and report["violations"] == [] and report["untraced"] == []
    summary = report["summary"]
    # the only weight left dense is the 3-channel stem: 2:4 needs C % 4 == 0
    dense = [w["name"] for w in report["weights"] if not w["pattern_ok"]]
    assert dense == [stem] and summary["exempt"] == 1 and summary["holding"] == summary["required"] >= 48
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["metrics"]["pattern_coverage"] == pytest.approx(summary["pattern_coverage"])
    assert summary["pattern_coverage"] > 0.99
    if model == "vit_b_16":  # every block's fused QKV (768 -> 2304) and out_proj (768 -> 768) hold 2:4
        shapes = [tuple(w["shape"]) for w in report["weights"] if w["pattern_ok"]]
        assert shapes.count((768, 2304)) == 12 and shapes.count((768, 768)) == 12


def test_torchvision_resnet18_channel_pruning_then_24(tmp_path):
    _extra("torchvision.models", "vision")
    run = tmp_path / "run"
    cfg = _config(tmp_path, "torchvision:resnet18", {}, 32, structured={"ratio": 0.5, "finetune_epochs": 1})
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    params = manifest["structured"]["params"]
    assert params["after"] < 0.5 * params["before"]
    assert _inspect(run / "model.onnx")[0] == 0


@pytest.mark.parametrize(("library", "extra", "model", "options", "named"), [
    ("timm", "timm", "timm:vit_tiny_patch16_224", {"img_size": 32}, "blocks.0.attn"),
    ("torchvision.models", "vision", "torchvision:shufflenet_v2_x0_5", {}, "ZeroDivisionError"),
])
def test_channel_pruning_that_would_break_a_model_is_refused_before_training(tmp_path, capsys, library, extra,
                                                                               model, options, named):
    _extra(library, extra)
    run = tmp_path / "run"
    cfg = _config(tmp_path, model, options, 32, structured={"ratio": 0.5, "finetune_epochs": 1})
    assert main(["run", str(cfg), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert named in err and "structured.ignore" in err
    # refused at the model stage: nothing trained, pruned or exported
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "manifest.json", "metrics.csv"]
