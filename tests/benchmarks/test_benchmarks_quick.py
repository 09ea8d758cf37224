"""Smoke tests of the benchmark scripts in --quick mode: they run and write well-formed outputs.

Timings and accuracies are never asserted (they depend on the machine and on tiny budgets).
Each script runs in a subprocess with cwd and TMPDIR inside tmp_path, so nothing is written
elsewhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(work), "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(work)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--out", str(out), *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def table_rows(markdown: str) -> list[list[str]]:
    """Data rows of every markdown table (header and separator rows skipped)."""
    rows, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            if previous.startswith("|"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        previous = line if not line.startswith("|---") else "|"
    return rows


@pytest.fixture(scope="module")
def accuracy_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_script("accuracy.py", tmp_path_factory.mktemp("accuracy"))


@pytest.fixture(scope="module")
def overhead_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_script("overhead.py", tmp_path_factory.mktemp("overhead"))


def test_accuracy_quick_writes_runs_table_and_plot(accuracy_out: Path) -> None:
    runs = json.loads((accuracy_out / "accuracy_runs.json").read_text())
    assert runs, "no runs recorded"
    for key, record in runs.items():
        assert json.loads(key)["method"] == record["method"]
        for field in ("dataset", "method", "pattern", "seed", "test_accuracy", "sparsity", "epochs_total"):
            assert field in record
        assert 0.0 <= record["test_accuracy"] <= 1.0
    methods = {r["method"] for r in runs.values()}
    assert {"dense", "optg", "oneshot"} <= methods
    oneshot = next(r for r in runs.values() if r["method"] == "oneshot")
    optg_nm = next(r for r in runs.values() if r["method"] == "optg" and r["pattern"] == "2:4")
    assert oneshot["epochs_total"] == 2 * optg_nm["epochs_total"]  # ASP: dense + fine-tune
    assert optg_nm["sparsity"] == pytest.approx(0.5, abs=1e-6)     # 2:4 is exactly half zeros

    table = (accuracy_out / "accuracy_mnist1d.md").read_text()
    labels = [row[0] for row in table_rows(table)]
    assert "optg" in labels and "gmp" in labels and any(l.startswith("oneshot") for l in labels)
    assert "±" in table and "Dense" in table
    assert (accuracy_out / "accuracy_mnist1d.png").read_bytes()[:8] == PNG_MAGIC

    summary = json.loads((accuracy_out / "accuracy_summary.json").read_text())
    assert {"protocol", "seeds", "cells"} <= set(summary)
    assert all({"mean", "std", "n", "method", "pattern"} <= set(c) for c in summary["cells"])


def test_accuracy_quick_resumes_from_cache(accuracy_out: Path, tmp_path: Path) -> None:
    """A second invocation on the same --out reuses every cached run (same record objects)."""
    before = json.loads((accuracy_out / "accuracy_runs.json").read_text())
    env = {**os.environ, "TMPDIR": str(tmp_path), "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick",
                           "--out", str(accuracy_out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((accuracy_out / "accuracy_runs.json").read_text()) == before
    assert " seed 0: test " not in proc.stdout  # nothing was retrained


def test_overhead_quick_writes_tables_and_json(overhead_out: Path) -> None:
    report = json.loads((overhead_out / "overhead.json").read_text())
    for field in ("steps", "mask_update", "memory", "export"):
        assert field in report
    step = report["steps"][0]
    assert set(step["ratio_to_dense"]) == {"dense", "optg-unstructured-90%", "optg-2:4"}
    assert all(v > 0 for v in step["ratio_to_dense"].values())
    rules = {r["rule"] for r in report["mask_update"]}
    assert {"unstructured-90%", "2:4 at target", "2:4 mid-ramp"} <= rules
    fp32, bf16 = (next(r for r in report["memory"] if r["score_dtype"] == d) for d in ("float32", "bfloat16"))
    assert fp32["scores_bytes"] == fp32["targeted_weight_bytes"] == fp32["momentum_bytes"]
    assert bf16["scores_bytes"] * 2 == bf16["targeted_weight_bytes"] == bf16["momentum_bytes"] * 2
    assert fp32["extra_over_targeted"] == 2.25 and bf16["extra_over_targeted"] == 1.25  # bool masks: 1 byte
    assert report["export"]["onnx_bytes"] > 0 and report["export"]["latency"]

    md = (overhead_out / "overhead.md").read_text()
    for heading in ("## Training step", "## Mask update", "## Memory", "## Export"):
        assert heading in md
    step_rows = [r for r in table_rows(md) if r[0].startswith("resnet20") and len(r) == 10]
    assert len(step_rows) == 3
