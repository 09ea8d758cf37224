"""benchmarks/tensorrt.py without TensorRT: it says it skipped and writes that; with a stand-in
`trtexec` (a script printing what trtexec prints) it runs the manifest's commands for the
detected major version, sparse and dense, and reads the median and the sparse layers back."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from benchmarks.tensorrt import parse_trtexec_log, trtexec_major

ROOT = Path(__file__).resolve().parents[2]
LOG = """[12/06/2026-10:00:00] [I] TensorRT version: 11.1.0
[I] [TRT] (Sparsity) Layers eligible for sparse math: fc1, fc2
[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: fc1
[I] GPU Compute Time: min = 0.010 ms, max = 0.030 ms, mean = 0.015 ms, median = 0.0123 ms, percentile(90%) = 0.02 ms
"""


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.onnx", "reference.onnx"):
        (run / name).write_bytes(b"")
    cmd = "--onnx=model.onnx --sparsity=enable --saveEngine=model.plan --exportLayerInfo=model.layers.json"
    (run / "manifest.json").write_text(json.dumps({"deployment": {"tensorrt": [
        {"file": "model.onnx", "dtype": "fp16", "tensorrt10": f"trtexec --fp16 {cmd}",
         "tensorrt11": f"trtexec {cmd}"}]}}))
    return run


def test_parse_reads_median_version_and_sparse_layers():
    parsed = parse_trtexec_log(LOG)
    assert parsed == {"median_ms": 0.0123, "tensorrt": "11.1", "eligible_sparse": ["fc1", "fc2"],
                      "picked_sparse": ["fc1"]}
    assert parse_trtexec_log("nothing") == {"median_ms": None, "tensorrt": None, "eligible_sparse": [],
                                            "picked_sparse": []}


def test_major_version_from_the_banner_or_the_version_line():
    assert trtexec_major("&&&& RUNNING TensorRT.trtexec [TensorRT v100800] # trtexec --help") == 10
    assert trtexec_major("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] # trtexec") == 11
    assert trtexec_major(LOG) == 11 and trtexec_major("usage") is None


def _script(tmp_path, run, env):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tensorrt.py"), "--run", str(run),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)


def test_without_tensorrt_it_skips_with_a_message(tmp_path):
    run = _run_dir(tmp_path)
    proc = _script(tmp_path, run, {**os.environ, "PATH": str(tmp_path / "empty")})
    assert proc.returncode == 0 and "skipped: no TensorRT here" in proc.stdout
    assert "skipped" in json.loads((tmp_path / "out" / "tensorrt.json").read_text())


def test_with_trtexec_it_builds_sparse_and_dense_and_reads_them_back(tmp_path):
    run = _run_dir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    calls = tmp_path / "calls.txt"
    fake.write_text(f"#!{sys.executable}\nimport sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    f"print({LOG!r})\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc = _script(tmp_path, run, {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "out" / "tensorrt.json").read_text())["rows"]
    assert [(r["file"], r["sparsity"]) for r in rows] == [("model.onnx", "enable"), ("model.onnx", "disable"),
                                                          ("reference.onnx", "enable")]
    assert all(r["median_ms"] == 0.0123 and r["picked_sparse"] == ["fc1"] for r in rows)
    built = calls.read_text().splitlines()[1:]  # the first call asks for the version
    assert all("--fp16" not in line for line in built)  # TensorRT 11: no precision flag
    assert "--onnx=reference.onnx" in built[2] and "--saveEngine=reference.sparsity-enable.plan" in built[2]
    assert "--sparsity=disable" in built[1] and "--saveEngine=model.sparsity-disable.plan" in built[1]
