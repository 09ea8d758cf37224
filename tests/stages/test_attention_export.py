"""Attention and GPT-2 Conv1D weights after export: every eligible weight holds 2:4 in the
file (fused QKV included), coverage counts weight MACs, and a mask on the wrong axis is caught."""
import io

import pytest
import torch
from torch import nn

import optg
from optg.nm import from_groups, to_groups
from pipeline.inspect_cmd import run_inspect
from stages.export import ExportConfig, export_onnx
from stages.onnx_sparsity import collect_weights, load_model, pattern_coverage, weight_macs


class Encoder(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        return self.head(self.fc(x + self.attn(x, x, x, need_weights=False)[0]).mean(1))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_attention_export_holds_2_4_on_every_weight(tmp_path, exporter):
    torch.manual_seed(0)
    model = Encoder()
    sp = optg.create("oneshot", model, pattern="2:4", epochs=1).attach()
    sp.start_epoch(0)
    sp.bake()
    result = export_onnx(model.eval(), torch.randn(2, 10, 64), tmp_path / "m.onnx", ExportConfig(exporter=exporter), {})
    out = io.StringIO()
    assert run_inspect(str(result.path), "2:4", False, out) == 0, out.getvalue()
    weights = collect_weights(load_model(result.path))
    shapes = sorted(tuple(sorted(w.shape)) for w in weights)
    assert (64, 192) in shapes  # the fused QKV projection, one weight
    macs = weight_macs(load_model(result.path), weights)
    # per sample: every projection runs on 10 tokens, the head once (after the mean)
    by_numel = dict(zip([w.numel for w in weights], macs))
    assert by_numel[64 * 192] == 64 * 192 * 10 and by_numel[64 * 8] == 64 * 8
    assert pattern_coverage(macs, [w.check(2, 4).holds for w in weights]) == 1.0
    assert "2:4 coverage: 100.0%" in out.getvalue()


def test_conv1d_masked_on_the_wrong_axis_is_caught(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    block = transformers.GPT2LMHeadModel(config).transformer.h[0].mlp.eval()  # c_fc, c_proj: Conv1D
    with torch.no_grad():
        for conv in (block.c_fc, block.c_proj):
            w = conv.weight  # [in, out]: the hardware groups along axis 0
            keep = torch.zeros(to_groups(w, 4, 0).shape, dtype=torch.bool)
            keep.scatter_(1, to_groups(w, 4, 0).abs().topk(2, dim=1).indices, True)
            w.mul_(from_groups(keep, w, 0))
    good = export_onnx(block, torch.randn(2, 5, 32), tmp_path / "good.onnx", ExportConfig(), {})
    assert run_inspect(str(good.path), "2:4", False, io.StringIO()) == 0
    with torch.no_grad():  # planted: 2:4 along axis 1 (the out features) instead
        w = block.c_fc.weight
        w.copy_(torch.randn_like(w))
        keep = torch.zeros(to_groups(w, 4, 1).shape, dtype=torch.bool)
        keep.scatter_(1, to_groups(w, 4, 1).abs().topk(2, dim=1).indices, True)
        w.mul_(from_groups(keep, w, 1))
    bad = export_onnx(block, torch.randn(2, 5, 32), tmp_path / "bad.onnx", ExportConfig(), {})
    out = io.StringIO()
    assert run_inspect(str(bad.path), "2:4", False, out) == 3
    assert "c_fc" in out.getvalue() or "FAIL weight" in out.getvalue()
