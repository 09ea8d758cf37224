"""What all data sources share: the config, the bundle, array validation and the deterministic
test/val carving. The data stage's entry point is `stages.data.load_data`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from stages.base import StageError, StrictModel
from stages.data.loading import EpochLoader, make_loader

SPLITS = ("train", "val", "test")
Arrays = tuple[np.ndarray, np.ndarray]


class DataConfig(StrictModel):
    """Which dataset to load and how to split and batch it.

    name: digits | mnist1d | synthetic | npz | cifar10 | imagefolder, or
        "package.module:callable" (called as `f(seed=seed, **options)`, returning a DataBundle
        or a dict with `train` and optionally `val`/`test` (x, y) arrays and `num_classes`).
    path: the npz file, the CIFAR-10 python-format folder, or the imagefolder root.
    options: dataset-specific settings; unknown ones are rejected with the valid list.
    val_fraction: carved from train, deterministically by seed; ignored when the source has
        its own val split.
    test_fraction: only for sources without their own test split (digits, synthetic, npz with
        only x/y, plugins without `test`).

    Array sources (npz, plugins) give x as (N, ...) so one sample's shape is x.shape[1:]; 2-D
    x of shape (N, F) is read as a 1-channel signal (N, 1, F), so 1-D conv models apply.
    Labels must be non-negative integers; num_classes is max label + 1 unless given.

    batch_size: the GLOBAL training batch; with N processes each takes batch_size / N.
    num_workers: loader worker processes per training process; "auto" (default) is 0 for
        tensors in memory and a CPU-count share for file datasets (see
        `stages.data.loading.default_num_workers`). Results do not depend on it.
    pin_memory: page-locked batches and non-blocking copies when training on CUDA.
    persistent_workers, prefetch_factor: kept between epochs; batches queued per worker.
    """

    name: str
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    """batch size of evaluation"""
    num_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = Field(2, ge=1)

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("dataset name must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) + test_fraction ({self.test_fraction}) "
                "must be < 1 so some training data is left"
            )
        return self


@dataclass(frozen=True)
class LoaderOptions:
    """How a bundle's loaders fetch batches (from DataConfig; defaults for plugin bundles)."""

    num_workers: int | Literal["auto"] = "auto"
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2

    @classmethod
    def from_config(cls, cfg: DataConfig) -> LoaderOptions:
        return cls(cfg.num_workers, cfg.pin_memory, cfg.persistent_workers, cfg.prefetch_factor)


@dataclass
class DataBundle:
    """Three splits plus what a model needs to know: one sample's shape and the class count."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    loading: LoaderOptions = field(default_factory=lambda: LoaderOptions())
    class_names: list[str] | None = None  # label i's name, when the source knows it
    preprocessing: dict[str, Any] | None = None  # what a deployed model's input must get (scale, mean, std)
    tokenizer: Any = None  # stages.data.text.TokenizerInfo for token data
    max_token_id: int | None = None  # the largest token id in any split (token data)

    def split(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise StageError(
                f"dataset {self.name!r}: unknown split {split!r}; valid: {', '.join(SPLITS)}"
            )
        return getattr(self, split)

    def loader(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> EpochLoader:
        """This process's loader of a split; the order depends only on (seed, epoch).

        `batch_size` is the global batch: with `world_size` processes this rank gets its
        share (see `stages.data.loading`). Call `set_epoch(e)` on the result before each pass
        (epoch e shuffles with seed + e). Workers and pinning follow `self.loading`
        (`data.num_workers` etc.; pinning only when `device` is CUDA).
        """
        opts = self.loading
        return make_loader(
            self.split(split), batch_size, shuffle=shuffle, seed=seed, rank=rank,
            world_size=world_size, device=device,
            num_workers=None if opts.num_workers == "auto" else opts.num_workers,
            pin_memory=opts.pin_memory, persistent_workers=opts.persistent_workers,
            prefetch_factor=opts.prefetch_factor,
        )

    def batch(self, split: str, limit: int | None = None) -> Any:
        """The first `limit` samples of a split as one batch, without augmentation: `(x, y)`
        for tensor data, the dataset's own batch (a dict of tensors) for batch datasets."""
        dataset = self.split(split)
        get_batch = getattr(dataset, "get_batch", None)
        if callable(get_batch) and not hasattr(dataset, "tensors"):
            count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
            return get_batch(torch.arange(count), None)
        return self.tensors(split, limit)

    def tensors(self, split: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """Stacked (x, y) of a split, the first `limit` samples, without augmentation."""
        dataset = self.split(split)
        base = getattr(dataset, "tensors", None)  # TensorDataset and AugmentedTensorDataset
        if isinstance(base, tuple) and len(base) == 2:
            x, y = base
            return (x, y) if limit is None else (x[:limit], y[:limit])
        size = len(dataset)  # type: ignore[arg-type]
        count = size if limit is None else min(limit, size)
        if count == 0:
            return torch.empty(0, *self.input_shape), torch.empty(0, dtype=torch.long)
        xs, ys = zip(*(dataset[i] for i in range(count)))
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


# --------------------------------------------------------------------------- array helpers


def validate_arrays(dataset: str, split: str, x: Any, y: Any) -> Arrays:
    """Check one split's arrays and return them as float32 x (N, ...) and int64 y (N,)."""
    x, y = np.asarray(x), np.asarray(y)
    where = f"dataset {dataset!r} split {split!r}"
    if x.dtype.kind not in "biuf":
        raise StageError(f"{where}: x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise StageError(f"{where}: x must be (N, ...) with at least 2 dims, got shape {x.shape}")
    if y.ndim != 1:
        raise StageError(f"{where}: y must be 1-D labels (N,), got shape {y.shape}")
    if len(x) != len(y):
        raise StageError(f"{where}: x has {len(x)} samples but y has {len(y)} labels")
    if not np.all(np.isfinite(x)):
        raise StageError(f"{where}: x contains NaN or infinite values")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y) & (y == np.round(y))):
            raise StageError(f"{where}: labels must be integers, got non-integer values in y")
    elif y.dtype.kind not in "biu":
        raise StageError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise StageError(f"{where}: labels must be >= 0, got {int(y.min())}")
    if x.ndim == 2:  # (N, F) -> (N, 1, F): a 1-channel signal
        x = x[:, None, :]
    return x.astype(np.float32, copy=False), y


def split_arrays(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[Arrays, Arrays]:
    """Deterministically split (x, y) into (rest, carved) with round(fraction * N) carved.

    Stratified by label when every class can give a sample, else a plain seeded shuffle.
    """
    n_carve = int(round(len(y) * fraction))
    if n_carve == 0:
        return (x, y), (x[:0], y[:0])
    if n_carve >= len(y):
        raise StageError(f"cannot carve {n_carve} of {len(y)} samples and keep any for training")
    state = seed % (2**32)
    index = np.arange(len(y))
    try:
        keep, carve = train_test_split(index, test_size=n_carve, random_state=state, stratify=y)
    except ValueError:  # a class with < 2 samples, or fewer carved samples than classes
        keep, carve = train_test_split(index, test_size=n_carve, random_state=state)
    keep, carve = np.sort(keep), np.sort(carve)
    return (x[keep], y[keep]), (x[carve], y[carve])


def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


def bundle_from_arrays(
    name: str,
    cfg: DataConfig,
    seed: int,
    train: Arrays,
    test: Arrays | None = None,
    val: Arrays | None = None,
    num_classes: int | None = None,
) -> DataBundle:
    """Validate arrays and build a bundle; a missing test (val) split is carved from train by
    cfg.test_fraction (cfg.val_fraction)."""
    x_train, y_train = validate_arrays(name, "train", *train)
    if test is None:
        (x_train, y_train), (x_test, y_test) = split_arrays(
            x_train, y_train, cfg.test_fraction, seed
        )
    else:
        x_test, y_test = validate_arrays(name, "test", *test)
    if val is None:
        (x_train, y_train), (x_val, y_val) = split_arrays(
            x_train, y_train, cfg.val_fraction, seed + 1
        )
    else:
        x_val, y_val = validate_arrays(name, "val", *val)
    if len(y_train) == 0:
        raise StageError(f"dataset {name!r}: the train split is empty")
    shape = x_train.shape[1:]
    for split, xs in (("val", x_val), ("test", x_test)):
        if len(xs) and xs.shape[1:] != shape:
            raise StageError(
                f"dataset {name!r}: {split} samples have shape {xs.shape[1:]}, train has {shape}"
            )
    top = int(max(int(ys.max()) for ys in (y_train, y_val, y_test) if len(ys))) + 1
    if num_classes is None:
        num_classes = top
    elif int(num_classes) < top:
        raise StageError(
            f"dataset {name!r}: num_classes={num_classes} but labels go up to {top - 1}"
        )
    return DataBundle(
        name=name,
        train=to_dataset(x_train, y_train),
        val=to_dataset(x_val.reshape(-1, *shape), y_val),
        test=to_dataset(x_test.reshape(-1, *shape), y_test),
        input_shape=tuple(int(d) for d in shape),
        num_classes=int(num_classes),
    )
