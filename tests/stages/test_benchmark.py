"""Benchmark stage: interleaved timing, medians and ratios, result shape, errors (no timing asserted)."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from torch import nn

from stages.base import StageError
from stages.benchmark import (
    BenchmarkConfig,
    LatencyResult,
    export_reference,
    interleaved_timings,
    measure_latency,
    render_latency_markdown,
)
from stages.export import ExportConfig


def matmul_onnx(path: Path, features: int, hidden: int, batch: int | str = "N") -> Path:
    """x [batch, features] @ W [features, hidden] -> y."""
    w = numpy_helper.from_array(np.ones((features, hidden), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, hidden])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_interleaving_alternates_order_and_times_each_call() -> None:
    now = [0.0]
    log: list[str] = []

    def clock() -> float:
        return now[0]

    def call(name: str, cost: float):
        def run() -> None:
            log.append(name)
            now[0] += cost
        return run

    samples = interleaved_timings([call("ref", 2.0), call("cand", 0.5)], repeats=4, warmup=2, clock=clock)
    assert log == ["ref", "cand", "cand", "ref",                       # warm-up, alternating too
                   "ref", "cand", "cand", "ref", "ref", "cand", "cand", "ref"]
    assert samples == [[2.0] * 4, [0.5] * 4]


def test_measure_latency_result_shape_medians_and_ratio(tmp_path: Path) -> None:
    ref = matmul_onnx(tmp_path / "ref.onnx", 16, 64)
    cand = matmul_onnx(tmp_path / "cand.onnx", 16, 8)
    cfg = BenchmarkConfig(batch_sizes=[1, 4], repeats=5, warmup=1, threads=1, cuda=False)
    result = measure_latency(ref, cand, (16,), cfg)
    assert isinstance(result, LatencyResult)
    assert result.threads == 1 and result.providers == ["CPUExecutionProvider"]
    assert [(r.provider, r.batch_size) for r in result.rows] == [("CPUExecutionProvider", 1),
                                                                 ("CPUExecutionProvider", 4)]
    for row in result.rows:
        assert len(row.reference_samples_ms) == len(row.candidate_samples_ms) == 5
        assert row.reference_ms == statistics.median(row.reference_samples_ms)
        assert row.candidate_ms == statistics.median(row.candidate_samples_ms)
        assert row.ratio == row.candidate_ms / row.reference_ms
        assert result.ratio(row.batch_size) == row.ratio
    assert result.max_ratio() == max(r.ratio for r in result.rows)
    section = result.to_dict()
    assert section["threads"] == 1 and len(section["rows"]) == 2
    assert set(section["rows"][0]) == {"provider", "batch_size", "reference_ms", "candidate_ms", "ratio"}
    md = render_latency_markdown(section)
    assert "1 intra-op thread(s), median of 5 interleaved" in md
    assert md.count("| CPUExecutionProvider |") == 2
    with pytest.raises(KeyError, match="batch 32"):
        result.ratio(32)


def test_measure_latency_errors(tmp_path: Path) -> None:
    ref = matmul_onnx(tmp_path / "ref.onnx", 16, 64)
    fixed = matmul_onnx(tmp_path / "fixed.onnx", 16, 8, batch=1)
    cfg = BenchmarkConfig(batch_sizes=[1, 4], repeats=3, warmup=0, cuda=False)
    with pytest.raises(StageError, match="missing ONNX file"):
        measure_latency(ref, tmp_path / "nope.onnx", (16,), cfg)
    with pytest.raises(StageError, match="fixed dims"):
        measure_latency(ref, fixed, (16,), cfg)
    with pytest.raises(StageError, match="rank 2"):
        measure_latency(ref, ref, (4, 4), cfg)


@pytest.mark.parametrize("settings,fragment", [
    ({"batch_sizes": [0, 1]}, "batch sizes must be >= 1"),
    ({"batch_sizes": [1, 1]}, "distinct"),
    ({"batch_sizes": []}, "batch_sizes"),
    ({"repeats": 2}, "repeats"),
    ({"threads": 0}, "threads"),
    ({"thread": 2}, "Extra inputs"),
])
def test_bad_benchmark_config(settings: dict, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        BenchmarkConfig(**settings)


def test_export_reference_writes_a_timeable_file(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(2, 3, 4)
    cfg = ExportConfig(exporter="torchscript")
    path = export_reference(model, x, tmp_path / "reference.onnx", cfg)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["optg.role"] == "latency-reference"
    result = measure_latency(path, path, (3, 4), BenchmarkConfig(batch_sizes=[2], repeats=3, warmup=0, cuda=False))
    assert [r.batch_size for r in result.rows] == [2]


def test_cuda_is_timed_only_where_onnxruntime_has_it(tmp_path: Path) -> None:
    import onnxruntime as ort

    ref = matmul_onnx(tmp_path / "ref.onnx", 16, 64)
    result = measure_latency(ref, ref, (16,), BenchmarkConfig(batch_sizes=[1], repeats=3, warmup=0, cuda=True))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert "CUDAExecutionProvider" in result.providers or any("fell back" in n for n in result.notes)
    else:
        assert result.providers == ["CPUExecutionProvider"]
        assert result.notes == ["CUDAExecutionProvider not installed: CPU only"]
    assert not any("Tensorrt" in r.provider for r in result.rows)
