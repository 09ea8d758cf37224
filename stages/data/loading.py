"""Batches for training and evaluation: sharding, per-sample seeding, workers, pinning.

One loader serves one process of a job of `world_size` processes. Each epoch has ONE global
order, a function of (seed, epoch) only; global step s takes positions [s*B, (s+1)*B) of it
(B = the global batch size) and rank r gets every world_size-th sample of that global batch
(`batch[r::world_size]`), so the union of the ranks' batches at a step is exactly the
single-process batch. Random augmentation draws from a per-sample seed that is itself a
function of (seed, epoch, dataset index): what a sample looks like does not depend on the
number of workers, on which rank loads it or on the batch it lands in.

Datasets are fetched a whole batch at a time (the DataLoader gets batch keys, not indices):
 - `TensorDataset`-like data in memory (`BatchDataset.get_batch`) is one vectorised
   gather per batch, in the training process (see `default_num_workers`);
 - `SeededDataset.get_item(index, seed)` (e.g. `imagefolder`) decodes and augments one
   file per sample in the worker processes, with the sample's own generator;
 - any other map-style Dataset (users' plugins) is read item by item with torch's CPU
   generator, `random` and numpy's global RNG seeded from the sample seed (and restored
   afterwards), so its augmentation is reproducible the same way.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    Sampler,
    TensorDataset,
    default_collate,
)

from stages.base import StageError

_SEED_LIMIT = 2**62  # sample seeds are uniform in [0, 2**62)
BatchKey = tuple[np.ndarray, np.ndarray | None]  # (dataset indices, their sample seeds or None)


@runtime_checkable
class BatchDataset(Protocol):
    """In-memory data that returns a whole batch with one vectorised op."""

    def get_batch(self, indices: Tensor, seeds: Tensor | None) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class SeededDataset(Protocol):
    """Per-sample data (files) whose random transforms draw only from `seed`."""

    def get_item(self, index: int, seed: int | None) -> tuple[Tensor, Any]: ...


def is_in_memory(dataset: Dataset) -> bool:
    """True for tensors already in memory, which a worker process could only slow down."""
    return isinstance(dataset, (TensorDataset, BatchDataset))


def needs_seeds(dataset: Dataset) -> bool:
    """Plain tensors draw nothing; everything else may augment and gets per-sample seeds."""
    return not isinstance(dataset, TensorDataset) and bool(getattr(dataset, "augments", True))


def cpu_count() -> int:
    """CPUs this process may run on (affinity/cgroup aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(dataset: Dataset, device: torch.device | None) -> int:
    """`data.num_workers: auto`.

    - Tensors in memory: 0. A batch is one indexing op (microseconds); a worker would add a
      copy through shared memory and a process hop (measured by benchmarks/throughput.py).
    - Files (imagefolder, plugin datasets): the CPUs of this process's share of the node
      (torchrun's LOCAL_WORLD_SIZE processes split them), minus one for the training loop,
      at most 8 per process, on CUDA; on CPU the training step needs the cores too, so half
      of the share, at most 4.
    """
    if is_in_memory(dataset):
        return 0
    share = max(1, cpu_count() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device is not None and device.type == "cuda":
        return min(8, max(1, share - 1))
    return min(4, share // 2)


class ShardedBatchSampler(Sampler[BatchKey]):
    """Yields this rank's share of each global batch of one epoch as (indices, seeds).

    `set_epoch(e)` selects the epoch: the order is `randperm(size)` from a generator seeded
    with `seed + e` (or 0..size-1 without shuffle), the sample seeds come from the same
    generator. `even=True` (training) keeps every rank at the same step count with a
    non-empty batch: the global batch must divide by world_size, and a last global batch
    with fewer samples than ranks is dropped (on every rank; never with one process).
    `even=False` (evaluation) keeps every sample; a rank whose share of the last batch is
    empty just has one batch fewer.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1, seeded: bool = True, even: bool = True) -> None:
        if batch_size <= 0:
            raise StageError(f"batch_size must be > 0, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise StageError(f"rank {rank} is not in a world of size {world_size}")
        if even and batch_size % world_size:
            raise StageError(
                f"the global batch size {batch_size} is not divisible by the world size "
                f"{world_size}; pick a batch size that is a multiple of the process count"
            )
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.seeded, self.even = rank, world_size, seeded, even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def num_global_steps(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        if rest and (not self.even or rest >= self.world_size):
            full += 1
        return full

    def __len__(self) -> int:
        steps = self.num_global_steps()
        rest = self.size % self.batch_size
        if not self.even and rest and rest <= self.rank:  # empty share of the last batch
            steps -= 1
        return steps

    def __iter__(self) -> Iterator[BatchKey]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = (torch.randperm(self.size, generator=generator) if self.shuffle
                 else torch.arange(self.size)).numpy()
        seeds = (torch.randint(0, _SEED_LIMIT, (self.size,), generator=generator).numpy()
                 if self.seeded else None)
        for step in range(self.num_global_steps()):
            start = step * self.batch_size
            shard = order[start:start + self.batch_size][self.rank::self.world_size]
            if len(shard):
                yield shard, (None if seeds is None else seeds[shard])


class BatchFetcher(Dataset):
    """What the DataLoader indexes: one key -> one collated (x, y) batch (runs in workers)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: BatchKey) -> Any:
        indices, seeds = key
        data = self.dataset
        if isinstance(data, TensorDataset):
            index = torch.from_numpy(indices)
            return tuple(t[index] for t in data.tensors)
        if isinstance(data, BatchDataset):
            return data.get_batch(torch.from_numpy(indices),
                                  None if seeds is None else torch.from_numpy(seeds))
        if isinstance(data, SeededDataset):
            item_seeds = [None] * len(indices) if seeds is None else [int(s) for s in seeds]
            return default_collate([data.get_item(int(i), s) for i, s in zip(indices, item_seeds)])
        return default_collate(_seeded_items(data, indices, seeds))


def _seeded_items(data: Dataset, indices: np.ndarray, seeds: np.ndarray | None) -> list[Any]:
    """Read items of a generic Dataset, each with the global RNGs seeded from its seed.

    Only torch's CPU generator is touched (not CUDA's), and all three states are restored,
    so the training process's own random stream is unchanged.
    """
    if seeds is None:
        return [data[int(i)] for i in indices]
    cpu = torch.default_generator
    saved = cpu.get_state(), random.getstate(), np.random.get_state()
    try:
        items = []
        for i, s in zip(indices, seeds):
            s = int(s)
            cpu.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            items.append(data[int(i)])
        return items
    finally:
        cpu.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class EpochLoader(DataLoader):
    """A DataLoader over a ShardedBatchSampler; `set_epoch(e)` before each pass.

    Made once per phase so persistent workers live across epochs; the sampler runs in this
    process, so a new epoch reaches it even when the workers persist.
    """

    sampler: ShardedBatchSampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    even: bool | None = None,
    num_workers: int | None = None,
    device: torch.device | None = None,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
) -> EpochLoader:
    """This rank's loader of `dataset`; see the module docstring for what it yields.

    batch_size: the GLOBAL batch; each rank's batches are batch_size / world_size.
    even: every rank gets a non-empty batch at every step (default: when shuffling, i.e.
        training); evaluation keeps every sample instead.
    num_workers: None picks `default_num_workers`. pin_memory applies on CUDA only.
    """
    even = shuffle if even is None else even
    sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                                  rank=rank, world_size=world_size,
                                  seeded=needs_seeds(dataset), even=even)
    workers = default_num_workers(dataset, device) if num_workers is None else num_workers
    if workers < 0:
        raise StageError(f"num_workers must be >= 0, got {workers}")
    cuda = device is not None and device.type == "cuda"
    return EpochLoader(
        BatchFetcher(dataset), batch_size=None, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory and cuda, generator=torch.Generator().manual_seed(seed),
        persistent_workers=persistent_workers and workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
    )
