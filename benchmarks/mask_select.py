"""Unstructured mask-update cost: the exact global threshold over N scores, old vs new.

Times `kthvalue` (the old threshold), `kth_smallest` (the radix select in optg/patterns.py)
and a full `start_epoch()` of an OptG sparsifier at 90% unstructured over N weights, and
checks that both thresholds are the same value.

    python benchmarks/mask_select.py                      # CPU, 25M weights
    python benchmarks/mask_select.py --device cuda        # on a GPU (target: <= 30 ms for 25M)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import optg
from optg.patterns import kth_smallest


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights-m", type=float, default=25.0, help="millions of weights")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    numel = int(args.weights_m * 1_000_000)
    torch.manual_seed(0)
    scores = torch.randn(numel, device=device)
    k = numel - int(0.1 * numel)  # keep 10%
    _timed(lambda: kth_smallest(scores, k), device, 1)  # warm-up (CUDA context, allocator)
    old_s, old = _timed(lambda: scores.kthvalue(k).values.item(), device, args.repeats)
    new_s, new = _timed(lambda: kth_smallest(scores, k), device, args.repeats)
    scores = torch.empty(0)  # free the memory before the model
    width = 1024
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(max(1, round(numel / width**2)))])
    sp = optg.create("optg", model.to(device), target=0.9, epochs=10).attach()
    with torch.no_grad():
        for layer in sp.layers:
            layer.scores.normal_()
    epoch_s, _ = _timed(lambda: sp.start_epoch(9), device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {numel:,} scores, median of {args.repeats}:")
    print(f"  kthvalue threshold      {old_s * 1e3:9.1f} ms")
    print(f"  radix-select threshold  {new_s * 1e3:9.1f} ms   (same value: {old == new})")
    print(f"  start_epoch, 90% global {epoch_s * 1e3:9.1f} ms   ({sp.fraction=:.2f})")


if __name__ == "__main__":
    main()
