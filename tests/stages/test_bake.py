"""The bake stage: typed layer rows with the weight's parameter name, exact weighted sparsities,
and the safetensors file."""
import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import optg
from stages.bake import BakedLayer, bake, save_safetensors, summarize, weight_name


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)                     # 6 inputs: cannot hold 2:4, stays dense
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


def baked():
    model = Net()
    sparsifier = optg.create("oneshot", model, pattern="2:4", epochs=1).attach()
    sparsifier.start_epoch(0)
    return model, bake(sparsifier)


def test_bake_reports_typed_layers_with_parameter_names_and_exact_sparsities():
    model, result = baked()
    rows = {r.name: r for r in result.layers}
    assert set(rows) == {"stem", "body.1"}
    assert rows["stem"] == BakedLayer(name="stem", type="Linear", shape=[8, 6], numel=48, targeted=False,
                                      pattern="dense", sparsity=0.0, reason=rows["stem"].reason,
                                      parameter="stem.weight")
    assert "6" in rows["stem"].reason
    assert rows["body.1"].parameter == "body.1.weight" and rows["body.1"].pattern == optg.Pattern.nm(2, 4)
    assert rows["body.1"].targeted and rows["body.1"].sparsity == 0.5
    assert result.targeted_sparsity == 0.5
    assert result.model_sparsity == pytest.approx((0.0 * 48 + 0.5 * 32) / 80)
    w = model.body[1].weight.detach()
    assert torch.all((w.reshape(-1, 4) != 0).sum(1) == 2)  # exact zeros, 2 of every 4 inputs
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__, name  # plain modules again


def test_the_pattern_is_one_value_from_bake_through_the_manifest_json_to_verify():
    """BakedLayer holds the Pattern (no text to re-parse), writes its text to JSON, and reads back
    the same value; an 'unstructured' row takes its sparsity as the target; verify refuses text."""
    from stages.verify import LayerExpectation

    _, result = baked()
    for row in result.layers:
        assert isinstance(row.pattern, optg.Pattern)
        data = row.model_dump(mode="json")
        assert data["pattern"] == str(row.pattern)
        assert BakedLayer.model_validate(data) == row
    loose = BakedLayer.model_validate({**result.layers[1].model_dump(mode="json"), "pattern": "unstructured",
                                       "sparsity": 0.9})
    assert loose.pattern == optg.Pattern.unstructured(0.9)
    with pytest.raises(ValueError, match="N:M pattern needs 1 <= N < M, got 4:2"):
        BakedLayer.model_validate({**result.layers[1].model_dump(mode="json"), "pattern": "4:2"})
    with pytest.raises(TypeError, match="pattern must be an optg Pattern"):
        LayerExpectation("body.1.weight", "2:4", 0.5)  # type: ignore[arg-type]


def test_summarize_weights_sparsity_by_element_count():
    model = Net()
    report = optg.create("gmp", model, target=0.5, epochs=1).attach().report()
    assert [(r.name, r.numel) for r in report] == [("stem", 48), ("body.1", 32)]
    rows = [dataclasses.replace(r, targeted=True, sparsity=s) for r, s in zip(report, (0.25, 0.75))]
    result = summarize(rows, model)
    assert result.targeted_sparsity == pytest.approx((0.25 * 48 + 0.75 * 32) / 80)
    assert result.model_sparsity == result.targeted_sparsity
    assert summarize([], model).targeted_sparsity == 0.0


def test_weight_name_finds_the_registered_parameter():
    model = Net()
    assert weight_name(model, "body.1.weight") == "body.1.weight"
    with pytest.raises(AttributeError):
        weight_name(model, "nope.weight")
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = shared[0].weight  # tied: saved once, under its first name
    assert weight_name(shared, "1.weight") == "0.weight"


def test_save_safetensors_writes_the_state_dict_and_metadata(tmp_path):
    model, _ = baked()
    path = save_safetensors(model, tmp_path / "model.safetensors", {"config_hash": "abc"})
    assert path == tmp_path / "model.safetensors"
    state = load_file(str(path))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"config_hash": "abc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
