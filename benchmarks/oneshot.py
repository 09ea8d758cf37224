"""One-shot peers against OptG from the same trained dense model: magnitude (ASP), Wanda and
SparseGPT, each one-shot (`epochs: 0`) and with the config's own fine-tune budget (mask held),
and OptG's pretrained default, through `optg run` (the CLI, as a user runs it).

The dense phase is deterministic per seed (same config, same seed, same CPU), so every method
starts from the same trained weights; the table reports test accuracy (or perplexity) of the
baked model, mean and std over seeds, and the sparsify stage's seconds (calibration included).

    python benchmarks/oneshot.py --config configs/quickstart.yaml --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CELLS: dict[str, list[str]] = {
    "magnitude one-shot": ["sparsity.method=oneshot", "sparsity.epochs=0"],
    "wanda one-shot": ["sparsity.method=wanda", "sparsity.epochs=0"],
    "sparsegpt one-shot": ["sparsity.method=sparsegpt", "sparsity.epochs=0"],
    "magnitude + fine-tune": ["sparsity.method=oneshot"],
    "wanda + fine-tune": ["sparsity.method=wanda"],
    "sparsegpt + fine-tune": ["sparsity.method=sparsegpt"],
    "optg (pretrained default)": ["sparsity.method=optg"],
    "optg (score_init sparsegpt)": ["sparsity.method=optg", "sparsity.score_init=sparsegpt"],
    "optg (score_init wanda)": ["sparsity.method=optg", "sparsity.score_init=wanda"],
    "optg (bf16 scores)": ["sparsity.method=optg", "sparsity.score_dtype=bfloat16"],
}


def run(config: Path, cell: list[str], seed: int, out: Path, extra: list[str]) -> dict:
    """One `optg run` (cached by its run directory's manifest)."""
    manifest = out / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("status") != "succeeded":
        sets = [*cell, f"seed={seed}", "benchmark.enabled=false", *extra]
        cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(out), "--quiet", "--force",
               *(a for s in sets for a in ("--set", s))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode not in (0, 3):  # 3: a gate failed; the numbers still count
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = json.loads(manifest.read_text())
    metrics = m["metrics"]
    key = "sparse_perplexity" if metrics.get("metric") == "perplexity" else "sparse_accuracy"
    return {"value": metrics[key], "dense": metrics.get(key.replace("sparse", "dense")), "metric": key,
            "seconds": m["stages"]["sparsify"]["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--set", dest="extra", action="append", default=[], help="more overrides for every run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/oneshot"))
    args = p.parse_args()
    rows = []
    for cell in args.cells:
        results = [run(args.config, CELLS[cell], seed, args.out / args.config.stem / f"{cell.replace(' ', '_')}_{seed}",
                       args.extra) for seed in args.seeds]
        values = [r["value"] for r in results]
        rows.append((cell, statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                     statistics.mean(r["seconds"] for r in results), results[0]["metric"],
                     statistics.mean(r["dense"] for r in results if r["dense"] is not None)))
    metric = rows[0][4]
    print(f"| {args.config.name} ({', '.join(args.extra) or 'as shipped'}), seeds {args.seeds} | {metric} "
          f"(mean ± std) | sparsify s |")
    print("|---|---|---|")
    print(f"| dense | {rows[0][5]:.4f} | - |")
    for cell, mean, std, seconds, _, _ in rows:
        print(f"| {cell} | {mean:.4f} ± {std:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
