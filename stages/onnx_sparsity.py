"""Read weights and their sparsity back from an ONNX file; N:M along the reduction axis; eligibility.

Everything here works on the file as written (after the exporter folded BatchNorm, pre-transposed
Linear weights or renamed tensors), so a 2:4 claim is checked where it matters: on the tensors a
runtime such as TensorRT will see. Pure functions on `onnx.ModelProto` and numpy, shared by the
verify stage and `optg inspect`.

Which tensors count as weights: a constant (initializer, sparse initializer or Constant node)
feeding Conv input 1, Gemm input 1 (B; also A when constant), or either MatMul input when it is a
constant of rank >= 2, followed back through Identity, Cast, Transpose (the permutation is applied
to the axis), DequantizeLinear (zeros of the dequantized tensor) and shape-preserving Reshape.
Nodes inside If/Loop/Scan subgraphs and ConvTranspose are not inspected.

Reduction axis in the consumer's layout: Conv weight [K, C/g, *k] -> 1; Gemm B -> 1 when transB=1
else 0; MatMul constant B [..., K, N] -> -2; constant A [..., M, K] -> -1. An N:M group is M
consecutive elements along that axis at one fixed position of all other axes.

Eligibility (see ALGORITHMS.md section 3): hardware 2:4 needs the reduction size C % 4 == 0 and an
ungrouped layer; TensorRT only picks sparse kernels where they pay off, so a layer with fewer than
`TINY_NUMEL` weights or `C < TINY_C` is reported as eligible but not `likely_faster`. apex ASP's
stricter rule (K % 8 == 0 and C % 16 == 0) is reported separately.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HW_M = 4  # sparse tensor cores group 4 elements along the reduction axis (2:4)
TINY_NUMEL = 4096  # fewer weights than this: sparse kernels cannot win back their overhead
TINY_C = 64  # reduction size below this: same
# Candidate patterns for "best fit", most restrictive first (1:2 implies 2:4 implies 4:8).
CANDIDATE_PATTERNS: tuple[tuple[int, int], ...] = ((1, 4), (2, 8), (1, 2), (2, 4), (4, 8))

_PASS_THROUGH = {"Identity", "Cast"}
_FX_PARAM_RE = re.compile(r"%p_([A-Za-z0-9_]+)")


@dataclass
class OnnxWeight:
    """One constant weight as a Conv/Gemm/MatMul consumes it, in its stored layout."""

    name: str  # stored tensor name (initializer, sparse initializer or Constant output)
    node: str  # consuming node's name (or "<op>#<index>" when unnamed)
    op: str  # Conv, Gemm or MatMul
    node_index: int  # position of the consumer in graph.node
    input_index: int
    source: str  # "initializer", "sparse_initializer" or "constant"
    path: tuple[str, ...]  # ops between the stored tensor and the consumer, consumer side first
    values: np.ndarray  # stored layout; dequantized when behind DequantizeLinear
    reduction_axis: int  # in the stored layout
    out_axis: int  # output-channel axis (K) in the stored layout
    consumer_perm: tuple[int, ...]  # consumer layout = values.transpose(consumer_perm)
    group: int = 1
    scope: str | None = None  # module path from the dynamo exporter's metadata, if any
    fx_params: tuple[str, ...] = field(default_factory=tuple)  # "%p_xxx" parameters it references

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.values.shape)

    @property
    def reduction_size(self) -> int:
        """C: the reduction length per output channel (C/g for a grouped Conv)."""
        return self.shape[self.reduction_axis]

    @property
    def out_size(self) -> int:
        return self.shape[self.out_axis]

    @property
    def numel(self) -> int:
        return int(self.values.size)

    @property
    def sparsity(self) -> float:
        return sparsity(self.values)

    def torch_layout(self) -> np.ndarray:
        """The weight as PyTorch holds it: [K, C, *kernel] (Linear: [out, in])."""
        return np.moveaxis(self.values, [self.out_axis, self.reduction_axis], [0, 1])


@dataclass
class NMCheck:
    """Result of checking N:M along one axis. `location` is in the stored layout."""

    n: int
    m: int
    applicable: bool  # reduction size divisible by M
    holds: bool
    groups: int = 0
    bad_groups: int = 0
    location: str | None = None  # e.g. "[5, 4:8, 0, 1]" - the first violating group
    location_nnz: int | None = None

    def describe(self) -> str:
        if not self.applicable:
            return f"{self.n}:{self.m} not applicable (reduction size not divisible by {self.m})"
        if self.holds:
            return f"{self.n}:{self.m} holds"
        return (f"{self.bad_groups} of {self.groups} groups have more than {self.n} nonzeros, "
                f"first at {self.location} ({self.location_nnz} nonzeros)")


@dataclass
class Eligibility:
    eligible: bool  # hardware 2:4 capable: C % 4 == 0 and not grouped
    likely_faster: bool  # eligible and large enough for TensorRT to pick a sparse kernel
    apex: bool  # apex ASP would prune it: K % 8 == 0, C % 16 == 0, not grouped
    reason: str  # why not eligible / not likely faster; "" when both hold


def sparsity(values: np.ndarray) -> float:
    """Fraction of exact zeros."""
    return 0.0 if values.size == 0 else float(1.0 - int(np.count_nonzero(values)) / values.size)


def check_nm(values: np.ndarray, axis: int, n: int, m: int) -> NMCheck:
    """At most n nonzeros in every run of m consecutive elements along `axis` (vectorised)."""
    size = values.shape[axis]
    if size % m:
        return NMCheck(n, m, applicable=False, holds=False)
    moved = np.moveaxis(values, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], size // m, m)
    nnz = np.count_nonzero(groups, axis=-1)
    bad = nnz > n
    bad_count = int(np.count_nonzero(bad))
    result = NMCheck(n, m, applicable=True, holds=bad_count == 0, groups=int(nnz.size),
                     bad_groups=bad_count)
    if bad_count:
        flat = int(np.flatnonzero(bad)[0])
        pos = np.unravel_index(flat, bad.shape)
        others, gidx = [int(p) for p in pos[:-1]], int(pos[-1])
        parts = [str(p) for p in others]
        parts.insert(axis, f"{gidx * m}:{gidx * m + m}")
        result.location = "[" + ", ".join(parts) + "]"
        result.location_nnz = int(nnz[pos])
    return result


def best_pattern(values: np.ndarray, axis: int) -> str | None:
    """The most restrictive common N:M pattern that holds along `axis`, or None."""
    for n, m in CANDIDATE_PATTERNS:
        check = check_nm(values, axis, n, m)
        if check.holds:
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


def must_hold(w: OnnxWeight, m: int) -> tuple[bool, str]:
    """Whether `inspect --pattern N:M` requires this weight to hold N:M, and why not if exempt.

    Every weight whose reduction axis can carry the pattern (C % M == 0, ungrouped) must hold it,
    including one the user left dense: finding such layers is what the check is for.
    """
    if w.group > 1:
        return False, f"grouped conv (group={w.group})"
    if w.reduction_size % m:
        return False, f"C={w.reduction_size} not divisible by {m}"
    return True, ""


def weight_report(w: OnnxWeight, nm: tuple[int, int] | None = None) -> dict:
    """JSON-ready description of one weight; checks `nm` (default hardware 2:4)."""
    n, m = nm if nm is not None else (2, HW_M)
    check = check_nm(w.values, w.reduction_axis, n, m)
    elig = eligibility(w)
    required, exempt_reason = must_hold(w, m)
    return {
        "name": w.name, "node": w.node, "op": w.op, "shape": list(w.shape),
        "reduction_axis": w.reduction_axis, "C": w.reduction_size, "K": w.out_size,
        "group": w.group, "source": w.source, "path": list(w.path),
        "sparsity": round(w.sparsity, 6), "pattern": f"{n}:{m}",
        "pattern_ok": check.holds if check.applicable else None,
        "required": required, "exempt_reason": exempt_reason,
        "bad_groups": check.bad_groups, "groups": check.groups,
        "first_bad_group": check.location, "first_bad_group_nnz": check.location_nnz,
        "best_pattern": best_pattern(w.values, w.reduction_axis),
        "eligible": elig.eligible, "likely_faster": elig.likely_faster,
        "apex_eligible": elig.apex, "reason": elig.reason,
    }


# ----------------------------------------------------------------------------- read-back


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file with its external data. Raises on a missing or unreadable file."""
    return onnx.load(str(path), load_external_data=True)


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """COO sparse tensor (linear [NNZ] or [NNZ, rank] indices) to a dense numpy array."""
    values = numpy_helper.to_array(sp.values).reshape(-1)
    dims = tuple(int(d) for d in sp.dims)
    dense = np.zeros(int(np.prod(dims)) if dims else 1, dtype=values.dtype)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    dense[indices.reshape(-1)] = values
    return dense.reshape(dims)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "sparse_value":
            return sparse_to_dense(attr.sparse_tensor)
        if attr.name == "value_floats":
            return np.asarray(attr.floats, dtype=np.float32)
        if attr.name == "value_float":
            return np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_ints":
            return np.asarray(attr.ints, dtype=np.int64)
        if attr.name == "value_int":
            return np.asarray(attr.i, dtype=np.int64)
    return None


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


@dataclass
class _Resolved:
    values: np.ndarray
    name: str
    source: str
    path: list[str]
    perms: list[tuple[int, ...]]  # Transpose perms met, consumer side first


class _Graph:
    """Index of a graph's constants and producers, to follow a weight back to its storage."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None) -> None:
        graph = model.graph
        self.base_dir = base_dir or ""
        self.inits = {t.name: t for t in graph.initializer}
        self.sparse = {s.values.name: s for s in graph.sparse_initializer}
        self.producers = {out: node for node in graph.node for out in node.output if out}
        self._cache: dict[str, np.ndarray | None] = {}

    def _array(self, name: str) -> tuple[np.ndarray, str] | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name], self.base_dir), "initializer"
        if name in self.sparse:
            return sparse_to_dense(self.sparse[name]), "sparse_initializer"
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and not node.domain:
            value = _constant_value(node)
            if value is not None:
                return value, "constant"
        return None

    def constant(self, name: str, depth: int = 0) -> np.ndarray | None:
        """Value of a constant-foldable tensor through the pass-through ops (used for shapes)."""
        found = self.resolve(name, depth)
        return None if found is None else found.values

    def resolve(self, name: str, depth: int = 0) -> _Resolved | None:
        if not name or depth > 16:
            return None
        direct = self._array(name)
        if direct is not None:
            return _Resolved(direct[0], name, direct[1], [], [])
        node = self.producers.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op in _PASS_THROUGH:
            inner = self.resolve(node.input[0], depth + 1)
            if inner is not None:
                inner.path.insert(0, op)
            return inner
        if op == "Transpose":
            inner = self.resolve(node.input[0], depth + 1)
            if inner is None:
                return None
            perm = tuple(_attr(node, "perm", None) or range(inner.values.ndim - 1, -1, -1))
            # perms are composed consumer side first; record this one at the front
            inner.path.insert(0, op)
            inner.perms.insert(0, perm)
            return inner
        if op == "Reshape":
            inner = self.resolve(node.input[0], depth + 1)
            target = self.constant(node.input[1], depth + 1) if len(node.input) > 1 else None
            if inner is None or target is None or inner.perms:
                return None
            in_shape = _apply_perms(inner.values.shape, inner.perms)
            if _reshape_target(in_shape, target, bool(_attr(node, "allowzero", 0))) != in_shape:
                return None  # only shape-preserving reshapes keep the axes meaningful
            inner.path.insert(0, op)
            return inner
        if op == "DequantizeLinear":
            inner = self.resolve(node.input[0], depth + 1)
            if inner is None or inner.perms:
                return None
            scale = self.constant(node.input[1], depth + 1) if len(node.input) > 1 else None
            zero = self.constant(node.input[2], depth + 1) if len(node.input) > 2 else None
            inner.values = _dequantize(inner.values, scale, zero, int(_attr(node, "axis", 1)))
            inner.path.insert(0, op)
            return inner
        return None


def _apply_perms(shape: tuple[int, ...], perms: list[tuple[int, ...]]) -> tuple[int, ...]:
    for perm in reversed(perms):  # storage side first
        shape = tuple(shape[p] for p in perm)
    return tuple(int(d) for d in shape)


def _reshape_target(shape: tuple[int, ...], target: np.ndarray, allowzero: bool) -> tuple[int, ...]:
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(dims)]
    if out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1])) or 1
        out[out.index(-1)] = int(np.prod(shape)) // known
    return tuple(out)


def _dequantize(q: np.ndarray, scale: np.ndarray | None, zero: np.ndarray | None,
                axis: int) -> np.ndarray:
    """(q - zero_point) * scale with per-tensor or per-axis parameters; zeros stay exact."""
    centered = q.astype(np.int64)
    try:
        if zero is not None:
            centered = centered - _broadcast_axis(zero.astype(np.int64), q.ndim, axis)
        if scale is None:
            return centered.astype(np.float32)
        return (centered * _broadcast_axis(scale.astype(np.float32), q.ndim, axis)).astype(np.float32)
    except ValueError:  # blocked quantization or odd shapes: zeros of (q - zero) still hold
        return centered.astype(np.float32)


def _broadcast_axis(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if param.size == 1:
        return param.reshape(())
    if param.ndim != 1:
        raise ValueError("blocked quantization parameters")
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def _consumer_axes(node: onnx.NodeProto, index: int, rank: int) -> tuple[int, int] | None:
    """(reduction axis, output axis) in the consumer's layout, or None if not a weight input."""
    op = node.op_type
    if op == "Conv" and index == 1 and rank >= 3:
        return 1, 0
    if op == "Gemm" and rank == 2:
        if index == 1:
            return (1, 0) if _attr(node, "transB", 0) else (0, 1)
        if index == 0:
            return (0, 1) if _attr(node, "transA", 0) else (1, 0)
    if op == "MatMul" and rank >= 2:
        if index == 1:
            return rank - 2, rank - 1
        if index == 0:
            return rank - 1, rank - 2
    return None


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


def collect_weights(model: onnx.ModelProto, base_dir: str | None = None) -> list[OnnxWeight]:
    """Every constant weight consumed by a Conv/Gemm/MatMul in the main graph, in node order."""
    g = _Graph(model, base_dir)
    found: list[OnnxWeight] = []
    for idx, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        indices = (1,) if node.op_type == "Conv" else (1, 0)
        for index in indices:
            if index >= len(node.input):
                continue
            res = g.resolve(node.input[index])
            # kind "V" covers ml_dtypes' bfloat16/float8 as onnx returns them
            if res is None or res.values.ndim < 2 or res.values.dtype.kind not in "fiuV":
                continue
            axes = _consumer_axes(node, index, res.values.ndim)
            if axes is None:
                continue
            # consumer axis i is stored axis chain[i]: compose perms, consumer side first
            chain = list(range(res.values.ndim))
            for perm in res.perms:
                chain = [perm[c] for c in chain]
            scope, params = _scope(node)
            found.append(OnnxWeight(
                name=res.name, node=node.name or f"{node.op_type}#{idx}", op=node.op_type,
                node_index=idx, input_index=index, source=res.source, path=tuple(res.path),
                values=res.values, reduction_axis=chain[axes[0]], out_axis=chain[axes[1]],
                consumer_perm=tuple(chain), group=int(_attr(node, "group", 1)) if node.op_type == "Conv" else 1,
                scope=scope, fx_params=params,
            ))
    return found
