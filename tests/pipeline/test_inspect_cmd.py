"""`optg inspect` body: exit codes 0/3/2, table and JSON output, on hand-made ONNX files."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.inspect_cmd import run_inspect
from tests.stages import onnx_cases as cases

RNG = np.random.default_rng(1)


def nm_along(shape: tuple[int, ...], axis: int, n: int = 2, m: int = 4) -> np.ndarray:
    w = RNG.standard_normal(shape).astype(np.float32) + 0.1
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m).copy()
    np.put_along_axis(groups, np.argsort(np.abs(groups), axis=-1)[..., : m - n], 0.0, axis=-1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def write_model(path: Path, conv_w: np.ndarray, fc_w: np.ndarray, dw_w: np.ndarray | None = None) -> Path:
    """stem Conv (C=3, dense) -> Conv -> [depthwise Conv] -> GlobalAveragePool -> Flatten -> Gemm."""
    stem = RNG.standard_normal((conv_w.shape[1], 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(stem, "stem.weight"), numpy_helper.from_array(conv_w, "conv.weight"),
             numpy_helper.from_array(fc_w, "fc.weight")]
    nodes = [helper.make_node("Conv", ["input", "stem.weight"], ["a"], name="stem_conv", pads=[1] * 4),
             helper.make_node("Conv", ["a", "conv.weight"], ["b"], name="body_conv", pads=[1] * 4)]
    last = "b"
    if dw_w is not None:
        inits.append(numpy_helper.from_array(dw_w, "dw.weight"))
        nodes.append(helper.make_node("Conv", ["b", "dw.weight"], ["c"], name="dw_conv",
                                      group=dw_w.shape[0], pads=[1] * 4))
        last = "c"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc.weight"], ["logits"], name="fc_gemm", transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def good(tmp_path) -> Path:
    return write_model(tmp_path / "good.onnx", nm_along((32, 16, 3, 3), 1), nm_along((10, 32), 1),
                       dw_w=RNG.standard_normal((32, 1, 3, 3)).astype(np.float32))


def inspect(path, pattern=None, as_json=False) -> tuple[int, str]:
    out = io.StringIO()
    code = run_inspect(str(path), pattern, as_json, out)
    return code, out.getvalue()


def test_report_only_exits_0_and_shows_every_weight(good):
    code, text = inspect(good)
    assert code == 0
    for name in ("stem.weight", "conv.weight", "fc.weight", "dw.weight"):
        assert name in text
    assert "exempt (C=3 not divisible by 4)" in text
    assert "exempt (grouped conv (group=32))" in text
    assert "summary:" in text and "2 hold it" in text


def test_pattern_holds_exits_0(good):
    assert inspect(good, "2:4")[0] == 0
    assert inspect(good, "4:8")[0] == 0  # 2:4 implies 4:8
    code, text = inspect(good, "1:4")
    assert code == 3 and "FAIL" in text


def test_one_bad_group_exits_3_naming_weight_node_and_group(tmp_path, capsys):
    fc = nm_along((10, 32), 1)
    zero = int(np.flatnonzero(fc[7, 12:16] == 0)[0])
    fc[7, 12 + zero] = 0.5
    path = write_model(tmp_path / "bad.onnx", nm_along((32, 16, 3, 3), 1), fc)
    code, text = inspect(path, "2:4")
    assert code == 3
    fail = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1
    assert "'fc.weight'" in fail[0] and "fc_gemm" in fail[0] and "[7, 12:16]" in fail[0]
    assert "1 of 80 groups" in fail[0]


def test_pattern_along_wrong_axis_exits_3(tmp_path):
    wrong = nm_along((32, 16, 3, 3), 0)  # 2:4 along output channels, not input channels
    path = write_model(tmp_path / "wrong.onnx", wrong, nm_along((10, 32), 1))
    code, text = inspect(path, "2:4")
    assert code == 3 and "'conv.weight'" in text and "body_conv" in text


def test_dense_eligible_layer_fails_with_pattern(tmp_path):
    dense_fc = RNG.standard_normal((10, 32)).astype(np.float32)
    path = write_model(tmp_path / "dense.onnx", nm_along((32, 16, 3, 3), 1), dense_fc)
    assert inspect(path)[0] == 0  # report only
    code, text = inspect(path, "2:4")
    assert code == 3 and "'fc.weight'" in text and "is dense and not 2:4" in text


def test_json_output_shape(good, tmp_path, capsys):
    code, text = inspect(good, None, as_json=True)
    data = json.loads(text)
    assert code == 0 and data["exit_code"] == 0 and data["pattern"] is None
    assert data["checked_pattern"] == "2:4" and data["violations"] == []
    assert set(data["summary"]) >= {"weights", "required", "holding", "violating", "exempt",
                                    "trt_eligible", "likely_faster", "apex_eligible"}
    row = {w["name"]: w for w in data["weights"]}["conv.weight"]
    assert row["op"] == "Conv" and row["shape"] == [32, 16, 3, 3] and row["reduction_axis"] == 1
    assert row["pattern_ok"] is True and row["best_pattern"] == "2:4" and row["node"] == "body_conv"
    for key in ("sparsity", "eligible", "likely_faster", "apex_eligible", "reason", "first_bad_group"):
        assert key in row

    dense = write_model(tmp_path / "d.onnx", nm_along((32, 16, 3, 3), 1),
                        RNG.standard_normal((10, 32)).astype(np.float32))
    code, text = inspect(dense, "2:4", as_json=True)
    data = json.loads(text)  # stdout stays pure JSON
    assert code == 3 and data["exit_code"] == 3 and len(data["violations"]) == 1
    assert "fc.weight" in capsys.readouterr().err


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "abc", "dense", "unstructured", ""])
def test_bad_pattern_exits_2(good, pattern, capsys):
    assert inspect(good, pattern)[0] == 2
    assert "pattern" in capsys.readouterr().err


def test_missing_and_unreadable_files_exit_2(tmp_path, capsys):
    assert inspect(tmp_path / "nope.onnx", "2:4")[0] == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    assert inspect(junk)[0] == 2
    assert "cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert inspect(empty, None, as_json=True)[0] == 2
    assert "cannot read" in capsys.readouterr().err


# ----------------------------------------------------------------------------- adversarial files
# (issue 12: chains that must be followed, inputs that must fail closed, bounded work)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case", sorted(cases.GOOD_BAD))
def test_adversarial_good_passes_and_bad_fails_2_4(case, tmp_path, capsys):
    good = save(cases.GOOD_BAD[case](True), tmp_path / "good.onnx")
    bad = save(cases.GOOD_BAD[case](False), tmp_path / "bad.onnx")
    code, text = inspect(good, "2:4")
    assert code == 0, text
    assert "result: OK (1 weight(s) checked" in text
    code, text = inspect(bad, "2:4")
    assert code == 3, text
    fails = [line for line in text.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 1 and "not 2:4 along reduction axis" in fails[0]
    assert inspect(bad)[0] == 0  # report only


@pytest.mark.parametrize("case", sorted(cases.UNTRACED))
def test_untraceable_weight_fails_closed_naming_it(case, tmp_path, capsys):
    build, name = cases.UNTRACED[case]
    path = save(build(), tmp_path / f"{case}.onnx")
    code, text = inspect(path, "2:4")
    assert code == 3, text
    assert f"FAIL weight '{name}'" in text and "untraced, nothing was checked" in text
    assert "result: OK" not in text
    code, text = inspect(path)  # without --pattern: reported, exit 0
    assert code == 0 and f"untraced: weight '{name}'" in text
    code, out = inspect(path, "2:4", as_json=True)
    data = json.loads(out)
    assert code == 3 and data["summary"]["untraced"] >= 1
    assert {u["name"] for u in data["untraced"]} == {name}
    assert name in capsys.readouterr().err


def test_mul_by_one_names_the_stored_weight(tmp_path):
    code, text = inspect(save(cases.mul_by_one(), tmp_path / "m.onnx"), "2:4")
    assert code == 3 and "Mul node 'times_one' from 'W', 'one'" in text


@pytest.mark.parametrize("build, why", [(cases.no_weights, "no Conv/Gemm/MatMul weight could be read"),
                                        (cases.stem_only, "no weight can carry 2:4; every weight is exempt: 'W' (C=3")])
def test_nothing_checked_is_never_ok(build, why, tmp_path):
    path = save(build(), tmp_path / "m.onnx")
    code, text = inspect(path, "2:4")
    assert code == 3 and f"FAIL nothing checked: {why}" in text and "result: OK" not in text
    assert inspect(path)[0] == 0


def test_attention_activation_is_not_untraced(tmp_path):
    code, text = inspect(save(cases.attention_like(), tmp_path / "a.onnx"), "2:4")
    assert code == 0 and "2 Conv/Gemm/MatMul weight(s) read, 0 untraced" in text


def test_huge_sparse_initializer_is_fast_and_bounded(tmp_path, capsys):
    good = save(cases.huge_sparse(True), tmp_path / "huge.onnx")
    assert good.stat().st_size < 400
    start = time.perf_counter()
    code, text = inspect(good, "2:4")
    assert code == 0 and "32768x16384" in text and time.perf_counter() - start < 2.0
    code, text = inspect(save(cases.huge_sparse(False), tmp_path / "bad.onnx"), "2:4")
    assert code == 3 and "first bad group at [5, 0:4] (3 nonzeros)" in text
    start = time.perf_counter()
    code, _ = inspect(save(cases.huge_sparse(True, quantized=True), tmp_path / "q.onnx"), "2:4")
    assert code == 2 and time.perf_counter() - start < 2.0
    assert "oversized tensor" in capsys.readouterr().err


def test_cli_entry_fails_closed(tmp_path):
    """Through `python -m pipeline.cli inspect`: the exit code a release script sees."""
    untraced = save(cases.graph_input_weight(), tmp_path / "gi.onnx")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(untraced), "--pattern",
                           "2:4"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "FAIL weight 'W'" in proc.stdout and "graph input" in proc.stdout
