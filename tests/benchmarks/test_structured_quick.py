"""Smoke test of benchmarks/structured.py --quick: it runs and writes well-formed outputs.

Accuracies and timings are never asserted (tiny budgets, shared machine); the structure is:
every importance has a cell with MACs removed, ORT latency ratios at batch 1 and 32, and a 2:4
compounded file whose 2:4 pattern was read back from the ONNX and holds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_structured_quick_writes_cells_tables_and_checks(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(work), "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(work)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "structured.py"), "--quick", "--out", str(out)],
                          check=False, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "structured_summary.json").read_text())
    cells = summary["cells"]
    assert sorted(c["importance"] for c in cells) == ["magnitude", "optg", "taylor"]
    for c in cells:
        assert c["model"] == "cnn1d" and c["ratio"] == 0.5
        assert 0 < c["macs_reduction"] < 1 and 0.0 <= c["accuracy"] <= 1.0
        assert set(c["latency"]) == set(c["nm_latency"]) == {"b1", "b32"}
        assert all(v > 0 for v in c["latency"].values())
        assert c["nm_check"]["required"] > 0 and c["nm_check"]["holding"] == c["nm_check"]["required"]
    md = (out / "structured.md").read_text()
    assert "## cnn1d (mnist1d)" in md and md.count("| 50% |") == 3 and "ok (" in md
    assert len(json.loads((out / "structured_runs.json").read_text())) == 4  # dense + 3 cells
