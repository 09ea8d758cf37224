"""Unpickling that cannot run code, for the one pickled data format we must read.

CIFAR-10's "python version" batches are pickles: a dict of bytes keys, a uint8 numpy array
(`b'data'`), a list of int labels and lists of bytes. `pickle.load` on such a file runs
whatever callable the file names, so a planted batch file could run any command. The
`RestrictedUnpickler` here resolves a global only if it is on a short list of what numpy
array reconstruction needs; anything else (`os.system`, `builtins.eval`, `subprocess.Popen`,
...) is refused with `UnsafePickleError` naming the global. Dicts, lists, tuples, bytes,
str, int and float are pickle opcodes, not globals, so they need no entry.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from stages.base import StageError

try:  # numpy >= 2 keeps the array internals in numpy._core; 1.x in numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class UnsafePickleError(StageError):
    """A pickle named a global outside the allowed list; nothing it names was called."""


_LATIN1 = {"latin1", "latin", "l1", "iso88591", "iso885911987"}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 writes for `bytes` under pickle protocols 0-2 (`_codecs.encode(s, 'latin1')`);
    only that codec, so the global cannot reach other codecs."""
    if encoding.lower().replace("-", "").replace("_", "") not in _LATIN1 or not isinstance(text, str):
        raise UnsafePickleError(f"pickle calls _codecs.encode with {encoding!r}; only latin1 bytes are admitted")
    return text.encode("latin1")


# module.name -> the object it resolves to. Py2-era files (the real CIFAR batches) name
# numpy.core.*; numpy >= 2 writes numpy._core.*; protocol 5 arrays use _frombuffer.
CIFAR_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,  # type: ignore[attr-defined]
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,  # type: ignore[attr-defined]
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` whose `find_class` admits only `allowed` (module, name) pairs."""

    def __init__(self, file: BinaryIO, *, source: str,
                 allowed: dict[tuple[str, str], Callable[..., Any]] = CIFAR_GLOBALS,
                 encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source, self.allowed = source, allowed

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            admitted = ", ".join(sorted({f"{m}.{n}" for m, n in self.allowed}))
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle the global {module}.{name} (it could run code); "
                f"this file is not a plain data pickle. Admitted: {admitted}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused a persistent id in the pickle; not a plain data pickle")


def restricted_load(file: str | Path | BinaryIO | bytes, *, source: str | None = None,
                    allowed: dict[tuple[str, str], Callable[..., Any]] = CIFAR_GLOBALS,
                    encoding: str = "bytes") -> Any:
    """Unpickle a path, an open binary file or bytes with `RestrictedUnpickler`.

    `encoding="bytes"` reads Python 2 `str` as bytes, as the CIFAR batches need.
    """
    if isinstance(file, bytes):
        return RestrictedUnpickler(io.BytesIO(file), source=source or "pickle", allowed=allowed,
                                   encoding=encoding).load()
    if isinstance(file, (str, Path)):
        with open(file, "rb") as handle:
            return RestrictedUnpickler(handle, source=source or str(file), allowed=allowed,
                                       encoding=encoding).load()
    return RestrictedUnpickler(file, source=source or str(getattr(file, "name", "pickle")), allowed=allowed,
                               encoding=encoding).load()
