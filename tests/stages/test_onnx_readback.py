"""The read-back on hand-built adversarial ONNX files (issue 12): chains it must follow and compute
as the runtime does (checked bit for bit against onnxruntime), inputs it must report as untraced,
and sparse initializers it must handle without densifying."""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.onnx_sparsity import (
    OversizedTensor,
    UnreadableTensor,
    collect_weights,
    scan_weights,
    weight_report,
)
from stages.onnx_values import Tensor, check_nm, numeric
from tests.stages import onnx_cases as cases


def only(model: onnx.ModelProto):
    scan = scan_weights(model)
    assert scan.untraced == [] and len(scan.weights) == 1
    return scan.weights[0]


@pytest.mark.parametrize("case", sorted(cases.GOOD_BAD))
def test_good_holds_2_4_and_bad_does_not(case):
    build = cases.GOOD_BAD[case]
    good, bad = only(build(True)), only(build(False))
    assert weight_report(good, (2, 4))["pattern_ok"] is True
    assert weight_report(bad, (2, 4))["pattern_ok"] is False
    assert good.reduction_size % 4 == 0 and good.shape == bad.shape


EXPECT = {  # case -> (op, consumer-layout shape, reduction axis, path, sparsity of good, of bad)
    "qdq": ("Gemm", (16, 32), 1, ("DequantizeLinear", "QuantizeLinear"), 0.5, 0.0),
    "transpose_dq": ("Gemm", (16, 32), 1, ("DequantizeLinear", "Transpose"), 0.5, 0.5),
    "blocked_uint4": ("Gemm", (16, 64), 1, ("DequantizeLinear",), 0.5, 0.0),
    "fp8": ("Gemm", (16, 32), 1, ("DequantizeLinear",), 0.5, 0.0),
    "reshape": ("Conv", (8, 16, 3, 3), 1, ("Reshape",), 0.5, 0.5),
    "fused_conv": ("FusedConv", (16, 32, 3, 3), 1, (), 0.5, 0.5),
    "constant": ("Conv", (16, 32, 1, 1), 1, (), 0.5, 0.0),
    "cast_fp16": ("Gemm", (16, 32), 1, ("Cast",), 0.5, 0.0),
    "bf16": ("Gemm", (16, 32), 1, (), 0.5, 0.0),
    "matmul_rank3": ("MatMul", (4, 32, 16), 1, (), 0.5, 0.5),
    "conv_integer": ("ConvInteger", (16, 32, 1, 1), 1, ("ConvInteger zero point",), 0.5, 0.0),
}


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_op_shape_axis_path_and_sparsity(case):
    op, shape, axis, path, sp_good, sp_bad = EXPECT[case]
    good, bad = only(cases.GOOD_BAD[case](True)), only(cases.GOOD_BAD[case](False))
    assert (good.op, good.shape, good.reduction_axis, good.path) == (op, shape, axis, path)
    assert good.sparsity == pytest.approx(sp_good) and bad.sparsity == pytest.approx(sp_bad)


def _ort_weight(model: onnx.ModelProto, elem: int) -> np.ndarray:
    """What onnxruntime computes for the consumer's weight input (every node but the consumer)."""
    name = model.graph.node[-1].input[1]
    graph = helper.make_graph(list(model.graph.node[:-1]), "w", [],
                              [helper.make_tensor_value_info(name, elem, None)],
                              initializer=list(model.graph.initializer))
    m = helper.make_model(graph, opset_imports=model.opset_import, ir_version=cases.IR_VERSION)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


@pytest.mark.parametrize("name, build, elem", [
    ("qdq good", lambda: cases.qdq(True), TensorProto.FLOAT),
    ("qdq bad", lambda: cases.qdq(False), TensorProto.FLOAT),
    ("qdq zero point mismatch", lambda: cases.qdq(True, dq_zero=0), TensorProto.FLOAT),
    ("qdq rounds to zero point", cases.qdq_rounds_to_zero, TensorProto.FLOAT),
    ("transpose -> dq", lambda: cases.transpose_dq(True), TensorProto.FLOAT),
    ("blocked uint4 good", lambda: cases.blocked_uint4(True), TensorProto.FLOAT),
    ("blocked uint4 bad", lambda: cases.blocked_uint4(False), TensorProto.FLOAT),
    ("fp8 good", lambda: cases.fp8(True), TensorProto.FLOAT),
    ("fp8 dense", lambda: cases.fp8(False), TensorProto.FLOAT),
    ("cast underflow", lambda: cases.cast_fp16(True), TensorProto.FLOAT16),
    ("cast no underflow", lambda: cases.cast_fp16(False), TensorProto.FLOAT16),
    ("shape-changing reshape", lambda: cases.reshape(False), TensorProto.FLOAT),
])
def test_values_equal_what_onnxruntime_computes(name, build, elem):
    model = build()
    w = only(model)
    expected = numeric(_ort_weight(model, elem))
    assert expected.shape == w.shape
    np.testing.assert_array_equal(w.values, expected)  # bit for bit, zeros included


def test_quantization_zeros_follow_the_runtime_not_the_stored_floats():
    # stored fp32 has no zeros, but half of it quantizes to the zero point: the runtime sees 2:4
    w = only(cases.qdq_rounds_to_zero())
    assert w.sparsity == pytest.approx(0.5) and w.check(2, 4).holds
    # a DequantizeLinear zero point that differs from the QuantizeLinear one: no zeros survive
    w = only(cases.qdq(True, dq_zero=0))
    assert w.sparsity == 0.0 and not w.check(2, 4).holds


def test_fp8_is_decoded_as_floats_not_truncated():
    w = only(cases.fp8(False))
    assert w.sparsity == 0.0 and float(np.abs(w.values).min()) > 0.04  # 0.1 * scale 0.5, rounded
    assert w.values.dtype == np.float32


def test_cast_and_bf16_dtypes_are_reported():
    assert only(cases.cast_fp16(True)).dtype == "float16"
    assert only(cases.bf16(True)).dtype == "bfloat16"
    assert only(cases.fp8(True)).dtype == "float32"  # DequantizeLinear's output type


def test_rank3_matmul_checks_k_not_the_batch_axis():
    bad = only(cases.matmul_rank3(False))
    assert bad.reduction_axis == 1 and bad.out_axis == 2
    assert check_nm(bad.values, 0, 2, 4).holds  # 2:4 along the batch axis ...
    assert not bad.check(2, 4).holds  # ... is not what a sparse kernel needs


@pytest.mark.parametrize("case", sorted(cases.UNTRACED))
def test_untraceable_weights_are_reported_not_dropped(case):
    build, name = cases.UNTRACED[case]
    scan = scan_weights(build())
    assert scan.weights == [] and len(scan.untraced) >= 1
    assert {u.name for u in scan.untraced} == {name}
    assert all(u.reason for u in scan.untraced)


def test_untraced_reasons_name_the_cause():
    mul = scan_weights(cases.mul_by_one()).untraced[0]
    assert "Mul node 'times_one'" in mul.reason and "'W'" in mul.reason
    gi = scan_weights(cases.graph_input_weight()).untraced[0]
    assert "graph input" in gi.reason
    dyn = scan_weights(cases.reshape_dynamic()).untraced[0]
    assert "Reshape node 'r'" in dyn.reason and "Shape node" in dyn.reason
    body = scan_weights(cases.conv_in_if_body()).untraced
    assert {u.reason.split(" of ")[0] for u in body} == {"inside the then_branch", "inside the else_branch"}


def test_activation_operand_is_not_a_weight():
    scan = scan_weights(cases.attention_like())
    assert [w.name for w in scan.weights] == ["Wq", "Wk"] and scan.untraced == []
    assert scan.activation_operands == 1  # K^T in Q K^T


def test_matmul_weight_fed_from_graph_input_through_transpose_is_untraced():
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
              helper.make_tensor_value_info("Wt", TensorProto.FLOAT, [16, 32])]
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")]
    scan = scan_weights(cases.make(nodes, inputs=inputs))
    assert [u.name for u in scan.untraced] == ["W"] and "'Wt'" in scan.untraced[0].reason


def test_no_weights_and_exempt_only():
    assert scan_weights(cases.no_weights()).weights == []
    stem = only(cases.stem_only())
    assert weight_report(stem, (2, 4))["required"] is False


def test_not_inspected_ops_are_listed():
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up")
    scan = scan_weights(cases.make([node], [cases.init("W", cases.dense((8, 8, 2, 2)))]))
    assert scan.weights == [] and scan.untraced == [] and "ConvTranspose node 'up'" in scan.not_inspected[0]


# ----------------------------------------------------------------------------- bounded work


def test_huge_sparse_initializer_is_checked_without_densifying():
    model = cases.huge_sparse(True)
    assert len(model.SerializeToString()) < 400
    tracemalloc.start()
    start = time.perf_counter()
    good = only(model)
    rep = weight_report(good, (2, 4))
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert good.tensor.is_sparse and good.shape == cases.HUGE_SHAPE
    assert rep["pattern_ok"] is True and rep["numel"] == 2 ** 29 and rep["zeros"] == 2 ** 29 - 5
    assert rep["groups"] == 2 ** 27 and rep["best_pattern"] == "2:8"  # cols 0 and 1 share a group
    assert peak < 16 * 2 ** 20, f"peak {peak} bytes"  # 2 GiB dense would be 2 ** 31
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    bad = weight_report(only(cases.huge_sparse(False)), (2, 4))
    assert bad["pattern_ok"] is False and bad["bad_groups"] == 1
    assert bad["first_bad_group"] == "[5, 0:4]" and bad["first_bad_group_nnz"] == 3


def test_huge_sparse_behind_dequantize_is_refused_as_oversized():
    start = time.perf_counter()
    with pytest.raises(OversizedTensor, match="densified; the limit is"):
        scan_weights(cases.huge_sparse(True, quantized=True))
    assert time.perf_counter() - start < 2.0


def test_malformed_sparse_initializers_are_unreadable():
    def sparse_model(idx, dims=(4, 4)):
        sp = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(len(idx), np.float32), "W"),
                                       numpy_helper.from_array(np.asarray(idx, np.int64), "W_i"), list(dims))
        return cases.make([cases.gemm()], sparse=[sp])

    with pytest.raises(UnreadableTensor, match="repeated indices"):
        collect_weights(sparse_model([1, 1]))
    with pytest.raises(UnreadableTensor, match="outside shape"):
        collect_weights(sparse_model([16]))
    with pytest.raises(OversizedTensor):
        collect_weights(sparse_model([0], dims=(2 ** 40, 2 ** 40)))


@pytest.mark.parametrize("seed", range(4))
def test_sparse_and_dense_checks_agree_after_transpose_and_reshape(seed):
    r = np.random.default_rng(seed)
    dense = np.where(r.random((8, 12, 2, 4)) < 0.35, r.standard_normal((8, 12, 2, 4)), 0.0)
    idx = np.flatnonzero(dense)
    coo = Tensor(dense.shape, indices=idx, nz=dense.reshape(-1)[idx])
    for perm in [(0, 1, 2, 3), (1, 0, 3, 2), (3, 2, 1, 0)]:
        t, d = coo.transpose(perm), np.transpose(dense, perm)
        np.testing.assert_array_equal(t.to_dense(), d)
        for axis in range(4):
            for n, m in [(2, 4), (1, 2), (1, 4)]:
                assert t.check_nm(axis, n, m) == check_nm(d, axis, n, m)
    flat = coo.reshape((8, 96))
    assert flat.check_nm(1, 2, 4) == check_nm(dense.reshape(8, 96), 1, 2, 4)
    assert coo.sparsity() == pytest.approx(1 - np.count_nonzero(dense) / dense.size)


def test_com_microsoft_fused_gemm_and_matmul_with_transposed_b():
    w = cases.nm_along((16, 32), 1)  # [N, K]: 2:4 along K
    gemm = helper.make_node("FusedGemm", ["X", "W"], ["Y"], name="fg", domain="com.microsoft", transB=1)
    got = only(cases.make([gemm], [cases.init("W", w)], ms=True))
    assert (got.op, got.reduction_axis) == ("FusedGemm", 1) and got.check(2, 4).holds
    mm = helper.make_node("FusedMatMul", ["X", "W"], ["Y"], name="fmm", domain="com.microsoft", transB=1)
    got = only(cases.make([mm], [cases.init("W", w)], ms=True))
    assert (got.op, got.reduction_axis, got.out_axis) == ("FusedMatMul", 1, 0) and got.check(2, 4).holds
    mm_k_n = helper.make_node("FusedMatMul", ["X", "W"], ["Y"], name="fmm", domain="com.microsoft")
    assert not only(cases.make([mm_k_n], [cases.init("W", w)], ms=True)).check(2, 4).holds
    batch = helper.make_node("FusedMatMul", ["X", "W"], ["Y"], name="fmm", domain="com.microsoft",
                             transBatchB=1)
    scan = scan_weights(cases.make([batch], [cases.init("W", w)], ms=True))
    assert scan.weights == [] and "transBatchB=1" in scan.untraced[0].reason


def test_qlinear_matmul_zero_point_per_column():
    zp = np.arange(16, dtype=np.int8) - 8  # per column N of B [K 32, N 16]
    mask = cases.keep_mask((32, 16), 0)
    b = np.where(mask, 100, zp[None, :]).astype(np.int8)
    names = ["X", "xs", "xz", "B", "bs", "bz", "ys", "yz"]
    inits = [cases.init("xs", np.float32(0.1)), cases.init("xz", np.int8(0)), cases.init("B", b),
             cases.init("bs", np.full(16, 0.1, np.float32)), cases.init("bz", zp),
             cases.init("ys", np.float32(0.1)), cases.init("yz", np.int8(0))]
    node = helper.make_node("QLinearMatMul", names, ["Y"], name="qmm")
    got = only(cases.make([node], inits))
    assert (got.reduction_axis, got.path) == (0, ("QLinearMatMul zero point",))
    assert got.sparsity == pytest.approx(0.5) and got.check(2, 4).holds
