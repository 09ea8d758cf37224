"""Built-in model zoo: shapes, determinism, 2:4-friendly widths, ONNX export parity."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from stages.zoo import MODELS, torchvision_model
from stages.base import StageError

# name -> (one-sample input shape, options): small inputs/widths keep export fast.
CASES: dict[str, tuple[tuple[int, ...], dict]] = {
    "small_cnn": ((1, 8, 8), {}),
    "cnn1d": ((1, 40), {}),
    "resnet20": ((3, 16, 16), {}),
    "resnet32": ((3, 8, 8), {}),
    "resnet56": ((3, 8, 8), {}),
    "vgg_small": ((3, 32, 32), {"width_mult": 0.25}),
    "mobilenet_v1": ((3, 32, 32), {"width_mult": 0.25}),
    "transformer": ((1, 40), {}),
}


def _build(name: str, shape: tuple[int, ...], num_classes: int = 10, **options) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.get(name)(shape, num_classes, **options)


def _calibrate(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Give BatchNorm non-trivial running stats, so eval-mode parity tests real arithmetic."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape))
    return model.eval()


def test_registry_holds_every_builtin() -> None:
    assert set(CASES) <= set(MODELS.names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape(name: str) -> None:
    shape, options = CASES[name]
    model = _build(name, shape, num_classes=7, **options)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("resnet20", (3, 32, 32)),
        ("resnet20", (1, 28, 28)),
        ("vgg_small", (3, 4, 4)),
        ("vgg_small", (1, 8, 8)),
        ("mobilenet_v1", (1, 28, 28)),
        ("transformer", (1, 8, 8)),
        ("transformer", (3, 10, 10)),  # 10 is not a multiple of patch=4: zero-padded
        ("transformer", (2, 37)),
        ("small_cnn", (3, 5, 5)),
    ],
)
def test_other_input_shapes(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, shape, num_classes=5).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 5)


def test_mobilenet_stem_stride_follows_input_size() -> None:
    small = _build("mobilenet_v1", (3, 32, 32), width_mult=0.25)
    large = _build("mobilenet_v1", (3, 96, 96), width_mult=0.25)
    forced = _build("mobilenet_v1", (3, 32, 32), width_mult=0.25, small_input=False)
    assert small[0][0].stride == (1, 1)
    assert large[0][0].stride == (2, 2) and forced[0][0].stride == (2, 2)
    depthwise = [m for m in small.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels for m in depthwise)


def test_transformer_uses_plain_linears_only() -> None:
    model = _build("transformer", (1, 40))
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 + 2 * (4 + 2) + 1  # embed, per block q/k/v/out + 2 MLP, head


@pytest.mark.parametrize("name", sorted(CASES))
def test_deterministic_given_seed(name: str) -> None:
    shape, options = CASES[name]
    a, b = _build(name, shape, **options), _build(name, shape, **options)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_hidden_layers_are_2to4_friendly(name: str) -> None:
    """Every conv/linear after the stem reduces over a multiple of 16 channels (depthwise
    convs, with one input channel per group, are exempt)."""
    shape, options = CASES[name]
    model = _build(name, shape, **options)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    reduction = [
        m.weight.shape[1] for m in layers[1:]  # layers[0] is the stem / patch embedding
        if not (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels)
    ]
    assert reduction and all(c % 16 == 0 for c in reduction), reduction


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_export_parity_with_dynamic_batch(name: str, tmp_path: Path) -> None:
    shape, options = CASES[name]
    model = _calibrate(_build(name, shape, **options), shape)
    path = tmp_path / f"{name}.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model, (torch.randn(2, *shape),), str(path), dynamo=True,
        dynamic_shapes=({0: batch},), input_names=["x"], output_names=["logits"],
    )
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *shape)
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name,shape,options,message",
    [
        ("small_cnn", (1, 40), {}, "needs image input (C, H, W)"),
        ("cnn1d", (1, 8, 8), {}, "needs 1-D signal input (C, L)"),
        ("cnn1d", (1, 2), {}, "too short"),
        ("resnet20", (40,), {}, "needs image input"),
        ("transformer", (1, 40), {"dim": 30, "heads": 4}, "divisible by heads=4"),
        ("transformer", (5,), {}, "(C, L) or (C, H, W)"),
        ("vgg_small", (3, 8, 8), {"width_mult": 0}, "width_mult must be > 0"),
    ],
)
def test_bad_inputs_raise_stage_error(name: str, shape: tuple, options: dict, message: str) -> None:
    with pytest.raises(StageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MODELS.get(name)(shape, 10, **options)


def test_torchvision_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(StageError, match=r"install optg-pipeline\[vision\]"):
        torchvision_model("resnet50", (3, 224, 224), 1000)
