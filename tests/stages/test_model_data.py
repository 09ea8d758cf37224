"""Model and data stages: configs, name resolution, plugins, weights, loaders."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from stages.base import StageError
from stages.data import DataBundle, DataConfig, load_data
from stages.model import ModelConfig, build_model

PLUGIN = "optg_test_plugins"


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module with model and dataset factories, importable as `optg_test_plugins`."""
    (tmp_path / f"{PLUGIN}.py").write_text(textwrap.dedent('''
        import numpy as np
        from torch import nn
        from stages.data import DataConfig, bundle_from_arrays

        def tiny_mlp(input_shape, num_classes, hidden=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden),
                                 nn.ReLU(), nn.Linear(hidden, num_classes))

        def any_kwargs(input_shape, num_classes, **kwargs):
            return nn.Linear(int(np.prod(input_shape)), num_classes)

        def not_a_module(input_shape, num_classes):
            return "a string"

        NOT_CALLABLE = 3

        def blobs(seed, n=60, features=8):
            rng = np.random.default_rng(seed)
            x = rng.normal(size=(n, features)).astype("float32")
            y = (x[:, 0] > 0).astype("int64")
            return {"train": (x, y), "test": (x[:10], y[:10]), "num_classes": 3}

        def as_bundle(seed):
            x = np.zeros((20, 1, 4, 4), "float32"); y = np.arange(20) % 2
            return bundle_from_arrays("as_bundle", DataConfig(name="x"), seed, (x, y))

        def bad_return(seed):
            return [1, 2]

        def bad_keys(seed):
            return {"training": ([[0.0]], [0])}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    return PLUGIN


# --------------------------------------------------------------------------- configs


def test_configs_are_strict_and_validated() -> None:
    assert DataConfig(name="digits").batch_size == 64
    assert ModelConfig(name="small_cnn").options == {}
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataConfig(name="digits", batchsize=3)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ModelConfig(name="small_cnn", weight="x.pt")
    for bad in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"test_fraction": 0.0},
                {"batch_size": 0}, {"eval_batch_size": -1}, {"name": " "}):
        with pytest.raises(ValidationError):
            DataConfig(**{"name": "digits", **bad})
    with pytest.raises(ValidationError, match="must be < 1"):
        DataConfig(name="digits", val_fraction=0.5, test_fraction=0.5)


# --------------------------------------------------------------------------- build_model


def test_build_builtin_with_options() -> None:
    model = build_model(ModelConfig(name="cnn1d", options={"channels": 16}), (1, 40), 10)
    assert model.conv1.out_channels == 16
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(StageError, match="unknown model 'resnet18'; valid: cnn1d, mobilenet_v1, "
                                          "resnet20, resnet32, resnet56, small_cnn, transformer"):
        build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)


def test_unknown_and_bad_model_options() -> None:
    with pytest.raises(StageError, match="unknown option.*depth; valid: width"):
        build_model(ModelConfig(name="resnet20", options={"depth": 3}), (3, 32, 32), 10)
    with pytest.raises(StageError, match="could not be built with options"):
        build_model(ModelConfig(name="small_cnn", options={"width": "wide"}), (1, 8, 8), 10)
    with pytest.raises(StageError, match="invalid input_shape"):
        build_model(ModelConfig(name="small_cnn"), (1, 0, 8), 10)


def test_torchvision_model_needs_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(StageError, match=r"torchvision:resnet50.*install optg-pipeline\[vision\]"):
        build_model(ModelConfig(name="torchvision:resnet50"), (3, 224, 224), 1000)


def test_plugin_model(plugin: str) -> None:
    model = build_model(ModelConfig(name=f"{plugin}:tiny_mlp", options={"hidden": 32}), (1, 8, 8), 3)
    assert model[1].out_features == 32 and model(torch.randn(4, 1, 8, 8)).shape == (4, 3)
    assert build_model(ModelConfig(name=f"{plugin}:any_kwargs", options={"x": 1}), (4,), 2)
    with pytest.raises(StageError, match="unknown option.*depth; valid: hidden"):
        build_model(ModelConfig(name=f"{plugin}:tiny_mlp", options={"depth": 2}), (4,), 2)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        (f"{PLUGIN}:missing", f"module '{PLUGIN}' has no attribute 'missing'"),
        (f"{PLUGIN}:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
        (f"{PLUGIN}:not_a_module", "returned str, not a torch.nn.Module"),
        (f"{PLUGIN}:", "expected 'package.module:callable'"),
    ],
)
def test_plugin_model_errors(plugin: str, spec: str, message: str) -> None:
    with pytest.raises(StageError, match=message):
        build_model(ModelConfig(name=spec), (1, 8, 8), 3)


# --------------------------------------------------------------------------- weights


def _small(width: int = 16) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(ModelConfig(name="small_cnn", options={"width": width}), (1, 8, 8), 10)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth-nested"])
def test_weights_round_trip(tmp_path: Path, fmt: str) -> None:
    source = _small()
    with torch.no_grad():
        source(torch.randn(4, 1, 8, 8))  # train-mode pass: non-default BN buffers
    state = source.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    torch.manual_seed(2)  # a different init, so loading must overwrite it
    loaded = build_model(
        ModelConfig(name="small_cnn", weights=str(path)), (1, 8, 8), 10
    )
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_mismatch_lists_keys_and_shapes(tmp_path: Path) -> None:
    other = build_model(ModelConfig(name="cnn1d"), (1, 40), 10)
    torch.save(other.state_dict(), tmp_path / "cnn1d.pt")
    with pytest.raises(StageError, match=r"missing \(\d+\): 0\.0\.weight.*unexpected \(8\): conv1\.weight"):
        build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "cnn1d.pt")), (1, 8, 8), 10)
    torch.save(_small(width=32).state_dict(), tmp_path / "wide.pt")
    shapes = r"shape mismatch \(\d+\): 0\.0\.weight: file \(32, 1, 3, 3\) vs model \(16, 1, 3, 3\)"
    with pytest.raises(StageError, match=shapes):
        build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "wide.pt")), (1, 8, 8), 10)


def test_weights_file_errors(tmp_path: Path) -> None:
    cfg = ModelConfig(name="small_cnn", weights=str(tmp_path / "none.safetensors"))
    with pytest.raises(StageError, match="weights file not found.*none.safetensors"):
        build_model(cfg, (1, 8, 8), 10)
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(StageError, match="unknown extension ..onnx.; use .safetensors or a torch.save file"):
        build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "w.onnx")), (1, 8, 8), 10)
    (tmp_path / "w.pt").write_bytes(b"garbage")
    with pytest.raises(StageError, match="cannot read weights file"):
        build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "w.pt")), (1, 8, 8), 10)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(StageError, match="does not hold a state dict"):
        build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "list.pt")), (1, 8, 8), 10)


# --------------------------------------------------------------------------- data stage


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(StageError, match="unknown dataset 'mnist'; valid: cifar10, digits, "
                                          "imagefolder, mnist1d, npz, synthetic"):
        load_data(DataConfig(name="mnist"), 0)


def test_plugin_dataset_dict(plugin: str) -> None:
    bundle = load_data(DataConfig(name=f"{plugin}:blobs", options={"n": 80}), seed=5)
    assert bundle.input_shape == (1, 8) and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (72, 8, 10)
    again = load_data(DataConfig(name=f"{plugin}:blobs", options={"n": 80}), seed=5)
    assert torch.equal(bundle.tensors("train")[0], again.tensors("train")[0])


def test_plugin_dataset_bundle_and_errors(plugin: str) -> None:
    bundle = load_data(DataConfig(name=f"{plugin}:as_bundle"), 0)
    assert isinstance(bundle, DataBundle) and bundle.input_shape == (1, 4, 4)
    with pytest.raises(StageError, match="unknown option.*size; valid: n, features"):
        load_data(DataConfig(name=f"{plugin}:blobs", options={"size": 3}), 0)
    with pytest.raises(StageError, match="seed are set by the pipeline"):
        load_data(DataConfig(name=f"{plugin}:blobs", options={"seed": 3}), 0)
    with pytest.raises(StageError, match="returned list; expected a DataBundle or a dict"):
        load_data(DataConfig(name=f"{plugin}:bad_return"), 0)
    with pytest.raises(StageError, match=r"keys \['training'\]; needs 'train'"):
        load_data(DataConfig(name=f"{plugin}:bad_keys"), 0)
    with pytest.raises(StageError, match="has no attribute 'nothing'"):
        load_data(DataConfig(name=f"{plugin}:nothing"), 0)


def test_loader_is_deterministic_by_seed() -> None:
    bundle = load_data(DataConfig(name="synthetic", options={"num_samples": 64}), 0)

    def order(seed: int, shuffle: bool = True) -> torch.Tensor:
        return torch.cat([y for _, y in bundle.loader("train", 8, shuffle=shuffle, seed=seed)])

    x_all, y_all = bundle.tensors("train")
    assert torch.equal(order(0, shuffle=False), y_all)
    assert torch.equal(order(3), order(3))
    first = [x for x, _ in bundle.loader("train", 8, shuffle=True, seed=3)]
    second = [x for x, _ in bundle.loader("train", 8, shuffle=True, seed=4)]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    assert sorted(order(4).tolist()) == sorted(y_all.tolist())
    assert len(bundle.tensors("train", limit=5)[0]) == 5
    with pytest.raises(StageError, match="unknown split 'dev'; valid: train, val, test"):
        bundle.loader("dev", 8)


def test_digits_small_cnn_end_to_end() -> None:
    """The zoo's pairing works: a couple of epochs on digits beat 90%."""
    torch.manual_seed(0)
    bundle = load_data(DataConfig(name="digits"), 0)
    model = build_model(ModelConfig(name="small_cnn"), bundle.input_shape, bundle.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(3):
        for x, y in bundle.loader("train", 64, shuffle=True, seed=epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x, y = bundle.tensors("test")
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9
