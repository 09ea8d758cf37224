"""GPU proof: 2:4 weights baked like ours run on sparse tensor cores, and how much faster.

Builds nn.Linear weights pruned to 2:4 by magnitude along the input (reduction) dim - baked by
`optg` itself (one-shot magnitude 2:4, then `bake()`) - converts them with
`torch.sparse.to_sparse_semi_structured` (cuSPARSELt, or CUTLASS with --backend cutlass) on CUDA
in fp16, checks F.linear against the dense product (max abs error) and times dense vs 2:4 matmuls
with torch.utils.benchmark at several layer shapes and batch sizes. Prints a markdown table with
the device name and writes it to --out.

Never run in CI. Needs an sm80+ (Ampere/Hopper) GPU; without CUDA it prints
"no CUDA device: nothing measured" and exits 0.

    python benchmarks/semi_structured_gpu.py --out benchmarks/results/semi_structured_h100.md
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = ((4096, 4096), (8192, 8192), (16384, 4096), (4096, 16384))  # (out, in)
DEFAULT_BATCHES = (256, 2048, 8192)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude along the input dim, baked by the library itself (one-shot + bake),
    so the weights measured here are exactly what the pipeline ships."""
    import optg

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                            dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    optg.create("oneshot", layer, pattern="2:4").attach().bake()
    return layer.weight.detach()


def _parse_shape(text: str) -> tuple[int, int]:
    out_f, in_f = text.lower().split("x")
    return int(out_f), int(in_f)


def _time(stmt: str, env: dict, min_run_time: float) -> float:
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure(shapes: list[tuple[int, int]], batches: list[int], dtype: torch.dtype, backend: str,
            min_run_time: float) -> tuple[list[dict], str]:
    """Rows of (shape, batch, error, dense/sparse time, speed-up); returns the backend used."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend == "auto":
        available = getattr(torch.backends, "cusparselt", None)
        backend = "cusparselt" if available is not None and available.is_available() else "cutlass"
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    rows: list[dict] = []
    device = torch.device("cuda")
    for out_f, in_f in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        weight = prune_2_4(torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen))
        try:
            sparse_w = to_sparse_semi_structured(weight)
        except Exception as exc:  # noqa: BLE001 - report the shape, keep measuring the others
            rows.append({"shape": f"{out_f}x{in_f}", "batch": "-", "error": f"convert: {exc}"})
            continue
        for batch in batches:
            row: dict = {"shape": f"{out_f}x{in_f}", "batch": batch}
            try:
                x = torch.randn(batch, in_f, device=device, dtype=dtype, generator=gen)
                dense_y = F.linear(x, weight)
                sparse_y = F.linear(x, sparse_w)
                torch.cuda.synchronize()
                err = (dense_y.float() - sparse_y.float()).abs().max().item()
                scale = dense_y.float().abs().max().item()
                env = {"F": F, "x": x, "w": weight, "ws": sparse_w}
                t_dense = _time("F.linear(x, w)", env, min_run_time)
                t_sparse = _time("F.linear(x, ws)", env, min_run_time)
                flops = 2.0 * batch * in_f * out_f
                row.update(max_abs_err=err, rel_err=err / scale if scale else 0.0,
                           dense_ms=t_dense * 1e3, sparse_ms=t_sparse * 1e3,
                           dense_tflops=flops / t_dense / 1e12, sparse_tflops=flops / t_sparse / 1e12,
                           speedup=t_dense / t_sparse)
                del x, dense_y, sparse_y
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
        del weight, sparse_w
        torch.cuda.empty_cache()
    return rows, backend


def to_markdown(rows: list[dict], device_name: str, capability: tuple[int, int], backend: str,
                dtype: torch.dtype) -> str:
    lines = [
        f"# 2:4 semi-structured vs dense F.linear on {device_name}",
        "",
        f"sm_{capability[0]}{capability[1]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"dtype {str(dtype).replace('torch.', '')}, backend {backend}. Weight [out x in] pruned 2:4 "
        "by magnitude along `in` (the reduction axis); time = median of torch.utils.benchmark.",
        "",
        "| out x in | batch | max abs err | rel err | dense ms | 2:4 ms | dense TFLOP/s | 2:4 TFLOP/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['max_abs_err']:.3g} | {r['rel_err']:.2g} | "
            f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['dense_tflops']:.0f} | "
            f"{r['sparse_tflops']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape,
                        default=list(DEFAULT_SHAPES), help="OUTxIN layer shapes")
    parser.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--backend", choices=("auto", "cusparselt", "cutlass"), default="auto")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    capability = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if capability < (8, 0):
        print(f"{name} (sm_{capability[0]}{capability[1]}) has no 2:4 sparse tensor cores: "
              "nothing measured")
        return 0
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype warning of SparseSemiStructuredTensor
        rows, backend = measure(args.shapes, args.batches, dtype, args.backend, args.min_run_time)
    table = to_markdown(rows, name, capability, backend, dtype)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
