"""Export + verify round trips on small baked models, tampering, fallbacks, and the GPU script."""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from pydantic import ValidationError
from torch import nn

import stages.export as export_mod
import stages.verify as verify_mod
from optg.nm import from_groups, to_groups
from optg.pattern import Pattern
from stages.base import GateFailure, StageError
from stages.export import ExportConfig, export_onnx
from stages.onnx_sparsity import check_nm
from stages.verify import LayerExpectation, VerifyConfig, raise_on_failure, verify_onnx

REPO = Path(__file__).resolve().parents[2]
META = {"config_hash": "abc123", "pattern": "2:4", "version": "0.1.0"}


class Cnn2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Cnn1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(),
                                  nn.Conv1d(16, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Block(nn.Module):
    """Transformer-style MLP block: nn.Linear on 3-D input [B, T, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)


def bake(model: nn.Module, pattern: str) -> list[LayerExpectation]:
    """Apply 2:4 along dim 1 (top-2 |w| per group of 4) or 90% unstructured by hand."""
    exps = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            if pattern == "2:4":
                if p.shape[1] % 4:
                    exps.append(LayerExpectation(name, Pattern.dense(), 0.0))
                    continue
                g = to_groups(p, 4)
                keep = g.abs().topk(2, dim=1).indices
                p.copy_(from_groups(g * torch.zeros_like(g).scatter_(1, keep, 1.0), p))
            else:
                k = int(p.numel() * 0.9)
                thresh = p.abs().flatten().kthvalue(k).values
                p.mul_((p.abs() > thresh).float())
            zeros = float((p == 0).float().mean())
            exps.append(LayerExpectation(name, Pattern.parse(pattern, None if pattern == "2:4" else 0.9), zeros))
    return exps


def make(kind: str, pattern: str, seed: int = 0):
    torch.manual_seed(seed)
    model, x = {"cnn2d": (Cnn2d, (64, 3, 8, 8)), "cnn1d": (Cnn1d, (64, 1, 40)),
                "block": (Block, (64, 5, 32))}[kind]
    model = model()
    randomize_bn(model)
    model.eval()
    return model, torch.randn(*x), bake(model, pattern)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each model once (dynamo is ~1-3 s per model); tests copy files before tampering."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for key, kind, pattern, dtype, compact in [
        ("cnn2d", "cnn2d", "2:4", "fp32", True), ("cnn1d", "cnn1d", "2:4", "fp32", False),
        ("block", "block", "2:4", "fp32", False), ("cnn2d_u90", "cnn2d", "unstructured", "fp32", True),
        ("block_fp16", "block", "2:4", "fp16", False),
    ]:
        model, x, exps = make(kind, pattern)
        res = export_onnx(model, x[:1], root / key / "model.onnx",
                          ExportConfig(dtype=dtype, compact=compact), META)
        out[key] = (model, x, exps, res, dtype)
    return out


def check(entry, path: Path | None = None, **cfg):
    """Verify the exported files, or a tampered copy `path` of the dense one (no compact sibling)."""
    model, x, exps, res, dtype = entry
    if path is not None:
        res = dataclasses.replace(res, path=path, compact_path=None)
    return verify_onnx(res, model, x, exps, VerifyConfig(**cfg))


@pytest.mark.parametrize("key", ["cnn2d", "cnn1d", "block", "cnn2d_u90", "block_fp16"])
def test_round_trip_passes(exported, key):
    result = check(exported[key])
    assert result.passed, result.failures
    assert result.outputs and all(o["ok"] for o in result.outputs)
    assert exported[key][3].exporter == "dynamo" and exported[key][3].size_bytes > 0
    raise_on_failure(result)  # no exception
    d = result.to_dict()
    assert d["passed"] and isinstance(d["layers"], list)
    mapped = {row["torch_name"] for row in result.layers}
    for exp in exported[key][2]:
        assert exp.torch_name in mapped, exp.torch_name


def test_dynamo_folds_bn_keeps_names_and_metadata(exported):
    model, _, _, res, _ = exported["cnn2d"]
    proto = onnx.load(str(res.path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert "features.3.weight" in inits and "fc.weight" in inits
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    folded = inits["features.3.weight"]
    assert not np.allclose(folded, model.features[3].weight.detach().numpy())  # rescaled ...
    np.testing.assert_array_equal(folded == 0, model.features[3].weight.detach().numpy() == 0)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["config_hash"] == "abc123" and props["exporter"] == "dynamo"
    assert props["dtype"] == "fp32"
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    rows = {r["torch_name"]: r for r in check(exported["cnn2d"]).layers}
    assert rows["features.3.weight"]["value_check"] == "rescaled"
    assert rows["features.0.weight"]["reason"] == "C=3 not divisible by 4"


def test_linear_on_3d_is_a_renamed_matmul_found_by_metadata(exported):
    result = check(exported["block"])
    rows = {r["torch_name"]: r for r in result.layers}
    fc1 = rows["fc1.weight"]
    assert fc1["op"] == "MatMul" and fc1["name"] != "fc1.weight"  # pre-transposed, renamed
    assert fc1["shape"] == [32, 64] and fc1["reduction_axis"] == 0 and fc1["pattern_ok"]
    assert fc1["match"] in ("metadata", "scope") and fc1["value_check"] == "exact"


def test_inspect_reads_exported_files(exported):
    from pipeline.inspect_cmd import run_inspect

    out = io.StringIO()
    assert run_inspect(str(exported["block"][3].path), "2:4", False, out) == 0
    assert "MatMul" in out.getvalue() and "0 exempt" in out.getvalue()
    out = io.StringIO()
    assert run_inspect(str(exported["cnn2d_u90"][3].path), "2:4", True, out) == 3  # 90% is not 2:4


def test_fp16_file_and_notes(exported):
    proto = onnx.load(str(exported["block_fp16"][3].path))
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer
               if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    assert {p.key: p.value for p in proto.metadata_props}["dtype"] == "fp16"
    result = check(exported["block_fp16"])
    assert result.outputs[0]["atol"] == 1e-2


def test_compact_artifact_loads_and_matches(exported):
    res = exported["cnn2d_u90"][3]
    assert res.compact_path is not None and res.compact_path.name == "model.compact.onnx"
    assert res.compact_size_bytes < res.size_bytes  # 90% zeros: COO pays off
    compact = onnx.load(str(res.compact_path))
    assert {s.values.name for s in compact.graph.sparse_initializer} >= {"features.3.weight"}
    x = exported["cnn2d_u90"][1].numpy()
    dense = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    sparse = ort.InferenceSession(str(res.compact_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sparse.run(None, {"input": x})[0], dense.run(None, {"input": x})[0],
                               atol=1e-6)
    assert any("compact file" in n for n in check(exported["cnn2d_u90"]).notes)
    # 2:4 weights at 50% zeros would grow with int64 COO indices: they stay dense
    res24 = exported["cnn2d"][3]
    assert len(onnx.load(str(res24.compact_path)).graph.sparse_initializer) == 0


def _tamper(src: Path, dst: Path, name: str, edit) -> Path:
    proto = onnx.load(str(src))
    for init in proto.graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init).copy()
            edit(arr)
            init.CopyFrom(numpy_helper.from_array(arr, name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst))
    return dst


def _fill_first_zero(value: float):
    def edit(arr: np.ndarray) -> None:
        idx = np.unravel_index(int(np.flatnonzero(arr == 0)[0]), arr.shape)
        arr[idx] = value
    return edit


def test_tampered_zero_fails_pattern_and_parity(exported, tmp_path):
    entry = exported["cnn2d"]
    bad = _tamper(entry[3].path, tmp_path / "bad.onnx", "features.3.weight", _fill_first_zero(3.0))
    result = check(entry, bad)
    assert not result.passed
    pattern = [f for f in result.failures if f.startswith("nm_pattern")]
    assert len(pattern) == 1 and "features.3.weight" in pattern[0] and "node_Conv" in pattern[0]
    assert "[0, 0:4, 0, 0]" in pattern[0]
    assert any(f.startswith("onnx_parity") and "'logits'" in f for f in result.failures)
    with pytest.raises(GateFailure) as err:
        raise_on_failure(result)
    assert err.value.gate == "onnx_parity" and "features.3.weight" in str(err.value)


def test_tampered_tiny_value_is_a_pattern_only_failure(exported, tmp_path):
    entry = exported["cnn1d"]
    bad = _tamper(entry[3].path, tmp_path / "tiny.onnx", "head.weight", _fill_first_zero(1e-9))
    result = check(entry, bad)
    assert [f.split(":")[0] for f in result.failures] == ["nm_pattern"]
    assert "head.weight" in result.failures[0]
    with pytest.raises(GateFailure) as err:
        raise_on_failure(result)
    assert err.value.gate == "nm_pattern"


def test_scaled_weight_fails_parity_naming_output_and_suspect(exported, tmp_path):
    entry = exported["cnn2d"]
    bad = _tamper(entry[3].path, tmp_path / "scaled.onnx", "fc.weight", lambda a: a.__imul__(1.5))
    result = check(entry, bad)
    parity = [f for f in result.failures if f.startswith("onnx_parity")]
    assert parity and "'logits'" in parity[0] and "'fc.weight'" in parity[0]
    assert not any(f.startswith("nm_pattern") for f in result.failures)  # zeros untouched


def test_missing_weight_and_wrong_sparsity_are_named(exported):
    model, x, exps, res, dtype = exported["cnn2d_u90"]
    wrong = [LayerExpectation(e.torch_name, e.pattern, 0.5) if e.torch_name == "fc.weight" else e
             for e in exps] + [LayerExpectation("ghost.weight", Pattern.nm(2, 4), 0.5)]
    result = verify_onnx(res, model, x, wrong, VerifyConfig())
    text = "\n".join(result.failures)
    assert "ghost.weight" in text and "not found" in text
    assert "'fc.weight'" in text and "sparsity 0.9" in text
    assert all(f.startswith("nm_pattern") for f in result.failures)


def test_checker_failure_is_reported(exported, tmp_path):
    entry = exported["cnn1d"]
    proto = onnx.load(str(entry[3].path))
    proto.graph.node[0].input[0] = "does_not_exist"
    bad = tmp_path / "broken.onnx"
    onnx.save(proto, str(bad))
    result = check(entry, bad)
    assert not result.passed and any("onnx.checker" in f for f in result.failures)


def test_config_validation():
    with pytest.raises(ValidationError):
        ExportConfig(opset=12)
    with pytest.raises(ValidationError):
        ExportConfig(dtype="int8")
    with pytest.raises(ValidationError):
        ExportConfig(bogus=1)
    with pytest.raises(ValidationError):
        VerifyConfig(atoll=1e-3)
    with pytest.raises(ValidationError):
        VerifyConfig(num_samples=0)
    assert VerifyConfig().tolerances("fp16") == (1e-2, 1e-2)
    assert VerifyConfig(atol=1e-5).tolerances("fp32") == (1e-5, 1e-3)


def test_torchscript_fallback_static_batch_and_fp16_conversion(tmp_path, monkeypatch):
    model, x, exps = make("cnn1d", "2:4", seed=1)

    def no_dynamo(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(export_mod, "_export_dynamo", no_dynamo)
    res = export_onnx(model, x[:4], tmp_path / "ts.onnx", ExportConfig(dynamic_batch=False), META)
    assert res.exporter == "torchscript"
    assert any("simulated dynamo failure" in w for w in res.warnings)
    # fixed batch of 4: verify runs 10 samples in padded chunks
    result = verify_onnx(res, model, x[:10], exps, VerifyConfig())
    assert result.passed, result.failures
    assert result.outputs[0]["shape"] == [10, 8]

    real_ts = export_mod._export_torchscript

    def ts_fp32_only(model, example, cfg, spec):
        if example[0].dtype == torch.float16:
            raise RuntimeError("simulated: no fp16 tracing")
        return real_ts(model, example, cfg, spec)

    monkeypatch.setattr(export_mod, "_export_torchscript", ts_fp32_only)
    res16 = export_onnx(model, x[:1], tmp_path / "h.onnx",
                        ExportConfig(dtype="fp16", exporter="torchscript"), META)
    assert any("converted its float tensors to fp16" in w for w in res16.warnings)
    assert onnx.load(str(res16.path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    result = verify_onnx(res16, model, x, exps, VerifyConfig())
    assert result.passed, result.failures


def test_fp16_without_ort_kernel_is_verified_upcast(exported, monkeypatch):
    real = verify_mod._make_session

    def no_fp16_kernels(source):
        if isinstance(source, str):  # the fp16 file itself
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an "
                               "implementation for MatMul(13) node with name 'node_MatMul_1'")
        return real(source)

    monkeypatch.setattr(verify_mod, "_make_session", no_fp16_kernels)
    result = check(exported["block_fp16"])
    assert result.passed, result.failures
    assert any("upcast to fp32" in n for n in result.notes)


def test_export_failure_raises_stage_error(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("cannot run this")

    with pytest.raises(StageError, match="cannot run this"):
        export_onnx(Broken(), torch.randn(2, 3), tmp_path / "m.onnx",
                    ExportConfig(exporter="torchscript"), META)
    assert not (tmp_path / "m.onnx").exists()


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous release")
    real_save = onnx.save_model

    def crash(proto, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_mod.onnx, "save_model", crash)
    model, x, _ = make("cnn1d", "2:4")
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)][:1]
    for m in frozen:
        m.eval()  # a mixed-mode model: training, one BatchNorm frozen
    modes = [m.training for m in model.modules()]
    assert any(modes) and not all(modes)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, x[:1], target, ExportConfig(exporter="torchscript"), META)
    assert target.read_bytes() == b"previous release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    monkeypatch.setattr(export_mod.onnx, "save_model", real_save)
    assert [m.training for m in model.modules()] == modes  # every module's mode given back


def test_gpu_script_without_cuda_measures_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "semi_structured_gpu.py"),
                           "--out", str(tmp_path / "table.md")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device: nothing measured" in proc.stdout
    assert not (tmp_path / "table.md").exists()


def test_check_nm_matches_torch_grouping():
    """The numpy read-back groups exactly like optg.nm.to_groups (dim 1, per kernel position)."""
    torch.manual_seed(3)
    w = torch.randn(8, 16, 3, 3)
    g = to_groups(w, 4)
    keep = g.abs().topk(2, dim=1).indices
    baked = from_groups(g * torch.zeros_like(g).scatter_(1, keep, 1.0), w)
    assert check_nm(baked.numpy(), 1, 2, 4).holds
    assert not check_nm(baked.numpy(), 0, 2, 4).holds  # not along the output channels
