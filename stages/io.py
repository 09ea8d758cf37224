"""Atomic file writes and safe checkpoint reads.

A crash or a full disk never leaves a truncated file under a final name nor a stray temp
file; a written file gets the mode a plain `open(path, "w")` would (0o666 less the umask,
not `mkstemp`'s 0o600), so another user, a container or a web server can read artifacts.
Checkpoints are read with `torch.load(weights_only=True)`: a file that holds anything but
tensors, numbers, strings, lists and dicts is refused, and nothing in it runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stages.base import StageError

_UMASK_LOCK = threading.Lock()
_LOW_SPACE_BYTES = 1 << 20  # below this much free space a failed write is reported as a full disk
_TORCH_BOILERPLATE = ("Weights only load failed", "Re-running `torch.load`", "Please file an issue",
                      "Check the documentation of torch.load")


class WriteError(StageError, OSError):
    """Writing `path` failed (disk full, read-only or missing directory, serialiser error).

    The temp file is already removed and the previous file at `path`, if any, is untouched.
    A StageError (the runner records the run as failed) and an OSError (code that handled
    the bare OSError of a failed write still does).
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def current_umask() -> int:
    """The process umask, read from /proc where possible: `os.umask` can only be read by
    setting it, which briefly changes it for every thread."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _reason(exc: BaseException, directory: Path) -> str:
    """The error text, with the free space when the disk is (nearly) full: serialisers such as
    torch.save report a full disk only as 'unexpected pos ...'."""
    reason = f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.strerror else str(exc)
    reason = reason or type(exc).__name__
    try:
        stats = os.statvfs(directory)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        return reason
    if free < _LOW_SPACE_BYTES and "No space left" not in reason:
        reason += f" (the disk is full: {free} bytes free)"
    return reason


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temp file in the same directory, fsync it, then rename.

    Raises WriteError naming `path` and the reason if anything fails (a StageError raised
    by `write` passes through as it is); in every case the temp file is gone.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(exc, Exception) and not isinstance(exc, StageError):
            raise WriteError(path, _reason(exc, path.parent)) from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def safe_torch_load(path: Path, map_location: Any = None, what: str = "checkpoint") -> Any:
    """`torch.load(path, weights_only=True)`; StageError naming the file if it is refused or unreadable.

    Only tensors, numbers, strings, bools, None, lists, tuples and dicts are unpickled; a file
    naming any other global (e.g. `os.system`) is refused before anything in it is called.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        detail = " ".join(line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE))
        raise StageError(
            f"{what} {path} refused: {detail or type(exc).__name__}. Only tensors, numbers, strings, lists "
            "and dicts are read from it (weights_only) and nothing in it was run; if it was damaged or "
            "tampered with, delete it to redo that phase") from None
    except OSError as exc:
        raise StageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
