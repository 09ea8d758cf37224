"""INT8 QDQ for sparse INT8 tensor cores: a calibrated static post-training quantization of an
exported fp32 ONNX file, and the read-back that says whether each GEMM is in the form TensorRT
runs sparse.

Library: ONNX Runtime's `quantize_static` in QDQ format. NVIDIA ModelOpt's ONNX PTQ was checked
first: `pip install --dry-run "nvidia-modelopt[onnx]" torch==2.13.0` keeps torch but would pull
onnxruntime-gpu~=1.24 (replacing the CPU onnxruntime 1.32 every stage here runs on), cupy-cuda12x
and an older onnx; plain `nvidia-modelopt` installs, without what its ONNX PTQ imports.

Placement (what TensorRT needs to pick a sparse INT8 kernel): every Conv/Gemm/MatMul gets a
Q/DQ pair on its data input, its weight as int8 per output channel with zero point 0 (so an
exact zero stays an exact zero and 2:4 survives), and a QuantizeLinear on its output, so that
the GEMM is INT8 in *and* INT8 out and its epilogue stays INT8; nothing else is quantized.
Activations are symmetric (zero point 0) as TensorRT requires, calibrated on training batches.
`qdq_placement` reads any file back and reports, per weighted GEMM, the three facts.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from stages.base import StageError
from stages.onnx_file import atomic_save

GEMMS = ("Conv", "Gemm", "MatMul")
# Ops TensorRT fuses into a GEMM's epilogue before an output quantizer (bias, activation, residual).
_EPILOGUE = frozenset({"Add", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Mul", "Gelu", "Tanh", "HardSigmoid",
                       "HardSwish", "BatchNormalization"})
_INT8 = (TensorProto.INT8,)
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
LIBRARY = ("onnxruntime.quantization.quantize_static (QDQ, per-channel symmetric int8 weights, "
           "symmetric int8 activations)")


@dataclass
class QdqLayer:
    """One GEMM with a constant weight, as the quantized file runs it."""

    node: str
    op: str
    weight: str  # the stored int8 weight (or whatever feeds the weight input)
    int8_in: bool  # its data input comes out of an int8 DequantizeLinear
    int8_weight: bool  # its weight is an int8 constant through DequantizeLinear with zero point 0
    int8_out: bool  # its output reaches a QuantizeLinear directly or through epilogue ops only
    epilogue: list[str] = field(default_factory=list)  # ops between the GEMM and that QuantizeLinear

    @property
    def sparse_int8_form(self) -> bool:
        return self.int8_in and self.int8_weight and self.int8_out

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "weight": self.weight, "int8_in": self.int8_in,
                "int8_weight": self.int8_weight, "int8_out": self.int8_out, "epilogue": self.epilogue,
                "sparse_int8_form": self.sparse_int8_form}


@dataclass
class QuantizeResult:
    path: Path
    seconds: float
    calibration_batches: int
    calibration_method: str
    library: str
    layers: list[QdqLayer]


class _Feeds:
    """ONNX Runtime's CalibrationDataReader protocol over prepared feed dicts."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._it = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._it, None)
        return None if feed is None else dict(feed)


def quantize_int8(source: Path, dest: Path, feeds: list[dict[str, np.ndarray]],
                  method: CalibrationMethod = "minmax") -> QuantizeResult:
    """Write the INT8 QDQ form of the fp32 file `source` to `dest` (atomically: a temporary file
    beside it, then a rename), calibrated on `feeds` (one dict of named inputs per batch); the
    source's metadata is kept."""
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not feeds:
        raise StageError("int8 quantization needs calibration batches, and none were given")
    start = time.perf_counter()
    ort_method = {"minmax": OrtMethod.MinMax, "entropy": OrtMethod.Entropy,
                  "percentile": OrtMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".int8-") as tmp, _quiet_root_logger():
        staged = Path(tmp) / dest.name
        try:
            quantize_static(
                str(source), str(staged), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(GEMMS),
                calibrate_method=ort_method, reduce_range=False,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "QDQKeepRemovableActivations": True, "CalibTensorRangeSymmetric": True})
        except Exception as exc:  # noqa: BLE001 - ORT raises its own and onnx's error types
            raise StageError(f"int8 quantization of {source.name} failed: {type(exc).__name__}: "
                             f"{str(exc).strip()[:600]}") from exc
        proto = onnx.load(str(staged))
        original = onnx.load(str(source), load_external_data=False)
        del proto.metadata_props[:]
        proto.metadata_props.extend(_renamed_metadata(original, proto))
        atomic_save(proto, dest)
    return QuantizeResult(dest, time.perf_counter() - start, len(feeds), method, LIBRARY, qdq_placement(proto))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice ("consider pre-processing") on the root logger;
    the run's own log says what was done."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _renamed_metadata(original: onnx.ModelProto, quantized: onnx.ModelProto) -> list[onnx.StringStringEntryProto]:
    """The source's metadata; the dense-weight record is re-keyed to the quantized weights' names
    (ONNX Runtime stores `w` as `w_quantized`), so inspect's exemptions still find them."""
    import json

    from stages.onnx_sparsity import DENSE_WEIGHTS_KEY

    names = {init.name for init in quantized.graph.initializer}
    entries = []
    for prop in original.metadata_props:
        value = prop.value
        if prop.key == DENSE_WEIGHTS_KEY:
            try:
                record = json.loads(value)
            except ValueError:
                record = None
            if isinstance(record, dict):
                record = {(f"{k}_quantized" if k not in names and f"{k}_quantized" in names else k): v
                          for k, v in record.items()}
                value = json.dumps(record)
        entries.append(onnx.StringStringEntryProto(key=prop.key, value=value))
    return entries


def qdq_placement(proto: onnx.ModelProto) -> list[QdqLayer]:
    """Per Conv/Gemm/MatMul of the main graph whose second input is a constant (directly, or an
    int8 constant through DequantizeLinear): whether it is INT8 in, INT8 weight and INT8 out."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def constant(name: str) -> bool:
        node = producer.get(name)
        return name in inits or (node is not None and node.op_type == "Constant")

    def int8_dq(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        x = node.input[0]
        if x in inits:
            return node if inits[x].data_type in _INT8 else None
        q = producer.get(x)
        if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in inits \
                and inits[q.input[2]].data_type in _INT8:
            return node
        return None

    def zero_point_zero(dq: onnx.NodeProto) -> bool:
        if len(dq.input) < 3 or not dq.input[2]:
            return True
        zp = inits.get(dq.input[2])
        return zp is not None and not np.any(numpy_helper.to_array(zp))

    def output_quantized(name: str, depth: int = 0) -> tuple[bool, list[str]]:
        users = consumers.get(name, [])
        if not users or depth > 4:
            return False, []
        if all(u.op_type == "QuantizeLinear" for u in users):
            return True, []
        if len(users) == 1 and users[0].op_type in _EPILOGUE:
            ok, chain = output_quantized(users[0].output[0], depth + 1)
            return ok, [users[0].op_type, *chain]
        return False, []

    layers = []
    for idx, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in GEMMS or len(node.input) < 2:
            continue
        weight = node.input[1]
        dq = int8_dq(weight)
        if dq is None and not constant(weight):
            continue  # activation x activation (attention scores): not a weight GEMM
        if dq is not None and not (dq.input[0] in inits or constant(dq.input[0])):
            continue
        int8_out, chain = output_quantized(node.output[0])
        layers.append(QdqLayer(
            node=node.name or f"{node.op_type}#{idx}", op=node.op_type,
            weight=dq.input[0] if dq is not None else weight,
            int8_in=int8_dq(node.input[0]) is not None,
            int8_weight=dq is not None and dq.input[0] in inits and zero_point_zero(dq),
            int8_out=int8_out, epilogue=chain))
    return layers


def render_placement_markdown(file: str, rows: list[dict], method: str, batches: int) -> str:
    """report.md's per-layer Q/DQ placement of the INT8 file (verify's rows)."""
    form = sum(bool(r.get("sparse_int8_form")) for r in rows)
    lines = [f"## INT8 QDQ placement ({file})", "",
             f"{form} of {len(rows)} weighted GEMMs are INT8 in, INT8 weight (zero point 0) and INT8 out, the form "
             f"TensorRT's sparse INT8 kernels need; activations calibrated on {batches} training batches ({method}).",
             "", "| node | op | weight | INT8 in | INT8 weight | INT8 out | epilogue | N:M held |",
             "|---|---|---|---|---|---|---|---|"]

    def mark(v: object) -> str:
        return "-" if v is None else ("yes" if v else "no")
    for r in rows:
        lines.append(f"| {r['node']} | {r['op']} | {r['weight']} | {mark(r['int8_in'])} | {mark(r['int8_weight'])} | "
                     f"{mark(r['int8_out'])} | {' '.join(r.get('epilogue') or []) or '-'} | "
                     f"{mark(r.get('pattern_ok'))}{'' if r.get('required', True) else ' (not required)'} |")
    return "\n".join(lines) + "\n"
