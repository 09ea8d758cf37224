"""Ranks compare mask digests at every mask update: a planted divergence on one rank fails the
update on every rank with an error naming the first differing layer; identical ranks pass."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import optg
from optg.distributed import mask_digest
from pipeline.distributed import end_rank_process


def _worker(rank: int, world: int, init_file: str, out_dir: str, plant: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on both ranks
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        if plant and rank == 1:  # one weight of the middle layer differs on rank 1 only
            with torch.no_grad():
                model[2].weight[3, 1] = 100.0
        message = "ok"
        try:  # one-shot magnitude 2:4 fixes the masks at attach: one mask update, one check
            optg.create("oneshot", model, pattern="2:4", epochs=1).attach()
        except optg.MaskDivergence as exc:
            message = str(exc)
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(message)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_rank_process(0)  # skip interpreter finalization: gloo threads can abort it


def _run(tmp_path, plant: bool) -> list[str]:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), plant), nprocs=2, join=True)
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_planted_mask_divergence_fails_on_every_rank_naming_the_layer(tmp_path):
    for message in _run(tmp_path, plant=True):
        assert message.startswith("masks differ across ranks at layer '2'"), message
        assert "rank 1 keeps" in message


def test_identical_ranks_pass_the_check(tmp_path):
    assert _run(tmp_path, plant=False) == ["ok", "ok"]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_digest_tells_masks_apart_that_keep_as_many(dtype):
    a = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=dtype)
    b = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]], dtype=dtype)  # same count, same index sum
    assert torch.equal(mask_digest([a])[:, 0], mask_digest([b])[:, 0])
    assert not torch.equal(mask_digest([a]), mask_digest([b]))
    assert torch.equal(mask_digest([a, b]), mask_digest([a.clone(), b.clone()]))
