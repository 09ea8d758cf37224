"""An outside reference for our SparseGPT: NVIDIA ModelOpt's `sparsegpt` mode on the same trained
dense model, the same calibration batches and the same pattern (2:4), against `optg run` with
`sparsity.method=sparsegpt, sparsity.train=null`.

Per seed: `optg run CONFIG` one-shot SparseGPT (which trains the dense model first and keeps it
in `checkpoints/dense.pt`), then ModelOpt prunes a copy of that dense model; both are scored on
the test split. ModelOpt is not a dependency of the project: run this where it is installed
(`pip install nvidia-modelopt` leaves torch 2.13 in place; here in a venv with
`--system-site-packages`).

    python benchmarks/modelopt_reference.py --config configs/quickstart.yaml --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from stages.data import DataConfig, load_data
from stages.model import ModelConfig, build_model


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def one_seed(config: Path, seed: int, work: Path) -> dict[str, float]:
    import modelopt.torch.sparsity as mts  # type: ignore[import-not-found]

    run = work / f"seed{seed}"
    sets = ["--set", "sparsity.method=sparsegpt", "--set", "sparsity.train=null", "--set", f"seed={seed}",
            "--set", "benchmark.enabled=false"]
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(run), "--quiet",
                    *sets], check=True)
    manifest = json.loads((run / "manifest.json").read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())  # the run's own, overrides applied
    data = DataConfig(**resolved["data"])
    bundle = load_data(data, int(resolved["seed"]))
    model = build_model(ModelConfig(**resolved["model"]), bundle.input_shape, bundle.num_classes)
    model.load_state_dict(torch.load(run / "checkpoints" / "dense.pt", weights_only=True)["model"])
    batches = int(manifest["sparsity"]["calibration_batches"])
    bs = data.batch_size
    x, _ = bundle.tensors("train", limit=batches * bs)
    loader = [(x[i:i + bs],) for i in range(0, len(x), bs)]
    started = time.perf_counter()
    model = mts.sparsify(model, mode="sparsegpt", config={"data_loader": loader, "collect_func": lambda b: b[0]})
    mts.export(model)
    seconds = time.perf_counter() - started
    xt, yt = bundle.tensors("test")
    return {"ours": float(manifest["metrics"]["sparse_accuracy"]), "modelopt": _accuracy(model, xt, yt),
            "dense": float(manifest["metrics"]["dense_accuracy"]), "modelopt_seconds": seconds,
            "ours_seconds": float(manifest["stages"]["sparsify"]["seconds"]), "calibration_batches": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelopt-ref-") as tmp:
        rows = {seed: one_seed(args.config, seed, Path(tmp)) for seed in args.seeds}
    print(json.dumps(rows, indent=1))
    for key in ("dense", "ours", "modelopt"):
        values = [r[key] for r in rows.values()]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
        print(f"{key}: {mean:.4f} ± {std:.4f}")


if __name__ == "__main__":
    main()
