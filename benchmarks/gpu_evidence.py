"""GPU evidence in one prepared run (issue 10, point 9), for a session that is lent a device.

What it measures, in this order, and writes to `<out>/gpu_evidence.md` (+ `.json`):
1. the device (name, torch and CUDA versions);
2. the quickstart (`configs/quickstart.yaml`) through the CLI on `--device`: wall seconds,
   status, accuracies;
3. a sparse ResNet-50 run (`torchvision:resnet50`, OptG 2:4, 224 px) through the CLI from an
   imagefolder of generated JPEGs: per-epoch images/s from the manifest (`samples_per_second`),
   status, fp16 export verified;
4. the OptG/dense training-step ratio of that model (bf16 autocast, channels_last on CUDA),
   interleaved, median of repeats;
5. the unstructured mask-update time for 25M scores (`benchmarks/mask_select.py`);
6. optionally (`--tests`) the test suite with the GPUs visible (`OPTG_TEST_CUDA=1`).

`--quick` shrinks everything (resnet20 at 32 px, a few images and steps) so the script itself
is exercised on a CPU in the tests; its numbers then mean nothing.

    python benchmarks/gpu_evidence.py --device cuda --out benchmarks/results/gpu [--tests]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

import optg
from stages.io import atomic_write_json, atomic_write_text
from stages.model import ModelConfig, build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Settings, write_jpegs  # noqa: E402  (a sibling script, not a package)

REPO = Path(__file__).resolve().parents[1]


def cli_run(config: Path, out: Path, device: str) -> dict[str, Any]:
    """`optg run` in a subprocess; its exit code, wall seconds and manifest."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(out),
                           "--device", device, "--force", "--quiet"], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return {"exit": proc.returncode, "seconds": round(seconds, 1), "status": manifest.get("status"),
            "metrics": {k: manifest.get("metrics", {}).get(k) for k in
                        ("dense_accuracy", "sparse_accuracy", "targeted_sparsity", "parity_max_abs_error")},
            "samples_per_second": [h.get("samples_per_second") for h in manifest.get("history", [])],
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def imagefolder_config(root: Path, quick: bool, device: str) -> dict[str, Any]:
    size = 32 if quick else 224
    return {
        "name": "gpu-resnet", "seed": 0,
        "data": {"name": "imagefolder", "path": str(root), "batch_size": 16 if quick else 128,
                 "eval_batch_size": 64 if quick else 256, "options": {"image_size": size}},
        "model": {"name": "resnet20" if quick else "torchvision:resnet50"},
        "sparsity": {"method": "optg", "pattern": "2:4",
                     "train": {"epochs": 1 if quick else 2, "optimizer": {"name": "sgd", "lr": 0.05}}},
        "export": {"dtype": "fp16" if device == "cuda" else "fp32"},
        "benchmark": {"enabled": False},
    }


def step_ratio(quick: bool, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per training step, dense and with OptG 2:4 attached, interleaved."""
    size, batch = (32, 16) if quick else (224, 128)
    name = "resnet20" if quick else "torchvision:resnet50"
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    models = {}
    for kind in ("dense", "optg"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name), (3, size, size), 10).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sparsifier = optg.create("optg", model, pattern="2:4", epochs=1).attach() if kind == "optg" else None
        if sparsifier is not None:
            sparsifier.start_epoch(0)
        models[kind] = (model, opt, sparsifier)

    def one_step(kind: str) -> float:
        model, opt, sparsifier = models[kind]
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sparsifier is not None:
            sparsifier.step(lr=0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for kind in models:  # warm-up (cuDNN autotune, allocator)
        for _ in range(3):
            one_step(kind)
    times: dict[str, list[float]] = {"dense": [], "optg": []}
    for _ in range(repeats):
        for kind in ("dense", "optg"):
            times[kind].append(one_step(kind))
    dense, sparse = statistics.median(times["dense"]), statistics.median(times["optg"])
    return {"dense_ms": dense * 1e3, "optg_ms": sparse * 1e3, "ratio": sparse / dense}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to exercise the script on a CPU")
    parser.add_argument("--tests", action="store_true", help="also run the test suite with the GPUs visible")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick}

    report["quickstart"] = cli_run(REPO / "configs" / "quickstart.yaml", args.out / "quickstart", args.device)

    images = args.out / "images"
    if not (images / "train").exists():
        write_jpegs(images, Settings(images=64 if args.quick else 2560, min_side=40 if args.quick else 256,
                                     max_side=64 if args.quick else 400))
    config = args.out / "resnet.yaml"
    atomic_write_text(config, yaml.safe_dump(imagefolder_config(images, args.quick, args.device), sort_keys=False))
    report["resnet_run"] = cli_run(config, args.out / "resnet", args.device)
    report["step_ratio"] = step_ratio(args.quick, device, repeats=3 if args.quick else 30)

    quick_mask = ["--weights-m", "1", "--repeats", "1"] if args.quick else []
    mask = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mask_select.py"), "--device", args.device,
                           *quick_mask], capture_output=True, text=True, cwd=REPO)
    report["mask_select"] = {"exit": mask.returncode, "output": mask.stdout[-3000:] or mask.stderr[-2000:]}

    if args.tests:
        env = {**os.environ, "OPTG_TEST_CUDA": "1"}
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                               capture_output=True, text=True, cwd=REPO, env=env)
        report["tests"] = {"exit": tests.returncode, "tail": tests.stdout[-3000:]}

    atomic_write_json(args.out / "gpu_evidence.json", report)
    lines = [f"# GPU evidence on {report['device']} (torch {report['torch']}, CUDA {report['cuda']})", "",
             f"Command: `python benchmarks/gpu_evidence.py {' '.join(argv or sys.argv[1:])}`", "",
             "| what | result |", "|---|---|",
             f"| quickstart | exit {report['quickstart']['exit']}, {report['quickstart']['seconds']} s, "
             f"{report['quickstart']['status']}, {report['quickstart']['metrics']} |",
             f"| ResNet run (imagefolder, OptG 2:4) | exit {report['resnet_run']['exit']}, "
             f"{report['resnet_run']['seconds']} s, {report['resnet_run']['status']}, images/s per epoch "
             f"{report['resnet_run']['samples_per_second']} |",
             f"| step ms dense / optg 2:4 (ratio) | {report['step_ratio']['dense_ms']:.1f} / "
             f"{report['step_ratio']['optg_ms']:.1f} ({report['step_ratio']['ratio']:.3f}) |"]
    if "tests" in report:
        lines.append(f"| test suite (OPTG_TEST_CUDA=1) | exit {report['tests']['exit']} |")
    lines += ["", "mask_select.py:", "", "```", report["mask_select"]["output"].strip(), "```", ""]
    atomic_write_text(args.out / "gpu_evidence.md", "\n".join(lines))
    print("\n".join(lines))
    failed = [k for k in ("quickstart", "resnet_run", "mask_select") if report[k]["exit"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
