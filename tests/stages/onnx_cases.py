"""Hand-built ONNX files for the read-back's adversarial cases (issue 12), shared by the library
tests (tests/stages/test_onnx_readback.py) and the CLI tests (tests/pipeline/test_inspect_cmd.py).

Every builder returns a ModelProto whose weight consumer is the last node. `good=True` gives a
file whose weights the runtime sees as 2:4 along the reduction axis; `good=False` one that breaks
2:4 in the way the case is about (a reader that skips or mis-reads the chain would call it 2:4).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10  # what onnxruntime reads for opset 21


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def keep_mask(shape: tuple[int, ...], axis: int, n: int = 2, m: int = 4, seed: int = 0) -> np.ndarray:
    """Boolean mask keeping exactly n of every m consecutive elements along `axis`."""
    scores = rng(seed).random(shape)
    moved = np.moveaxis(scores, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    rank = np.argsort(np.argsort(groups, axis=-1), axis=-1)
    return np.moveaxis((rank >= m - n).reshape(moved.shape), -1, axis)


def dense(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Nonzero everywhere: |w| in [0.5, 1.5)."""
    r = rng(seed)
    return ((r.random(shape) + 0.5) * r.choice([-1.0, 1.0], size=shape)).astype(np.float32)


def nm_along(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    return np.where(keep_mask(shape, axis, seed=seed), dense(shape, seed + 1), 0.0).astype(np.float32)


def make(nodes: list[onnx.NodeProto], inits=(), sparse=(), inputs=None, ms: bool = False,
         out_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    inputs = inputs if inputs is not None else [helper.make_tensor_value_info("X", out_type, None)]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", out_type, None)],
                              initializer=list(inits), sparse_initializer=list(sparse))
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def gemm(w_name: str = "W") -> onnx.NodeProto:
    return helper.make_node("Gemm", ["X", w_name], ["Y"], name="fc", transB=1)


# ----------------------------------------------------------------------------- QDQ chains


def qdq(good: bool, dq_zero: int = 3) -> onnx.ModelProto:
    """W (fp32, [out 16, in 32]) -> QuantizeLinear -> DequantizeLinear -> Gemm(transB=1).
    Per output channel scale and int8 zero point 3; `dq_zero` != 3 breaks the zeros."""
    w = nm_along((16, 32), 1) if good else dense((16, 32))
    scale = (np.abs(w).max(axis=1) / 100).astype(np.float32)
    inits = [init("W", w), init("s", scale), init("zq", np.full(16, 3, np.int8)),
             init("zd", np.full(16, dq_zero, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["W", "s", "zq"], ["Wq"], axis=0, name="q"),
             helper.make_node("DequantizeLinear", ["Wq", "s", "zd"], ["Wdq"], axis=0, name="dq"),
             gemm("Wdq")]
    return make(nodes, inits)


def qdq_rounds_to_zero() -> onnx.ModelProto:
    """Dense fp32 W whose 'pruned' half is below scale/2: it quantizes to the zero point, so the
    runtime weight is 2:4 although the stored float tensor has no zeros."""
    big = nm_along((16, 32), 1)
    w = np.where(big != 0, big, 1e-4).astype(np.float32)
    inits = [init("W", w), init("s", np.float32(0.01)), init("z", np.int8(-5))]
    nodes = [helper.make_node("QuantizeLinear", ["W", "s", "z"], ["Wq"], name="q"),
             helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wdq"], name="dq"), gemm("Wdq")]
    return make(nodes, inits)


def transpose_dq(good: bool) -> onnx.ModelProto:
    """int8 stored [C 32, K 16] -> Transpose -> DequantizeLinear(axis 0, per K) -> Gemm(transB=1):
    good is 2:4 along C (the stored axis 0); bad is 2:4 along K."""
    zp = np.arange(16, dtype=np.int8) - 4  # per output channel, includes 0 and negatives
    mask = keep_mask((16, 32), 1) if good else keep_mask((16, 32), 0)
    vals = rng(3).integers(20, 100, size=(16, 32)).astype(np.int8)
    q = np.where(mask, vals, zp[:, None]).astype(np.int8)
    inits = [init("Wt", np.ascontiguousarray(q.T)), init("s", np.full(16, 0.02, np.float32)),
             init("z", zp)]
    nodes = [helper.make_node("Transpose", ["Wt"], ["Wq"], perm=[1, 0], name="t"),
             helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wdq"], axis=0, name="dq"),
             gemm("Wdq")]
    return make(nodes, inits)


def blocked_uint4(good: bool) -> onnx.ModelProto:
    """uint4 [K 16, C 64], blocks of 32 along C, zero point 8 everywhere: good stores 8 where
    pruned (a runtime zero), bad stores 0 there ((0 - 8) * scale is not zero)."""
    mask = keep_mask((16, 64), 1)
    kept = rng(4).choice([v for v in range(16) if v != 8], size=(16, 64))
    q = np.where(mask, kept, 8 if good else 0)
    inits = [init("Wq", q.astype(ml_dtypes.uint4)),
             init("s", (rng(5).random((16, 2)) + 0.5).astype(np.float32)),
             init("z", np.full((16, 2), 8).astype(ml_dtypes.uint4))]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wdq"], axis=1, block_size=32,
                              name="dq"), gemm("Wdq")]
    return make(nodes, inits)


def fp8(good: bool) -> onnx.ModelProto:
    """float8e4m3fn weight with |values| < 1 -> DequantizeLinear -> Gemm: a reader that truncates
    FP8 to integers sees only zeros; good is 2:4 (50% zeros), bad is dense (no zeros)."""
    w = (rng(6).random((16, 32)) * 0.8 + 0.1).astype(np.float32)
    if good:
        w = np.where(keep_mask((16, 32), 1), w, 0.0).astype(np.float32)
    inits = [init("Wq", w.astype(ml_dtypes.float8_e4m3fn)), init("s", np.float32(0.5)),
             init("z", np.zeros((), ml_dtypes.float8_e4m3fn))]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wdq"], name="dq"), gemm("Wdq")]
    return make(nodes, inits)


# ----------------------------------------------------------------------------- layout chains


def reshape(good: bool) -> onnx.ModelProto:
    """Conv weight stored flat [K 8, C*kh*kw 144] -> Reshape([8, 16, 3, 3]) -> Conv: good is 2:4
    along C; bad is 2:4 in the flat memory order (along the kernel, not C)."""
    w4 = nm_along((8, 16, 3, 3), 1)
    flat = w4.reshape(8, 144) if good else nm_along((8, 144), 1)
    inits = [init("Wflat", flat), init("shape", np.array([8, 16, 3, 3], np.int64))]
    nodes = [helper.make_node("Reshape", ["Wflat", "shape"], ["W"], name="r"),
             helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=[1, 1, 1, 1])]
    return make(nodes, inits)


def reshape_dynamic() -> onnx.ModelProto:
    """Reshape whose target shape is computed from the input at run time: untraceable."""
    inits = [init("Wflat", nm_along((8, 144), 1))]
    nodes = [helper.make_node("Shape", ["X"], ["xs"], name="shape_of_x"),
             helper.make_node("Reshape", ["Wflat", "xs"], ["W"], name="r"),
             helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")]
    return make(nodes, inits)


def fused_conv(good: bool) -> onnx.ModelProto:
    """com.microsoft FusedConv (what ORT's extended optimisation writes), same layout as Conv."""
    w = nm_along((16, 32, 3, 3), 1) if good else nm_along((16, 32, 3, 3), 0)
    node = helper.make_node("FusedConv", ["X", "W", "B"], ["Y"], name="fused", domain="com.microsoft",
                            activation="Relu", pads=[1, 1, 1, 1])
    return make([node], [init("W", w), init("B", np.zeros(16, np.float32))], ms=True)


def constant_node(good: bool) -> onnx.ModelProto:
    w = nm_along((16, 32, 1, 1), 1) if good else dense((16, 32, 1, 1))
    nodes = [helper.make_node("Constant", [], ["W"], value=init("Wc", w), name="const"),
             helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")]
    return make(nodes)


def cast_fp16(good: bool) -> onnx.ModelProto:
    """fp32 W -> Cast(fp16) -> Gemm: good's pruned half is 1e-9 (underflows to 0 in fp16), bad's
    is 1e-3 (representable in fp16, so not zero)."""
    big = nm_along((16, 32), 1)
    w = np.where(big != 0, big, 1e-9 if good else 1e-3).astype(np.float32)
    nodes = [helper.make_node("Cast", ["W"], ["W16"], to=TensorProto.FLOAT16, name="cast"), gemm("W16")]
    return make(nodes, [init("W", w)], out_type=TensorProto.FLOAT16)


def bf16(good: bool) -> onnx.ModelProto:
    """bfloat16 weight: good is 2:4; bad's pruned half is 1e-30 (a bf16 normal, not zero)."""
    big = nm_along((16, 32), 1)
    w = np.where(big != 0, big, 0.0 if good else 1e-30).astype(np.float32)
    return make([gemm()], [init("W", w.astype(ml_dtypes.bfloat16))], out_type=TensorProto.BFLOAT16)


def matmul_rank3(good: bool) -> onnx.ModelProto:
    """MatMul with a constant rank-3 B [batch 4, K 32, N 16]: N:M belongs on K (axis 1); bad is 2:4
    along the batch axis only."""
    b = nm_along((4, 32, 16), 1) if good else nm_along((4, 32, 16), 0)
    return make([helper.make_node("MatMul", ["X", "B"], ["Y"], name="bmm")], [init("B", b)])


def conv_integer(good: bool) -> onnx.ModelProto:
    """ConvInteger with a per-output-channel weight zero point 7: zero where W == 7."""
    mask = keep_mask((16, 32, 1, 1), 1)
    vals = rng(8).integers(8, 255, size=(16, 32, 1, 1))
    w = np.where(mask, vals, 7 if good else 0).astype(np.uint8)
    inits = [init("W", w), init("xz", np.uint8(128)), init("wz", np.full(16, 7, np.uint8))]
    node = helper.make_node("ConvInteger", ["X", "W", "xz", "wz"], ["Y"], name="convint")
    return make([node], inits, inputs=[helper.make_tensor_value_info("X", TensorProto.UINT8, None)],
                out_type=TensorProto.INT32)


# ----------------------------------------------------------------------------- fail closed


def mul_by_one() -> onnx.ModelProto:
    """W reaches the Gemm through Mul(W, 1): a constant inspect does not evaluate."""
    nodes = [helper.make_node("Mul", ["W", "one"], ["Wm"], name="times_one"), gemm("Wm")]
    return make(nodes, [init("W", dense((16, 32))), init("one", np.float32(1.0))])


def graph_input_weight() -> onnx.ModelProto:
    """The Gemm weight is a graph input: fed at run time, nothing in the file to check."""
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [16, 32])]
    return make([gemm()], inputs=inputs)


def no_weights() -> onnx.ModelProto:
    return make([helper.make_node("Relu", ["X"], ["Y"], name="relu")])


def stem_only() -> onnx.ModelProto:
    """One RGB stem Conv (C=3): exempt from 2:4, so nothing can be checked."""
    return make([helper.make_node("Conv", ["X", "W"], ["Y"], name="stem")],
                [init("W", dense((16, 3, 3, 3)))])


def attention_like() -> onnx.ModelProto:
    """Q = X Wq, K = X Wk, S = Q K^T: Wq and Wk are weights, K^T is an activation operand."""
    inits = [init("Wq", nm_along((32, 16), 0)), init("Wk", nm_along((32, 16), 0, seed=3))]
    nodes = [helper.make_node("MatMul", ["X", "Wq"], ["Q"], name="q_proj"),
             helper.make_node("MatMul", ["X", "Wk"], ["K"], name="k_proj"),
             helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["Q", "Kt"], ["Y"], name="scores")]
    return make(nodes, inits)


def conv_in_if_body() -> onnx.ModelProto:
    """A Conv inside an If branch: subgraphs are not read, so its weight is untraced."""
    body_conv = helper.make_node("Conv", ["X", "Wb"], ["Yb"], name="branch_conv")
    branch = helper.make_graph([body_conv], "branch", [],
                               [helper.make_tensor_value_info("Yb", TensorProto.FLOAT, None)],
                               initializer=[init("Wb", dense((16, 32, 1, 1)))])
    nodes = [helper.make_node("If", ["cond"], ["Y"], name="choose", then_branch=branch,
                              else_branch=branch)]
    return make(nodes, [init("cond", np.array(True))])


def contrib_contraction() -> onnx.ModelProto:
    """A com.microsoft contraction inspect does not read (MatMulNBits): untraced, not skipped."""
    node = helper.make_node("MatMulNBits", ["X", "Wq", "s"], ["Y"], name="mmnb", domain="com.microsoft",
                            K=32, N=16, bits=4, block_size=32)
    inits = [init("Wq", rng(9).integers(0, 255, size=(16, 1, 16)).astype(np.uint8)),
             init("s", np.ones(16, np.float32))]
    return make([node], inits, ms=True)


# ----------------------------------------------------------------------------- bounded work

HUGE_SHAPE = (32768, 16384)  # 2**29 float32 elements: 2 GiB dense


def huge_sparse(good: bool, quantized: bool = False) -> onnx.ModelProto:
    """A sparse initializer declaring a 2 GiB dense [32768, 16384] weight with a few values.
    good: at most 2 nonzeros per group of 4 along axis 1; bad: 3 in the group [5, 0:4].
    quantized: the int8 sparse tensor goes through DequantizeLinear with zero point 1 (every
    implicit zero becomes nonzero), which needs the dense tensor: refused as oversized."""
    cols = [0, 1, 100, 16383] if good else [0, 1, 2, 100]
    idx = np.array([5 * HUGE_SHAPE[1] + c for c in cols] + [HUGE_SHAPE[1] * 32767], np.int64)
    vals = np.array([1.0, -2.0, 3.0, 4.0, 5.0], np.float32)
    if quantized:
        vals = vals.astype(np.int8)
    sp = helper.make_sparse_tensor(init("Ws", vals), init("Ws_idx", idx), list(HUGE_SHAPE))
    if not quantized:
        return make([gemm("Ws")], sparse=[sp])
    nodes = [helper.make_node("DequantizeLinear", ["Ws", "s", "z"], ["Wdq"], name="dq"), gemm("Wdq")]
    return make(nodes, [init("s", np.float32(0.1)), init("z", np.int8(1))], sparse=[sp])


GOOD_BAD = {
    "qdq": qdq, "transpose_dq": transpose_dq, "blocked_uint4": blocked_uint4, "fp8": fp8,
    "reshape": reshape, "fused_conv": fused_conv, "constant": constant_node, "cast_fp16": cast_fp16,
    "bf16": bf16, "matmul_rank3": matmul_rank3, "conv_integer": conv_integer,
    "huge_sparse": huge_sparse,
}
UNTRACED = {  # case -> the weight name the failure must name
    "mul_by_one": (mul_by_one, "Wm"), "graph_input": (graph_input_weight, "W"),
    "reshape_dynamic": (reshape_dynamic, "W"), "if_body": (conv_in_if_body, "Wb"),
    "contrib": (contrib_contraction, "Wq"),
}
