"""`score_init: wanda | sparsegpt`: OptG from trained weights whose first mask is exactly that
one-shot method's mask (and, for SparseGPT, whose weights are its reconstruction), then learns
from there; refused from scratch; the calibration batches default to 8."""
import copy

import pytest
import torch
from torch import nn

import optg


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(24, 16, generator=g) * torch.linspace(0.1, 3.0, 16), None) for _ in range(3)]


def _loss(model, batch):
    return model(batch[0]).square().mean()


@pytest.mark.parametrize("pattern, target", [("2:4", None), ("unstructured", 0.75)])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_first_mask_is_the_one_shot_methods_mask(method, pattern, target):
    one_shot_model, optg_model = _model(), _model()
    one_shot = optg.create(method, one_shot_model, pattern=pattern, target=target, epochs=1).attach()
    one_shot.calibrate(_batches(), _loss)
    one_shot.start_epoch(0)
    sp = optg.create("optg", optg_model, pattern=pattern, target=target, epochs=3, score_init=method,
                     from_trained=True, schedule={"name": "cubic", "start": 0.0, "end": 1.0}).attach()
    assert sp.spec.start == "pretrained" and sp.spec.calibration_batches_in_force == 8
    sp.calibrate(_batches(), _loss)
    sp.start_epoch(1)  # the cubic ramp is at the target from epoch 1
    for name, mask in one_shot.masks().items():
        assert torch.equal(sp.masks()[name], mask), name
    for a, b in zip(one_shot_model.parameters(), optg_model.parameters()):  # SparseGPT's reconstruction too
        assert torch.equal(a, b)
    # OptG learns from there: the scores train and a strong enough signal moves the mask
    optg_model(_batches()[0][0]).square().mean().backward()
    sp.step(lr=0.1)
    assert all(l.scores is not None and l.scores.grad is None for l in sp.layers)  # stepped and cleared
    layer = sp.layers[0]
    pruned = ~layer.mask
    with torch.no_grad():
        layer.scores[pruned] += 1e3  # evidence for every pruned weight: the next mask swaps
    sp.start_epoch(2)
    assert not torch.equal(sp.masks()[layer.plan.name], one_shot.masks()[layer.plan.name])


def test_one_shot_start_needs_trained_weights():
    with pytest.raises(ValueError, match="score_init 'sparsegpt'.*needs start 'pretrained'"):
        optg.create("optg", _model(), pattern="2:4", epochs=2, score_init="sparsegpt", start="scratch")


def test_a_model_copy_is_not_needed_the_calibration_is_the_method_itself():
    """Wanda leaves the weights alone; SparseGPT zeroes what it prunes, exactly."""
    model = _model()
    before = copy.deepcopy(model.state_dict())
    sp = optg.create("optg", model, pattern="2:4", epochs=2, score_init="wanda", from_trained=True).attach()
    sp.calibrate(_batches(), _loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pipeline_run_with_sparsegpt_start(tmp_path, capsys):
    """Through the pipeline: calibrated on 8 batches (recorded), first mask SparseGPT's, OptG
    fine-tunes, the file verifies; without a trained model it is a config error (exit 2)."""
    import json

    from pipeline.cli import main
    from tests.pipeline.conftest import TINY, write_config

    cfg = copy.deepcopy(TINY)
    cfg["sparsity"]["optg"] = {"score_init": "sparsegpt"}
    run = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path / "a.yaml", cfg)), "--out", str(run), "--quiet"]) == 0, \
        capsys.readouterr().err
    m = json.loads((run / "manifest.json").read_text())
    assert m["sparsity"]["score_init"] == "sparsegpt" and m["sparsity"]["calibration_batches"] == 8
    assert m["verify"]["passed"] is True
    del cfg["train"]
    cfg["validate"] = {"min_accuracy": 0.1}
    assert main(["check", str(write_config(tmp_path / "b.yaml", cfg))]) == 2
    assert "sparsity.optg.score_init 'sparsegpt' starts OptG" in capsys.readouterr().err
