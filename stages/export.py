"""Export stage: the baked PyTorch model to an ONNX file whose zeros survive, written atomically.

The dynamo exporter (torch.export + onnxscript) is the default; with `exporter: auto` the legacy
TorchScript exporter is tried only if dynamo fails, and the result says so in `warnings`. What
torch 2.13's dynamo exporter does to the graph (the verify stage relies on this knowledge):
- parameter initializers keep their PyTorch names ("features.0.weight");
- eval-mode BatchNorm after a Conv is folded into it: the Conv weight keeps the conv's name but
  its values are scaled per output channel (zeros survive), a bias "<name>_bias" may be added;
- `nn.Linear` on 2-D input becomes Gemm(transB=1) on the original weight; on 3-D input it becomes
  MatMul with a pre-transposed constant [in, out] renamed "val_N" (node metadata keeps the module
  path in "pkg.torch.onnx.name_scopes").

fp16 exports the half-precision model; if tracing fails in fp16, the fp32 graph is exported and
its float tensors converted to fp16 (a warning says so). `compact: true` also writes
"<stem>.compact.onnx" where every float initializer with sparsity >= COMPACT_MIN_SPARSITY whose COO
form is actually smaller is stored as a sparse initializer (int64 linear indices, as ONNX
requires: for fp32 that pays from about 67% zeros, for fp16 from 80%; 2:4 weights stay dense).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field, field_validator
from torch import nn

from stages import onnx_eval, quantize, tensorrt
from stages.base import StageError, StrictModel, eval_mode
from stages.context import RunContext, Stage
from stages.io import atomic_write
from stages.onnx_file import atomic_save
from stages.onnx_sparsity import DENSE_WEIGHTS_KEY, collect_weights
from stages.records import Record
from stages.tasks import export_view
from stages.weight_match import match_weights

COMPACT_MIN_SPARSITY = 0.5
_COMPACT_MIN_NUMEL = 64  # tiny tensors are not worth an index array
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


class ExportConfig(StrictModel):
    """How to write the ONNX file."""

    enabled: bool = True
    """write model.onnx"""
    opset: int = 18
    """ONNX opset, 17 to 23"""
    dtype: Literal["fp32", "fp16"] = "fp32"
    """weights and activations of model.onnx"""
    dynamic_batch: bool = True
    """the batch dimension is dynamic (by name) in the graph"""
    input_name: str = "input"
    """the graph's input tensor name"""
    output_name: str = "logits"
    """the graph's output tensor name"""
    compact: bool = False
    """also write model.compact.onnx with sparse initializers"""
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    """auto: torch.export + onnxscript, TorchScript as fallback"""
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: also write model.int8.onnx, a calibrated static INT8 QDQ form placed for sparse "
        "INT8 kernels (stages.quantize)")
    calibration_batches: int = Field(8, ge=1, description="training batches that calibrate the int8 activations")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """int8: how activation ranges are calibrated"""

    @field_validator("opset")
    @classmethod
    def _sane_opset(cls, value: int) -> int:
        if not 17 <= value <= 23:
            raise ValueError(f"opset must be within 17..23 (LayerNormalization needs 17), got {value}")
        return value

    @field_validator("input_name", "output_name")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("tensor names must not be empty")
        return value


@dataclass
class ExportResult:
    """What export wrote, everything verify needs to check it: the files, the dtype of their
    weights and the graph's input/output names as they are in the file."""

    path: Path
    exporter: str
    seconds: float
    size_bytes: int
    warnings: list[str]
    compact_path: Path | None
    compact_size_bytes: int | None
    dtype: Literal["fp32", "fp16"] = "fp32"
    opset: int = 18
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    data_paths: list[Path] = field(default_factory=list)  # external-data sidecars ("<file>.data"), if any
    inputs: list[dict] = field(default_factory=list)  # graph_io: name, shape (ints or dim names), dtype
    outputs: list[dict] = field(default_factory=list)


def graph_io(proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """The graph's real inputs (initializers left out) and outputs as written in the file:
    {"name", "shape" (an int per fixed dim, the dim's name for a symbolic one such as the
    batch), "dtype"}; what a deployment needs to feed the model and read its result."""
    initializers = {t.name for t in proto.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
        return {"name": value.name, "shape": dims, "dtype": dtype}

    return ([spec(i) for i in proto.graph.input if i.name not in initializers],
            [spec(o) for o in proto.graph.output])


def export_onnx(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], path: Path,
                cfg: ExportConfig, metadata: dict[str, str], input_names: Sequence[str] | None = None,
                dynamic_axes: Sequence[dict[int, str]] | None = None,
                dense_weights: Mapping[str, str] | None = None) -> ExportResult:
    """Export `model` (eval mode, called with the example inputs positionally) to `path`;
    raise StageError when every exporter fails.

    `input_names` (default `[cfg.input_name]`) and `dynamic_axes` (per input, axis -> dim
    name; default the batch axis) come from the task (`stages.tasks.Task.input_specs`): a
    text model exports `input_ids` and `attention_mask` with dynamic `batch` and `sequence`.
    `cfg.dynamic_batch: false` fixes the batch axis; other named axes stay dynamic.

    `dense_weights`: PyTorch weight name -> why the run left it dense (tied to the embedding,
    an output head, excluded by the config). They are found in the exported graph and recorded
    by ONNX initializer name as metadata `optg.dense_weights` (JSON), which `optg inspect
    --pattern` reads: the weights a run deliberately kept dense are exempt, with the reason,
    so a run's own file passes its own check; a file without the record gets no exemption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    notes: list[str] = []
    examples = [example_input] if isinstance(example_input, torch.Tensor) else list(example_input)
    names = list(input_names) if input_names is not None else [cfg.input_name]
    axes = [dict(a) for a in dynamic_axes] if dynamic_axes is not None else [{0: "batch"} for _ in examples]
    if len(names) != len(examples) or len(axes) != len(examples):
        raise StageError(f"export: {len(examples)} example input(s) but {len(names)} name(s) and "
                         f"{len(axes)} axis map(s)")
    if not cfg.dynamic_batch:
        axes = [{i: d for i, d in a.items() if d != "batch"} for a in axes]
    prepared = []
    for example, dims in zip(examples, axes):
        example = example.detach()
        for axis in dims:  # torch.export specialises a size of 1 to a constant; trace with 2
            if example.shape[axis] == 1:
                example = torch.cat([example, example], dim=axis)
        prepared.append(example)
    spec = _Interface(names, axes)
    exporters: list[str] = ["dynamo", "torchscript"] if cfg.exporter == "auto" else [cfg.exporter]

    with eval_mode(model):
        if cfg.dtype == "fp16":
            work = copy.deepcopy(model).half().eval()
            half = [x.half() if x.is_floating_point() else x for x in prepared]
            proto, used, errors = _try_exporters(work, half, cfg, spec, exporters, notes)
            if proto is None:
                fp32 = copy.deepcopy(model).float().eval()
                proto, used, errors32 = _try_exporters(fp32, _as_fp32(prepared), cfg, spec, exporters, notes)
                if proto is not None:
                    notes.append("fp16 tracing failed (" + "; ".join(errors) + "); exported fp32 "
                                 "and converted its float tensors to fp16")
                    proto = convert_float_type(proto, TensorProto.FLOAT, TensorProto.FLOAT16)
                errors += errors32
        else:
            work = model if _is_fp32(model) else copy.deepcopy(model).float().eval()
            proto, used, errors = _try_exporters(work, _as_fp32(prepared), cfg, spec, exporters, notes)
    if proto is None:
        raise StageError("ONNX export failed: " + " | ".join(errors))

    inputs, outputs = graph_io(proto)
    props = {**{str(k): str(v) for k, v in metadata.items()}, "exporter": used, "dtype": cfg.dtype,
             "opset": str(cfg.opset), "optg.inputs": json.dumps(inputs), "optg.outputs": json.dumps(outputs)}
    if dense_weights:
        props[DENSE_WEIGHTS_KEY] = json.dumps(_dense_by_onnx_name(proto, work, dense_weights), sort_keys=True)
    set_metadata(proto, props)
    input_names = [i["name"] for i in inputs]
    output_names = [o["name"] for o in outputs]
    compact = make_compact(proto) if cfg.compact else None  # before saving: external data mutates proto
    sidecars = [atomic_save(proto, path)]

    compact_path = compact_size = None
    if compact is not None:
        compact_path = path.with_name(path.stem + ".compact.onnx")
        sidecars.append(atomic_save(compact, compact_path))
        compact_size = compact_path.stat().st_size
    return ExportResult(path=path, exporter=used, seconds=time.perf_counter() - start,
                        size_bytes=path.stat().st_size, warnings=notes, compact_path=compact_path,
                        compact_size_bytes=compact_size, dtype=cfg.dtype, opset=cfg.opset,
                        input_names=input_names, output_names=output_names, inputs=inputs, outputs=outputs,
                        data_paths=[p for p in sidecars if p is not None])


@dataclass(frozen=True)
class _Interface:
    """The exported graph's input names and, per input, its dynamic axes by name."""

    names: list[str]
    axes: list[dict[int, str]]


def _as_fp32(examples: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.float() if x.is_floating_point() else x for x in examples]


def _is_fp32(model: nn.Module) -> bool:
    return all(p.dtype == torch.float32 for p in model.parameters())


def _try_exporters(model: nn.Module, example: list[torch.Tensor], cfg: ExportConfig, spec: _Interface,
                   exporters: list[str], notes: list[str]) -> tuple[onnx.ModelProto | None, str, list[str]]:
    """First exporter that works wins; a fallback after a failure is noted as a warning."""
    errors: list[str] = []
    for name in exporters:
        try:
            with _quiet(notes):
                proto = _export_dynamo(model, example, cfg, spec) if name == "dynamo" else \
                    _export_torchscript(model, example, cfg, spec)
        except Exception as exc:  # noqa: BLE001 - every exporter failure is reported together
            errors.append(f"{name}: {type(exc).__name__}: {_first_lines(str(exc))}")
            continue
        if errors:
            notes.append(f"fell back to the {name} exporter because " + "; ".join(errors))
        return proto, name, errors
    return None, "", errors


def _first_lines(text: str, limit: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def _quiet(notes: list[str]) -> Iterator[None]:
    """Silence exporter chatter (stdout, INFO/WARNING logs); keep its UserWarnings as notes."""
    levels = {}
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            yield
        for w in caught:
            if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning)):
                continue
            text = f"{w.category.__name__}: {_first_lines(str(w.message), 300)}"
            if text not in notes:
                notes.append(text)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _export_dynamo(model: nn.Module, example: list[torch.Tensor], cfg: ExportConfig,
                   spec: _Interface) -> onnx.ModelProto:
    dims: dict[str, Any] = {}
    dynamic = tuple({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.items()} or None
                    for axes in spec.axes)
    program = torch.onnx.export(
        model, tuple(example), dynamo=True, verbose=False, opset_version=cfg.opset,
        input_names=spec.names, output_names=[cfg.output_name],
        dynamic_shapes=dynamic if any(a for a in spec.axes) else None, optimize=True, report=False,
    )
    if program is None:
        raise RuntimeError("dynamo exporter returned no program")
    return program.model_proto


def _export_torchscript(model: nn.Module, example: list[torch.Tensor], cfg: ExportConfig,
                        spec: _Interface) -> onnx.ModelProto:
    axes: dict[str, dict[int, str]] = {n: a for n, a in zip(spec.names, spec.axes) if a}
    if axes and "batch" in {d for a in spec.axes for d in a.values()}:
        axes[cfg.output_name] = {0: "batch"}
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "model.onnx")
        torch.onnx.export(
            model, tuple(example), target, dynamo=False, verbose=False, opset_version=cfg.opset,
            input_names=spec.names, output_names=[cfg.output_name], dynamic_axes=axes or None,
            do_constant_folding=True,
        )
        return onnx.load(target, load_external_data=True)


def _dense_by_onnx_name(proto: onnx.ModelProto, model: nn.Module, dense: Mapping[str, str]) -> dict[str, str]:
    """ONNX initializer name -> reason, for the weights in `dense` found by name, exporter
    metadata or module scope (never by order alone: an exemption must be certain)."""
    weights = collect_weights(proto)
    others = [n for n, p in model.named_parameters() if p.dim() >= 2 and n not in dense]
    found = match_weights(list(dense), weights, model, also=others)
    return {w.name: dense[name] for name, (w, how) in found.items() if name in dense and how != "order"}


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Merge `props` into the model's metadata_props (new values win)."""
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update(props)
    del proto.metadata_props[:]
    for key, value in merged.items():
        proto.metadata_props.add(key=key, value=value)


def make_compact(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of `proto` with sparse-enough float initializers stored as COO sparse initializers."""
    out = copy.deepcopy(proto)
    graph = out.graph
    graph_inputs = {i.name for i in graph.input}
    keep, moved = [], set()
    for init in graph.initializer:
        sparse = _to_sparse(init) if init.name not in graph_inputs else None
        if sparse is None:
            keep.append(init)
        else:
            graph.sparse_initializer.append(sparse)
            moved.add(init.name)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # value_info would type them as dense tensors; ONNX inference types them as sparse
    vis = [v for v in graph.value_info if v.name not in moved]
    del graph.value_info[:]
    graph.value_info.extend(vis)
    return out


def _to_sparse(init: TensorProto) -> onnx.SparseTensorProto | None:
    if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                              TensorProto.DOUBLE) or init.data_location == TensorProto.EXTERNAL:
        return None
    array = numpy_helper.to_array(init)
    if array.size < _COMPACT_MIN_NUMEL:
        return None
    flat = array.reshape(-1)
    idx = np.flatnonzero(flat)
    if 1 - idx.size / flat.size < COMPACT_MIN_SPARSITY:
        return None
    if idx.size * (flat.itemsize + 8) >= flat.size * flat.itemsize:
        return None  # COO with int64 indices would be larger than the dense tensor
    values = numpy_helper.from_array(flat[idx], init.name)
    indices = numpy_helper.from_array(idx.astype(np.int64), init.name + "_indices")
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def convert_float_type(proto: onnx.ModelProto, src: int, dst: int) -> onnx.ModelProto:
    """Copy of `proto` with every `src` float tensor (weights, constants, casts, I/O) as `dst`.

    Used for fp16 export when tracing in half fails, and by verify to run an fp16 file in fp32
    where ONNX Runtime CPU lacks an fp16 kernel. Value-info of intermediates is dropped.
    """
    out = copy.deepcopy(proto)
    np_dst = helper.tensor_dtype_to_np_dtype(dst)

    def conv_tensor(t: TensorProto) -> None:
        if t.data_type == src:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np_dst), t.name))

    def conv_graph(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            conv_tensor(t)
        for s in graph.sparse_initializer:
            conv_tensor(s.values)
        for vi in list(graph.input) + list(graph.output):
            if vi.type.tensor_type.elem_type == src:
                vi.type.tensor_type.elem_type = dst
        del graph.value_info[:]
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == src:
                    attr.i = dst
                elif attr.name == "dtype" and attr.type == onnx.AttributeProto.INT and attr.i == src:
                    attr.i = dst
                elif attr.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(attr.t)
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    conv_tensor(attr.sparse_tensor.values)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    conv_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        conv_graph(sub)

    conv_graph(out.graph)
    return out


# --------------------------------------------------------------------------- the records


class QuantizationRecord(Record):
    """`export.quantize: int8`: the INT8 QDQ file, how it was calibrated, and per weighted GEMM
    whether it is INT8 in, INT8 weight (zero point 0) and INT8 out (`stages.quantize`)."""

    file: str
    bytes: int
    seconds: float
    library: str
    calibration_batches: int
    calibration_method: str
    layers: list[dict[str, Any]] = Field(default_factory=list)


class ExportRecord(Record):
    """The export result as stored: file names relative to the run directory."""

    exporter: str
    seconds: float
    bytes: int
    warnings: list[str]
    opset: int
    dtype: Literal["fp32", "fp16"]
    compact_bytes: int | None
    file: str = "model.onnx"
    compact_file: str | None = None
    inputs: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    quantization: QuantizationRecord | None = None

    @classmethod
    def of(cls, result: ExportResult, run_dir: Path) -> "ExportRecord":
        def rel(path: Path) -> str:
            return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
        return cls(exporter=result.exporter, seconds=result.seconds, bytes=result.size_bytes,
                   warnings=list(result.warnings), opset=result.opset, dtype=result.dtype,
                   compact_bytes=result.compact_size_bytes, file=rel(result.path),
                   compact_file=None if result.compact_path is None else rel(result.compact_path),
                   inputs=list(result.input_names), outputs=list(result.output_names))

    def result(self, run_dir: Path) -> ExportResult:
        """The export result again, for verify on a resumed run."""
        return ExportResult(path=Path(run_dir) / self.file, exporter=self.exporter, seconds=self.seconds,
                            size_bytes=self.bytes, warnings=list(self.warnings),
                            compact_path=None if self.compact_file is None else Path(run_dir) / self.compact_file,
                            compact_size_bytes=self.compact_bytes, dtype=self.dtype, opset=self.opset,
                            input_names=list(self.inputs), output_names=list(self.outputs))


class TensorSpec(Record):
    name: str
    shape: list[int | str]  # a symbolic dim (the batch) by its name
    dtype: str


class Deployment(Record):
    """What a deployment needs to feed `model.onnx` and read its output; the same facts are in
    the file's metadata_props (`optg.inputs`, `optg.outputs`, `optg.class_names`,
    `optg.preprocessing`)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    class_names: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    tokenizer: list[str] | None = None  # the tokenizer files in the run directory that feed `input_ids`
    # per shipped ONNX file, the trtexec command that builds its sparse engine, for TensorRT 10
    # and 11 (`stages.tensorrt.engine_commands`: file, dtype, tensorrt10, tensorrt11)
    tensorrt: list[dict[str, str]] = Field(default_factory=list)


# --------------------------------------------------------------------------- the pipeline row


def _copy_tokenizer(ctx: RunContext) -> list[str]:
    """The tokenizer files beside model.onnx (hashed artifacts): the run directory alone serves."""
    info = ctx.bundle.tokenizer
    if info is None:
        return []
    names = []
    for source in info.files:
        data = Path(source).read_bytes()

        def write(tmp: Path, data: bytes = data) -> None:
            Path(tmp).write_bytes(data)

        path = atomic_write(ctx.run.path / source.name, write)
        ctx.run.add_artifact(source.name, path)
        names.append(source.name)
    return names


def _dense_weights(ctx: RunContext) -> dict[str, str]:
    """The weights this run left dense on purpose (tied, output head, excluded...), with the
    reason: the file records them so `optg inspect --pattern` on it agrees with the run."""
    dense = {layer.parameter: layer.reason for layer in ctx.run.manifest.metrics.layers
             if layer.pattern.is_dense and layer.reason}
    by_id = {id(p): n for n, p in ctx.model.named_parameters()}  # first name of each tensor
    for alias, param in ctx.model.named_parameters(remove_duplicate=False):  # a tied head's own name too
        first = by_id.get(id(param))
        if first in dense and alias not in dense:
            dense[alias] = dense[first]
    return dense


def run_export(ctx: RunContext) -> None:
    s, manifest = ctx.cfg.sparsity, ctx.run.manifest
    target = s.as_pattern.target
    metadata = {"optg.config_hash": manifest.config_hash, "optg.method": s.method, "optg.pattern": str(s.pattern),
                "optg.target": str(target), "optg.task": ctx.task.name,
                "optg.targeted_sparsity": f"{manifest.metrics.targeted_sparsity or 0:.6f}",
                "optg.version": manifest.versions["optg-pipeline"]}
    bundle = ctx.bundle
    if bundle.class_names is not None:
        metadata["optg.class_names"] = json.dumps(bundle.class_names)
    if bundle.preprocessing is not None:
        metadata["optg.preprocessing"] = json.dumps(bundle.preprocessing)
    tokenizer = _copy_tokenizer(ctx)
    if tokenizer:
        metadata["optg.tokenizer"] = json.dumps(tokenizer)
    ctx.model.eval().cpu()
    example = ctx.example(2)
    names, axes = ctx.export_interface(example)
    with export_view(ctx.model, ctx.task) as view:
        result = export_onnx(view, example, ctx.run.path / "model.onnx", ctx.cfg.export, metadata,
                             input_names=names, dynamic_axes=axes, dense_weights=_dense_weights(ctx))
    manifest.deployment = Deployment(inputs=result.inputs, outputs=result.outputs,  # type: ignore[arg-type]
                                     class_names=bundle.class_names, preprocessing=bundle.preprocessing,
                                     tokenizer=tokenizer or None)
    ctx.run.add_artifact("model.onnx", result.path)
    if result.compact_path is not None:
        ctx.run.add_artifact("model.compact.onnx", result.compact_path)
    for sidecar in result.data_paths:  # weights of a model over ~1.8 GB, beside the .onnx
        ctx.run.add_artifact(sidecar.name, sidecar)
    manifest.export = ExportRecord.of(result, ctx.run.path)
    for note in result.warnings:
        ctx.log(f"[export] note: {note}")
    shipped: list[tuple[str, str]] = [(result.path.name, result.dtype)]
    if ctx.cfg.export.quantize == "int8":
        manifest.export.quantization = _export_int8(ctx, result, example, names, axes, metadata)
        shipped.append((manifest.export.quantization.file, "int8"))
    lengths = ctx.cfg.benchmark.sequence_lengths or [int(bundle.input_shape[0])]
    sequence = max(lengths) if ctx.task.text_layout is not None else None
    manifest.deployment.tensorrt = [tensorrt.engine_commands(file, dtype, result.inputs,
                                                                   ctx.cfg.benchmark.batch_sizes, sequence)
                                    for file, dtype in shipped]


def _export_int8(ctx: RunContext, result: ExportResult, example: list[torch.Tensor], names: list[str],
                 axes: list[dict[int, str]], metadata: dict[str, str]) -> QuantizationRecord:
    """model.int8.onnx from the fp32 graph (model.onnx itself, or for an fp16 export a staged
    fp32 export that is removed afterwards), calibrated on the first training batches."""
    cfg = ctx.cfg.export
    dest = ctx.run.path / "model.int8.onnx"
    with tempfile.TemporaryDirectory(dir=ctx.run.path, prefix=".fp32-") as tmp:
        source = result
        if result.dtype != "fp32":
            fp32 = cfg.model_copy(update={"dtype": "fp32", "compact": False, "quantize": "none"})
            with export_view(ctx.model, ctx.task) as view:
                source = export_onnx(view, example, Path(tmp) / "model.fp32.onnx", fp32, metadata, input_names=names,
                                     dynamic_axes=axes, dense_weights=_dense_weights(ctx))
        feeds = onnx_eval.calibration_feeds(ctx.bundle, ctx.task, source.inputs, cfg.calibration_batches,
                                            ctx.cfg.data.batch_size)
        quantized = quantize.quantize_int8(source.path, dest, feeds, cfg.calibration_method)
    ctx.run.add_artifact("model.int8.onnx", dest)
    form = sum(layer.sparse_int8_form for layer in quantized.layers)
    ctx.log(f"[export] model.int8.onnx: {form}/{len(quantized.layers)} weighted GEMMs INT8 in, weight and out; "
            f"{len(feeds)} calibration batches ({cfg.calibration_method}), {quantized.seconds:.1f} s")
    return QuantizationRecord(file=dest.name, bytes=dest.stat().st_size, seconds=quantized.seconds,
                              library=quantized.library, calibration_batches=len(feeds),
                              calibration_method=cfg.calibration_method,
                              layers=[layer.to_dict() for layer in quantized.layers])


ROW = Stage("export", run_export, enabled=lambda c: c.export.enabled, section="export", inputs=("export",),
            redoable=True, all_ranks=False, results=("export",))
