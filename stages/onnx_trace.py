"""Follow a tensor of an ONNX graph back to its storage and compute the value the consumer sees.

`GraphIndex.trace(name)` walks from a tensor name to an initializer, a sparse initializer or a
Constant node, through the ops exporters and quantizers put between a weight and its Conv/Gemm/
MatMul: Identity, Cast (applied), Transpose, Reshape/Flatten/Squeeze/Unsqueeze (with constant
shapes), QuantizeLinear and DequantizeLinear (applied, per tensor / per axis / blocked; also in
the com.microsoft domain). The result is in the consumer's layout. Anything else - another op, a
graph input, a Reshape whose shape is computed at run time - raises `Untraceable` with the
reason, so the caller can fail closed instead of skipping the weight.

`GraphIndex.dynamic` holds every tensor that depends on a graph input (or on a random op), which
lets the caller tell an activation operand (attention's K) from a weight it could not trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_values import (
    Tensor,
    UnreadableTensor,
    cast,
    dequantize,
    dtype_kind,
    onnx_np_dtype,
    quantize,
)

MAX_DEPTH = 64
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}
# ops a weight fed at run time typically passes on its way to a MatMul (data input first)
_TRANSPARENT = {"Identity", "Cast", "CastLike", "Transpose", "Reshape", "Flatten", "Squeeze",
                "Unsqueeze", "DequantizeLinear", "QuantizeLinear"}
_ELEMENTWISE = {"Mul", "Div", "Add", "Sub"}


class Untraceable(Exception):
    """The tensor cannot be followed to a constant; `str(exc)` says where and why."""


@dataclass
class Traced:
    tensor: Tensor  # the value as the consumer sees it
    name: str  # stored tensor (initializer, sparse initializer or Constant output)
    source: str  # "initializer", "sparse_initializer" or "constant"
    stored_shape: tuple[int, ...]
    path: list[str] = field(default_factory=list)  # ops between storage and consumer, consumer first


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto) -> str:
    op = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
    return f"{op} node '{node.name}'" if node.name else f"{op} node (unnamed, output '{node.output[0]}')"


def subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read by the nodes of `node`'s subgraphs (outer-scope references)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_refs(inner)
    return names


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _constant_node_value(node: onnx.NodeProto, name: str) -> Tensor | None:
    for a in node.attribute:
        if a.name == "value":
            return Tensor.of(numpy_helper.to_array(a.t))
        if a.name == "sparse_value":
            return Tensor.from_sparse(a.sparse_tensor, name)
        if a.name == "value_floats":
            return Tensor.of(np.asarray(a.floats, dtype=np.float32))
        if a.name == "value_float":
            return Tensor.of(np.asarray(a.f, dtype=np.float32))
        if a.name == "value_ints":
            return Tensor.of(np.asarray(a.ints, dtype=np.int64))
        if a.name == "value_int":
            return Tensor.of(np.asarray(a.i, dtype=np.int64))
    return None


def _reshape_target(shape: tuple[int, ...], target: np.ndarray, allowzero: bool) -> tuple[int, ...]:
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(dims)]
    if out.count(-1) > 1 or any(d < -1 for d in out):
        raise ValueError(f"invalid Reshape target {dims}")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        total = int(np.prod(shape, dtype=np.int64))
        if known == 0 or total % known:
            raise ValueError(f"Reshape target {dims} does not fit shape {list(shape)}")
        out[out.index(-1)] = total // known
    return tuple(out)


class GraphIndex:
    """Index of one graph's constants and producers; traces tensors back to their storage."""

    def __init__(self, graph: onnx.GraphProto, base_dir: str | None = None) -> None:
        self.base_dir = base_dir or ""
        self.inits = {t.name: t for t in graph.initializer}
        self.sparse = {s.values.name: s for s in graph.sparse_initializer}
        self.producers = {out: node for node in graph.node for out in node.output if out}
        self.inputs = {i.name for i in graph.input if i.name not in self.inits
                       and i.name not in self.sparse}
        self.dynamic: set[str] = set(self.inputs)
        for node in graph.node:
            reads = [i for i in node.input if i]
            if has_subgraph(node):
                reads += sorted(subgraph_refs(node))
            if node.op_type in _RANDOM_OPS or any(i in self.dynamic for i in reads):
                self.dynamic.update(o for o in node.output if o)

    # ------------------------------------------------------------------ tracing

    def trace(self, name: str, depth: int = 0) -> Traced:
        """The value of `name` as its consumer sees it, followed back to a constant."""
        if depth > MAX_DEPTH:
            raise Untraceable(f"'{name}': more than {MAX_DEPTH} ops between it and a constant")
        if name in self.inits:
            arr = numpy_helper.to_array(self.inits[name], self.base_dir)
            return Traced(Tensor.of(arr), name, "initializer", tuple(int(d) for d in arr.shape))
        if name in self.sparse:
            t = Tensor.from_sparse(self.sparse[name], name)
            return Traced(t, name, "sparse_initializer", t.shape)
        if name in self.inputs:
            raise Untraceable(f"'{name}' is a graph input (fed at run time), not an initializer "
                              f"or Constant")
        node = self.producers.get(name)
        if node is None:
            raise Untraceable(f"'{name}' has no producer, initializer or Constant in this graph")
        op = node.op_type
        if node.domain not in (_QDQ_DOMAINS if "QuantizeLinear" in op else _DEFAULT_DOMAINS):
            raise Untraceable(f"'{name}' is computed by {node_label(node)}, which inspect does "
                              f"not follow")
        if op == "Constant":
            value = _constant_node_value(node, name)
            if value is None:
                raise Untraceable(f"{node_label(node)} has no value attribute inspect can read")
            return Traced(value, name, "constant", value.shape)
        handler = _HANDLERS.get(op)
        if handler is None:
            inputs = ", ".join(f"'{i}'" for i in node.input if i)
            raise Untraceable(f"'{name}' is computed by {node_label(node)} from {inputs or 'nothing'}, "
                              f"which inspect does not follow")
        inner = self.trace(node.input[0], depth + 1)
        try:
            inner.tensor = handler(self, node, inner.tensor, depth)
        except UnreadableTensor:
            raise  # a malformed or oversized tensor is an unreadable file, not an untraced weight
        except ValueError as exc:
            raise Untraceable(f"{node_label(node)}: {exc}") from exc
        inner.path.insert(0, op)
        return inner

    def constant(self, name: str, depth: int = 0) -> np.ndarray:
        """A small constant input (shape, scale, zero point) as a dense array."""
        return self.trace(name, depth + 1).tensor.to_dense(f"tensor '{name}'")

    def optional(self, node: onnx.NodeProto, index: int, depth: int) -> np.ndarray | None:
        if index < len(node.input) and node.input[index]:
            return self.constant(node.input[index], depth)
        return None

    def fed_from_input(self, name: str, depth: int = 0) -> str | None:
        """The graph input `name` is a plain copy of - through layout, (de)quantization and
        elementwise ops with a constant operand - or None when it is computed from data."""
        if name in self.inputs:
            return name
        node = self.producers.get(name)
        if node is None or depth > MAX_DEPTH or not node.input:
            return None
        if node.op_type in _TRANSPARENT:
            return self.fed_from_input(node.input[0], depth + 1)
        if node.op_type in _ELEMENTWISE and len(node.input) == 2:
            live = [i for i in node.input if i in self.dynamic]
            if len(live) == 1:
                return self.fed_from_input(live[0], depth + 1)
        return None


# ----------------------------------------------------------------------------- op handlers


def _cast(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    dtype = onnx_np_dtype(int(attr(node, "to", 0)))
    saturate = bool(attr(node, "saturate", 1))
    return t.map_values(lambda v: cast(v, dtype, saturate))


def _identity(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    return t


def _transpose(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    perm = attr(node, "perm", None)
    return t.transpose(tuple(int(p) for p in perm) if perm else tuple(range(t.ndim - 1, -1, -1)))


def _shape_input(g: GraphIndex, node: onnx.NodeProto, index: int, depth: int) -> np.ndarray:
    try:
        return g.constant(node.input[index], depth)
    except Untraceable as exc:
        raise ValueError(f"its input '{node.input[index]}' is not a constant ({exc})") from exc


def _reshape(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    if len(node.input) < 2:
        raise ValueError("no shape input")
    target = _shape_input(g, node, 1, depth)
    return t.reshape(_reshape_target(t.shape, target, bool(attr(node, "allowzero", 0))))


def _flatten(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    axis = int(attr(node, "axis", 1)) % (t.ndim + 1) if t.ndim else 0
    head = int(np.prod(t.shape[:axis], dtype=np.int64))
    return t.reshape((head, t.numel // head if head else 0))


def _axes(g: GraphIndex, node: onnx.NodeProto, depth: int) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        return [int(a) for a in _shape_input(g, node, 1, depth).reshape(-1)]
    axes = attr(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]


def _squeeze(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    axes = _axes(g, node, depth)
    drop = {a % t.ndim for a in axes} if axes is not None else {i for i, d in enumerate(t.shape) if d == 1}
    if any(t.shape[a] != 1 for a in drop):
        raise ValueError(f"cannot squeeze axes {sorted(drop)} of shape {list(t.shape)}")
    return t.reshape(tuple(d for i, d in enumerate(t.shape) if i not in drop))


def _unsqueeze(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    axes = _axes(g, node, depth)
    if axes is None:
        raise ValueError("no axes")
    rank = t.ndim + len(axes)
    new = {a % rank for a in axes}
    dims = iter(t.shape)
    return t.reshape(tuple(1 if i in new else next(dims) for i in range(rank)))


def _dequantize(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    scale = g.optional(node, 1, depth)
    if scale is None:
        raise ValueError("no scale input")
    zero = g.optional(node, 2, depth)
    out = int(attr(node, "output_dtype", 0))
    return Tensor.of(dequantize(t.to_dense(f"input of {node_label(node)}"), scale, zero,
                                int(attr(node, "axis", 1)), int(attr(node, "block_size", 0)),
                                onnx_np_dtype(out) if out else None))


def _quantize(g: GraphIndex, node: onnx.NodeProto, t: Tensor, depth: int) -> Tensor:
    scale = g.optional(node, 1, depth)
    if scale is None:
        raise ValueError("no scale input")
    zero = g.optional(node, 2, depth)
    out_attr = int(attr(node, "output_dtype", 0))
    dtype = zero.dtype if zero is not None else (onnx_np_dtype(out_attr) if out_attr else np.dtype(np.uint8))
    if dtype_kind(dtype) not in "fi":
        raise ValueError(f"unsupported output type {dtype}")
    return Tensor.of(quantize(t.to_dense(f"input of {node_label(node)}"), scale, zero,
                              int(attr(node, "axis", 1)), int(attr(node, "block_size", 0)), dtype,
                              bool(attr(node, "saturate", 1))))


_HANDLERS = {
    "Identity": _identity, "Cast": _cast, "Transpose": _transpose, "Reshape": _reshape,
    "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "DequantizeLinear": _dequantize, "QuantizeLinear": _quantize,
}
