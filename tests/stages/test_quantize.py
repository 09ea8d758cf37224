"""INT8 QDQ for sparse INT8 kernels on a hand-set 2:4 model: every weighted GEMM is INT8 in,
INT8 weight with zero point 0 and INT8 out; the zeros (so 2:4) survive quantization exactly;
the read-back catches a file whose GEMM output is not quantized; accuracy stays close."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from stages.base import StageError
from stages.export import ExportConfig, export_onnx
from stages.onnx_sparsity import collect_weights
from stages.quantize import qdq_placement, quantize_int8
from stages.verify import verify_int8


def _two_four(model: nn.Module) -> None:
    """Keep the 2 largest of every 4 along each weight's input axis (hand-set 2:4)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.shape[1] % 4 == 0:
                w = mod.weight.data.movedim(1, -1)
                groups = w.reshape(-1, 4).clone()
                groups.scatter_(1, groups.abs().argsort(dim=1)[:, :2], 0.0)
                mod.weight.data = groups.reshape(w.shape).movedim(-1, 1).contiguous()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q8")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 12)).eval()
    _two_four(model)
    metadata = {"optg.pattern": "2:4"}
    export_onnx(model, torch.randn(2, 8, 8, 8), tmp / "m.onnx", ExportConfig(), metadata)
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((16, 8, 8, 8)).astype(np.float32)} for _ in range(4)]
    result = quantize_int8(tmp / "m.onnx", tmp / "m.int8.onnx", feeds)
    return tmp, model, result


def test_every_weighted_gemm_is_int8_in_weight_and_out(files):
    _, _, result = files
    assert [layer.op for layer in result.layers] == ["Conv", "Gemm", "Gemm"]
    assert all(layer.sparse_int8_form for layer in result.layers), [lay.to_dict() for lay in result.layers]
    proto = onnx.load(str(result.path))
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:  # weights: int8, per output channel, zero point 0
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) is not None \
                and inits[node.input[0]].data_type == onnx.TensorProto.INT8 and node.input[0].endswith("_quantized"):
            scale = numpy_helper.to_array(inits[node.input[1]])
            assert scale.ndim == 1 and scale.size == inits[node.input[0]].dims[0]  # Conv [K, C, ..], Gemm [out, in]
            assert not np.any(numpy_helper.to_array(inits[node.input[2]]))


def test_zeros_survive_so_the_pattern_reads_back_through_dequantize(files):
    tmp, model, result = files
    proto = onnx.load(str(result.path))
    weights = collect_weights(proto)
    assert len(weights) == 3 and all(w.path == ("DequantizeLinear",) for w in weights)
    torch_zeros = {name: (p == 0) for name, p in model.named_parameters() if p.dim() > 1}
    for w in weights:
        assert w.check(2, 4).holds, w.name
        zeros = torch_zeros[w.name.removesuffix("_quantized")].numpy()
        assert np.array_equal(w.torch_layout() == 0, zeros)  # exactly the same zeros, no new ones
    failures, rows = verify_int8(result.path)
    assert failures == [] and all(r["pattern_ok"] for r in rows)


def test_outputs_stay_close_to_fp32(files):
    tmp, _, result = files
    x = np.random.default_rng(1).standard_normal((32, 8, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(tmp / "m.onnx")).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(result.path)).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_a_gemm_without_an_output_quantizer_is_reported(files, tmp_path):
    _, _, result = files
    proto = onnx.load(str(result.path))
    graph = proto.graph
    gemm = [n for n in graph.node if n.op_type == "Gemm"][-1]  # the head: Gemm -> Q -> DQ -> logits
    q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gemm.output[0])
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    graph.node.remove(q)  # plant: the head writes the logits in float, no output quantizer
    gemm.output[0] = dq.output[0]
    graph.node.remove(dq)
    planted = tmp_path / "planted.onnx"
    onnx.save(proto, str(planted))
    layers = {layer.node: layer for layer in qdq_placement(onnx.load(str(planted)))}
    assert layers[gemm.name].int8_in and layers[gemm.name].int8_weight and not layers[gemm.name].int8_out
    failures, _ = verify_int8(planted)
    assert len(failures) == 1 and gemm.name in failures[0] and "INT8 out" in failures[0]


def test_no_calibration_data_is_a_stage_error(files, tmp_path):
    tmp, _, _ = files
    with pytest.raises(StageError, match="calibration batches"):
        quantize_int8(tmp / "m.onnx", tmp_path / "x.onnx", [])
