"""The TensorRT engine-build step, written down for each shipped file and the TensorRT users have.

TensorRT 10: `trtexec --sparsity=enable` plus a precision flag: none for fp32 (TF32 sparse
kernels), `--fp16` for the fp16 file, `--int8` for the Q/DQ file (explicit quantization; the
Q/DQ scales decide, no calibrator runs).

TensorRT 11 removed every precision flag (`--fp16`, `--int8`, `--bf16`, `--fp8`, `--int4`,
`--best`) and `--stronglyTyped` (always on): the types in the file decide. The fp16 file is
strongly typed as exported (fp16 weights, inputs and outputs, the casts the exporter wrote) and
the INT8 file carries explicit Q/DQ, so both build with no flag. Its migration pages list the
removed options and `--sparsity` is not among them; the 11.x builder keeps `kSPARSE_WEIGHTS`
(only the precision flags, the precision constraints and `kDIRECT_IO` are in the removed-API
table), so `--sparsity=enable` is how 2:4 weights are enabled there too (docs.nvidia.com,
"Migrating trtexec Usage from TensorRT 10.x to 11.x" and "Removed C++ APIs and Replacements",
read 2026-12-06).

Both commands export the per-layer tactics (`--exportLayerInfo`, `--profilingVerbosity=detailed`)
and run `--verbose`, whose "(Sparsity)" lines say which layers TensorRT ran sparse
(`benchmarks/tensorrt.py` reads them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

PRECISION_FLAGS_10 = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"]}


def shape_ranges(inputs: Sequence[dict[str, Any]], batch_sizes: Sequence[int],
                 sequence_length: int | None) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min / opt / max shapes per graph input: the batch dim from 1 to the largest benchmarked
    batch (opt: the largest), a sequence dim from 1 to the data's sequence length (opt: it)."""
    largest = max(batch_sizes)
    ranges = {}
    for spec in inputs:
        dims = []
        for index, dim in enumerate(spec["shape"]):
            if isinstance(dim, int) and dim > 0:
                dims.append((dim, dim, dim))
            elif index == 0:
                dims.append((1, largest, largest))
            else:
                length = sequence_length or 1
                dims.append((1, length, length))
        ranges[spec["name"]] = ([d[0] for d in dims], [d[1] for d in dims], [d[2] for d in dims])
    return ranges


def _shape_flags(ranges: dict[str, tuple[list[int], list[int], list[int]]]) -> list[str]:
    if all(lo == hi for lo, _, hi in ranges.values()):
        return []  # static shapes: nothing to say
    flags = []
    for flag, which in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        flags.append(flag + "=" + ",".join(f"{name}:{'x'.join(map(str, dims[which]))}"
                                             for name, dims in ranges.items()))
    return flags


def engine_commands(file: str, dtype: str, inputs: Sequence[dict[str, Any]], batch_sizes: Sequence[int],
                    sequence_length: int | None) -> dict[str, str]:
    """{"file", "dtype", "tensorrt10", "tensorrt11"}: the trtexec command that builds (and times)
    a sparse engine from `file` (run in the run directory)."""
    if dtype not in PRECISION_FLAGS_10:
        raise ValueError(f"dtype must be one of {sorted(PRECISION_FLAGS_10)}, got {dtype!r}")
    stem = Path(file).name.removesuffix(".onnx")
    common = [f"--onnx={file}", "--sparsity=enable", f"--saveEngine={stem}.plan",
              *_shape_flags(shape_ranges(inputs, batch_sizes, sequence_length)),
              "--profilingVerbosity=detailed", f"--exportLayerInfo={stem}.layers.json", "--verbose"]
    return {"file": file, "dtype": dtype,
            "tensorrt10": " ".join(["trtexec", *PRECISION_FLAGS_10[dtype], *common]),
            "tensorrt11": " ".join(["trtexec", *common])}


def render_markdown(commands: Sequence[dict[str, str]]) -> str:
    """report.md's section: the engine-build command per shipped file."""
    lines = ["## TensorRT engines", "",
             "Build in the run directory. TensorRT 11 has no precision flags: the fp16 file's types and the "
             "INT8 file's Q/DQ decide the precision. `--verbose` prints which layers ran sparse (\"(Sparsity)\" "
             "lines); the ONNX Runtime CPU/CUDA latency in this report measures dense kernels.", ""]
    for c in commands:
        lines += [f"- `{c['file']}` ({c['dtype']}):", "", "  ```bash",
                  f"  # TensorRT 10\n  {c['tensorrt10']}", f"  # TensorRT 11\n  {c['tensorrt11']}", "  ```", ""]
    return "\n".join(lines)
