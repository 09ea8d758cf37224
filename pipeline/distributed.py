"""Running under torchrun: the process group, who owns the run directory, the `--nproc`
launcher, and what a rank does when the job is torn down.

`torchrun` (torch.distributed.run) starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR/PORT; `init_from_env` joins them into one
process group (NCCL on CUDA, gloo on CPU). Rank 0 owns the run directory: it alone writes the
manifest, checkpoints, artifacts and report; the other ranks read the manifest rank 0 opened
(broadcast, never from disk) and on a resume the same checkpoint files (so several nodes need
the run directory on a shared filesystem, at the same path).
"""
from __future__ import annotations

import atexit
import datetime as dt
import gc
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import torch
import torch.distributed as dist

TIMEOUT_ENV = "OPTG_DIST_TIMEOUT"  # seconds a collective may wait for a missing rank
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    nnodes: int = 1
    backend: Literal["nccl", "gloo"] | None = None

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory (rank 0 only)."""
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        """The manifest's `distributed` section."""
        return {"world_size": self.world_size, "backend": self.backend, "nnodes": self.nnodes}


class Terminated(KeyboardInterrupt):
    """SIGTERM, e.g. torchrun stopping the other ranks after one failed: handled like Ctrl-C
    (the manifest says `interrupted`, the same command resumes)."""


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it; 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def batch_problem(batch_size: int, world_size: int) -> str | None:
    """A config error when the global batch does not split evenly over the processes."""
    if world_size > 1 and batch_size % world_size:
        return (f"data.batch_size: the global batch {batch_size} is not divisible by the "
                f"{world_size} processes; use a multiple of {world_size}")
    return None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the run is already stopping
    raise Terminated()


def init_from_env(device: str) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (else a single-process DistInfo).

    device: the config's device ("auto", "cpu", "cuda"); CUDA picks NCCL and this rank's GPU
    (LOCAL_RANK), CPU picks gloo. Collectives give up after OPTG_DIST_TIMEOUT seconds (default
    600), so a rank that vanished without a trace cannot hang the job forever.
    """
    world = env_world_size()
    if world == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    nnodes = int(os.environ.get("GROUP_WORLD_SIZE", str(max(1, world // local_world))))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend: Literal["nccl", "gloo"] = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, nnodes=nnodes, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_rank_process(code: int) -> None:
    """End a rank's process with `code` once its work and teardown are done, without Python's
    interpreter finalization.

    Why: gloo's C++ worker threads can outlive `destroy_process_group` (the group object is freed
    only when the last reference goes) and still hold work whose tensors reference Python objects.
    When the interpreter finalizes, such a thread that takes the GIL is ended by `pthread_exit`,
    whose forced unwind through a noexcept frame aborts the process ("terminate called without
    an active exception", SIGABRT): a finished rank then reports a failure to torchrun, which
    SIGTERMs the others. So: collect garbage while the interpreter is whole, run the atexit
    handlers (tracking clients flush there), flush the streams and logging, then `os._exit`.
    """
    gc.collect()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to flush
            pass
    os._exit(code)


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's `value` on every rank (plain Python data: a manifest dict, a bool, an error)."""
    if info.world_size == 1:
        return value
    box = [value if info.writer else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


# --------------------------------------------------------------------------- optg run --nproc


def launch_command(nproc: int, cli_args: list[str]) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m pipeline.cli run ...` for this Python: a
    failed or killed rank stops the job (no restarts), checked every second."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "--monitor-interval=1", "-m", "pipeline.cli", "run", *cli_args]


def launch(nproc: int, cli_args: list[str], run_dir: Path) -> int:
    """Run the job on this node and map its outcome to the CLI's exit codes via the manifest
    (torchrun itself says 1 for any failure): 130 interrupted, 3 gate failed, 1 failed."""
    from pipeline.exit_codes import EXIT_ERROR, EXIT_GATE, EXIT_INTERRUPTED, EXIT_OK

    proc = subprocess.Popen(launch_command(nproc, cli_args))
    interrupted = False
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reached torchrun and the ranks too: let them stop
            interrupted = True
    if code == 0:
        return EXIT_OK
    status = _manifest_status(run_dir / "manifest.json")
    if interrupted or status == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_GATE if status == "gate_failed" else EXIT_ERROR


def _manifest_status(path: Path) -> str | None:
    import json

    try:
        return str(json.loads(path.read_text()).get("status"))
    except (OSError, ValueError):
        return None
