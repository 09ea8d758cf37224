"""The benchmark stage: latency of the final ONNX against a reference, measured in ONNX Runtime.

The reference is the dense model before pruning, exported the same way (`export_reference`).
Both files run in ONNX Runtime sessions built alike (CPUExecutionProvider, `threads` intra-op
threads, one inter-op thread, sequential execution, all graph optimisations), on the same random
input. Timing is interleaved: every repeat times one call of each model, alternating which goes
first, so drift (thermal, other processes) hits both alike. Per batch size the medians of
`repeats` calls give the ratio candidate / reference (< 1: the candidate is faster).

CUDA: only when ONNX Runtime's CUDAExecutionProvider is installed and a session really runs on it;
input and output then stay on the device (IO binding). TensorRT is never timed nor claimed.
"""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]
import torch
from pydantic import Field, field_validator
from torch import nn

from stages.base import StageError, StrictModel
from stages.context import RunContext, Stage
from stages.export import ExportConfig, export_onnx
from stages.tasks import export_view
from stages.validate import check_latency

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_INT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class BenchmarkConfig(StrictModel):
    """Latency measurement settings (the `benchmark:` section)."""

    enabled: bool = True
    """time reference.onnx against model.onnx in ONNX Runtime after export; needs export.enabled"""
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    """batch sizes timed"""
    repeats: int = Field(30, ge=3, description="timed calls per model and batch size (median)")
    warmup: int = Field(5, ge=0, description="untimed calls per model and batch size first")
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads (stated in results)")
    cuda: bool = Field(True, description="also time CUDAExecutionProvider when it is installed")
    seed: int = 0
    """seed of the random input"""
    sequence_lengths: list[int] | None = Field(
        None, min_length=1, description="token models: sequence lengths timed with every batch size "
        "(default: data.options.seq_len)")

    @field_validator("batch_sizes")
    @classmethod
    def _positive_unique(cls, value: list[int]) -> list[int]:
        bad = [b for b in value if b < 1]
        if bad:
            raise ValueError(f"batch sizes must be >= 1, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"batch sizes must be distinct, got {value}")
        return value

    @field_validator("sequence_lengths")
    @classmethod
    def _lengths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (any(n < 1 for n in value) or len(set(value)) != len(value)):
            raise ValueError(f"sequence lengths must be distinct and >= 1, got {value}")
        return value


@dataclass
class LatencyRow:
    provider: str
    batch_size: int
    reference_ms: float
    candidate_ms: float
    ratio: float
    reference_samples_ms: list[float] = field(repr=False)
    candidate_samples_ms: list[float] = field(repr=False)
    sequence_length: int | None = None  # token models: the timed sequence length


@dataclass
class LatencyResult:
    threads: int
    repeats: int
    warmup: int
    rows: list[LatencyRow]
    providers: list[str]
    onnxruntime: str
    notes: list[str] = field(default_factory=list)

    def ratio(self, batch_size: int, provider: str = "CPUExecutionProvider",
              sequence_length: int | None = None) -> float:
        for row in self.rows:
            if row.batch_size == batch_size and row.provider == provider and (
                    sequence_length is None or row.sequence_length == sequence_length):
                return row.ratio
        raise KeyError(f"no latency measured for batch {batch_size} on {provider}")

    def max_ratio(self, provider: str = "CPUExecutionProvider") -> float:
        """The worst ratio over the batch sizes (what a `max_latency_ratio` gate compares)."""
        return max(r.ratio for r in self.rows if r.provider == provider)

    def to_dict(self) -> dict[str, Any]:
        """`metrics.latency` of the manifest (medians and ratios; raw samples left out)."""
        return {
            "threads": self.threads, "repeats": self.repeats, "warmup": self.warmup,
            "onnxruntime": self.onnxruntime, "providers": self.providers, "notes": self.notes,
            "timing": "interleaved (reference and candidate alternate which runs first), median",
            "rows": [{k: v for k, v in asdict(r).items()
                      if not k.endswith("_samples_ms") and not (k == "sequence_length" and v is None)}
                     for r in self.rows],
        }


def interleaved_timings(calls: Sequence[Callable[[], object]], repeats: int, warmup: int,
                        clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per call of each callable. Repeat i calls them in order when i is even, in
    reverse order when odd (warm-up calls too, untimed)."""
    for i in range(warmup):
        for call in (calls if i % 2 == 0 else calls[::-1]):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for i in range(repeats):
        order = range(len(calls)) if i % 2 == 0 else range(len(calls) - 1, -1, -1)
        for k in order:
            start = clock()
            calls[k]()
            samples[k].append(clock() - start)
    return samples


def _session(path: Path, threads: int, provider: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:
        raise StageError(f"benchmark: ONNX Runtime cannot load {path}: {exc}") from exc


@dataclass(frozen=True)
class TokenInputs:
    """A token model's timing inputs: ids drawn uniformly below `vocab_size` (int inputs whose
    name has no "mask"), attention masks of ones, at each of `sequence_lengths`."""

    vocab_size: int
    sequence_lengths: Sequence[int]


def _feed(session: ort.InferenceSession, path: Path, input_shape: Sequence[int], batch: int,
          tokens: TokenInputs | None, length: int | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs for one call: floats of [batch, *input_shape] (one input), or the token
    inputs of [batch, length]; the same generator state gives both models the same input."""
    inputs = session.get_inputs()
    if tokens is None:
        if len(inputs) != 1:
            raise StageError(f"benchmark: {path} has {len(inputs)} inputs; one float input (or a token model) "
                             "is supported")
        spec = inputs[0]
        if spec.type not in _DTYPES:
            raise StageError(f"benchmark: {path} input {spec.name!r} has type {spec.type}; "
                             f"supported: {', '.join(_DTYPES)}")
        _check_dims(path, spec, [batch, *input_shape])
        return {spec.name: rng.standard_normal([batch, *input_shape]).astype(_DTYPES[spec.type])}
    assert length is not None
    feed = {}
    for spec in inputs:
        if spec.type not in _INT_DTYPES:
            raise StageError(f"benchmark: {path} input {spec.name!r} has type {spec.type}; a token model's inputs "
                             f"are {', '.join(_INT_DTYPES)}")
        _check_dims(path, spec, [batch, length])
        dtype = _INT_DTYPES[spec.type]
        feed[spec.name] = (np.ones((batch, length), dtype=dtype) if "mask" in spec.name
                           else rng.integers(0, tokens.vocab_size, (batch, length)).astype(dtype))
    return feed


def _check_dims(path: Path, spec: Any, shape: list[int]) -> None:
    if len(spec.shape) != len(shape):
        raise StageError(f"benchmark: {path} input {spec.name!r} has rank {len(spec.shape)}, "
                         f"the timed input {shape} has {len(shape)}")
    fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int) and d != shape[i]]
    if fixed:
        raise StageError(f"benchmark: {path} input {spec.name!r} has fixed dims {spec.shape}; "
                         f"cannot feed {shape} (export with dynamic_batch: true for several batch sizes)")


def _cpu_calls(sessions: list[ort.InferenceSession], feeds: list[dict[str, np.ndarray]]) -> list[Callable[[], object]]:
    return [partial(session.run, None, feed) for session, feed in zip(sessions, feeds)]


def _cuda_calls(sessions: list[ort.InferenceSession], feeds: list[dict[str, np.ndarray]]) -> list[Callable[[], object]]:
    calls: list[Callable[[], object]] = []
    for session, feed in zip(sessions, feeds):
        binding = session.io_binding()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda", 0)

        def call(session: ort.InferenceSession = session, binding: Any = binding) -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        calls.append(call)
    return calls


def measure_latency(reference_onnx: Path, candidate_onnx: Path, input_shape: Sequence[int],
                    cfg: BenchmarkConfig, tokens: TokenInputs | None = None) -> LatencyResult:
    """Time both files at every batch size in `cfg.batch_sizes` (and, for a token model, at
    every sequence length of `tokens`); `input_shape` is one sample without the batch dim.
    See the module docstring for the method."""
    reference_onnx, candidate_onnx = Path(reference_onnx), Path(candidate_onnx)
    missing = [str(p) for p in (reference_onnx, candidate_onnx) if not p.is_file()]
    if missing:
        raise StageError(f"benchmark: missing ONNX file(s): {', '.join(missing)}")
    providers = ["CPUExecutionProvider"]
    notes: list[str] = []
    if cfg.cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.append("CUDAExecutionProvider")
    rows: list[LatencyRow] = []
    for provider in providers:
        sessions = [_session(p, cfg.threads, provider) for p in (reference_onnx, candidate_onnx)]
        if sessions[0].get_providers()[0] != provider or sessions[1].get_providers()[0] != provider:
            notes.append(f"{provider} is installed but a session fell back to "
                         f"{sessions[0].get_providers()[0]}; not timed")
            continue
        lengths: Sequence[int | None] = list(tokens.sequence_lengths) if tokens is not None else [None]
        for batch in cfg.batch_sizes:
            for length in lengths:
                feeds = [_feed(session, path, input_shape, batch, tokens, length, np.random.default_rng(cfg.seed))
                         for session, path in zip(sessions, (reference_onnx, candidate_onnx))]  # same input
                make = _cpu_calls if provider == "CPUExecutionProvider" else _cuda_calls
                ref, cand = interleaved_timings(make(sessions, feeds), cfg.repeats, cfg.warmup)
                rows.append(_row(provider, batch, ref, cand, length))
    if cfg.cuda and "CUDAExecutionProvider" not in providers:
        notes.append("CUDAExecutionProvider not installed: CPU only")
    return LatencyResult(threads=cfg.threads, repeats=cfg.repeats, warmup=cfg.warmup, rows=rows,
                         providers=[r for r in providers if any(row.provider == r for row in rows)],
                         onnxruntime=ort.__version__, notes=notes)


def _row(provider: str, batch: int, ref: list[float], cand: list[float], length: int | None = None) -> LatencyRow:
    ref_ms, cand_ms = [s * 1e3 for s in ref], [s * 1e3 for s in cand]
    ref_med, cand_med = statistics.median(ref_ms), statistics.median(cand_ms)
    return LatencyRow(provider, batch, ref_med, cand_med, cand_med / ref_med, ref_ms, cand_ms, length)


def export_reference(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], path: Path,
                     cfg: ExportConfig, input_names: Sequence[str] | None = None,
                     dynamic_axes: Sequence[dict[int, str]] | None = None) -> Path:
    """Export the dense model (before pruning) with the same export settings as the final
    model, so the latency ratio compares like with like. Call it before structured pruning
    changes the model in place."""
    export_onnx(model, example_input, Path(path), cfg, metadata={"optg.role": "latency-reference"},
                input_names=input_names, dynamic_axes=dynamic_axes)
    return Path(path)


def render_latency_markdown(latency: dict[str, Any], candidate: str = "model.onnx") -> str:
    """The report.md section for `metrics.latency` (`LatencyResult.to_dict()`), `candidate`
    being the file timed against reference.onnx."""
    lines = [f"## Latency (ONNX Runtime, measured): reference.onnx vs {candidate}", "",
             (f"{latency['threads']} intra-op thread(s), median of {latency['repeats']} interleaved "
             f"calls after {latency['warmup']} warm-up, onnxruntime {latency['onnxruntime']}. ONNX Runtime's CPU "
             "and CUDA providers run dense kernels: a 2:4 weight is as fast as a dense one there; sparse tensor "
             "cores need a TensorRT engine built with sparsity enabled."), "",
             "| provider | batch | sequence | reference ms | candidate ms | ratio |", "|---|---|---|---|---|---|"]
    for r in latency["rows"]:
        lines.append(f"| {r['provider']} | {r['batch_size']} | {r.get('sequence_length') or '-'} "
                     f"| {r['reference_ms']:.3f} | {r['candidate_ms']:.3f} | {r['ratio']:.3f} |")
    lines += [f"- {note}" for note in latency.get("notes", [])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the pipeline row


def run_reference_onnx(ctx: RunContext) -> None:
    """The latency reference: the dense model (after the dense phase / pretrained load, before
    structured pruning and sparse training) exported exactly like the final model."""
    model = copy.deepcopy(ctx.model).cpu().eval()
    cfg = ctx.cfg.export.model_copy(update={"compact": False})
    example = ctx.example(2)
    names, axes = ctx.export_interface(example)
    with export_view(model, ctx.task) as view:
        path = export_reference(view, example, ctx.run.path / "reference.onnx", cfg,
                                                input_names=names, dynamic_axes=axes)
    ctx.run.add_artifact("reference.onnx", path)


def run_benchmark(ctx: RunContext) -> None:
    """Time reference.onnx against the final ONNX (ONNX Runtime, CPU; CUDA too when installed),
    record `metrics.latency`, then gate on `validate.max_latency_ratio` (exit 3): the gate lives
    here because the ratio exists only once the final file is exported."""
    manifest = ctx.run.manifest
    if manifest.export is None:
        raise StageError("benchmark needs the export stage's result, and the manifest has none")
    bundle, cfg = ctx.bundle, ctx.cfg.benchmark
    tokens = None
    if ctx.task.text_layout is not None:
        vocab = bundle.tokenizer.vocab_size if bundle.tokenizer is not None else bundle.num_classes
        tokens = TokenInputs(min(vocab, (bundle.max_token_id or vocab - 1) + 1),
                                             cfg.sequence_lengths or [int(bundle.input_shape[0])])
    result = measure_latency(ctx.run.path / "reference.onnx", ctx.run.path / manifest.export.file,
                                             bundle.input_shape, cfg, tokens)
    latency = result.to_dict()
    timed = [("model.onnx", result)]
    if manifest.export.quantization is not None:  # the INT8 file's ORT CPU latency joins the table
        int8 = measure_latency(ctx.run.path / "reference.onnx",
                                               ctx.run.path / manifest.export.quantization.file,
                                               bundle.input_shape, cfg, tokens)
        latency["int8"] = int8.to_dict()
        timed.append((manifest.export.quantization.file, int8))
    manifest.metrics.latency = latency
    for file, measured in timed:
        for row in measured.rows:
            at = f" sequence {row.sequence_length}" if row.sequence_length is not None else ""
            ctx.log(f"[benchmark] {row.provider} batch {row.batch_size}{at}: reference {row.reference_ms:.3f} ms, "
                    f"{file} {row.candidate_ms:.3f} ms, ratio {row.ratio:.3f} ({measured.threads} thread(s))")
    check_latency(result.max_ratio(), ctx.cfg.validate)


REFERENCE_ONNX_ROW = Stage("reference_onnx", run_reference_onnx, enabled=lambda c: c.benchmark_active,
                           section="export", all_ranks=False)
ROW = Stage("benchmark", run_benchmark, enabled=lambda c: c.benchmark_active, section="validate",
            inputs=("benchmark",), redoable=True, all_ranks=False)
