"""How fast data reaches the model: loader images/s by worker count, and CPU training steps/s.

1. `imagefolder` (lazy JPEG decode + RandomResizedCrop/flip in the workers) on JPEGs generated
   into a temporary folder, with 0, 1, 2 workers: images/s of a warm epoch (workers already
   started) and the seconds of the first epoch (worker start-up included).
2. Tensors in memory (the CIFAR-style augmented dataset) with 0 and 2 workers: why
   `data.num_workers: auto` is 0 for them.
3. CPU training steps/s of a small conv net (resnet20) fed from memory, and fed from the
   imagefolder with 0/1/2 workers (the decode competes with the step for the cores).

Prints a markdown table; with --out also writes throughput.md and throughput.json there.

    python benchmarks/throughput.py --quick                       # ~1 min on 2 busy cores
    python benchmarks/throughput.py --out benchmarks/results      # 500 JPEGs, a few minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.data.catalog import AugmentedTensorDataset
from stages.data.imagefolder import load_imagefolder
from stages.data.loading import cpu_count, make_loader
from stages.model import ModelConfig, build_model
from stages.train import OptimizerConfig, make_optimizer


@dataclass
class Settings:
    images: int = 500          # JPEGs written (train/ of 10 classes)
    min_side: int = 160
    max_side: int = 320
    image_size: int = 112      # crop fed to the model
    batch: int = 64
    workers: tuple[int, ...] = (0, 1, 2)
    memory_samples: int = 20_000
    train_steps: int = 20
    width: int = 16            # resnet20 width


def quick_settings() -> Settings:
    return Settings(images=160, min_side=64, max_side=128, image_size=48, batch=32,
                    memory_samples=4_000, train_steps=6, width=8)


def write_jpegs(root: Path, s: Settings, classes: int = 10) -> None:
    """`root/train/<class>/<i>.jpg` and a small `root/val/`, random sizes, noise + gradients."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", s.images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(s.min_side, s.max_side + 1, 2))
            ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
            pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def images_per_second(dataset, batch: int, workers: int) -> tuple[float, float]:
    """(warm epoch images/s, first epoch seconds) over one persistent-worker loader."""
    loader = make_loader(dataset, batch, shuffle=True, seed=0, num_workers=workers)
    started = time.perf_counter()
    for _ in loader:
        pass
    first = time.perf_counter() - started
    loader.set_epoch(1)
    started = time.perf_counter()
    seen = sum(len(y) for _, y in loader)
    return seen / (time.perf_counter() - started), first


def train_steps_per_second(loader, model, steps: int) -> float:
    """Median steps/s of SGD steps (forward, backward, update) with batches from `loader`."""
    optimizer = make_optimizer(model.parameters(), OptimizerConfig())
    model.train()
    times: list[float] = []
    epoch = 0
    while len(times) < steps + 1:  # the first step warms up allocators and workers
        loader.set_epoch(epoch)
        started = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            now = time.perf_counter()
            times.append(now - started)
            started = now
            if len(times) == steps + 1:
                break
        epoch += 1
    return 1.0 / statistics.median(times[1:])


def run(s: Settings) -> dict:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="optg-throughput-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_jpegs(root, s)
        print(f"wrote {s.images} JPEGs in {time.perf_counter() - started:.1f}s", flush=True)
        folder = load_imagefolder(root, image_size=s.image_size, resize=s.image_size * 8 // 7,
                                  augment=True, val_fraction=0.0, seed=0)
        for workers in s.workers:
            rate, first = images_per_second(folder.train, s.batch, workers)
            rows.append({"what": f"imagefolder loader ({s.image_size}px crops)", "workers": workers,
                         "images_per_s": rate, "first_epoch_s": first})
            print(rows[-1], flush=True)
        g = torch.Generator().manual_seed(0)
        memory = AugmentedTensorDataset(torch.randn(s.memory_samples, 3, 32, 32, generator=g),
                                        torch.randint(0, 10, (s.memory_samples,), generator=g))
        for workers in (0, 2):
            rate, first = images_per_second(memory, 256, workers)
            rows.append({"what": "in-memory tensors (32px, pad-crop+flip)", "workers": workers,
                         "images_per_s": rate, "first_epoch_s": first})
            print(rows[-1], flush=True)
        for source, workers in [("memory", 0)] + [("imagefolder", w) for w in s.workers]:
            torch.manual_seed(0)
            if source == "memory":
                shape, data = (3, 32, 32), memory
            else:
                shape, data = (3, s.image_size, s.image_size), folder.train
            model = build_model(ModelConfig(name="resnet20", options={"width": s.width}), shape, 10)
            loader = make_loader(data, s.batch, shuffle=True, seed=0, num_workers=workers)
            rate = train_steps_per_second(loader, model, s.train_steps)
            rows.append({"what": f"train resnet20 w{s.width} b{s.batch} from {source} "
                                 f"({shape[-1]}px)", "workers": workers, "steps_per_s": rate,
                         "images_per_s": rate * s.batch})
            print(rows[-1], flush=True)
    return {"settings": asdict(s), "rows": rows, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": cpu_count(), "machine": platform.machine()}


def markdown(report: dict, command: str) -> str:
    lines = [(f"`{command}` (torch {report['torch']}, {report['threads']} thread(s), "
              f"{report['cpus']} CPUs visible)"), "",
             "| what | workers | images/s | steps/s | first epoch s |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        steps = f"{r['steps_per_s']:.2f}" if "steps_per_s" in r else ""
        first = f"{r['first_epoch_s']:.2f}" if "first_epoch_s" in r else ""
        lines.append(f"| {r['what']} | {r['workers']} | {r['images_per_s']:.0f} | {steps} | {first} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller images and steps")
    parser.add_argument("--out", type=Path, help="also write throughput.md/.json here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    report = run(quick_settings() if args.quick else Settings())
    command = "python benchmarks/throughput.py" + (" --quick" if args.quick else "")
    table = markdown(report, command)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.md").write_text(table)
        (args.out / "throughput.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
