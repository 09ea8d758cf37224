"""`score_dtype: bfloat16`: the learned scores and their momentum take half the bytes, so OptG's
extra state is 1.25x the targeted weights' bytes (bf16 scores + bf16 momentum + a bool mask)
instead of 2.25x; masks rank the same as float32 where the scores are bf16-exact, gradients
reach the scores in their own dtype, and a method without learned scores refuses the key."""
import pytest
import torch
from torch import nn

import optg


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():  # integer weights: exact in bf16, distinct magnitudes per group of 4
        for layer in (model[0], model[2]):
            w = torch.randperm(layer.weight.numel()).float().reshape(layer.weight.shape) - layer.weight.numel() / 2
            layer.weight.copy_(w)
    return model


def _extra_ratio(sp: optg.Sparsifier) -> float:
    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)
    momentum = nbytes(st["momentum_buffer"] for st in sp.score_optimizer.state.values())
    return (nbytes(l.scores for l in sp.layers) + momentum + nbytes(l.mask for l in sp.layers)) \
        / nbytes(l.weight for l in sp.layers)


@pytest.mark.parametrize("dtype, ratio", [("float32", 2.25), ("bfloat16", 1.25)])
def test_extra_bytes_over_targeted_weights(dtype, ratio):
    model = _model()
    sp = optg.create("optg", model, pattern="2:4", epochs=2, score_dtype=dtype).attach()
    sp.start_epoch(0)
    model(torch.randn(4, 16)).square().mean().backward()
    assert all(l.scores.grad.dtype == getattr(torch, dtype) for l in sp.layers)  # the STE casts
    sp.step(lr=0.1)
    assert all(l.scores.dtype == getattr(torch, dtype) and l.mask.dtype == torch.bool for l in sp.layers)
    assert _extra_ratio(sp) == ratio


def test_bf16_scores_rank_like_float32_where_they_are_exact():
    masks = {}
    for dtype in ("float32", "bfloat16"):
        model = _model()
        sp = optg.create("optg", model, pattern="2:4", epochs=2, score_dtype=dtype, score_init="magnitude",
                         score_init_scale=1.0, schedule={"name": "constant"}).attach()
        sp.start_epoch(1)
        masks[dtype] = sp.masks()
    for name, mask in masks["float32"].items():
        assert mask.float().mean() == 0.5 and torch.equal(mask, masks["bfloat16"][name])


def test_score_dtype_applies_to_learned_scores_only():
    with pytest.raises(ValueError, match="score_dtype.*applies to learned scores"):
        optg.create("gmp", _model(), pattern="2:4", epochs=2, score_dtype="bfloat16")
