"""ImageNet-style folders of image files, decoded lazily (one file per sample) with PIL.

`root/<split>/<class>/**/<image>`: classes are the sorted folder names of `train/`, files
are found recursively with the usual image extensions, as torchvision's ImageFolder does.
Nothing is decoded up front; each sample is read, decoded and transformed when the loader
asks for it, i.e. in the loader's worker processes. The random training transform
(RandomResizedCrop + horizontal flip, torchvision's parameters) draws only from the
sample's own seed (`stages.data.loading`), so augmentation does not depend on the workers.
Needs Pillow only; torchvision is not used.
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from stages.base import StageError
from stages.data.bundle import DataBundle, split_arrays

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _pil():  # type: ignore[no-untyped-def]
    try:
        from PIL import Image
    except ImportError as exc:  # Pillow comes with matplotlib, a core dependency
        raise StageError("dataset 'imagefolder' needs Pillow (pip install pillow)") from exc
    return Image


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to `resize`, center-crop `size`, normalise (torchvision's
    Resize(int) + CenterCrop + ToTensor + Normalize, bilinear with antialiasing)."""

    resize: int
    size: int
    augments = False

    def __call__(self, image, rng: random.Random | None) -> Tensor:  # type: ignore[no-untyped-def]
        width, height = image.size
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        scale_x, scale_y = width / new_w, height / new_h
        top = round((new_h - self.size) / 2.0)
        left = round((new_w - self.size) / 2.0)
        if top < 0 or left < 0:  # crop larger than the resized image: resize first, then pad
            return _to_tensor(_center_pad(image.resize((new_w, new_h), _bilinear()), self.size))
        box = (left * scale_x, top * scale_y, (left + self.size) * scale_x,
               (top + self.size) * scale_y)
        return _to_tensor(image.resize((self.size, self.size), _bilinear(), box=box))


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) then a random horizontal flip, normalised."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augments = True

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params: (top, left, h, w)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height  # fallback: the central crop of the closest allowed ratio
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image, rng: random.Random | None) -> Tensor:  # type: ignore[no-untyped-def]
        rng = rng or random.Random(int(torch.randint(0, 2**62, ()).item()))
        width, height = image.size
        top, left, h, w = self.crop_box(width, height, rng)
        out = image.resize((self.size, self.size), _bilinear(), box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            out = out.transpose(_pil().Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(out)


def _bilinear():  # type: ignore[no-untyped-def]
    return _pil().Resampling.BILINEAR


def _center_pad(image, size: int):  # type: ignore[no-untyped-def]
    canvas = _pil().new("RGB", (max(size, image.size[0]), max(size, image.size[1])))
    canvas.paste(image, ((canvas.size[0] - image.size[0]) // 2, (canvas.size[1] - image.size[1]) // 2))
    left, top = (canvas.size[0] - size) // 2, (canvas.size[1] - size) // 2
    return canvas.crop((left, top, left + size, top + size))


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _to_tensor(image) -> Tensor:  # type: ignore[no-untyped-def]
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet-normalised."""
    array = torch.from_numpy(np.array(image, dtype=np.uint8))
    return array.permute(2, 0, 1).float().div_(255.0).sub_(_MEAN).div_(_STD)


class ImageFolderDataset(Dataset):
    """Image files with labels; one decode per access. Paths are kept in one numpy bytes
    array (not a list of str) so forked workers do not copy them page by page."""

    def __init__(self, root: Path, paths: Sequence[str], labels: Sequence[int],
                 transform: EvalTransform | TrainTransform) -> None:
        self.root = str(root)
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.augments = transform.augments

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageFolderDataset:
        out = ImageFolderDataset.__new__(ImageFolderDataset)
        out.root, out.transform, out.augments = self.root, self.transform, self.augments
        out.paths, out.labels = self.paths[indices], self.labels[indices]
        return out

    def get_item(self, index: int, seed: int | None) -> tuple[Tensor, int]:
        path = os.path.join(self.root, os.fsdecode(self.paths[index]))
        try:
            with _pil().open(path) as raw:
                image = raw.convert("RGB")
        except (OSError, ValueError) as exc:
            raise StageError(f"dataset 'imagefolder': cannot decode {path!r}: {exc}") from exc
        rng = None if seed is None else random.Random(seed)
        return self.transform(image, rng), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One sample; a random transform draws its seed from torch's global generator."""
        return self.get_item(index, None)


def scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(classes, relative paths, labels) of `folder/<class>/**/<image>`, sorted."""
    if not folder.is_dir():
        raise StageError(f"dataset 'imagefolder': missing folder {str(folder)!r}")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise StageError(
            f"dataset 'imagefolder': classes in {folder.name}/ differ from train/ "
            f"({len(found)} vs {len(classes)} folders; only in {folder.name}/: "
            f"{', '.join(extra[:5]) or '-'}; missing: {', '.join(missing[:5]) or '-'})"
        )
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(found):
        before = len(paths)
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, folder)
            paths += [os.path.join(rel, f) for f in sorted(filenames)
                      if f.lower().endswith(IMG_EXTENSIONS)]
        labels += [label] * (len(paths) - before)
        if len(paths) == before:
            empty.append(name)
    if not found:
        raise StageError(f"dataset 'imagefolder': {str(folder)!r} has no class folders")
    if empty:
        raise StageError(
            f"dataset 'imagefolder': no image files ({', '.join(IMG_EXTENSIONS)}) in "
            f"{len(empty)} class folder(s) of {str(folder)!r}: {', '.join(empty[:5])}"
        )
    return found, paths, labels


def load_imagefolder(root: Path, *, image_size: int, resize: int, augment: bool,
                     val_fraction: float, seed: int) -> DataBundle:
    """`root/train` and `root/val` (and optionally `root/test`) as a bundle.

    With test/: val = val/, test = test/. Without: val/ is the held-out test set (as
    ImageNet results are reported on it) and val is carved from train by `val_fraction`
    (stratified, by `seed`) with the eval transform.
    """
    eval_tf = EvalTransform(resize, image_size)
    train_tf = TrainTransform(image_size) if augment else eval_tf
    classes, paths, labels = scan(root / "train")
    train_all = ImageFolderDataset(root / "train", paths, labels, train_tf)

    def folder(sub: str) -> ImageFolderDataset:
        _, sub_paths, sub_labels = scan(root / sub, classes)
        return ImageFolderDataset(root / sub, sub_paths, sub_labels, eval_tf)

    if (root / "test").is_dir():
        train, val, test = train_all, folder("val"), folder("test")
    else:
        test = folder("val")
        index = np.arange(len(labels))
        (keep, _), (carve, _) = split_arrays(index, train_all.labels, val_fraction, seed)
        train = train_all.subset(keep)
        val = ImageFolderDataset(root / "train", paths, labels, eval_tf).subset(carve)
    return DataBundle(name="imagefolder", train=train, val=val, test=test,
                      input_shape=(3, image_size, image_size), num_classes=len(classes),
                      class_names=list(classes),
                      preprocessing={"layout": f"N x 3 x {image_size} x {image_size} RGB",
                                     "resize_shorter_side": resize, "center_crop": image_size,
                                     "scale": "pixel / 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
