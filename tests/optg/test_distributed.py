"""Two gloo processes under DistributedDataParallel hold identical masks at every update.

Each rank sees different data, so local score gradients differ; the sparsifier's score
synchronisation is what keeps masks equal. The control run disables it and must diverge,
proving the test can fail."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import optg
from pipeline.distributed import end_rank_process


def _worker(rank: int, world: int, init_file: str, out_dir: str, method: str, pattern: str, sync: bool):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3))
        kw = dict(target=0.8) if pattern == "unstructured" else dict(pattern=pattern)
        sp = optg.create(method, model, epochs=4, **kw).attach()
        if not sync:
            import optg.sparsifier as module
            module.all_reduce_mean = lambda tensors: None
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        history: list = []
        try:
            for epoch in range(4):
                sp.start_epoch(epoch)
                history.append({k: v.clone() for k, v in sp.masks().items()})
                for _ in range(5):
                    x = torch.randn(16, 4, 8, generator=gen)
                    y = torch.randint(0, 3, (16,), generator=gen)
                    loss = F.cross_entropy(ddp(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sp.step(lr=0.1)
        except optg.MaskDivergence as exc:  # the run-time check caught ranks drifting apart
            history.append(str(exc))
        torch.save(history, os.path.join(out_dir, f"masks{rank}.pt"))
        del ddp  # release the reducer's gloo work before teardown
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    end_rank_process(0)  # skip interpreter finalization: gloo threads can abort it


def _run(tmp_path, method, pattern, sync):
    init = tmp_path / "init"
    mp.spawn(_worker, args=(2, str(init), str(tmp_path), method, pattern, sync), nprocs=2, join=True)
    return [torch.load(tmp_path / f"masks{r}.pt") for r in range(2)]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ddp_ranks_hold_identical_masks(tmp_path, pattern):
    rank0, rank1 = _run(tmp_path, "optg", pattern, sync=True)
    for epoch, (a, b) in enumerate(zip(rank0, rank1)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"epoch {epoch} layer {name}"
    assert any(not m.all() for m in rank0[-1].values())  # masks really prune


def test_ddp_without_score_sync_diverges(tmp_path):
    """Without the score sync the masks drift apart, and the ranks' digest check stops both."""
    rank0, rank1 = _run(tmp_path, "optg", "unstructured", sync=False)
    assert rank0[-1] == rank1[-1]  # the same error on both ranks, naming the same layer
    assert isinstance(rank0[-1], str) and rank0[-1].startswith("masks differ across ranks at layer")
