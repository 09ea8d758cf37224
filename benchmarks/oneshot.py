"""One-shot peers against OptG from the same trained dense model: magnitude (ASP), Wanda and
SparseGPT, each one-shot (`epochs: 0`) and with the config's own fine-tune budget (mask held),
OptG's pretrained default, and (`--cells gmp srste ...`) GMP and SR-STE with the same budget,
through `optg run` (the CLI, as a user runs it).

The dense phase is deterministic per seed (same config, same seed, same CPU), so every method
starts from the same trained weights; the table reports test accuracy (or perplexity) of the
baked model, mean and std over seeds, and the sparsify stage's seconds (calibration included).

    python benchmarks/oneshot.py --config configs/quickstart.yaml --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CELLS: dict[str, list[str]] = {
    "magnitude one-shot": ["sparsity.method=oneshot", "sparsity.train=null"],
    "wanda one-shot": ["sparsity.method=wanda", "sparsity.train=null"],
    "sparsegpt one-shot": ["sparsity.method=sparsegpt", "sparsity.train=null"],
    "magnitude + fine-tune": ["sparsity.method=oneshot"],
    "wanda + fine-tune": ["sparsity.method=wanda"],
    "sparsegpt + fine-tune": ["sparsity.method=sparsegpt"],
    "gmp": ["sparsity.method=gmp"],
    "srste": ["sparsity.method=srste"],
    "optg (pretrained default)": ["sparsity.method=optg"],
    "optg (score_init sparsegpt)": ["sparsity.method=optg", "sparsity.optg.score_init=sparsegpt"],
    "optg (score_init wanda)": ["sparsity.method=optg", "sparsity.optg.score_init=wanda"],
    "optg (bf16 scores)": ["sparsity.method=optg", "sparsity.optg.score_dtype=bfloat16"],
}


def run(config: Path, cell: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One `optg run` of `cell` for `seed` (its own run directory: the dense phase reruns, and
    is the same for every cell of a seed); the manifest is kept as `<out>/<cell>_<seed>.json`."""
    kept = out / f"{cell.replace(' ', '_')}_{seed}.json"
    if not kept.is_file():
        sets = [*CELLS[cell], f"seed={seed}", "benchmark.enabled=false", *extra]
        run_dir = out / f"{cell.replace(' ', '_')}_{seed}"
        cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(run_dir), "--quiet", "--force",
               *(a for s in sets for a in ("--set", s))]
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code not in (0, 3):  # 3: a gate failed; the numbers still count
                err.seek(0)
                raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{err.read().decode()[-3000:]}")
        manifest = json.loads((run_dir / "manifest.json").read_text())
        manifest["benchmark_peak_rss_mb"] = usage.ru_maxrss / 1024  # the whole run's process, dense phase included
        kept.write_text(json.dumps(manifest))
        shutil.rmtree(run_dir)  # the numbers are kept; the artifacts are not needed
    m = json.loads(kept.read_text())
    metrics = m["metrics"]
    key = "sparse_perplexity" if metrics.get("metric") == "perplexity" else "sparse_accuracy"
    return {"value": metrics[key], "dense": metrics.get(key.replace("sparse", "dense")), "metric": key,
            "seconds": m["stages"]["sparsify"]["seconds"], "rss_mb": m.get("benchmark_peak_rss_mb")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cells", nargs="+", default=[c for c in CELLS if c not in ("gmp", "srste")], choices=list(CELLS))
    p.add_argument("--set", dest="extra", action="append", default=[], help="more overrides for every run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/oneshot"))
    args = p.parse_args()
    rows = []
    for cell in args.cells:
        tag = args.config.stem + "".join("_" + re.sub(r"[^A-Za-z0-9.]+", "-", e) for e in args.extra)
        results = [run(args.config, cell, seed, args.out / tag, args.extra) for seed in args.seeds]
        values = [r["value"] for r in results]
        rss = [r["rss_mb"] for r in results if r["rss_mb"] is not None]
        rows.append((cell, statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                     statistics.mean(r["seconds"] for r in results), results[0]["metric"],
                     statistics.mean(r["dense"] for r in results if r["dense"] is not None),
                     max(rss) if rss else None))
    metric = rows[0][4]
    print(f"| {args.config.name} ({', '.join(args.extra) or 'as shipped'}), seeds {args.seeds} | {metric} "
          f"(mean ± std) | sparsify stage s (calibration + fine-tune) | peak RSS MB (whole run) |")
    print("|---|---|---|---|")
    print(f"| dense | {rows[0][5]:.4f} | - | - |")
    for cell, mean, std, seconds, _, _, rss in rows:
        print(f"| {cell} | {mean:.4f} ± {std:.4f} | {seconds:.1f} | {'-' if rss is None else f'{rss:.0f}'} |")


if __name__ == "__main__":
    main()
