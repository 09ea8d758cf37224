"""What OptG costs: training-step time, mask-update time, memory, export and ONNX Runtime latency.

Every ratio is measured in one process with the compared variants interleaved (dense, optg
unstructured, optg 2:4, dense, ...) so that load from other processes hits them alike, and the
median over repeats is reported. Writes `overhead.json` (raw numbers) and `overhead.md` (tables)
under --out.

    python benchmarks/overhead.py --out benchmarks/results          # full, ~10 min on 2 cores
    python benchmarks/overhead.py --quick --out /tmp/overhead       # tiny sizes, < 30 s
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import optg
from stages.export import ExportConfig, export_onnx
from stages.model import ModelConfig, build_model
from stages.train import OptimizerConfig, make_optimizer

SCHEDULE_EPOCHS = 10          # sigmoid schedule length used to put a sparsifier at its target
VARIANTS = ("dense", "optg-unstructured-90%", "optg-2:4")
GOAL_STEP_RATIO = 1.05
GOAL_MASK_SECONDS_25M = 1.0


@dataclass
class Settings:
    """Sizes and repeat counts; `--quick` shrinks all of them."""

    models: tuple[str, ...] = ("resnet20", "resnet56")
    width: int = 16
    batch: int = 64
    warmup: int = 3
    repeats: int = 30
    mask_sizes_m: tuple[float, ...] = (1, 2, 5, 10, 25)
    mask_repeats: int = 3
    latency_batches: tuple[int, ...] = (1, 64)
    latency_repeats: int = 30
    profile_steps: int = 5
    devices: list[str] = field(default_factory=lambda: ["cpu"])


def quick_settings() -> Settings:
    return Settings(models=("resnet20",), width=4, batch=8, warmup=1, repeats=3,
                    mask_sizes_m=(0.05, 0.1), mask_repeats=1, latency_batches=(1, 4),
                    latency_repeats=3, profile_steps=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, options={"width": width}), (3, 32, 32), 10).to(device)


def _sparsifier(variant: str, model: nn.Module, score_dtype: str = "float32") -> optg.Sparsifier | None:
    """An attached OptG sparsifier at its final sparsity (the steady state of training)."""
    if variant == "dense":
        return None
    pattern = "2:4" if variant.endswith("2:4") else "unstructured"
    target = None if pattern == "2:4" else 0.9
    sp = optg.create("optg", model, pattern=pattern, target=target, epochs=SCHEDULE_EPOCHS,
                     score_dtype=score_dtype).attach()
    sp.start_epoch(SCHEDULE_EPOCHS - 1)
    return sp


class StepRunner:
    """One training configuration: model, optimiser, optional sparsifier, a fixed batch."""

    def __init__(self, variant: str, model_name: str, s: Settings, device: torch.device) -> None:
        self.device = device
        self.model = _model(model_name, s.width, device).train()
        self.optimizer = make_optimizer(self.model.parameters(), OptimizerConfig())
        self.sparsifier = _sparsifier(variant, self.model)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(s.batch, 3, 32, 32, generator=gen).to(device)
        self.y = torch.randint(0, 10, (s.batch,), generator=gen).to(device)

    def step(self) -> dict[str, float]:
        """One full step; seconds per phase (fwd+bwd, optimizer, sparsifier) and total."""
        _sync(self.device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(self.device)
        t1 = time.perf_counter()
        self.optimizer.step()
        _sync(self.device)
        t2 = time.perf_counter()
        if self.sparsifier is not None:
            self.sparsifier.step(lr=self.optimizer.param_groups[0]["lr"])
        _sync(self.device)
        t3 = time.perf_counter()
        return {"fwd_bwd": t1 - t0, "optimizer": t2 - t1, "sparsifier": t3 - t2, "total": t3 - t0}


def bench_steps(model_name: str, s: Settings, device: torch.device) -> dict:
    """Interleaved repeats of the three variants; medians per phase and ratios to dense."""
    runners = {v: StepRunner(v, model_name, s, device) for v in VARIANTS}
    for _ in range(s.warmup):
        for r in runners.values():
            r.step()
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for i in range(s.repeats):
        order = VARIANTS[i % 3:] + VARIANTS[:i % 3]  # rotate so no variant always runs first
        for v in order:
            samples[v].append(runners[v].step())
    medians = {v: {k: statistics.median(x[k] for x in samples[v]) for k in samples[v][0]}
               for v in VARIANTS}
    dense = medians["dense"]["total"]
    # ratio within each repeat (neighbouring steps share the machine's load), then the median
    paired = {v: statistics.median(a["total"] / d["total"] for a, d in zip(samples[v], samples["dense"]))
              for v in VARIANTS}
    # per-epoch mask recomputation, amortised over one CIFAR epoch (50k images)
    steps_per_epoch = max(1, 50_000 // s.batch)
    mask_update = {}
    for v in VARIANTS[1:]:
        sp = runners[v].sparsifier
        times = []
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            sp.start_epoch(SCHEDULE_EPOCHS - 1)
            _sync(device)
            times.append(time.perf_counter() - t)
        mask_update[v] = {"seconds": statistics.median(times),
                          "per_step_amortised": statistics.median(times) / steps_per_epoch}
    return {"model": model_name, "device": str(device), "batch": s.batch, "width": s.width,
            "repeats": s.repeats, "threads": torch.get_num_threads(), "median_seconds": medians,
            "ratio_to_dense": {v: medians[v]["total"] / dense for v in VARIANTS},
            "paired_ratio_to_dense": paired,
            "mask_update_per_epoch": mask_update, "steps_per_epoch_assumed": steps_per_epoch,
            "profile": profile_overhead(runners, s) if device.type == "cpu" else None}


def profile_overhead(runners: dict[str, StepRunner], s: Settings, top: int = 8) -> dict:
    """Inclusive time of OptG's STE function per step, plus (json only) the per-op self-time
    differences optg minus dense, which on a shared machine are dominated by noise."""
    from torch.profiler import ProfilerActivity, profile

    def per_op(runner: StepRunner) -> tuple[dict[str, float], dict[str, float]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(s.profile_steps):
                runner.step()
        events = prof.key_averages()
        own = {e.key: e.cpu_time_total / 1e6 / s.profile_steps for e in events if "ScoreSTE" in e.key}
        return {e.key: e.self_cpu_time_total / 1e6 / s.profile_steps for e in events}, own

    dense, _ = per_op(runners["dense"])
    out = {}
    for v in VARIANTS[1:]:
        ops, own = per_op(runners[v])
        diff = {k: ops.get(k, 0.0) - dense.get(k, 0.0) for k in set(ops) | set(dense)}
        ranked = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
        out[v] = {"diff": [{"op": k, "extra_seconds_per_step": d} for k, d in ranked],
                  "ste_inclusive_seconds_per_step": own}
    return out


def bench_mask_update(s: Settings, device: torch.device) -> list[dict]:
    """start_epoch() mask recomputation over N weights in 1024-wide Linear layers, random scores:
    global unstructured (a radix select over all scores) and 2:4 at the target (topk per group)
    and mid-ramp (topk + a global radix select over the candidates)."""
    rows = []
    for size_m in s.mask_sizes_m:
        numel = int(size_m * 1_000_000)
        width = 1024 if numel >= 1024 * 1024 else 256
        layers = max(1, round(numel / (width * width)))
        for label, pattern, epoch in (("unstructured-90%", "unstructured", SCHEDULE_EPOCHS - 1),
                                      ("2:4 at target", "2:4", SCHEDULE_EPOCHS - 1),
                                      ("2:4 mid-ramp", "2:4", int(0.4 * SCHEDULE_EPOCHS))):
            model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
            sp = optg.create("optg", model, pattern=pattern, target=0.9 if pattern == "unstructured" else None,
                             epochs=SCHEDULE_EPOCHS).attach()
            with torch.no_grad():
                for layer in sp.layers:
                    layer.scores.normal_()
            times = []
            for _ in range(s.mask_repeats):
                _sync(device)
                t = time.perf_counter()
                sp.start_epoch(epoch)
                _sync(device)
                times.append(time.perf_counter() - t)
            rows.append({"weights": layers * width * width, "rule": label, "device": str(device),
                         "seconds": statistics.median(times), "fraction": sp.fraction})
            del sp, model
    return rows


MEMORY_TARGETS = {"float32": 2.25, "bfloat16": 1.25}  # extra bytes / targeted weight bytes (issue 17)


def bench_memory(s: Settings) -> list[dict]:
    """Bytes OptG adds per model and score dtype: scores, their SGD momentum buffers, and the
    bool masks, over the targeted weights' bytes."""
    rows = []
    for name, score_dtype in ((n, d) for n in s.models for d in MEMORY_TARGETS):
        model = _model(name, s.width, torch.device("cpu"))
        sp = _sparsifier("optg-unstructured-90%", model, score_dtype)
        opt = make_optimizer(model.parameters(), OptimizerConfig())
        loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
        loss.backward()
        opt.step()
        sp.step(lr=0.1)  # creates the momentum buffers
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
        scores = nbytes(l.scores for l in sp.layers)
        momentum = nbytes(st["momentum_buffer"] for st in sp.score_optimizer.state.values()
                          if st.get("momentum_buffer") is not None)
        masks = nbytes(l.mask for l in sp.layers)
        targeted = nbytes(l.weight for l in sp.layers)
        params = nbytes(model.parameters())
        rows.append({"model": name, "width": s.width, "score_dtype": score_dtype, "param_bytes": params,
                     "targeted_weight_bytes": targeted, "scores_bytes": scores,
                     "momentum_bytes": momentum, "mask_bytes": masks,
                     "extra_over_targeted": (scores + momentum + masks) / targeted,
                     "target_extra_over_targeted": MEMORY_TARGETS[score_dtype],
                     "scores_plus_momentum_over_params": (scores + momentum) / params,
                     "all_extra_over_params": (scores + momentum + masks) / params})
    return rows


def bench_export(s: Settings, workdir: Path) -> dict:
    """export_onnx of a baked optg-2:4 resnet20, then ORT vs eager latency, interleaved."""
    import onnxruntime as ort

    model = _model("resnet20", s.width, torch.device("cpu"))
    sp = _sparsifier("optg-2:4", model)
    sp.bake()
    model.eval()
    path = workdir / "resnet20_2of4.onnx"
    result = export_onnx(model, torch.randn(1, 3, 32, 32), path, ExportConfig(), {"source": "overhead"})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    latency = []
    for batch in s.latency_batches:
        x = torch.randn(batch, 3, 32, 32)
        feed = {session.get_inputs()[0].name: x.numpy()}
        runs: dict[str, Callable[[], object]] = {
            "torch_eager": lambda: model(x), "onnxruntime": lambda: session.run(None, feed)}
        with torch.no_grad():
            diff = float(np.abs(session.run(None, feed)[0] - model(x).numpy()).max())
            for fn in runs.values():
                fn()
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(s.latency_repeats):
                for k, fn in runs.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        latency.append({"batch": batch, "median_seconds": med, "max_abs_diff": diff,
                        "ort_over_eager": med["onnxruntime"] / med["torch_eager"]})
    return {"exporter": result.exporter, "export_seconds": result.seconds,
            "onnx_bytes": result.size_bytes, "latency": latency}


def write_markdown(report: dict, path: Path) -> None:
    """Human-readable tables of everything in the report."""
    L = [f"# Overhead ({'quick' if report['quick'] else 'full'} run)", "",
         f"torch {report['torch']}, {report['threads']} CPU threads, device(s): {', '.join(report['devices'])}.",
         "Medians of interleaved repeats; ratios are to dense in the same process.", "",
         "## Training step (forward + backward + optimizer step + sparsifier step)", "",
         "| model | device | batch | variant | total ms | fwd+bwd ms | optimizer ms | sparsifier ms | "
         "ratio of medians | median of paired ratios |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for b in report["steps"]:
        for v in VARIANTS:
            m = b["median_seconds"][v]
            L.append(f"| {b['model']} | {b['device']} | {b['batch']} | {v} | {1e3 * m['total']:.1f} | "
                     f"{1e3 * m['fwd_bwd']:.1f} | {1e3 * m['optimizer']:.2f} | {1e3 * m['sparsifier']:.2f} | "
                     f"{b['ratio_to_dense'][v]:.3f} | {b['paired_ratio_to_dense'][v]:.3f} |")
    L += ["", f"Goal: ratio <= {GOAL_STEP_RATIO} on CPU.", "",
          "Per-epoch mask recomputation (start_epoch), amortised per step over a 50k-image epoch:", "",
          "| model | device | variant | seconds per update | per step (amortised) ms |", "|---|---|---|---|---|"]
    for b in report["steps"]:
        for v, m in b["mask_update_per_epoch"].items():
            L.append(f"| {b['model']} | {b['device']} | {v} | {m['seconds']:.4f} | {1e3 * m['per_step_amortised']:.3f} |")
    for b in report["steps"]:
        if b.get("profile"):
            L += ["", f"OptG's own autograd function ({b['model']}, {b['device']}, torch.profiler over "
                      f"{report['profile_steps']} steps, inclusive CPU time per step; the sparsifier "
                      "step above is the score SGD update):", "",
                  "| variant | op | ms per step |", "|---|---|---|"]
            for v, prof in b["profile"].items():
                L += [f"| {v} | `{k}` | {1e3 * t:.2f} |" for k, t in prof["ste_inclusive_seconds_per_step"].items()
                      if not k.startswith("autograd::engine")]
    L += ["", "## Mask update vs number of weights", "",
          "| weights | rule | device | seconds | sparsity fraction of target |", "|---|---|---|---|---|"]
    L += [f"| {r['weights']:,} | {r['rule']} | {r['device']} | {r['seconds']:.4f} | {r['fraction']:.2f} |"
          for r in report["mask_update"]]
    L += ["", f"Goal: 25M weights < {GOAL_MASK_SECONDS_25M} s on CPU.", "",
          "## Memory added by OptG", "",
          "| model | score dtype | params bytes | targeted weights bytes | scores bytes | momentum bytes | "
          "mask bytes (bool) | extra / targeted (target) | all extra/params |", "|---|---|---|---|---|---|---|---|---|"]
    L += [f"| {r['model']} (width {r['width']}) | {r['score_dtype']} | {r['param_bytes']:,} | "
          f"{r['targeted_weight_bytes']:,} | {r['scores_bytes']:,} | {r['momentum_bytes']:,} | {r['mask_bytes']:,} | "
          f"{r['extra_over_targeted']:.3f} (<= {r['target_extra_over_targeted']}) | {r['all_extra_over_params']:.3f} |"
          for r in report["memory"]]
    e = report["export"]
    L += ["", "## Export and inference (baked optg 2:4 resnet20)", "",
          f"export_onnx ({e['exporter']}): {e['export_seconds']:.2f} s, {e['onnx_bytes']:,} bytes.", "",
          "| batch | torch eager ms | onnxruntime ms | ORT / eager | max abs diff |", "|---|---|---|---|---|"]
    L += [f"| {r['batch']} | {1e3 * r['median_seconds']['torch_eager']:.2f} | "
          f"{1e3 * r['median_seconds']['onnxruntime']:.2f} | {r['ort_over_eager']:.3f} | {r['max_abs_diff']:.2e} |"
          for r in e["latency"]]
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes for tests (< 30 s)")
    parser.add_argument("--models", nargs="+", help="override the CIFAR ResNets timed (resnet20 resnet56)")
    parser.add_argument("--batch", type=int, help="training batch (64)")
    parser.add_argument("--repeats", type=int, help="interleaved timed steps per variant (30)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: least noise on a shared machine; 0: torch's default)")
    args = parser.parse_args(argv)
    s = quick_settings() if args.quick else Settings()
    s.models = tuple(args.models or s.models)
    s.batch, s.repeats = args.batch or s.batch, args.repeats or s.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and not args.quick:
        s.devices.append("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"quick": args.quick, "profile_steps": s.profile_steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "devices": s.devices, "steps": [], "mask_update": []}
    for dev in map(torch.device, s.devices):
        for name in s.models:
            report["steps"].append(bench_steps(name, s, dev))
            print(f"steps {name} {dev}: ratios {report['steps'][-1]['ratio_to_dense']}", flush=True)
        report["mask_update"] += bench_mask_update(s, dev)
    report["memory"] = bench_memory(s)
    with tempfile.TemporaryDirectory() as tmp:
        report["export"] = bench_export(s, Path(tmp))
    report["seconds"] = time.perf_counter() - started
    (args.out / "overhead.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, args.out / "overhead.md")
    print(f"wrote {args.out / 'overhead.md'} in {report['seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main()
