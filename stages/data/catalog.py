"""Built-in datasets and the `DATASETS` registry.

Each factory is `factory(cfg: DataConfig, seed: int) -> DataBundle`. Options are validated
with a small strict pydantic model per dataset, so a typo lists the valid option names.
Splits are carved deterministically from `seed` (see `stages.data.bundle.split_arrays`); nothing is
downloaded or written to disk.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from torch.utils.data import Dataset

from optg.registry import Registry
from stages.base import StageError, StrictModel
from stages.data.bundle import DataBundle, DataConfig, bundle_from_arrays
from stages.data.imagefolder import load_imagefolder
from stages.plugins import schema_problems
from stages.safe_pickle import restricted_load

DatasetFactory = Callable[[DataConfig, int], DataBundle]

DATASETS: Registry[DatasetFactory] = Registry[DatasetFactory]("dataset")

OptionsT = TypeVar("OptionsT", bound=StrictModel)

MAX_SAMPLES = 100_000_000  # generated datasets: beyond this the allocation, not the config, fails
MAX_SYNTHETIC_ELEMENTS = 1 << 30  # values in a synthetic dataset (4 GiB of float32)


class NoOptions(StrictModel):
    """For datasets that take no options."""


def parse_options(dataset: str, schema: type[OptionsT], options: Mapping[str, Any]) -> OptionsT:
    """Validate `options` against `schema`; StageError names the dataset and valid options."""
    valid = list(schema.model_fields)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise StageError(
            f"dataset {dataset!r}: unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(valid) if valid else '(none)'}"
        )
    try:
        return schema.model_validate(dict(options))
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise StageError(f"dataset {dataset!r}: invalid options: {details}") from None


def _no_path(dataset: str, cfg: DataConfig) -> None:
    if cfg.path is not None:
        raise StageError(f"dataset {dataset!r} is built in and takes no path, got {cfg.path!r}")


def _need_path(dataset: str, cfg: DataConfig, what: str) -> Path:
    if cfg.path is None:
        raise StageError(f"dataset {dataset!r} needs `path`: {what}")
    return Path(cfg.path).expanduser()


# --------------------------------------------------------------------------- digits


@DATASETS.register("digits")
def digits(cfg: DataConfig, seed: int) -> DataBundle:
    """sklearn's 8x8 digits (1797 images), scaled to [0, 1], stratified test/val by seed."""
    parse_options("digits", NoOptions, cfg.options)
    _no_path("digits", cfg)
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images / 16.0).astype(np.float32)[:, None, :, :]
    bundle = bundle_from_arrays("digits", cfg, seed, (x, raw.target), num_classes=10)
    bundle.class_names = [str(i) for i in range(10)]
    bundle.preprocessing = {"layout": "N x 1 x 8 x 8", "scale": "pixel / 16 (sklearn digits 0..16 -> 0..1)"}
    return bundle


# --------------------------------------------------------------------------- mnist1d


class Mnist1dOptions(StrictModel):
    num_samples: int | None = Field(None, ge=20, le=MAX_SAMPLES, description="package default: 5000")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="generation seed; package default: 42")


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int | None, gen_seed: int | None) -> tuple[np.ndarray, ...]:
    """Generate MNIST-1D in memory (make_dataset, not get_dataset, which caches a pickle in the
    working directory). make_dataset reseeds the global `random`/numpy RNGs, so their state is
    saved and restored around it. Cached per process: generation takes ~2 s."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if num_samples is not None:
        args.num_samples = num_samples
    if gen_seed is not None:
        args.seed = gen_seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = tuple(
        np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")
    )
    for array in arrays:
        array.flags.writeable = False
    return arrays


@DATASETS.register("mnist1d")
def mnist1d(cfg: DataConfig, seed: int) -> DataBundle:
    """MNIST-1D generated in memory: x (1, 40) float32, the package's 80/20 train/test split,
    val carved from train by `seed`. Options `num_samples`, `seed` (generation)."""
    opts = parse_options("mnist1d", Mnist1dOptions, cfg.options)
    _no_path("mnist1d", cfg)
    x, y, x_test, y_test = _mnist1d_arrays(opts.num_samples, opts.seed)
    bundle = bundle_from_arrays(
        "mnist1d", cfg, seed, (x, y), test=(x_test, y_test), num_classes=10
    )
    bundle.class_names = [str(i) for i in range(10)]
    return bundle


# --------------------------------------------------------------------------- synthetic


class SyntheticOptions(StrictModel):
    shape: list[int] = Field(default_factory=lambda: [1, 8, 8], min_length=1, max_length=4)
    """one sample's shape"""
    num_classes: int = Field(4, ge=2, le=100_000)
    """number of classes"""
    num_samples: int = Field(512, ge=4, le=MAX_SAMPLES)
    """samples generated (then split)"""
    noise: float = Field(0.5, ge=0.0)
    """standard deviation of the noise added to each class template"""

    @field_validator("shape")
    @classmethod
    def _positive_dims(cls, value: list[int]) -> list[int]:
        if any(d <= 0 for d in value):
            raise ValueError(f"all dims must be > 0, got {value}")
        return value

    @model_validator(mode="after")
    def _fits_in_memory(self) -> "SyntheticOptions":
        elements = self.num_samples * math.prod(self.shape)
        if elements > MAX_SYNTHETIC_ELEMENTS:
            raise ValueError(f"num_samples x prod(shape) = {elements} values; the limit is "
                             f"{MAX_SYNTHETIC_ELEMENTS} ({4 * MAX_SYNTHETIC_ELEMENTS >> 30} GiB of float32)")
        return self


@DATASETS.register("synthetic")
def synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    """One Gaussian template per class plus `noise` * N(0, 1), from a generator seeded by
    `seed`: learnable well above chance, instant to make, for tests and smoke runs."""
    opts = parse_options("synthetic", SyntheticOptions, cfg.options)
    _no_path("synthetic", cfg)
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randn(opts.num_classes, *opts.shape, generator=generator)
    y = torch.randperm(opts.num_samples, generator=generator) % opts.num_classes
    x = templates[y] + opts.noise * torch.randn(opts.num_samples, *opts.shape, generator=generator)
    return bundle_from_arrays(
        "synthetic", cfg, seed, (x.numpy(), y.numpy()), num_classes=opts.num_classes
    )


# --------------------------------------------------------------------------- npz


class NpzOptions(StrictModel):
    num_classes: int | None = Field(None, ge=1, le=1_000_000, description="default: max label + 1")


_NPZ_EXPLICIT = ("x_train", "y_train", "x_test", "y_test")


@DATASETS.register("npz")
def npz(cfg: DataConfig, seed: int) -> DataBundle:
    """Arrays from a .npz: `x`,`y` (split by test/val fractions) or explicit
    `x_train`,`y_train`,`x_test`,`y_test` with optional `x_val`,`y_val`."""
    opts = parse_options("npz", NpzOptions, cfg.options)
    path = _need_path("npz", cfg, "a .npz file with x/y or x_train/y_train/x_test/y_test")
    if not path.is_file():
        raise StageError(f"dataset 'npz': file not found: {str(path)!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise StageError(f"dataset 'npz': cannot read {str(path)!r} as .npz: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise StageError(f"dataset 'npz': {str(path)!r} holds a single array, not a .npz archive")
    with archive:
        keys = sorted(archive.files)

        def get(key: str) -> np.ndarray:
            try:
                return archive[key]
            except ValueError as exc:  # object arrays need pickle, which we refuse
                raise StageError(
                    f"dataset 'npz': array {key!r} in {str(path)!r} is not numeric "
                    f"(object array): {exc}"
                ) from exc

        found = f"found keys: {', '.join(keys) if keys else '(none)'}"
        if any(k in keys for k in _NPZ_EXPLICIT):
            missing = [k for k in _NPZ_EXPLICIT if k not in keys]
            if missing:
                raise StageError(
                    f"dataset 'npz': {str(path)!r} has explicit splits but lacks "
                    f"{', '.join(missing)}; {found}"
                )
            has_val = [k for k in ("x_val", "y_val") if k in keys]
            if len(has_val) == 1:
                raise StageError(
                    f"dataset 'npz': {str(path)!r} has {has_val[0]} without its pair; {found}"
                )
            train = (get("x_train"), get("y_train"))
            test: tuple[np.ndarray, np.ndarray] | None = (get("x_test"), get("y_test"))
            val = (get("x_val"), get("y_val")) if has_val else None
        elif "x" in keys and "y" in keys:
            train, test, val = (get("x"), get("y")), None, None
        else:
            raise StageError(
                f"dataset 'npz': {str(path)!r} needs arrays x, y or x_train, y_train, x_test, "
                f"y_test (optionally x_val, y_val); {found}"
            )
    return bundle_from_arrays(
        "npz", cfg, seed, train, test=test, val=val, num_classes=opts.num_classes
    )


# --------------------------------------------------------------------------- cifar10

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = "test_batch"


class Cifar10Options(StrictModel):
    augment: bool = Field(False, description="random 4-px-pad crop + horizontal flip on train")


class AugmentedTensorDataset(Dataset):
    """Image tensors with the standard CIFAR augmentation (pad-4 random crop, random flip).

    The loader fetches whole batches with `get_batch`: one vectorised gather, each sample's
    crop offsets and flip read off its own seed (`stages.data.loading`), so a batch does not
    depend on workers or ranks. Indexing one sample draws its seed from torch's global RNG.
    `tensors` exposes the un-augmented data like TensorDataset does.
    """

    augments = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pad: int = 4) -> None:
        self.tensors = (x, y)
        self.pad = pad

    def __len__(self) -> int:
        return len(self.tensors[1])

    def get_batch(
        self, indices: torch.Tensor, seeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tensors[0][indices], self.tensors[1][indices]
        if seeds is None:
            return x, y
        n, _, h, w = x.shape
        span = 2 * self.pad + 1  # the seed's mixed-radix digits: top, left, flip
        top, left = seeds % span, (seeds // span) % span
        flip = ((seeds // (span * span)) % 2).bool()
        padded = torch.nn.functional.pad(x, (self.pad,) * 4)
        rows = (top[:, None] + torch.arange(h))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w))
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        channel = torch.arange(x.shape[1])[None, :, None, None]
        return padded[batch, channel, rows, cols], y

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = torch.randint(0, 2**62, (1,))
        x, y = self.get_batch(torch.tensor([index]), seed)
        return x[0], y[0]


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with file.open("rb") as fh:
            batch = restricted_load(fh, source=str(file))
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
    except Exception as exc:
        raise StageError(f"dataset 'cifar10': cannot read batch {str(file)!r}: {exc}") from exc
    if data is None or labels is None:
        raise StageError(
            f"dataset 'cifar10': batch {str(file)!r} lacks b'data'/b'labels'; "
            f"keys: {sorted(map(str, batch))}"
        )
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise StageError(
            f"dataset 'cifar10': batch {str(file)!r} data has shape {data.shape}, "
            "expected (N, 3072)"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels)


def _normalise_cifar(x: np.ndarray) -> np.ndarray:
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CIFAR10_STD, dtype=np.float32)[:, None, None]
    return (x.astype(np.float32) / 255.0 - mean) / std


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig, seed: int) -> DataBundle:
    """CIFAR-10 python-format batches (data_batch_1..5, test_batch) at `path` or at
    `path`/cifar-10-batches-py; normalised with the CIFAR mean/std, x (3, 32, 32)."""
    opts = parse_options("cifar10", Cifar10Options, cfg.options)
    root = _need_path("cifar10", cfg, "the CIFAR-10 python-format folder (cifar-10-batches-py)")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise StageError(f"dataset 'cifar10': folder not found: {str(root)!r}")
    missing = [n for n in (*_CIFAR10_TRAIN, _CIFAR10_TEST) if not (root / n).is_file()]
    if missing:
        found = sorted(p.name for p in root.iterdir())
        raise StageError(
            f"dataset 'cifar10': {str(root)!r} lacks {', '.join(missing)}; "
            f"found: {', '.join(found) if found else '(empty)'}"
        )
    parts = [_read_cifar_batch(root / n) for n in _CIFAR10_TRAIN]
    x_train = _normalise_cifar(np.concatenate([p[0] for p in parts]))
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(root / _CIFAR10_TEST)
    bundle = bundle_from_arrays(
        "cifar10", cfg, seed, (x_train, y_train), test=(_normalise_cifar(x_test), y_test),
        num_classes=10,
    )
    if opts.augment:
        bundle.train = AugmentedTensorDataset(*bundle.train.tensors)  # type: ignore[attr-defined]
    bundle.class_names = list(CIFAR10_CLASSES)
    bundle.preprocessing = {"layout": "N x 3 x 32 x 32 RGB", "scale": "pixel / 255",
                            "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    return bundle


# --------------------------------------------------------------------------- imagefolder

class ImageFolderOptions(StrictModel):
    image_size: int = Field(224, gt=0, le=4096, description="crop size fed to the model")
    resize: int | None = Field(None, gt=0, le=8192, description="eval: resize shorter side, then "
                               "center-crop; default round(image_size * 256 / 224), ImageNet's ratio")
    augment: bool = Field(True, description="train: RandomResizedCrop + horizontal flip")

    @model_validator(mode="after")
    def _resize_covers_crop(self) -> "ImageFolderOptions":
        if self.resize is None:
            self.__dict__["resize"] = round(self.image_size * 256 / 224)  # no re-validation loop
        elif self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size}): the eval "
                             "centre crop is taken from the resized image")
        return self


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig, seed: int) -> DataBundle:
    """ImageNet-style `path/train/<class>/*` and `path/val/<class>/*`, decoded lazily per
    sample (in the loader's workers) with Pillow; see `stages.data.imagefolder`.

    With a `path/test/` folder: val = val/, test = test/. Without one, val/ is the held-out
    test set (as ImageNet results are reported on it) and val is carved from train by
    `val_fraction` using the eval transforms.
    """
    opts = parse_options("imagefolder", ImageFolderOptions, cfg.options)
    root = _need_path("imagefolder", cfg, "a root with train/ and val/ class folders")
    assert opts.resize is not None  # filled from image_size by the options model
    return load_imagefolder(root, image_size=opts.image_size, resize=opts.resize,
                            augment=opts.augment, val_fraction=cfg.val_fraction, seed=seed)


# --------------------------------------------------------------------------- schemas (for `optg check`)


@dataclass(frozen=True)
class DatasetSchema:
    """What a built-in dataset accepts, checked before anything runs: its options model and
    whether `path` is required (with what it names) or refused (None)."""

    options: type[StrictModel]
    path: str | None


DATASET_SCHEMAS: dict[str, DatasetSchema] = {
    "digits": DatasetSchema(NoOptions, None),
    "mnist1d": DatasetSchema(Mnist1dOptions, None),
    "synthetic": DatasetSchema(SyntheticOptions, None),
    "npz": DatasetSchema(NpzOptions, "a .npz file with x/y or x_train/y_train/x_test/y_test"),
    "cifar10": DatasetSchema(Cifar10Options, "the CIFAR-10 python-format folder (cifar-10-batches-py)"),
    "imagefolder": DatasetSchema(ImageFolderOptions, "a root with train/ and val/ class folders"),
}


def check_builtin(name: str, cfg: DataConfig) -> list[tuple[str, str]]:
    """Problems of a built-in dataset's config as (key inside `data`, message); [] if none.

    Checks what can be known without reading the data: options against the dataset's schema,
    and whether `path` is given when needed (not whether it exists: the data may be mounted
    only where the run happens)."""
    schema = DATASET_SCHEMAS[name]
    problems: list[tuple[str, str]] = []
    if schema.path is not None and cfg.path is None:
        problems.append(("path", f"dataset {name!r} needs `path`: {schema.path}"))
    if schema.path is None and cfg.path is not None:
        problems.append(("path", f"dataset {name!r} is built in and takes no path"))
    return problems + schema_problems(schema.options, cfg.options, f"dataset {name!r}")
