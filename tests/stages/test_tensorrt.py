"""The engine-build commands written for each shipped file: TensorRT 10 takes a precision flag
per dtype, TensorRT 11 none (the file's types and Q/DQ decide); both enable sparse weights and
take the shape ranges of the graph's dynamic dims."""
import pytest

from stages.tensorrt import engine_commands, shape_ranges

TOKENS = [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
          {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"}]
IMAGE = [{"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]


@pytest.mark.parametrize("dtype, flag", [("fp32", None), ("fp16", "--fp16"), ("int8", "--int8")])
def test_tensorrt10_takes_the_precision_flag_and_11_takes_none(dtype, flag):
    c = engine_commands("model.onnx", dtype, IMAGE, [1, 32], None)
    ten, eleven = c["tensorrt10"].split(), c["tensorrt11"].split()
    assert "--sparsity=enable" in ten and "--sparsity=enable" in eleven
    assert (flag in ten) if flag else not {"--fp16", "--int8"} & set(ten)
    assert not {"--fp16", "--int8", "--best", "--bf16", "--stronglyTyped"} & set(eleven)
    assert "--minShapes=input:1x3x32x32" in ten and "--maxShapes=input:32x3x32x32" in eleven


def test_token_inputs_range_over_batch_and_sequence():
    ranges = shape_ranges(TOKENS, [1, 8], 128)
    assert ranges["input_ids"] == ([1, 1], [8, 128], [8, 128]) == ranges["attention_mask"]
    c = engine_commands("model.int8.onnx", "int8", TOKENS, [1, 8], 128)
    assert "--optShapes=input_ids:8x128,attention_mask:8x128" in c["tensorrt11"]
    assert "--saveEngine=model.int8.plan" in c["tensorrt11"]


def test_static_shapes_need_no_shape_flags_and_bad_dtype_is_refused():
    c = engine_commands("model.onnx", "fp32", [{"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32"}], [1], None)
    assert "Shapes" not in c["tensorrt10"]
    with pytest.raises(ValueError, match="dtype"):
        engine_commands("model.onnx", "bf16", IMAGE, [1], None)
