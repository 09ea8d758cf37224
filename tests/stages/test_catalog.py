"""Built-in datasets: shapes, class counts, deterministic splits, npz/cifar10 file handling."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.catalog import CIFAR10_MEAN, DATASETS, AugmentedTensorDataset
from stages.base import StageError
from stages.data import DataBundle, DataConfig, load_data


def _load(name: str, seed: int = 0, **kwargs) -> DataBundle:
    return load_data(DataConfig(name=name, **kwargs), seed)


def _sizes(bundle: DataBundle) -> tuple[int, int, int]:
    return len(bundle.train), len(bundle.val), len(bundle.test)  # type: ignore[arg-type]


def _check_tensors(bundle: DataBundle) -> None:
    for split in ("train", "val", "test"):
        x, y = bundle.tensors(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == bundle.input_shape
        assert len(x) == len(y)
        if len(y):
            assert 0 <= int(y.min()) and int(y.max()) < bundle.num_classes


def test_registry_lists_builtins() -> None:
    assert DATASETS.names() == ["cifar10", "digits", "imagefolder", "mnist1d", "npz", "synthetic"]


def test_digits_shapes_and_split_sizes() -> None:
    bundle = _load("digits")
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    n_train, n_val, n_test = _sizes(bundle)
    assert n_train + n_val + n_test == 1797
    assert n_test == round(1797 * 0.2) and n_val == round((1797 - n_test) * 0.1)
    x, _ = bundle.tensors("train")
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    _check_tensors(bundle)


def test_digits_split_is_stratified() -> None:
    _, y = _load("digits").tensors("test")
    counts = torch.bincount(y, minlength=10)
    assert int(counts.min()) >= 30  # ~36 per class out of 359


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_same_seed_same_split_other_seed_differs(name: str) -> None:
    a, b, c = _load(name, seed=3), _load(name, seed=3), _load(name, seed=4)
    for split in ("train", "val", "test"):
        assert torch.equal(a.tensors(split)[0], b.tensors(split)[0])
    assert not torch.equal(a.tensors("test")[0], c.tensors("test")[0])


def test_mnist1d_default_sizes_and_shapes() -> None:
    bundle = _load("mnist1d")
    assert bundle.input_shape == (1, 40) and bundle.num_classes == 10
    n_train, n_val, n_test = _sizes(bundle)
    assert (n_train + n_val, n_test) == (4000, 1000) and n_val == 400
    _check_tensors(bundle)


def test_mnist1d_is_side_effect_free_and_seeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = _load("mnist1d", seed=0, options={"num_samples": 200})
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG untouched
    assert list(tmp_path.iterdir()) == []  # nothing cached to disk
    assert _sizes(a) == (144, 16, 40)
    b = _load("mnist1d", seed=0, options={"num_samples": 200})
    c = _load("mnist1d", seed=1, options={"num_samples": 200})
    assert torch.equal(a.tensors("val")[0], b.tensors("val")[0])
    assert not torch.equal(a.tensors("val")[0], c.tensors("val")[0])
    assert torch.equal(a.tensors("test")[0], c.tensors("test")[0])  # generation seed unchanged
    d = _load("mnist1d", seed=0, options={"num_samples": 200, "seed": 7})
    assert not torch.equal(a.tensors("test")[0], d.tensors("test")[0])


def test_synthetic_options_shapes_and_learnability() -> None:
    bundle = _load("synthetic", options={"shape": [2, 12], "num_classes": 3, "num_samples": 300})
    assert bundle.input_shape == (2, 12) and bundle.num_classes == 3
    assert sum(_sizes(bundle)) == 300
    _check_tensors(bundle)
    x, y = bundle.tensors("train")
    centroids = torch.stack([x[y == k].mean(0) for k in range(3)]).flatten(1)
    xt, yt = bundle.tensors("test")
    pred = torch.cdist(xt.flatten(1), centroids).argmin(1)
    assert (pred == yt).float().mean() > 0.8  # chance is 1/3


def test_synthetic_1d_shape_becomes_one_channel_signal() -> None:
    assert _load("synthetic", options={"shape": [16]}).input_shape == (1, 16)


def test_val_fraction_zero_gives_empty_val() -> None:
    bundle = _load("synthetic", val_fraction=0.0)
    x, y = bundle.tensors("val")
    assert x.shape == (0, 1, 8, 8) and y.shape == (0,)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("synthetic", {"nois": 1.0}, "unknown option.*nois.*valid: shape, num_classes, num_samples, noise"),
        ("synthetic", {"noise": -1}, "noise.*greater than or equal to 0"),
        ("digits", {"x": 1}, r"unknown option.*valid: \(none\)"),
        ("mnist1d", {"num_samples": 5}, "num_samples"),
        ("cifar10", {"augmnt": True}, "valid: augment"),
    ],
)
def test_bad_options_are_stage_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(StageError, match=message):
        _load(name, options=options, path="/nonexistent" if name == "cifar10" else None)


def test_builtin_without_path_rejects_path_and_file_sources_need_one() -> None:
    with pytest.raises(StageError, match="takes no path"):
        _load("digits", path="/tmp/x")
    with pytest.raises(StageError, match="needs `path`"):
        _load("npz")


# --------------------------------------------------------------------------- npz


def _npz(tmp_path: Path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_implicit_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 3, 4, 4)), np.arange(100) % 5
    bundle = _load("npz", path=_npz(tmp_path, x=x, y=y))
    assert bundle.input_shape == (3, 4, 4) and bundle.num_classes == 5
    assert _sizes(bundle) == (72, 8, 20)
    _check_tensors(bundle)


def test_npz_explicit_splits_and_2d_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(50, 6)), "y_train": np.arange(50) % 3,
        "x_test": rng.normal(size=(10, 6)), "y_test": np.arange(10) % 3,
    }
    bundle = _load("npz", path=_npz(tmp_path, **arrays), test_fraction=0.5)
    assert bundle.input_shape == (1, 6)  # (N, F) -> (N, 1, F)
    assert _sizes(bundle) == (45, 5, 10)  # test from file, val carved from train
    x_test, _ = bundle.tensors("test")
    assert np.allclose(x_test[:, 0].numpy(), arrays["x_test"])
    arrays |= {"x_val": rng.normal(size=(7, 6)), "y_val": np.arange(7) % 3}
    bundle = _load("npz", path=_npz(tmp_path, **arrays), options={"num_classes": 4})
    assert _sizes(bundle) == (50, 7, 10) and bundle.num_classes == 4


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"a": np.zeros(3)}, "needs arrays x, y or x_train.*found keys: a"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4), "x_test": np.zeros((2, 2))},
         "lacks y_test; found keys: x_test, x_train, y_train"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(5, dtype=int)}, "x has 4 samples but y has 5"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0.5, 1])}, "labels must be integers"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 1, 1])}, "labels must be >= 0, got -1"),
        ({"x": np.array([["a", "b"]] * 4), "y": np.zeros(4, dtype=int)}, "x must be numeric"),
        ({"x": np.array([[1], "ab", None, 2.0], dtype=object), "y": np.zeros(4, dtype=int)},
         "'x'.*not numeric"),
        ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, dtype=int)}, "NaN"),
        ({"x": np.zeros(4), "y": np.zeros(4, dtype=int)}, "at least 2 dims"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4, dtype=int), "x_test": np.zeros((2, 2)),
          "y_test": np.zeros(2, dtype=int), "x_val": np.zeros((1, 2))}, "x_val without its pair"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    with pytest.raises(StageError, match=message):
        _load("npz", path=_npz(tmp_path, **arrays))


def test_npz_missing_file_and_bad_num_classes(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="file not found.*nope.npz"):
        _load("npz", path=str(tmp_path / "nope.npz"))
    path = _npz(tmp_path, x=np.zeros((20, 2)), y=np.arange(20) % 4)
    with pytest.raises(StageError, match="num_classes=2 but labels go up to 3"):
        _load("npz", path=path, options={"num_classes": 2})
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StageError, match="cannot read"):
        _load("npz", path=str(tmp_path / "junk.npz"))


# --------------------------------------------------------------------------- cifar10


def _fake_cifar(root: Path, per_batch: int = 20, n_test: int = 10) -> Path:
    """The CIFAR-10 python layout: pickled dicts with b'data' (N, 3072) uint8 and b'labels'."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in np.arange(n) % 10],
        }
        with (root / name).open("wb") as fh:
            pickle.dump(batch, fh)
    return root


def test_cifar10_fake_folder(tmp_path: Path) -> None:
    folder = _fake_cifar(tmp_path / "cifar-10-batches-py")
    for path in (folder, tmp_path):  # the batches folder or its parent
        bundle = _load("cifar10", path=str(path))
        assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
        assert _sizes(bundle) == (90, 10, 10)
        _check_tensors(bundle)


def test_cifar10_normalisation_and_augment(tmp_path: Path) -> None:
    folder = _fake_cifar(tmp_path / "c")
    with (folder / "test_batch").open("rb") as fh:
        raw = pickle.load(fh)
    raw[b"data"][0, :1024] = round(CIFAR10_MEAN[0] * 255)  # red plane at the mean
    with (folder / "test_batch").open("wb") as fh:
        pickle.dump(raw, fh)
    bundle = _load("cifar10", path=str(folder), options={"augment": True})
    x_test, _ = bundle.tensors("test")
    assert float(x_test[0, 0].abs().max()) < 0.01
    assert isinstance(bundle.train, AugmentedTensorDataset)
    x0, _ = bundle.tensors("train", limit=1)
    torch.manual_seed(0)
    augmented = torch.stack([bundle.train[0][0] for _ in range(8)])
    assert augmented.shape == (8, 3, 32, 32)
    assert any(not torch.equal(a, x0[0]) for a in augmented)


def test_cifar10_missing_batches_are_listed(tmp_path: Path) -> None:
    folder = _fake_cifar(tmp_path / "c")
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(StageError, match="lacks data_batch_3, test_batch; found: data_batch_1"):
        _load("cifar10", path=str(folder))
    with pytest.raises(StageError, match="folder not found"):
        _load("cifar10", path=str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_needs_no_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    for module in ("torchvision", "torchvision.datasets", "torchvision.transforms"):
        monkeypatch.setitem(sys.modules, module, None)
    for split, count in (("train", 10), ("val", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(folder / f"{i}.jpg")
    bundle = _load("imagefolder", path=str(tmp_path), options={"image_size": 16, "resize": 20})
    assert _sizes(bundle) == (18, 2, 4) and bundle.num_classes == 2
    assert bundle.tensors("test")[0].shape == (4, 3, 16, 16)
    with pytest.raises(StageError, match="missing folder"):
        _load("imagefolder", path=str(tmp_path / "nowhere"))
