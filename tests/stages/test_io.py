"""Atomic writes (mode, cleanup, typed errors) and weights_only checkpoint reads."""
from __future__ import annotations

import copy
import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from stages import io as stage_io
from stages.base import StageError
from stages.io import (
    WriteError,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    current_umask,
    safe_torch_load,
)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_a_plain_write_would(tmp_path: Path, umask, mask: int, mode: int) -> None:
    umask(mask)
    assert current_umask() == mask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for written in (atomic_write_text(tmp_path / "a.txt", "x"), atomic_torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")):
        assert stat.S_IMODE(written.stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_disk_full_during_write_removes_the_temp_file_and_names_the_target(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("previous version")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as err:
        atomic_write(target, write)
    assert str(target) in str(err.value) and "No space left on device" in str(err.value)
    assert err.value.path == target and isinstance(err.value, StageError) and isinstance(err.value, OSError)
    assert _leftovers(tmp_path) == []
    assert target.read_text() == "previous version"  # the old file is untouched


def test_failed_rename_removes_the_temp_file(tmp_path: Path, monkeypatch) -> None:
    def refuse(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(stage_io.os, "replace", refuse)
    with pytest.raises(WriteError, match=r"cannot write .*ckpt\.pt: Read-only file system"):
        atomic_torch_save({"w": torch.ones(3)}, tmp_path / "ckpt.pt")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "ckpt.pt").exists()


def test_serialiser_errors_are_typed_and_leave_nothing(tmp_path: Path) -> None:
    """torch.save on a full disk raises RuntimeError ('unexpected pos ...'), not OSError."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 576 vs 534")

    with pytest.raises(WriteError, match="unexpected pos"):
        atomic_write(tmp_path / "sparse.pt", write)
    assert list(tmp_path.iterdir()) == []


def test_stage_errors_and_interrupts_pass_through(tmp_path: Path) -> None:
    for exc in (StageError("export said no"), KeyboardInterrupt()):
        def write(tmp: Path, exc: BaseException = exc) -> None:
            raise exc

        with pytest.raises(type(exc)):
            atomic_write(tmp_path / "x.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_is_a_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(WriteError, match=r"cannot write .*not_a_dir/report\.md"):
        atomic_write_text(blocker / "report.md", "x")


# ---------------------------------------------------------------- checkpoints


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tampered_checkpoint_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "dense.pt"
    torch.save({"phase": "dense", "model": {"w": torch.ones(2)}, "payload": _Planted(marker)}, path)
    with pytest.raises(StageError) as err:
        safe_torch_load(path)
    message = str(err.value)
    assert str(path) in message and "posix.system" in message and "nothing in it was run" in message
    assert "weights_only` set to `False`" not in message  # torch's advice to disable the check is dropped
    assert not marker.exists()


def test_damaged_checkpoint_is_a_stage_error(tmp_path: Path) -> None:
    path = tmp_path / "sparse.pt"
    atomic_torch_save({"w": torch.ones(4)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StageError, match=r"sparse\.pt"):
        safe_torch_load(path)


@pytest.mark.parametrize("method,pattern", [("optg", "2:4"), ("gmp", "unstructured"), ("srste", "2:4")])
def test_trainer_checkpoint_loads_with_weights_only(tmp_path: Path, method: str, pattern: str) -> None:
    """The whole training state (model, AdamW, schedule, sparsifier, RNG, history) is plain
    data, and a resume from it continues exactly like the uninterrupted run."""
    from pipeline.config import validate_config
    from stages import sparsify as sparsify_stage
    from stages.data import load_data
    from stages.model import build_model
    from stages.train import Trainer
    from tests.pipeline.conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["data"]["options"]["num_samples"] = 96
    raw["sparsity"].update(method=method, pattern=pattern,
                           train={"epochs": 2, "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.8, 0.99]}})
    if pattern == "unstructured":
        raw["sparsity"]["target"] = 0.8
    cfg = validate_config(raw)
    bundle = load_data(cfg.data, 0)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
        sparsifier = sparsify_stage.build_sparsifier(model, cfg.sparsity, steps_per_epoch=3, seed=0)
        return Trainer(model, bundle, cfg.sparsity.train, phase="sparse", device=torch.device("cpu"), seed=0,
                       batch_size=32, sparsifier=sparsifier, log=lambda _: None)

    full = trainer()
    first_epoch = {}
    full.run(on_epoch_end=lambda t: first_epoch or first_epoch.update(state=copy.deepcopy(t.state_dict())))
    path = atomic_torch_save(first_epoch["state"], tmp_path / "sparse.pt")
    resumed = trainer()
    resumed.load_state_dict(safe_torch_load(path))
    assert resumed.next_epoch == 1
    resumed.run()
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
