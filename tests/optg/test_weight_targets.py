"""Every weight that runs a matrix product is a target, on its reduction axis: attention's
fused QKV and out projections (read functionally, and by the fused eval fast path), the
transformers Conv1D (weight [in, out]: axis 0), tied heads left dense, user types by registry."""
import pytest
import torch
from torch import nn

import optg
from optg.nm import from_groups, to_groups
from optg.weights import WEIGHT_KINDS, register_weight


class VitBlock(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.norm(x)
        return self.fc(x + self.attn(y, y, y, need_weights=False)[0])


def _holds_nm(w: torch.Tensor, axis: int, n=2, m=4) -> bool:
    return bool(((to_groups(w, m, axis) != 0).sum(1) <= n).all())


def test_attention_projections_are_masked_in_train_and_fused_eval_forward():
    torch.manual_seed(0)
    model = VitBlock()
    keys = list(model.state_dict())
    sp = optg.create("oneshot", model, pattern="2:4", epochs=1).attach()
    plans = {p.name: p for p in sp.plans}
    assert plans["attn.in_proj_weight"].kind == "nm" and plans["attn.in_proj_weight"].owner == "attn"
    assert plans["attn.out_proj"].kind == "nm" and plans["attn.out_proj"].parameter == "attn.out_proj.weight"
    assert plans["fc"].kind == "nm"
    sp.start_epoch(0)  # the 2:4 mask in force
    assert list(model.state_dict()) == keys  # nothing renamed while attached
    x = torch.randn(3, 5, 16)
    model.train()
    attached_train = model(x)
    model.eval()
    with torch.no_grad():  # nn.MultiheadAttention's fused fast path runs here
        attached_eval = model(x)
    masks = sp.masks()
    sp.bake()
    assert "forward" not in model.attn.__dict__
    for name in ("attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"):
        w = model.get_parameter(name)
        assert _holds_nm(w, 1) and (w == 0).float().mean() == 0.5, name
    assert torch.equal(model.attn.in_proj_weight == 0, ~masks["attn.in_proj_weight"])
    model.train()
    assert torch.allclose(model(x), attached_train, atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), attached_eval, atol=1e-6)


def test_attention_gradients_reach_the_parameters_and_optg_scores():
    torch.manual_seed(0)
    model = VitBlock()
    sp = optg.create("optg", model, pattern="2:4", epochs=2).attach()
    sp.start_epoch(1)
    model(torch.randn(2, 4, 16)).square().mean().backward()
    assert model.attn.in_proj_weight.grad is not None and model.attn.out_proj.weight.grad is not None
    layer = next(l for l in sp.layers if l.plan.name == "attn.in_proj_weight")
    assert layer.scores is not None and layer.scores.grad is not None
    # OptG's straight-through estimator: dL/dw = g * m, zero where pruned
    assert (model.attn.in_proj_weight.grad[~layer.mask] == 0).all()


def test_separate_qkv_projections_are_targets():
    attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
    plans = {p.name: p for p in optg.create("gmp", attn, pattern="2:4", epochs=1).plans}
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj"} <= set(plans)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_weights_group_along_axis_0_and_the_tied_head_stays_dense():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 8))
    sp = optg.create("oneshot", model, pattern="2:4", epochs=1).attach()
    plans = {p.name: p for p in sp.plans}
    conv = [n for n, p in plans.items() if p.type_name == "Conv1D"]
    assert sorted(conv) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                            "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert all(plans[n].kind == "nm" and plans[n].axis == 0 for n in conv)
    assert plans["lm_head"].kind == "dense" and plans["lm_head"].reason.startswith("tied to transformer.wte.weight")
    sp.start_epoch(0)
    with torch.no_grad():
        attached = model(input_ids=ids).logits
    sp.bake()
    for n in conv:
        w = model.get_parameter(f"{n}.weight")  # [in, out]
        assert _holds_nm(w, 0), n
        assert not _holds_nm(w, 1), n  # the other axis would be the wrong layout for the hardware
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, attached, atol=1e-5)


def test_untied_llama_head_is_dense_by_default_and_can_be_included():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    plans = {p.name: p for p in optg.create("gmp", model, pattern="2:4", epochs=1).plans}
    assert plans["lm_head"].kind == "dense" and "output head" in plans["lm_head"].reason
    targeted = {n for n, p in plans.items() if p.kind == "nm"}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"} \
        <= targeted
    included = optg.create("gmp", model, pattern="2:4", epochs=1, include=["lm_head", "layers"]).plans
    assert next(p for p in included if p.name == "lm_head").kind == "nm"


def test_nm_groups_follow_the_axis():
    w = torch.arange(2 * 8, dtype=torch.float32).reshape(8, 2)  # [in=8, out=2]
    groups = to_groups(w, 4, axis=0)
    assert torch.equal(groups[0], w[:4, 0]) and torch.equal(from_groups(groups, w, 0), w)


class Scaled(nn.Module):
    """A user's layer: y = x @ kernel (kernel [in, out]) * scale."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 4))
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x @ self.kernel * self.scale


def test_a_registered_user_type_is_masked_on_its_axis():
    kind = register_weight(Scaled, "kernel", 0)
    try:
        model = nn.Sequential(Scaled())
        sp = optg.create("oneshot", model, pattern="2:4", epochs=1, types=["Scaled"]).attach()
        assert [p.name for p in sp.plans] == ["0.kernel"]
        sp.start_epoch(0)
        x = torch.randn(3, 8)
        out = model(x)
        sp.bake()
        assert _holds_nm(model[0].kernel, 0)
        assert torch.allclose(model(x), out)
    finally:
        WEIGHT_KINDS.remove(kind)
    with pytest.raises(ValueError, match="unknown layer types"):
        optg.create("gmp", nn.Sequential(Scaled()), pattern="2:4", epochs=1, types=["Scaled"])
