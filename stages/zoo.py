"""Built-in model zoo: small, ONNX-exportable classifiers and the `MODELS` registry.

Every factory has the signature `factory(input_shape, num_classes, **options) -> nn.Module`
where `input_shape` is one sample without the batch dim: (C, L) for 1-D signals, (C, H, W)
for images. Models are plain nn.Module trees of Conv/Linear/BatchNorm/LayerNorm/ReLU so that
masks can be applied to their weights and `torch.onnx.export(..., dynamo=True)` works with a
dynamic batch dimension. Hidden channel counts are multiples of 16, so 2:4 sparsity applies to
every layer except stems whose input channels (1 or 3) are not a multiple of 4, and depthwise
convolutions (one input channel per group).
"""
from __future__ import annotations

import difflib
import functools
import importlib
import math
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from optg.registry import Registry
from stages.base import StageError, missing_extra
from stages.plugins import signature_schema

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry[ModelFactory]("model")


# --------------------------------------------------------------------------- helpers


def _round16(channels: float) -> int:
    """Round a scaled channel count to a multiple of 16 (at least 16), so 2:4 groups fit."""
    return max(16, int(round(channels / 16.0)) * 16)


def _image_shape(model: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise StageError(
            f"model {model!r} needs image input (C, H, W), got input_shape {tuple(input_shape)}"
        )
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


def _positive(model: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise StageError(f"model {model!r}: option {key} must be > 0, got {value}")


def _init_conv_bn(module: nn.Module) -> None:
    """He init for convs, identity BN, PyTorch-default Linear: a standard CNN start.

    Depthwise convs use fan_in: PyTorch's fan_out ignores groups, which would shrink the signal
    ~sqrt(C)x per block and leave a fresh (eval-mode) MobileNet with constant outputs.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            depthwise = m.groups > 1 and m.groups == m.in_channels
            nn.init.kaiming_normal_(m.weight, mode="fan_in" if depthwise else "fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn_relu(
    cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


# --------------------------------------------------------------------------- small_cnn


@MODELS.register("small_cnn")
def small_cnn(input_shape: Sequence[int], num_classes: int, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU blocks (w, 2w, 4w) with one 2x2 pool: sized for 8x8 digits."""
    c, h, w = _image_shape("small_cnn", input_shape)
    _positive("small_cnn", width=width)
    layers: list[nn.Module] = [_conv_bn_relu(c, width), _conv_bn_relu(width, 2 * width)]
    if h >= 2 and w >= 2:
        layers.append(nn.MaxPool2d(2))
    layers += [
        _conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    ]
    model = nn.Sequential(*layers)
    _init_conv_bn(model)
    return model


# --------------------------------------------------------------------------- cnn1d


class ConvBase1d(nn.Module):
    """The MNIST-1D paper's ConvBase: three strided conv1d + ReLU, then a linear classifier."""

    def __init__(self, in_channels: int, length: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        out_len = length
        for conv in (self.conv1, self.conv2, self.conv3):
            pad = int(conv.padding[0])  # an int padding here, never "same"/"valid"
            out_len = (out_len + 2 * pad - conv.kernel_size[0]) // conv.stride[0] + 1
        if out_len < 1:
            raise StageError(f"model 'cnn1d': input length {length} is too short (needs >= 3)")
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.linear(self.flatten(x))


@MODELS.register("cnn1d")
def cnn1d(input_shape: Sequence[int], num_classes: int, channels: int = 32) -> nn.Module:
    """MNIST-1D ConvBase for (C, L) input; with 32 channels it reaches ~94% on mnist1d."""
    if len(input_shape) != 2:
        raise StageError(
            f"model 'cnn1d' needs 1-D signal input (C, L), got input_shape {tuple(input_shape)}"
        )
    _positive("cnn1d", channels=channels)
    return ConvBase1d(int(input_shape[0]), int(input_shape[1]), num_classes, channels)


# --------------------------------------------------------------------------- ResNet (CIFAR)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut; a 1x1 conv+BN projection when the shape changes
    (option B), which exports as a plain Conv unlike option A's zero-padding slice."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet: depth 6n+2, three stages of n blocks at w, 2w, 4w channels."""

    def __init__(self, in_channels: int, num_classes: int, blocks: int, width: int) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, width)
        stages: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def _resnet(depth: int) -> ModelFactory:
    blocks = (depth - 2) // 6

    def factory(input_shape: Sequence[int], num_classes: int, width: int = 16) -> nn.Module:
        c, _, _ = _image_shape(f"resnet{depth}", input_shape)
        _positive(f"resnet{depth}", width=width)
        return CifarResNet(c, num_classes, blocks, width)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} ({blocks} blocks per stage), option `width` (16)."
    return factory


for _depth in (20, 32, 56):
    MODELS.add(f"resnet{_depth}", _resnet(_depth))


# --------------------------------------------------------------------------- vgg_small

_VGG_SMALL: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, "M")


@MODELS.register("vgg_small")
def vgg_small(input_shape: Sequence[int], num_classes: int, width_mult: float = 1.0) -> nn.Module:
    """64-64-M-128-128-M-256-M conv-BN-ReLU, global pool, linear head; pools are skipped once the
    feature map is 1x1, so inputs from 32x32 down to tiny images work."""
    c, h, w = _image_shape("vgg_small", input_shape)
    _positive("vgg_small", width_mult=width_mult)
    layers: list[nn.Module] = []
    cin = c
    for item in _VGG_SMALL:
        if item == "M":
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        cout = _round16(float(item) * width_mult)
        layers.append(_conv_bn_relu(cin, cout))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    _init_conv_bn(model)
    return model


# --------------------------------------------------------------------------- mobilenet_v1

# (output channels, stride) of the 13 depthwise-separable blocks of MobileNetV1.
_MOBILENET_V1: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


@MODELS.register("mobilenet_v1")
def mobilenet_v1(
    input_shape: Sequence[int],
    num_classes: int,
    width_mult: float = 1.0,
    small_input: bool | None = None,
) -> nn.Module:
    """MobileNetV1: 3x3 stem then depthwise (groups=C) 3x3 + pointwise 1x1 blocks.

    `small_input` (default: H <= 64) makes the stem stride 1 so 32x32 inputs keep a 2x2 map.
    """
    c, h, _ = _image_shape("mobilenet_v1", input_shape)
    _positive("mobilenet_v1", width_mult=width_mult)
    if small_input is None:
        small_input = h <= 64
    cin = _round16(32 * width_mult)
    layers: list[nn.Module] = [_conv_bn_relu(c, cin, stride=1 if small_input else 2)]
    for cout, stride in _MOBILENET_V1:
        cout = _round16(cout * width_mult)
        layers.append(
            nn.Sequential(
                _conv_bn_relu(cin, cin, stride=stride, groups=cin),  # depthwise
                _conv_bn_relu(cin, cout, k=1),  # pointwise
            )
        )
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    _init_conv_bn(model)
    return model


# --------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/out nn.Linear layers (mask-friendly,
    unlike nn.MultiheadAttention which uses its weights functionally)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, Dh)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.out((attn @ v).transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Patchify(nn.Module):
    """(B, C, L) -> (B, L/p, C*p) or (B, C, H, W) -> (B, HW/p^2, C*p*p), zero-padding the
    spatial dims up to a multiple of the patch size (pad amounts are fixed at build time)."""

    def __init__(self, input_shape: Sequence[int], patch: int) -> None:
        super().__init__()
        self.channels = int(input_shape[0])
        self.spatial = tuple(int(d) for d in input_shape[1:])
        self.patch = patch
        self.grid = tuple(math.ceil(d / patch) for d in self.spatial)
        pad: list[int] = []
        for size, cells in zip(reversed(self.spatial), reversed(self.grid)):
            pad += [0, cells * patch - size]  # F.pad order: last dim first
        self.pad = tuple(pad)
        self.num_tokens = math.prod(self.grid)
        self.token_dim = self.channels * patch ** len(self.spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = nn.functional.pad(x, self.pad)
        c, p = self.channels, self.patch
        if len(self.spatial) == 1:
            x = x.reshape(-1, c, self.grid[0], p).permute(0, 2, 1, 3)
        else:
            gh, gw = self.grid
            x = x.reshape(-1, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, self.num_tokens, self.token_dim)


class TransformerClassifier(nn.Module):
    """Patch embedding + learned positions, `depth` encoder blocks, LayerNorm, mean-pool, head."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, dim: int, depth: int, heads: int,
        mlp_ratio: int, patch: int,
    ) -> None:
        super().__init__()
        self.patchify = Patchify(input_shape, patch)
        self.embed = nn.Linear(self.patchify.token_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.patchify.num_tokens, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.patchify(x)) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


@MODELS.register("transformer")
def transformer(
    input_shape: Sequence[int],
    num_classes: int,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 2,
    patch: int = 4,
) -> nn.Module:
    """Small ViT-style encoder for (C, L) signals (patches of `patch` samples) or (C, H, W)
    images (patch x patch squares). All layers act on (B, T, D), exporting as MatMul."""
    if len(input_shape) not in (2, 3):
        raise StageError(
            f"model 'transformer' needs (C, L) or (C, H, W) input, got {tuple(input_shape)}"
        )
    _positive("transformer", dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, patch=patch)
    if dim % heads:
        raise StageError(f"model 'transformer': dim={dim} must be divisible by heads={heads}")
    return TransformerClassifier(input_shape, num_classes, dim, depth, heads, mlp_ratio, patch)


# --------------------------------------------------------------------------- torchvision


def torchvision_model(
    name: str, input_shape: Sequence[int], num_classes: int, **options: Any
) -> nn.Module:
    """`torchvision:<name>`: an untrained torchvision classifier (weights=None).

    torchvision is an optional extra; without it this raises a StageError saying how to get it.
    """
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError as exc:
        raise missing_extra(f"model 'torchvision:{name}'", exc, "vision") from exc
    _reserved(f"torchvision:{name}", options, ("weights", "num_classes"))
    available = sorted(models.list_models())
    if name not in available:
        raise StageError(
            f"unknown torchvision model {name!r}; valid: {', '.join(available)}"
        )
    if len(input_shape) != 3 or int(input_shape[0]) != 3:
        raise StageError(
            f"model 'torchvision:{name}' expects RGB images (3, H, W), got {tuple(input_shape)}"
        )
    return models.get_model(name, weights=None, num_classes=num_classes, **options)


def timm_model(
    name: str, input_shape: Sequence[int], num_classes: int, **options: Any
) -> nn.Module:
    """`timm:<name>`: an untrained timm model (pretrained=False) for `num_classes` and the
    input's channel count; `options` go to `timm.create_model` (e.g. `img_size` for ViTs,
    `drop_path_rate`). timm is an optional extra (it also needs torchvision)."""
    try:
        timm = importlib.import_module("timm")
    except ImportError as exc:
        raise missing_extra(f"model 'timm:{name}'", exc, "timm") from exc
    if not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        raise StageError(
            f"unknown timm model {name!r}; "
            + (f"close names: {', '.join(close)}; " if close else "")
            + f"timm {timm.__version__} has {len(known)} (see timm.list_models())"
        )
    if len(input_shape) != 3:
        raise StageError(
            f"model 'timm:{name}' expects images (C, H, W), got {tuple(input_shape)}"
        )
    _reserved(f"timm:{name}", options, ("pretrained", "num_classes", "in_chans"))
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=int(input_shape[0]), **options
    )


def _reserved(model: str, options: dict[str, Any], names: Sequence[str]) -> None:
    """Zoo options the pipeline sets itself (no downloads: weights come from model.weights)."""
    clash = sorted(set(options) & set(names))
    if clash:
        raise StageError(
            f"model {model!r}: option(s) {', '.join(clash)} are set by the pipeline "
            "(pretrained weights load through model.weights)"
        )


# --------------------------------------------------------------------------- option schemas

# Allowed ranges of the built-in factories' options, by parameter name: wide enough for any
# real model, narrow enough that a typo (width 1e9) is refused by `optg check`, not the allocator.
OPTION_BOUNDS: dict[str, Any] = {
    "width": Field(ge=1, le=4096), "channels": Field(ge=1, le=4096), "width_mult": Field(gt=0, le=16),
    "dim": Field(ge=1, le=8192), "depth": Field(ge=1, le=128), "heads": Field(ge=1, le=256),
    "mlp_ratio": Field(ge=1, le=16), "patch": Field(ge=1, le=1024),
}


@functools.lru_cache(maxsize=None)
def options_schema(name: str) -> type[BaseModel]:
    """The strict options model of built-in model `name`, derived from its factory's
    signature (after `input_shape, num_classes`) with `OPTION_BOUNDS`."""
    return signature_schema(MODELS.get(name), name, skip=2, bounds=OPTION_BOUNDS)
