"""Structured pruning stage: coupling, rounding, plans, importances, targets, resume, config."""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
import torch_pruning as tp
from pydantic import ValidationError
from torch import nn
from torch.func import functional_call

from stages.base import StageConfigError, StageError
from stages.structured import (
    StructuredConfig,
    StructuredProgress,
    apply_plan,
    channel_table,
    detect_stem_and_classifier,
    prune_channels,
    render_structured_markdown,
)
from stages.structured_importance import (
    MaskTarget,
    OptGImportance,
    group_slices,
    learn_optg_scores,
    weight_masks,
)

SHAPES = {"resnet20": (3, 16, 16), "mobilenet_v1": (3, 16, 16), "cnn1d": (1, 40), "small_cnn": (1, 8, 8)}
QUIET = {"log": lambda _msg: None}


def build(name: str, seed: int = 0) -> nn.Module:
    from stages.zoo import MODELS
    torch.manual_seed(seed)
    return MODELS.get(name)(SHAPES[name], 10)


def batches(shape: tuple[int, ...], count: int = 3, size: int = 8):
    def source(step: int):
        g = torch.Generator().manual_seed(100 + step)
        for _ in range(count):
            yield torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)
    return source


def example(name: str) -> torch.Tensor:
    return torch.randn(2, *SHAPES[name], generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- structure

@pytest.mark.parametrize("name,importance", [
    ("resnet20", "magnitude"), ("resnet20", "optg"), ("resnet20", "taylor"),
    ("mobilenet_v1", "magnitude"), ("mobilenet_v1", "optg"),
    ("cnn1d", "optg"), ("small_cnn", "taylor"),
])
def test_pruned_model_runs_is_rounded_coupled_smaller_and_rebuilds(name: str, importance: str) -> None:
    model, x = build(name), example(name)
    dense_out = outputs(model, x)
    cfg = StructuredConfig(ratio=0.5, importance=importance, optg_steps=4, taylor_batches=2)
    result = prune_channels(model, cfg, x, batches=batches(SHAPES[name]), **QUIET)
    assert result.model is model
    out = outputs(model, x)
    assert out.shape == dense_out.shape

    before, after = result.channels_before, result.channels_after
    assert after == channel_table(model)
    changed = {n for n in after if after[n] != before[n]}
    assert changed, "nothing was pruned"
    for n in changed:  # every channel count that changed is a multiple of round_to
        for side in ("in", "out"):
            if after[n][side] != before[n][side]:
                assert after[n][side] % 8 == 0 and after[n][side] >= 8, (n, after[n])
    stem, classifier = detect_stem_and_classifier(build(name), x)
    assert after[stem]["out"] == before[stem]["out"] and after[classifier]["out"] == 10
    assert result.macs_after < result.macs_before and result.params_after < result.params_before

    modules = dict(model.named_modules())
    for n, m in modules.items():  # coupled layers agree
        if isinstance(m, nn.Conv2d) and m.groups > 1:  # depthwise stays depthwise
            assert m.groups == m.in_channels == m.out_channels == m.weight.shape[0]
        if type(m).__name__ == "BasicBlock":
            out_c = m.conv2.out_channels
            assert m.bn2.num_features == out_c and m.bn1.num_features == m.conv1.out_channels == m.conv2.in_channels
            shortcut_out = (m.shortcut[0].out_channels if isinstance(m.shortcut, nn.Sequential)
                            else m.conv1.in_channels)
            assert shortcut_out == out_c
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape[0] == m.num_features == m.running_mean.shape[0]

    # the plan rebuilds the slimmed architecture on a fresh dense model, weights load strictly
    plan = json.loads(json.dumps(result.plan))
    fresh = apply_plan(build(name, seed=7), plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(outputs(fresh, x), out)


def test_detects_stem_and_classifier() -> None:
    assert detect_stem_and_classifier(build("resnet20"), example("resnet20")) == ("stem.0", "fc")
    assert detect_stem_and_classifier(build("cnn1d"), example("cnn1d")) == ("conv1", "linear")


def test_magnitude_matches_torch_pruning_exactly() -> None:
    for allocation in ("global", "layerwise"):
        ours, theirs, x = build("resnet20"), build("resnet20"), example("resnet20")
        cfg = StructuredConfig(ratio=0.4, importance="magnitude", allocation=allocation, round_to=8)
        prune_channels(ours, cfg, x, **QUIET)
        pruner = tp.pruner.BasePruner(
            theirs, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.4,
            global_pruning=allocation == "global", ignored_layers=[theirs.stem[0], theirs.fc], round_to=8)
        pruner.step()
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), allocation


def test_iterative_steps_reach_the_ratio_of_prunable_channels() -> None:
    model, x = build("resnet20"), example("resnet20")
    result = prune_channels(model, StructuredConfig(ratio=0.5, iterative_steps=2), x, **QUIET)
    # stem ignored, so its 16-channel stream stays; prunable: 32 + 64 streams + 9 block convs = 432.
    # Global steps aim at 324 then 216 kept; kept counts are rounded down to multiples of 8 per
    # group (Torch-Pruning's rule), which removes a little more.
    assert [s.step for s in result.steps] == [1, 2]
    assert [s.channels for s in result.steps] == [288, 192]
    assert result.steps[-1].macs == result.macs_after

    # layerwise on cnn1d (conv2, conv3: 32 channels each, stem and classifier ignored):
    # step 1 removes 25% -> 24 each; step 2 removes 1/3 of 24 -> 16 each
    result = prune_channels(build("cnn1d"), StructuredConfig(ratio=0.5, iterative_steps=2, allocation="layerwise",
                                                             importance="optg", optg_steps=2),
                            example("cnn1d"), batches=batches(SHAPES["cnn1d"]), **QUIET)
    assert [s.channels for s in result.steps] == [48, 32]
    assert [result.channels_after[n]["out"] for n in ("conv1", "conv2", "conv3")] == [32, 16, 16]


# --------------------------------------------------------------------------- OptG importance

class ConvBnConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.pool(y).flatten(1))


def _group(model: nn.Module, x: torch.Tensor, root: nn.Module, out_fn: Any) -> tp.Group:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    channels = root.out_channels if hasattr(root, "out_channels") else root.out_features
    return dg.get_pruning_group(root, out_fn, list(range(channels)))


def test_optg_importance_sums_planted_scores_over_the_group() -> None:
    torch.manual_seed(0)
    model, x = ConvBnConv(), torch.randn(2, 3, 5, 5)
    names = {m: n for n, m in model.named_modules()}
    group = _group(model, x, model.conv1, tp.prune_conv_out_channels)
    scores = {
        # conv1 rows: channel c scores c per weight (27 weights per row)
        "conv1": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 3, 3).clone(),
        # conv2 input columns: channel 1 gets -10 per weight (6 rows), the rest 0
        "conv2": torch.zeros(6, 4, 1, 1).index_fill_(1, torch.tensor([1]), -10.0),
        "fc": torch.full((3, 6), 99.0),  # not in this group: must not count
    }
    imp = OptGImportance(scores, names)(group)
    assert torch.equal(imp, torch.tensor([0.0, 27.0 - 60.0, 54.0, 81.0]))
    assert torch.argsort(imp).tolist() == [1, 0, 2, 3]  # lowest first: channel 1 goes first

    # a group reaching the classifier through pooling: conv2 rows + fc columns
    group2 = _group(model, x, model.conv2, tp.prune_conv_out_channels)
    imp2 = OptGImportance({"conv2": torch.ones(6, 4, 1, 1), "fc": torch.arange(18.0).view(3, 6)}, names)(group2)
    assert torch.equal(imp2, 4.0 + torch.arange(18.0).view(3, 6).sum(0))


def test_optg_importance_counts_depthwise_once_and_flatten_positions_per_channel() -> None:
    torch.manual_seed(0)
    dw = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                       nn.Conv2d(4, 2, 1, bias=False))
    x = torch.randn(1, 2, 4, 4)
    names = {m: n for n, m in dw.named_modules()}
    group = _group(dw, x, dw[0], tp.prune_conv_out_channels)
    scores = {"0": torch.zeros(4, 2, 1, 1), "1": torch.ones(4, 1, 3, 3), "2": torch.zeros(2, 4, 1, 1)}
    assert torch.equal(OptGImportance(scores, names)(group), torch.full((4,), 9.0))  # not 18

    flat = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5, 2))
    xf = torch.randn(1, 1, 5)
    names = {m: n for n, m in flat.named_modules()}
    group = _group(flat, xf, flat[0], tp.prune_conv_out_channels)
    lin = torch.arange(30.0).view(2, 15)
    imp = OptGImportance({"0": torch.zeros(3, 1, 3), "2": lin}, names)(group)
    assert torch.equal(imp, lin.view(2, 3, 5).sum(dim=(0, 2)))  # channel c = features c*5..c*5+4


def test_optg_scores_follow_the_straight_through_estimator() -> None:
    """One step, nothing masked: s = -lr * w * dL/dw and w -= lr * dL/dw (SGD, first step)."""
    torch.manual_seed(0)
    model, x, y = ConvBnConv(), torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 0])
    reference = copy.deepcopy(model).train()
    loss = nn.functional.cross_entropy(reference(x), y)
    grads = dict(zip([n for n, _ in reference.named_parameters()], torch.autograd.grad(loss, list(reference.parameters()))))
    names = {m: n for n, m in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    slices = [group_slices(g, names) for g in dg.get_all_groups(ignored_layers=[model.fc],
                                                                 root_module_types=[nn.Conv2d, nn.Linear])]
    weights = {n: dict(model.named_modules())[n].weight.detach().clone() for n in ("conv1", "conv2", "fc")}
    lr = 0.1
    scores = learn_optg_scores(model, slices, iter([(x, y)]), nn.functional.cross_entropy, steps=1, lr=lr,
                               target=MaskTarget(total=0, fraction=None, min_keep=1))
    for n, w in weights.items():
        torch.testing.assert_close(scores[n], -lr * w * grads[f"{n}.weight"], rtol=0, atol=1e-7)
        torch.testing.assert_close(dict(model.named_modules())[n].weight.detach(),
                                   w - lr * grads[f"{n}.weight"], rtol=0, atol=1e-7)


def test_channel_mask_equals_removing_the_channel() -> None:
    """Masking a channel's input columns in its consumers gives the pruned model's output."""
    torch.manual_seed(0)
    model, x = ConvBnConv().eval(), torch.randn(2, 3, 5, 5)
    names = {m: n for n, m in model.named_modules()}
    group = _group(model, x, model.conv1, tp.prune_conv_out_channels)
    gs = group_slices(group, names)
    weights = {n: dict(model.named_modules())[n].weight for n in ("conv1", "conv2", "fc")}
    masks = weight_masks([gs], [torch.tensor([True, False, True, False])], weights)
    with torch.no_grad():
        masked = functional_call(model, {f"{n}.weight": w * masks[n] for n, w in weights.items()}, (x,))
    pruned = copy.deepcopy(model)
    tp.DependencyGraph().build_dependency(pruned, example_inputs=x).get_pruning_group(
        pruned.conv1, tp.prune_conv_out_channels, [1, 3]).prune()
    with torch.no_grad():
        torch.testing.assert_close(masked, pruned(x), rtol=0, atol=1e-6)
    assert torch.equal(masks["conv1"], torch.ones_like(masks["conv1"]))  # producers are not masked


# --------------------------------------------------------------------------- targets

def test_macs_target_is_reached_with_the_smallest_ratio() -> None:
    model, x = build("resnet20"), example("resnet20")
    cfg = StructuredConfig(target={"macs": 0.5})
    result = prune_channels(model, cfg, x, **QUIET)
    assert result.macs_after <= 0.5 * result.macs_before
    assert result.macs_after > 0.4 * result.macs_before  # not overshooting far (round_to=8 granularity)


def test_unreachable_target_is_a_clear_error() -> None:
    with pytest.raises(StageError, match=r"target\.params: cannot reach"):
        prune_channels(build("cnn1d"), StructuredConfig(target={"params": 0.99}), example("cnn1d"), **QUIET)


# --------------------------------------------------------------------------- resume

def test_resume_after_interrupted_finetune_reproduces_the_uninterrupted_run() -> None:
    name, x = "resnet20", example("resnet20")
    cfg = StructuredConfig(ratio=0.5, importance="optg", optg_steps=3, iterative_steps=2, finetune_epochs=1)
    data = batches(SHAPES[name], count=2)

    def finetune(model: nn.Module, step: int, epochs: int) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model.train()
        for xb, yb in data(50 + step):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    full = build(name)
    prune_channels(full, cfg, x, batches=data, finetune=finetune, **QUIET)

    saved: list[tuple[dict[str, torch.Tensor], str]] = []

    def checkpoint(model: nn.Module, progress: StructuredProgress) -> None:
        saved.append(({k: v.clone() for k, v in model.state_dict().items()}, progress.model_dump_json()))

    def crashing(model: nn.Module, step: int, epochs: int) -> None:
        if step == 2:
            raise KeyboardInterrupt
        finetune(model, step, epochs)

    with pytest.raises(KeyboardInterrupt):
        prune_channels(build(name), cfg, x, batches=data, finetune=crashing, checkpoint=checkpoint, **QUIET)
    weights, state = saved[-1]
    progress = StructuredProgress.model_validate_json(state)
    assert (progress.pruned, progress.finetuned, len(saved)) == (2, 1, 3)

    resumed = apply_plan(build(name, seed=3), progress.plan)
    resumed.load_state_dict(weights, strict=True)
    result = prune_channels(resumed, cfg, x, batches=data, finetune=finetune, resume=progress, **QUIET)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s.step for s in result.steps] == [1, 2]

    with pytest.raises(StageError, match="architecture differs"):
        prune_channels(build(name), cfg, x, batches=data, finetune=finetune, resume=progress, **QUIET)


# --------------------------------------------------------------------------- config and errors

@pytest.mark.parametrize("settings,fragments", [
    ({"ratio": 1.5}, ["ratio must be in (0, 1)"]),
    ({}, ["exactly one of ratio"]),
    ({"ratio": 0.5, "target": {"macs": 0.5}}, ["exactly one of ratio"]),
    ({"ratio": 0.5, "importance": "l1"}, ["importance", "'l1'", "magnitude, optg, taylor"]),
    ({"ratio": 2, "importance": "l1", "ignore": ["(", "@head"]},
     ["ratio must be", "unknown importance", "bad regex '('", "unknown token '@head'"]),
    ({"target": {"macs": 0.5, "params": 0.5}}, ["exactly one of macs, params"]),
    ({"target": {"macs": 1.0}}, ["target.macs must be in (0, 1)"]),
    ({"target": {"flops": 0.5}}, ["flops", "Extra inputs are not permitted"]),
    ({"ratio": 0.5, "round_to": 0}, ["round_to"]),
    ({"ratio": 0.5, "allocation": "local"}, ["allocation"]),
    ({"ratio": 0.5, "iterative_step": 2}, ["iterative_step", "Extra inputs"]),
])
def test_bad_config_is_rejected_naming_the_field(settings: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        StructuredConfig(**settings)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_hooks_and_bad_plans_are_stage_errors() -> None:
    x = example("cnn1d")
    with pytest.raises(StageError, match="needs training batches"):
        prune_channels(build("cnn1d"), StructuredConfig(ratio=0.5, importance="taylor"), x, **QUIET)
    with pytest.raises(StageError, match="no fine-tune callable"):
        prune_channels(build("cnn1d"), StructuredConfig(ratio=0.5, finetune_epochs=1), x, **QUIET)
    with pytest.raises(StageConfigError, match="every channel group is ignored") as nothing:
        prune_channels(build("cnn1d"), StructuredConfig(ratio=0.5, ignore=["conv", "@classifier"]), x, **QUIET)
    assert nothing.value.field == "ignore"  # the runner reports it as structured.ignore, exit 2
    plan = prune_channels(build("cnn1d"), StructuredConfig(ratio=0.5), x, **QUIET).plan
    with pytest.raises(StageError, match=r"'conv2': plan says Conv1d, model has Linear; 'linear': no such module"):
        apply_plan(_renamed_cnn1d(), plan)
    with pytest.raises(StageError, match="not a structured plan"):
        apply_plan(build("cnn1d"), {"modules": {}})


def _renamed_cnn1d() -> nn.Module:
    model = build("cnn1d")
    model.conv2 = nn.Linear(2, 2)  # type: ignore[assignment]
    del model.linear
    return model


def test_manifest_section_and_markdown() -> None:
    result = prune_channels(build("cnn1d"), StructuredConfig(ratio=0.5), example("cnn1d"), **QUIET)
    section = json.loads(json.dumps(result.to_dict()))
    assert section["params"]["before"] == result.params_before and section["macs"]["after"] == result.macs_after
    assert section["channels"]["conv2"] == {"before": {"in": 32, "out": 32}, "after": {"in": 32, "out": 16}}
    assert section["ignored"] == ["conv1", "linear"]
    md = render_structured_markdown(section)
    assert "| conv2 | 32 -> 32 | 32 -> 16 |" in md and "| parameters |" in md
