"""Loaders: worker-independent batches, rank shards of one global order, lazy imagefolder,
sharded evaluation, and the trainer's use of them (workers, channels_last, compile)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import optg
from pipeline.distributed import end_rank_process
from stages.base import StageError
from stages.data import DataBundle, DataConfig, LoaderOptions, load_data
from stages.data.catalog import AugmentedTensorDataset
from stages.data.imagefolder import EvalTransform, TrainTransform, load_imagefolder
from stages.data.loading import default_num_workers, make_loader
from stages.tasks import ClassificationTask
from stages.train import TrainConfig, Trainer, evaluate


class GlobalRngDataset(Dataset):
    """A user's Dataset that augments with the global torch, numpy and random RNGs."""

    def __init__(self, n: int = 24) -> None:
        self.x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import random

        noise = torch.rand(4) + float(np.random.rand()) + random.random()
        return self.x[i] + noise, i


def _augmented(n: int = 40) -> AugmentedTensorDataset:
    g = torch.Generator().manual_seed(0)
    return AugmentedTensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.arange(n) % 3)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder of 3 classes of small random JPEGs of varied sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for label in ("a", "b", "c"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def _epochs(loader, epochs=(0, 1)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [(x.clone(), torch.as_tensor(y).clone()) for x, y in loader]
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("kind", ["tensors", "imagefolder", "plugin"])
def test_batches_do_not_depend_on_the_number_of_workers(kind: str, jpegs: Path) -> None:
    if kind == "tensors":
        data: Dataset = _augmented()
    elif kind == "imagefolder":
        data = load_imagefolder(jpegs, image_size=16, resize=18, augment=True, val_fraction=0.0,
                                seed=0).train
    else:
        data = GlobalRngDataset()
    serial = _epochs(make_loader(data, 8, shuffle=True, seed=5, num_workers=0))
    parallel = _epochs(make_loader(data, 8, shuffle=True, seed=5, num_workers=2))
    assert _same(serial, parallel)
    # the augmentation is really random (epochs differ) and the same seed repeats it
    assert not torch.equal(serial[0][0], serial[len(serial) // 2][0])
    assert _same(serial, _epochs(make_loader(data, 8, shuffle=True, seed=5, num_workers=0)))


def test_reading_a_plugin_dataset_leaves_the_global_rngs_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    list(make_loader(GlobalRngDataset(), 8, shuffle=True, seed=5, num_workers=0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_of_each_step_make_the_single_process_batch(world: int) -> None:
    data = _augmented(50)  # 50 = 6 * 8 + 2: a short last batch
    single = _epochs(make_loader(data, 8, shuffle=True, seed=1), epochs=(3,))
    shards = [_epochs(make_loader(data, 8, shuffle=True, seed=1, rank=r, world_size=world),
                      epochs=(3,)) for r in range(world)]
    steps = 7 if world == 2 else 6  # the last batch of 2 cannot feed 4 ranks: dropped
    assert all(len(s) == steps for s in shards)
    for step in range(steps):
        x, y = single[step]
        for rank in range(world):  # rank r holds samples r, r + world, ... of the global batch
            assert torch.equal(shards[rank][step][0], x[rank::world])  # augmentation included
            assert torch.equal(shards[rank][step][1], y[rank::world])


def test_evaluation_shards_cover_every_sample_once() -> None:
    data = TensorDataset(torch.arange(21.0)[:, None], torch.arange(21))
    seen = torch.cat([y for r in range(4) for _, y in make_loader(data, 8, rank=r, world_size=4)])
    assert sorted(seen.tolist()) == list(range(21))
    with pytest.raises(StageError, match="global batch size 6 is not divisible by the world size 4"):
        make_loader(data, 6, shuffle=True, world_size=4)
    with pytest.raises(StageError, match="rank 2 is not in a world of size 2"):
        make_loader(data, 8, rank=2, world_size=2)


def test_num_workers_auto_rule(monkeypatch: pytest.MonkeyPatch, jpegs: Path) -> None:
    files = load_imagefolder(jpegs, image_size=16, resize=18, augment=False, val_fraction=0.0,
                             seed=0).test
    monkeypatch.setattr("stages.data.loading.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_num_workers(_augmented(), cuda) == 0  # tensors in memory
    assert default_num_workers(TensorDataset(torch.zeros(2, 1)), cpu) == 0
    assert (default_num_workers(files, cuda), default_num_workers(files, cpu)) == (8, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the node
    assert (default_num_workers(files, cuda), default_num_workers(files, cpu)) == (3, 2)
    monkeypatch.setattr("stages.data.loading.cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert (default_num_workers(files, cuda), default_num_workers(files, cpu)) == (1, 1)


def test_data_config_reaches_the_loader() -> None:
    with pytest.raises(ValidationError, match="num_workers"):
        DataConfig(name="digits", num_workers=-1)
    with pytest.raises(ValidationError, match="num_workers"):
        DataConfig(name="digits", num_workers="many")
    bundle = load_data(DataConfig(name="synthetic", num_workers=2, prefetch_factor=3,
                                  persistent_workers=False), 0)
    assert bundle.loading == LoaderOptions(2, True, False, 3)
    loader = bundle.loader("train", 16, shuffle=True, device=torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (2, 3, False)
    assert not loader.pin_memory  # pinning is for CUDA copies only
    assert load_data(DataConfig(name="synthetic"), 0).loader("train", 16).num_workers == 0


def test_imagefolder_is_lazy_and_names_a_broken_file(jpegs: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(jpegs, root)
    bundle = load_imagefolder(root, image_size=16, resize=18, augment=True, val_fraction=0.25,
                              seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test), bundle.num_classes) == (18, 6, 6, 3)
    victim = root / "val" / "b" / "1.jpg"
    victim.write_bytes(b"not a jpeg")  # after the bundle exists: nothing was decoded yet
    x, y = bundle.tensors("test", limit=3)
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 1]
    with pytest.raises(StageError, match=r"cannot decode .*val/b/1\.jpg"):
        bundle.tensors("test")


def test_imagefolder_transforms() -> None:
    from PIL import Image

    solid = Image.new("RGB", (40, 30), (255, 0, 128))
    x = EvalTransform(resize=20, size=16)(solid, None)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor([255, 0, 128]) / 255.0 - mean) / std
    assert x.shape == (3, 16, 16) and torch.allclose(x, expected[:, None, None].expand(3, 16, 16), atol=1e-5)
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3)))
    train = TrainTransform(16)
    import random

    a, b = train(ramp, random.Random(7)), train(ramp, random.Random(7))
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    crops = {tuple(train(ramp, random.Random(s))[0, 0, [0, -1]].tolist()) for s in range(12)}
    assert len(crops) > 6  # different seeds crop and flip differently
    for s in range(50):  # torchvision's RandomResizedCrop bounds
        top, left, h, w = train.crop_box(64, 48, random.Random(s))
        assert 0 <= top <= 48 - h and 0 <= left <= 64 - w and h > 0 and w > 0


# --------------------------------------------------------------------------- evaluation


def _eval_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bundle = load_data(DataConfig(name="synthetic", options={"num_samples": 203, "noise": 3.0}), 0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
        accuracy = evaluate(model, bundle, "train", torch.device("cpu"), 32, rank=rank,
                            world_size=world)
        torch.save(accuracy, os.path.join(out_dir, f"acc{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_rank_process(0)  # skip interpreter finalization: gloo threads can abort it


def test_sharded_evaluation_equals_single_process(tmp_path: Path) -> None:
    """Two gloo processes (spawned: forked ones deadlock in gloo; ~10-30 s for two torch
    imports): the only check that the counts really are summed across ranks."""
    torch.manual_seed(0)
    bundle = load_data(DataConfig(name="synthetic", options={"num_samples": 203, "noise": 3.0}), 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    single = evaluate(model, bundle, "train", torch.device("cpu"), 32)
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"acc{r}.pt") for r in range(2)]
    assert ranks == [single, single] and 0 < single < 1  # counts are integers: exact
    with pytest.raises(StageError, match="world_size=2 needs an initialised process group"):
        evaluate(model, bundle, "train", torch.device("cpu"), 32, world_size=2)


# --------------------------------------------------------------------------- trainer


def _bundle(workers: int | str = 0) -> DataBundle:
    train = _augmented(48)
    val = TensorDataset(*(t[:16] for t in train.tensors))
    return DataBundle("aug", train, val, val, (3, 6, 6), 3, LoaderOptions(num_workers=workers))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3))


def _train(bundle: DataBundle, model: nn.Module, sparsifier=None, **cfg) -> Trainer:
    trainer = Trainer(model, bundle, TrainConfig(epochs=2, **cfg), phase="dense",
                      device=torch.device("cpu"), seed=0, batch_size=16, eval_batch_size=16,
                      sparsifier=sparsifier, log=lambda _: None)
    trainer.run()
    return trainer


def test_training_is_the_same_with_workers() -> None:
    serial, parallel = _train(_bundle(0), _model()), _train(_bundle(2), _model())
    assert [r.train_loss for r in serial.history] == [r.train_loss for r in parallel.history]
    assert all(torch.equal(a, b) for a, b in zip(serial.model.state_dict().values(),
                                                 parallel.model.state_dict().values()))


def test_channels_last_training_with_a_sparsifier_restores_contiguous_weights() -> None:
    """The CUDA path (channels_last) forced on CPU: same numbers, contiguous weights after."""
    def run(channels_last: bool) -> Trainer:
        model = _model()
        sparsifier = optg.create("optg", model, epochs=2, target=0.5).attach()
        trainer = Trainer(model, _bundle(), TrainConfig(epochs=2), phase="sparse",
                          device=torch.device("cpu"), seed=0, batch_size=16, eval_batch_size=16,
                          sparsifier=sparsifier, log=lambda _: None)
        trainer.channels_last = channels_last
        trainer.run()
        return trainer

    plain, nhwc = run(False), run(True)
    conv = nhwc.model[0].weight
    assert conv.is_contiguous()
    assert torch.allclose(plain.model[0].weight, conv, atol=1e-5)
    assert [round(r.train_loss, 4) for r in plain.history] == [round(r.train_loss, 4) for r in nhwc.history]
    x, _ = ClassificationTask().to_device((torch.zeros(2, 3, 4, 4), torch.zeros(2)), torch.device("cpu"), True)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_compile_runs_the_same_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile wraps the forward in torch.compile; traced here with the eager backend
    (inductor's C++ build takes ~30 s on a shared CPU; see the benchmark)."""
    real = torch.compile
    calls = []

    def eager(model, **kw):
        calls.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager)
    compiled = _train(_bundle(), _model(), compile=True)
    plain = _train(_bundle(), _model())
    assert len(calls) == 1
    assert [round(r.train_loss, 5) for r in compiled.history] == [round(r.train_loss, 5) for r in plain.history]
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())  # no _orig_mod.

    def unsupported(model, **kw):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.raises(StageError, match="train.compile: torch.compile is not available here"):
        _train(_bundle(), _model(), compile=True)
