"""Every built-in model family, baked at 2:4 and at 90% unstructured, exports to ONNX and
verifies: parity with PyTorch, and the sparsity read back from the file matches (N:M along
the reduction axis after BN folding and Linear->MatMul rewrites)."""
import pytest
import torch

import optg
from stages.bake import bake
from stages.export import ExportConfig, export_onnx
from stages.model import ModelConfig, build_model
from stages.onnx_sparsity import collect_weights, load_model
from stages.verify import LayerExpectation, VerifyConfig, raise_on_failure, verify_onnx

FAMILIES = [
    ("small_cnn", (1, 8, 8), {}),
    ("cnn1d", (1, 40), {}),
    ("resnet20", (3, 16, 16), {}),
    ("vgg_small", (3, 16, 16), {"width_mult": 0.25}),
    ("mobilenet_v1", (3, 16, 16), {"width_mult": 0.25}),
    ("transformer", (1, 40), {"dim": 32, "depth": 1}),
]


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("name,shape,options", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_exports_and_verifies(tmp_path, name, shape, options, pattern):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, options=options), shape, 10)
    model.train()
    with torch.no_grad():  # realistic BatchNorm statistics, so folding is exercised
        for _ in range(3):
            model(torch.randn(16, *shape))
    kw = dict(pattern=pattern) if pattern != "unstructured" else dict(target=0.9)
    method = "oneshot" if pattern != "unstructured" else "gmp"
    sparsifier = optg.create(method, model, epochs=1, **kw).attach()
    sparsifier.start_epoch(1)
    rows = bake(sparsifier).layers
    if pattern == "2:4":
        assert any(r.pattern == optg.Pattern.nm(2, 4) for r in rows)  # BakedLayer: the pattern as a value
    else:
        total = sum(r.numel for r in rows if r.targeted)
        assert sum(r.sparsity * r.numel for r in rows if r.targeted) / total == pytest.approx(0.9, abs=1e-3)
    model.eval()
    inputs = torch.randn(24, *shape)
    path = tmp_path / "model.onnx"
    exported = export_onnx(model, inputs[:2], path, ExportConfig(), {"optg.pattern": pattern})
    expectations = [LayerExpectation(r.parameter, r.pattern, r.sparsity) for r in rows]
    result = verify_onnx(exported, model, inputs, expectations, VerifyConfig())
    raise_on_failure(result)
    assert result.passed
    by_torch = {l["torch_name"]: l for l in result.layers if l.get("torch_name")}
    for r in rows:
        assert r.parameter == f"{r.name}.weight"  # every built-in family keeps the weight under its module
        assert r.parameter in by_torch, f"{r.name} not found in the ONNX file"
        if r.pattern == optg.Pattern.nm(2, 4):
            assert by_torch[r.parameter]["pattern_ok"] is True
    if name == "transformer":  # Linear on (B, T, D) exports as MatMul with a transposed weight
        ops = {w.op for w in collect_weights(load_model(path))}
        assert "MatMul" in ops
