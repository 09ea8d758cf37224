"""Read weights and their sparsity back from an ONNX file; N:M along the reduction axis; eligibility.

Everything here works on the file as written (after the exporter folded BatchNorm, pre-transposed
Linear weights or renamed tensors, after a quantizer inserted QuantizeLinear/DequantizeLinear), so
a 2:4 claim is checked where it matters: on the tensors a runtime such as TensorRT will see.
Pure functions on `onnx.ModelProto` and numpy, shared by the verify stage and `optg inspect`.

Which tensors count as weights (see `scan_weights`): the weight input of Conv, com.microsoft
FusedConv, ConvInteger and QLinearConv; B of Gemm/com.microsoft FusedGemm; B of MatMul,
com.microsoft FusedMatMul, MatMulInteger and QLinearMatMul unless it is an activation computed from
the graph's inputs (attention's K); and A of these when it is a constant. Each is followed back to
an initializer, sparse initializer or Constant by `stages.onnx_trace` (Identity, Cast,
Transpose, Reshape/Flatten/Squeeze/Unsqueeze, QuantizeLinear, DequantizeLinear; values computed as
the runtime would). A weight input that cannot be followed - a graph input, an op inspect does
not evaluate (`Mul(W, 1)`), a Reshape with a computed shape, a weight inside an If/Loop/Scan body,
a constant operand of a com.microsoft/custom contraction or of Einsum - is reported as an
`UntracedWeight` with the reason, never skipped: `optg inspect --pattern` fails on it.
ConvTranspose and RNN weights are listed as not inspected.

Values, shapes and axes are in the consumer's layout (what the Conv/Gemm/MatMul reads); the
stored tensor's shape is `stored_shape`. Reduction axis: Conv weight [K, C/g, *k] -> 1; Gemm B
-> 1 when transB=1 else 0; MatMul B [..., K, N] -> -2 (never a batch axis); constant A
[..., M, K] -> -1. An N:M group is M consecutive elements along that axis at one fixed position
of all other axes. Integer ops (ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul) count a
weight as zero where it equals its zero point.

Eligibility (docs/library.md, "N:M and 2:4"): hardware 2:4 needs the reduction size C % 4 == 0 and an
ungrouped layer; TensorRT only picks sparse kernels where they pay off, so a layer with fewer than
`TINY_NUMEL` weights or `C < TINY_C` is reported as eligible but not `likely_faster`. apex ASP's
stricter rule (K % 8 == 0 and C % 16 == 0) is reported separately.
"""
from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from stages.onnx_trace import (
    GraphIndex,
    Traced,
    Untraceable,
    attr,
    has_subgraph,
    node_label,
)
from stages.onnx_values import (
    MAX_DENSE_ELEMENTS,
    NMCheck,
    OversizedTensor,
    Tensor,
    UnreadableTensor,
    check_nm,
    dtype_kind,
    numeric,
)

__all__ = [
    "CANDIDATE_PATTERNS",
    "HW_M",
    "MAX_DENSE_ELEMENTS",
    "TINY_C",
    "TINY_NUMEL",
    "Eligibility",
    "NMCheck",
    "OnnxWeight",
    "OversizedTensor",
    "UnreadableTensor",
    "UntracedWeight",
    "WeightScan",
    "best_pattern",
    "check_nm",
    "collect_weights",
    "eligibility",
    "load_model",
    "must_hold",
    "scan_weights",
    "sparse_to_dense",
    "sparsity",
    "weight_report",
]

HW_M = 4  # sparse tensor cores group 4 elements along the reduction axis (2:4)
TINY_NUMEL = 4096  # fewer weights than this: sparse kernels cannot win back their overhead
TINY_C = 64  # reduction size below this: same
# Candidate patterns for "best fit", most restrictive first (1:2 implies 2:4 implies 4:8).
CANDIDATE_PATTERNS: tuple[tuple[int, int], ...] = ((1, 4), (2, 8), (1, 2), (2, 4), (4, 8))

_FX_PARAM_RE = re.compile(r"%p_([A-Za-z0-9_]+)")


@dataclass
class OnnxWeight:
    """One constant weight as a Conv/Gemm/MatMul consumes it, in the consumer's layout."""

    name: str  # stored tensor name (initializer, sparse initializer or Constant output)
    node: str  # consuming node's name (or "<op>#<index>" when unnamed)
    op: str  # Conv, FusedConv, Gemm, MatMul, ... (the consumer's op type)
    input_index: int
    source: str  # "initializer", "sparse_initializer" or "constant"
    path: tuple[str, ...]  # ops between the stored tensor and the consumer, consumer side first
    tensor: Tensor  # consumer layout, decoded (float32/int64 for bf16/fp8/int4), dense or COO
    reduction_axis: int  # in the consumer layout
    out_axis: int  # output-channel axis (K) in the consumer layout
    stored_shape: tuple[int, ...]
    dtype: str = "float32"  # element type the consumer sees (before decoding)
    group: int = 1
    scope: str | None = None  # module path from the dynamo exporter's metadata, if any
    fx_params: tuple[str, ...] = field(default_factory=tuple)  # "%p_xxx" parameters it references

    @property
    def values(self) -> np.ndarray:
        """Dense values (OversizedTensor for a huge weight stored sparse)."""
        return self.tensor.to_dense(f"weight '{self.name}'")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    @property
    def reduction_size(self) -> int:
        """C: the reduction length per output channel (C/g for a grouped Conv)."""
        return self.shape[self.reduction_axis]

    @property
    def out_size(self) -> int:
        return self.shape[self.out_axis]

    @property
    def numel(self) -> int:
        return self.tensor.numel

    @property
    def zeros(self) -> int:
        return self.numel - self.tensor.count_nonzero()

    @property
    def sparsity(self) -> float:
        return self.tensor.sparsity()

    def check(self, n: int, m: int) -> NMCheck:
        """N:M along the reduction axis (from the indices when the weight is stored sparse)."""
        return self.tensor.check_nm(self.reduction_axis, n, m)

    def torch_layout(self) -> np.ndarray:
        """The weight as PyTorch holds it: [K, C, *kernel] (Linear: [out, in])."""
        return np.moveaxis(self.values, [self.out_axis, self.reduction_axis], [0, 1])


@dataclass
class UntracedWeight:
    """A weight input of a Conv/Gemm/MatMul whose values could not be read: nothing was checked."""

    name: str  # the tensor name at the consumer's input
    node: str
    op: str
    input_index: int
    reason: str

    def describe(self) -> str:
        return (f"weight '{self.name}' (node {self.node}, {self.op} input {self.input_index}) is "
                f"untraced, nothing was checked: {self.reason}")


@dataclass
class WeightScan:
    """What `scan_weights` found: read weights, untraced weight inputs, ops it does not inspect."""

    weights: list[OnnxWeight] = field(default_factory=list)
    untraced: list[UntracedWeight] = field(default_factory=list)
    not_inspected: list[str] = field(default_factory=list)
    activation_operands: int = 0  # MatMul operands computed from the graph's inputs (not weights)


@dataclass
class Eligibility:
    eligible: bool  # hardware 2:4 capable: C % 4 == 0 and not grouped
    likely_faster: bool  # eligible and large enough for TensorRT to pick a sparse kernel
    apex: bool  # apex ASP would prune it: K % 8 == 0, C % 16 == 0, not grouped
    reason: str  # why not eligible / not likely faster; "" when both hold


def sparsity(values: np.ndarray) -> float:
    """Fraction of exact zeros."""
    values = numeric(values)
    return 0.0 if values.size == 0 else float(1.0 - int(np.count_nonzero(values)) / values.size)


def best_pattern(values: np.ndarray | Tensor, axis: int) -> str | None:
    """The most restrictive common N:M pattern that holds along `axis`, or None."""
    tensor = values if isinstance(values, Tensor) else Tensor.of(values)
    for n, m in CANDIDATE_PATTERNS:
        if tensor.check_nm(axis, n, m).holds:
            return f"{n}:{m}"
    return None


def eligibility(w: OnnxWeight) -> Eligibility:
    """TensorRT / apex view of one weight; `reason` names the first rule it misses."""
    c, k = w.reduction_size, w.out_size
    reasons: list[str] = []
    if w.group > 1:
        reasons.append(f"grouped conv (group={w.group})")
    if c % HW_M:
        reasons.append(f"C={c} not divisible by {HW_M}")
    eligible = not reasons
    if eligible and (w.numel < TINY_NUMEL or c < TINY_C):
        reasons.append(f"too small to gain: {w.numel} weights, C={c} (sparse kernels need "
                       f">= {TINY_NUMEL} weights and C >= {TINY_C})")
    apex = w.group == 1 and k % 8 == 0 and c % 16 == 0
    return Eligibility(eligible, eligible and not reasons, apex, "; ".join(reasons))


DENSE_WEIGHTS_KEY = "optg.dense_weights"  # metadata: {initializer name: why the run left it dense}


def dense_exemptions(model: onnx.ModelProto) -> dict[str, str]:
    """The weights the exporting run left dense on purpose (`optg.dense_weights` metadata, by
    initializer name, with the reason); {} for a file without the record or with a bad one."""
    for prop in model.metadata_props:
        if prop.key == DENSE_WEIGHTS_KEY:
            try:
                value = json.loads(prop.value)
            except ValueError:
                return {}
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def must_hold(w: OnnxWeight, m: int, exempt: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Whether `inspect --pattern N:M` requires this weight to hold N:M, and why not if exempt.

    Every weight whose reduction axis can carry the pattern (C % M == 0, ungrouped) must hold it,
    including one the user left dense, unless the file records that its run left it dense on
    purpose (`exempt`: `dense_exemptions`, e.g. an output head tied to the embedding). A file
    from elsewhere has no record: there, finding dense layers is what the check is for.
    """
    if w.group > 1:
        return False, f"grouped conv (group={w.group})"
    if w.reduction_size % m:
        return False, f"C={w.reduction_size} not divisible by {m}"
    if exempt and w.name in exempt:
        return False, f"left dense by the run: {exempt[w.name]}"
    return True, ""


def weight_report(w: OnnxWeight, nm: tuple[int, int] | None = None, exempt: Mapping[str, str] | None = None) -> dict:
    """JSON-ready description of one weight; checks `nm` (default hardware 2:4)."""
    n, m = nm if nm is not None else (2, HW_M)
    check = w.check(n, m)
    elig = eligibility(w)
    required, exempt_reason = must_hold(w, m, exempt)
    return {
        "name": w.name, "node": w.node, "op": w.op, "shape": list(w.shape),
        "reduction_axis": w.reduction_axis, "C": w.reduction_size, "K": w.out_size,
        "group": w.group, "source": w.source, "path": list(w.path),
        "stored_shape": list(w.stored_shape), "dtype": w.dtype, "numel": w.numel, "zeros": w.zeros,
        "sparsity": round(w.sparsity, 6), "pattern": f"{n}:{m}",
        "pattern_ok": check.holds if check.applicable else None,
        "required": required, "exempt_reason": exempt_reason,
        "bad_groups": check.bad_groups, "groups": check.groups,
        "first_bad_group": check.location, "first_bad_group_nnz": check.location_nnz,
        "best_pattern": best_pattern(w.tensor, w.reduction_axis),
        "eligible": elig.eligible, "likely_faster": elig.likely_faster,
        "apex_eligible": elig.apex, "reason": elig.reason,
    }


# ----------------------------------------------------------------------------- read-back


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file with its external data. Raises on a missing or unreadable file."""
    return onnx.load(str(path), load_external_data=True)


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """COO sparse tensor (linear [NNZ] or [NNZ, rank] indices) to a dense numpy array; refuses
    (OversizedTensor) more than MAX_DENSE_ELEMENTS elements."""
    return Tensor.from_sparse(sp, sp.values.name).to_dense(f"sparse tensor '{sp.values.name}'")


@dataclass(frozen=True)
class _Slot:
    """How a consumer op reads one input as a weight."""

    index: int
    role: str  # "weight": always a weight; "b": a weight unless an activation; "a": only if constant
    zero_point: int | None = None  # input holding its zero point (integer ops)


_CONV = (_Slot(1, "weight"),)
_GEMM = (_Slot(1, "weight"), _Slot(0, "a"))
_MATMUL = (_Slot(1, "b"), _Slot(0, "a"))
_CONSUMERS: dict[tuple[str, str], tuple[_Slot, ...]] = {
    ("", "Conv"): _CONV, ("com.microsoft", "FusedConv"): _CONV,
    ("", "ConvInteger"): (_Slot(1, "weight", 3),), ("", "QLinearConv"): (_Slot(3, "weight", 5),),
    ("", "Gemm"): _GEMM, ("com.microsoft", "FusedGemm"): _GEMM,
    ("", "MatMul"): _MATMUL, ("com.microsoft", "FusedMatMul"): _MATMUL,
    ("", "MatMulInteger"): (_Slot(1, "b", 3), _Slot(0, "a", 2)),
    ("", "QLinearMatMul"): (_Slot(3, "b", 5), _Slot(0, "a", 2)),
}
_CONV_OPS = {"Conv", "FusedConv", "ConvInteger", "QLinearConv"}
_GEMM_OPS = {"Gemm", "FusedGemm"}
_NOT_INSPECTED = {"ConvTranspose", "LSTM", "GRU", "RNN"}  # no 2:4 check defined for these
_CONTRACTION_RE = re.compile(r"Conv|Gemm|MatMul|Attention|Einsum")


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _axes(node: onnx.NodeProto, slot: _Slot, rank: int) -> tuple[int, int] | str | None:
    """(reduction axis, output axis) in the consumer layout; a reason when the input cannot be a
    weight of that op; None for a MatMul vector operand (no N:M groups to check)."""
    op = node.op_type
    if op in _CONV_OPS:
        return (1, 0) if rank >= 3 else f"{op} weight of rank {rank} (expected >= 3)"
    if op in _GEMM_OPS:
        if rank != 2:
            return f"{op} operand of rank {rank} (expected 2)"
        if slot.index == 1:
            return (1, 0) if attr(node, "transB", 0) else (0, 1)
        return (0, 1) if attr(node, "transA", 0) else (1, 0)
    if rank < 2:
        return None
    is_b = slot.role == "b"
    if op == "FusedMatMul":
        if attr(node, "transBatchB" if is_b else "transBatchA", 0):
            return f"FusedMatMul with {'transBatchB' if is_b else 'transBatchA'}=1 is not inspected"
        if attr(node, "transB" if is_b else "transA", 0):
            return (rank - 1, rank - 2) if is_b else (rank - 2, rank - 1)
    return (rank - 2, rank - 1) if is_b else (rank - 1, rank - 2)


def _center(values: np.ndarray, zero: np.ndarray, out_axis: int) -> np.ndarray:
    """values - zero_point (per tensor, or per output channel/column along `out_axis`)."""
    q, z = numeric(values).astype(np.int64), numeric(zero).astype(np.int64)
    if z.size == 1:
        return q - z.reshape(())
    if z.ndim == 1 and z.size == q.shape[out_axis]:
        view = [1] * q.ndim
        view[out_axis] = z.size
        return q - z.reshape(view)
    if z.ndim == q.ndim:
        return q - z  # broadcasts or raises ValueError
    raise ValueError(f"zero point of shape {list(z.shape)} does not fit weight {list(q.shape)}")


def _scope(node: onnx.NodeProto) -> tuple[str | None, tuple[str, ...]]:
    """Module path and referenced parameters from the dynamo exporter's node metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    scope = None
    raw = meta.get("pkg.torch.onnx.name_scopes")
    if raw:
        try:
            scopes = ast.literal_eval(raw)
            if isinstance(scopes, list) and len(scopes) >= 3:
                scope = str(scopes[-2])
            elif isinstance(scopes, list):
                scope = ""
        except (ValueError, SyntaxError):
            scope = None
    params = tuple(_FX_PARAM_RE.findall(meta.get("pkg.torch.onnx.fx_node", "")))
    if scope is None and node.name.startswith("/"):
        # TorchScript names nodes "/features/features.0/Conv": the module path is the last scope
        parts = node.name.strip("/").split("/")
        scope = parts[-2] if len(parts) >= 2 else ""
    return scope, params


class _Scanner:
    """Walks the main graph's nodes and reads (or reports untraced) every weight input."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None) -> None:
        self.graph = model.graph
        self.g = GraphIndex(model.graph, base_dir)
        self.scan = WeightScan()
        self._outer_const: set[str] | None = None  # main-graph constants, for subgraph bodies

    def run(self) -> WeightScan:
        for idx, node in enumerate(self.graph.node):
            label = node.name or f"{node.op_type}#{idx}"
            slots = _CONSUMERS.get((_domain(node), node.op_type))
            if slots is not None:
                for slot in slots:
                    self._slot(node, label, slot)
            elif _domain(node) == "" and node.op_type in _NOT_INSPECTED:
                self.scan.not_inspected.append(f"{node_label(node)}: {node.op_type} weights are not "
                                               f"checked for N:M")
            elif (_domain(node) != "" or node.op_type == "Einsum") \
                    and _CONTRACTION_RE.search(node.op_type):
                self._unread_contraction(node, label)
            if has_subgraph(node):
                self._subgraphs(node, label)
        return self.scan

    def _untraced(self, node: onnx.NodeProto, label: str, index: int, reason: str) -> None:
        self.scan.untraced.append(UntracedWeight(node.input[index], label, node.op_type, index, reason))

    def _slot(self, node: onnx.NodeProto, label: str, slot: _Slot) -> None:
        if slot.index >= len(node.input) or not node.input[slot.index]:
            return
        name = node.input[slot.index]
        dynamic = name in self.g.dynamic
        if slot.role == "a" and dynamic:
            return  # the data operand
        try:
            traced = self.g.trace(name)
        except Untraceable as exc:
            fed = self.g.fed_from_input(name) if dynamic else None
            if slot.role == "b" and dynamic and fed is None:
                self.scan.activation_operands += 1  # computed from the inputs: an activation
                return
            reason = str(exc)
            if fed is not None and fed != name:
                reason += f"; it is fed at run time from graph input '{fed}'"
            elif dynamic and fed is None:
                reason += "; it is computed at run time from the graph's inputs"
            self._untraced(node, label, slot.index, reason)
            return
        self._weight(node, label, slot, traced)

    def _weight(self, node: onnx.NodeProto, label: str, slot: _Slot, traced: Traced) -> None:
        tensor = traced.tensor
        kind = dtype_kind(tensor.dtype)
        if kind not in "fi":
            self._untraced(node, label, slot.index, f"element type {tensor.dtype} is not numeric")
            return
        axes = _axes(node, slot, tensor.ndim)
        if axes is None:
            return
        if isinstance(axes, str):
            self._untraced(node, label, slot.index, axes)
            return
        dtype = tensor.dtype.name
        tensor = tensor.map_values(numeric)
        path = list(traced.path)
        if slot.zero_point is not None and slot.zero_point < len(node.input) \
                and node.input[slot.zero_point]:
            try:
                zero = self.g.constant(node.input[slot.zero_point])
                if np.any(numeric(zero)):
                    tensor = Tensor.of(_center(tensor.to_dense(f"weight '{traced.name}'"), zero, axes[1]))
                    path.insert(0, f"{node.op_type} zero point")
            except (Untraceable, ValueError) as exc:
                if isinstance(exc, UnreadableTensor):
                    raise
                self._untraced(node, label, slot.index, f"zero point '{node.input[slot.zero_point]}': "
                                                        f"{exc}")
                return
        scope, params = _scope(node)
        self.scan.weights.append(OnnxWeight(
            name=traced.name, node=label, op=node.op_type, input_index=slot.index,
            source=traced.source, path=tuple(path), tensor=tensor, reduction_axis=axes[0],
            out_axis=axes[1], stored_shape=traced.stored_shape, dtype=dtype,
            group=int(attr(node, "group", 1)) if node.op_type in _CONV_OPS else 1,
            scope=scope, fx_params=params,
        ))

    def _unread_contraction(self, node: onnx.NodeProto, label: str) -> None:
        """A contraction inspect does not evaluate: each constant operand of rank >= 2 is untraced."""
        for index, name in enumerate(node.input):
            if not name or name in self.g.dynamic:
                continue
            try:
                rank = self.g.trace(name).tensor.ndim
            except Untraceable:
                rank = 2  # a constant we cannot even read: as unchecked as it gets
            if rank >= 2:
                self._untraced(node, label, index, f"{node_label(node)} is not an op inspect reads "
                                                   f"weights from")

    def _subgraphs(self, node: onnx.NodeProto, label: str) -> None:
        """Weights of Conv/Gemm/MatMul inside If/Loop/Scan bodies are not read: report them."""
        if self._outer_const is None:
            self._outer_const = {n for n in (*self.g.inits, *self.g.sparse, *self.g.producers)
                                 if n not in self.g.dynamic}
        outer_const = self._outer_const
        for a in node.attribute:
            for body in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                consts = outer_const | {t.name for t in body.initializer} \
                    | {s.values.name for s in body.sparse_initializer} \
                    | {o for n in body.node if n.op_type == "Constant" for o in n.output}
                for inner in body.node:
                    for slot in _CONSUMERS.get((_domain(inner), inner.op_type), ()):
                        name = inner.input[slot.index] if slot.index < len(inner.input) else ""
                        if name and (slot.role == "weight" or name in consts):
                            self.scan.untraced.append(UntracedWeight(
                                name, inner.name or f"{inner.op_type} in {label}", inner.op_type,
                                slot.index, f"inside the {a.name} of {node_label(node)}; subgraphs "
                                            f"are not inspected"))
                    if has_subgraph(inner):
                        self._subgraphs(inner, label)


def scan_weights(model: onnx.ModelProto, base_dir: str | None = None) -> WeightScan:
    """Every weight of the main graph's Conv/Gemm/MatMul-like nodes, in node order, plus every
    weight input that could not be traced (with the reason). Raises UnreadableTensor (its
    subclass OversizedTensor for a tensor too large to densify) for a malformed stored tensor."""
    return _Scanner(model, base_dir).run()


def collect_weights(model: onnx.ModelProto, base_dir: str | None = None) -> list[OnnxWeight]:
    """The weights `scan_weights` could read (untraced inputs are left out: see scan_weights)."""
    return scan_weights(model, base_dir).weights


# ----------------------------------------------------------------------------- coverage


def weight_macs(model: onnx.ModelProto, weights: list[OnnxWeight]) -> list[int]:
    """Multiply-accumulates per sample of each weight's node: its element count times the
    positions it is applied at (a Conv's output pixels, the tokens of a MatMul, also when the
    exporter flattened [batch, sequence] into one axis). Shapes come from ONNX Runtime's
    symbolic shape inference (sympy, which torch requires); every symbol (the batch, a dynamic
    sequence) counts as 1, so a token model is counted per token: the shares between weights,
    which coverage reports, are exact. Where that inference fails, ONNX's own shape inference;
    a node whose shape neither infers counts once."""
    dims: dict[str, list[int | str]] = {}
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
        graph = inferred.graph if inferred is not None else model.graph
    except Exception:  # noqa: BLE001 - it cannot read every graph: ONNX's own inference then
        try:
            graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:  # noqa: BLE001 - nor can that: count those weights once
            graph = model.graph
    for value in (*graph.value_info, *graph.output):
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "1") for d in shape.dim]
    outputs = {node.name or f"{node.op_type}#{i}": node.output[0] for i, node in enumerate(model.graph.node)
               if node.output}
    macs = []
    for w in weights:
        per_sample = _per_sample(dims.get(outputs.get(w.node, ""), []))
        positions = max(1, per_sample // max(1, w.out_size)) if per_sample else 1
        macs.append(w.numel * positions)
    return macs


def _per_sample(shape: list[int | str]) -> int:
    """The element count of a shape with every symbol set to 1 (0 when unknown)."""
    if not shape:
        return 0
    import sympy

    total = 1
    for d in shape:
        if isinstance(d, str):
            names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", d))  # every name a symbol ("N", "E" included)
            try:
                expr = sympy.sympify(d, locals={n: sympy.Symbol(n) for n in names})
                d = int(expr.subs({sym: 1 for sym in expr.free_symbols}))
            except Exception:  # noqa: BLE001 - an expression sympy cannot read: count it once
                d = 1
        total *= max(int(d), 1)
    return total


def pattern_coverage(macs: list[int], holds: list[bool]) -> float | None:
    """The share of weight MACs on weights that hold the pattern (None: no weight MACs)."""
    total = sum(macs)
    return sum(m for m, ok in zip(macs, holds) if ok) / total if total else None
