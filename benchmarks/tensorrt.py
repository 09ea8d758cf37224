"""Build and time TensorRT engines for a finished run: dense vs 2:4, same settings, and which
layers TensorRT ran sparse.

For each shipped file of `<run>` (model.onnx, model.int8.onnx when present) and the dense
reference (reference.onnx, when the run has the benchmark stage), one engine is built with
`--sparsity=enable` and, for the shipped files, one with `--sparsity=disable` (the same file on
dense kernels), each timed by trtexec (median GPU compute time). The commands are the ones the
run wrote into `manifest.json` (`deployment.tensorrt`) for the detected TensorRT major version;
the layers TensorRT picked sparse kernels for come from trtexec's "(Sparsity)" log lines.

Backends, the first found: `trtexec` on PATH (or --trtexec); else ONNX Runtime's TensorRT
execution provider (`trt_sparsity_enable`; it times, but does not say which layers ran sparse).
Where neither exists the script says so and exits 0 having written a "skipped" result: CPU
machines and CI have no TensorRT.

    python benchmarks/tensorrt.py --run runs/quickstart --out benchmarks/results/tensorrt
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_MEDIAN = re.compile(r"GPU Compute Time:.*?median = ([0-9.eE+-]+) ms")
_VERSION = re.compile(r"TensorRT version:\s*([0-9]+)\.([0-9]+)")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:\s*(.*)")
_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:\s*(.*)")


def parse_trtexec_log(text: str) -> dict[str, Any]:
    """Median GPU compute ms, TensorRT version, the layers eligible for and picked for sparse
    kernels, from one trtexec run's output (None / [] where the log does not say)."""
    median = _MEDIAN.search(text)
    version = _VERSION.search(text)

    def layers(pattern: re.Pattern[str]) -> list[str]:
        names: list[str] = []
        for match in pattern.finditer(text):
            names += [n.strip() for n in match.group(1).split(",") if n.strip()]
        return names

    return {"median_ms": float(median.group(1)) if median else None,
            "tensorrt": f"{version.group(1)}.{version.group(2)}" if version else None,
            "eligible_sparse": layers(_ELIGIBLE), "picked_sparse": layers(_PICKED)}


def _trtexec_major(trtexec: str) -> int | None:
    proc = subprocess.run([trtexec, "--help"], capture_output=True, text=True, timeout=120)
    return trtexec_major(proc.stdout + proc.stderr)


def trtexec_major(text: str) -> int | None:
    """The TensorRT major version from trtexec's banner ("[TensorRT v100800]" = 10.8.0) or its
    "TensorRT version: 11.1.0" line."""
    found = _VERSION.search(text) or re.search(r"TensorRT v([0-9]+)([0-9]{2})([0-9]{2})\]", text)
    return int(found.group(1)) if found else None


def _with_sparsity(command: str, sparsity: str, tag: str) -> str:
    """The manifest's command with `--sparsity=<sparsity>` and its outputs renamed by `tag`."""
    command = command.replace("--sparsity=enable", f"--sparsity={sparsity}")
    return re.sub(r"--(saveEngine|exportLayerInfo)=(\S+?)(\.plan|\.layers\.json)",
                  lambda m: f"--{m.group(1)}={m.group(2)}.{tag}{m.group(3)}", command)


def run_trtexec(run: Path, manifest: dict[str, Any], trtexec: str, out: Path) -> list[dict[str, Any]]:
    major = _trtexec_major(trtexec) or 10
    key = "tensorrt11" if major >= 11 else "tensorrt10"
    commands = list(manifest.get("deployment", {}).get("tensorrt") or [])
    if (run / "reference.onnx").is_file() and commands:
        first = commands[0]  # model.onnx's command, for the dense file exported the same way
        stem = first["file"].removesuffix(".onnx")
        reference = first[key]
        for flag, old, new in (("onnx", first["file"], "reference.onnx"), ("saveEngine", f"{stem}.", "reference."),
                               ("exportLayerInfo", f"{stem}.", "reference.")):
            reference = reference.replace(f"--{flag}={old}", f"--{flag}={new}")
        commands.append({**first, "file": "reference.onnx", key: reference})
    rows = []
    for c in commands:
        modes = ["enable"] if c["file"] == "reference.onnx" else ["enable", "disable"]
        for mode in modes:
            command = _with_sparsity(c[key], mode, f"sparsity-{mode}").replace("trtexec", trtexec, 1)
            start = time.perf_counter()
            proc = subprocess.run(command.split(), cwd=run, capture_output=True, text=True, timeout=3600)
            log = proc.stdout + proc.stderr
            (out / f"{Path(c['file']).stem}.sparsity-{mode}.log").write_text(log)
            rows.append({"file": c["file"], "dtype": c["dtype"], "sparsity": mode, "command": command,
                         "returncode": proc.returncode, "build_and_time_s": round(time.perf_counter() - start, 1),
                         **parse_trtexec_log(log)})
    return rows


def run_ort_tensorrt(run: Path, manifest: dict[str, Any], repeats: int = 200) -> list[dict[str, Any]]:
    """ONNX Runtime's TensorRT EP: median wall ms per call at the largest benchmarked shape."""
    import numpy as np
    import onnxruntime as ort

    rows = []
    for c in manifest.get("deployment", {}).get("tensorrt") or []:
        shapes = re.search(r"--optShapes=(\S+)", c["tensorrt11"])
        for mode in ("enable", "disable"):
            options = {"trt_sparsity_enable": mode == "enable", "trt_fp16_enable": c["dtype"] == "fp16",
                       "trt_int8_enable": c["dtype"] == "int8"}
            session = ort.InferenceSession(str(run / c["file"]), providers=[("TensorrtExecutionProvider", options)])
            feeds = {}
            opt = dict(item.split(":") for item in shapes.group(1).split(",")) if shapes else {}
            for spec in session.get_inputs():
                dims = [int(d) for d in opt[spec.name].split("x")] if spec.name in opt else \
                    [d if isinstance(d, int) else 1 for d in spec.shape]
                kind = np.int64 if "int64" in spec.type else (np.float16 if "float16" in spec.type else np.float32)
                feeds[spec.name] = np.ones(dims, dtype=kind)
            for _ in range(10):
                session.run(None, feeds)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append((time.perf_counter() - start) * 1000)
            rows.append({"file": c["file"], "dtype": c["dtype"], "sparsity": mode, "backend": "onnxruntime-trt",
                         "median_ms": statistics.median(times), "picked_sparse": None})
    return rows


def render(rows: list[dict[str, Any]], backend: str) -> str:
    lines = [f"# TensorRT engines ({backend})", "", "| file | dtype | sparsity | median GPU ms | sparse layers |",
             "|---|---|---|---|---|"]
    for r in rows:
        picked = r.get("picked_sparse")
        median = r.get("median_ms")
        lines.append(f"| {r['file']} | {r['dtype']} | {r['sparsity']} | "
                     f"{'-' if median is None else f'{median:.4f}'} | "
                     f"{'not reported' if picked is None else len(picked)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished run directory (manifest.json, model.onnx)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--trtexec", default=None, help="path of trtexec (default: the one on PATH)")
    args = p.parse_args(argv)
    manifest = json.loads((args.run / "manifest.json").read_text())
    if not (manifest.get("deployment") or {}).get("tensorrt"):
        print(f"{args.run}: the manifest has no deployment.tensorrt commands (an older run?)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    trtexec = args.trtexec or shutil.which("trtexec")
    providers: list[str] = []
    try:
        import onnxruntime as ort
        providers = ort.get_available_providers()
    except ImportError:
        pass
    if trtexec:
        backend, rows = "trtexec", run_trtexec(args.run.resolve(), manifest, trtexec, args.out)
    elif "TensorrtExecutionProvider" in providers:
        backend, rows = "onnxruntime TensorrtExecutionProvider", run_ort_tensorrt(args.run, manifest)
    else:
        message = ("skipped: no TensorRT here (no trtexec on PATH, onnxruntime has no TensorrtExecutionProvider); "
                   "the commands to run where TensorRT is installed are in manifest.json deployment.tensorrt")
        print(message)
        (args.out / "tensorrt.json").write_text(json.dumps({"skipped": message}, indent=2) + "\n")
        return 0
    (args.out / "tensorrt.json").write_text(json.dumps({"backend": backend, "rows": rows}, indent=2) + "\n")
    (args.out / "tensorrt.md").write_text(render(rows, backend))
    print(render(rows, backend))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
