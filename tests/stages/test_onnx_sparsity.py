"""Read-back of weights and N:M compliance from hand-made ONNX graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.onnx_sparsity import (
    OnnxWeight,
    best_pattern,
    check_nm,
    collect_weights,
    eligibility,
    must_hold,
    sparse_to_dense,
    weight_report,
)

RNG = np.random.default_rng(0)


def nm_along(shape: tuple[int, ...], axis: int, n: int = 2, m: int = 4) -> np.ndarray:
    """Random weight that is exactly n:m along `axis` (largest |w| kept, others zeroed)."""
    w = RNG.standard_normal(shape).astype(np.float32) + 0.1
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m).copy()
    order = np.argsort(np.abs(groups), axis=-1)
    np.put_along_axis(groups, order[..., : m - n], 0.0, axis=-1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def model_of(nodes, inputs, outputs, inits=(), sparse=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits),
                              sparse_initializer=list(sparse))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def vi(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def conv_model(w: np.ndarray, group: int = 1) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="conv0", group=group)
    return model_of([node], [vi("X", None)], [vi("Y", None)], [numpy_helper.from_array(w, "W")])


def gemm_model(w: np.ndarray, trans_b: int) -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="fc", transB=trans_b)
    return model_of([node], [vi("X", None)], [vi("Y", None)], [numpy_helper.from_array(w, "W")])


def only(model: onnx.ModelProto) -> OnnxWeight:
    weights = collect_weights(model)
    assert len(weights) == 1
    return weights[0]


def test_conv_2_4_along_input_channels_holds():
    w = only(conv_model(nm_along((16, 8, 3, 3), axis=1)))
    assert (w.op, w.node, w.reduction_axis, w.out_axis) == ("Conv", "conv0", 1, 0)
    rep = weight_report(w, (2, 4))
    assert rep["pattern_ok"] is True and rep["bad_groups"] == 0 and rep["best_pattern"] == "2:4"
    assert rep["sparsity"] == pytest.approx(0.5)
    assert rep["eligible"] and rep["required"]


def test_conv_2_4_only_along_kernel_width_fails():
    # memory-order grouping (the classic mistake): 2 of every 4 kernel-width taps kept
    raw = (RNG.standard_normal((8, 8, 1, 4)) + 3).astype(np.float32) * np.array([1, 1, 0, 0], np.float32)
    w = only(conv_model(raw))
    assert check_nm(raw, 3, 2, 4).holds  # it is "2:4" along the kernel width ...
    rep = weight_report(w, (2, 4))
    assert rep["pattern_ok"] is False  # ... but not along C, which is what the hardware needs
    assert rep["first_bad_group"] == "[0, 0:4, 0, 0]" and rep["first_bad_group_nnz"] == 4


def test_gemm_trans_b_1_and_0():
    w_out_in = nm_along((16, 32), axis=1)  # nn.Linear layout [out, in]
    ok = only(gemm_model(w_out_in, trans_b=1))
    assert ok.reduction_axis == 1 and check_nm(ok.values, ok.reduction_axis, 2, 4).holds
    # the same tensor read as B [K, N] (transB=0) reduces over axis 0: the pattern is wrong there
    w_rows = nm_along((32, 16), axis=1)
    wrong = only(gemm_model(w_rows, trans_b=0))
    assert wrong.reduction_axis == 0 and weight_report(wrong)["pattern_ok"] is False
    right = only(gemm_model(nm_along((32, 16), axis=0), trans_b=0))
    assert right.reduction_axis == 0 and weight_report(right)["pattern_ok"] is True
    # a [N, K] weight with transB=1 but 2:4 along axis 0 fails
    bad = only(gemm_model(nm_along((16, 32), axis=0), trans_b=1))
    assert weight_report(bad)["pattern_ok"] is False


def test_matmul_constant_b_and_a():
    b = nm_along((32, 16), axis=0)  # [K, N] as nn.Linear on 3-D input exports
    node = helper.make_node("MatMul", ["X", "B"], ["Y"], name="mm")
    w = only(model_of([node], [vi("X", None)], [vi("Y", None)], [numpy_helper.from_array(b, "B")]))
    assert (w.input_index, w.reduction_axis, w.reduction_size, w.out_size) == (1, 0, 32, 16)
    assert weight_report(w)["pattern_ok"] is True
    np.testing.assert_array_equal(w.torch_layout(), b.T)
    a = nm_along((16, 32), axis=1)  # constant A [M, K] reduces over axis 1
    node = helper.make_node("MatMul", ["A", "X"], ["Y"], name="mm_a")
    wa = only(model_of([node], [vi("X", None)], [vi("Y", None)], [numpy_helper.from_array(a, "A")]))
    assert (wa.input_index, wa.reduction_axis) == (0, 1) and weight_report(wa)["pattern_ok"]


def test_weight_behind_transpose_cast_and_constant():
    stored = nm_along((16, 32), axis=1).astype(np.float16)  # [out, in] stored, fp16
    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(stored, "Wc")),
        helper.make_node("Cast", ["Wc"], ["Wf"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["Wf"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "Wt"], ["Y"], name="mm"),
    ]
    w = only(model_of(nodes, [vi("X", None)], [vi("Y", None)]))
    assert w.source == "constant" and w.path == ("Transpose", "Cast") and w.name == "Wc"
    # values and axes in the consumer's layout: MatMul B [K=32, N=16] reduces over axis 0
    assert w.reduction_axis == 0 and w.shape == (32, 16) and w.stored_shape == (16, 32)
    assert w.dtype == "float32" and weight_report(w)["pattern_ok"] is True
    np.testing.assert_array_equal(w.torch_layout(), stored)


def test_conv_weight_behind_4d_transpose():
    torch_w = nm_along((8, 16, 3, 3), axis=1)
    stored = torch_w.transpose(0, 2, 3, 1)  # [K, kh, kw, C] in storage
    nodes = [helper.make_node("Transpose", ["S"], ["W"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")]
    w = only(model_of(nodes, [vi("X", None)], [vi("Y", None)], [numpy_helper.from_array(stored, "S")]))
    assert w.reduction_axis == 1 and w.reduction_size == 16 and w.out_axis == 0
    assert w.shape == (8, 16, 3, 3) and w.stored_shape == (8, 3, 3, 16)
    assert weight_report(w)["pattern_ok"] is True
    np.testing.assert_array_equal(w.torch_layout(), torch_w)


def test_weight_behind_dequantize_linear():
    mask = nm_along((16, 32), axis=1) != 0
    zp = np.full((16,), 3, dtype=np.int8)
    q = RNG.integers(4, 100, size=(16, 32)).astype(np.int8)  # never equal to the zero point
    q = np.where(mask, q, zp[:, None]).astype(np.int8)  # zero weight <=> q == zero point
    inits = [numpy_helper.from_array(q, "Wq"),
             numpy_helper.from_array(np.full((16,), 0.05, np.float32), "s"),
             numpy_helper.from_array(zp, "z")]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], axis=0),
             helper.make_node("Gemm", ["X", "W"], ["Y"], name="qfc", transB=1)]
    w = only(model_of(nodes, [vi("X", None)], [vi("Y", None)], inits))
    assert w.path == ("DequantizeLinear",) and w.name == "Wq"
    assert np.count_nonzero(q) == q.size  # the raw int8 tensor has no zeros at all ...
    assert w.sparsity == pytest.approx(0.5)  # ... the dequantized weight is 50% zeros
    assert weight_report(w)["pattern_ok"] is True


def test_single_bad_group_detected_and_located():
    raw = nm_along((32, 64, 3, 3), axis=1)
    zero_pos = np.flatnonzero(raw[5, 8:12, 1, 2] == 0)[0]
    raw[5, 8 + zero_pos, 1, 2] = 0.7  # one group now has 3 nonzeros
    check = check_nm(raw, 1, 2, 4)
    assert not check.holds and check.bad_groups == 1 and check.groups == 32 * 16 * 9
    assert check.location == "[5, 8:12, 1, 2]" and check.location_nnz == 3
    rep = weight_report(only(conv_model(raw)))
    assert rep["pattern_ok"] is False and rep["first_bad_group"] == "[5, 8:12, 1, 2]"


def test_grouped_conv_and_rgb_stem_are_ineligible():
    grouped = only(conv_model(nm_along((64, 4, 3, 3), axis=1), group=32))
    elig = eligibility(grouped)
    assert not elig.eligible and "grouped conv (group=32)" in elig.reason
    assert must_hold(grouped, 4) == (False, "grouped conv (group=32)")
    stem = only(conv_model(RNG.standard_normal((64, 3, 7, 7)).astype(np.float32)))
    elig = eligibility(stem)
    assert not elig.eligible and elig.reason == "C=3 not divisible by 4"
    assert weight_report(stem)["pattern_ok"] is None and not must_hold(stem, 4)[0]


def test_eligibility_tiny_vs_large_and_apex():
    small = eligibility(only(gemm_model(nm_along((10, 32), axis=1), trans_b=1)))
    assert small.eligible and not small.likely_faster and "too small to gain" in small.reason
    assert not small.apex  # K=10 is not a multiple of 8
    big = eligibility(only(gemm_model(nm_along((256, 512), axis=1), trans_b=1)))
    assert big.eligible and big.likely_faster and big.apex and big.reason == ""


def test_sparse_initializer_and_trivial_reshape():
    w = nm_along((16, 32), axis=1)
    idx = np.flatnonzero(w)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(w.reshape(-1)[idx], "Ws"),
                                   numpy_helper.from_array(idx.astype(np.int64), "Ws_idx"), [16, 32])
    np.testing.assert_array_equal(sparse_to_dense(sp), w)
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["Ws", "shape"], ["Wr"]),
             helper.make_node("Gemm", ["X", "Wr"], ["Y"], name="fc", transB=1)]
    got = only(model_of(nodes, [vi("X", None)], [vi("Y", None)], [shape], [sp]))
    assert got.source == "sparse_initializer" and got.path == ("Reshape",)
    assert weight_report(got)["pattern_ok"] is True
    # a shape-changing reshape is applied: the consumer sees [32, 16], which is not 2:4 along axis 1
    flat = numpy_helper.from_array(np.array([32, 16], np.int64), "shape2")
    nodes[0] = helper.make_node("Reshape", ["Ws", "shape2"], ["Wr"])
    got = only(model_of(nodes, [vi("X", None)], [vi("Y", None)], [flat], [sp]))
    assert got.shape == (32, 16) and got.stored_shape == (16, 32) and got.tensor.is_sparse
    np.testing.assert_array_equal(got.values, w.reshape(32, 16))
    assert got.check(2, 4).holds == check_nm(w.reshape(32, 16), 1, 2, 4).holds


def test_best_pattern_and_dense():
    assert best_pattern(nm_along((8, 16), axis=1, n=1, m=4), 1) == "1:4"
    assert best_pattern(nm_along((8, 16), axis=1), 1) == "2:4"
    assert best_pattern(nm_along((8, 16), axis=1, n=4, m=8), 1) == "4:8"
    assert best_pattern(np.ones((8, 16), np.float32), 1) is None
    assert not check_nm(np.ones((8, 6), np.float32), 1, 2, 4).applicable


def test_bfloat16_weight_is_read():
    w = nm_along((8, 16), axis=1)
    t = helper.make_tensor("W", TensorProto.BFLOAT16, list(w.shape), w.reshape(-1).tolist())
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="fc", transB=1)
    got = only(model_of([node], [vi("X", None, TensorProto.BFLOAT16)],
                        [vi("Y", None, TensorProto.BFLOAT16)], [t]))
    assert got.sparsity == pytest.approx(0.5) and weight_report(got)["pattern_ok"] is True
