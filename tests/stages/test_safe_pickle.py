"""The restricted unpickler: CIFAR-style batches load, pickles that would run code are refused."""
from __future__ import annotations

import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

from stages.safe_pickle import CIFAR_GLOBALS, UnsafePickleError, restricted_load


def _cifar_batch(n: int = 6) -> dict:
    """A batch as CIFAR-10's python version holds it: bytes keys, (N, 3072) uint8, int labels."""
    rng = np.random.default_rng(0)
    return {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _globals_named(data: bytes) -> set[str]:
    """The module.name pairs a pickle refers to (GLOBAL, or STACK_GLOBAL after two strings)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return found


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_load_with_every_protocol(tmp_path: Path, protocol: int) -> None:
    batch = _cifar_batch()
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    loaded = restricted_load(path)
    assert loaded[b"labels"] == batch[b"labels"] and loaded[b"filenames"] == batch[b"filenames"]
    assert loaded[b"data"].dtype == np.uint8 and np.array_equal(loaded[b"data"], batch[b"data"])


def test_protocol_2_batch_needs_only_admitted_globals() -> None:
    """What a real batch references (protocol 2, as CIFAR's are written) is all on the list."""
    named = _globals_named(pickle.dumps(_cifar_batch(), protocol=2))
    assert named and named <= {f"{m}.{n}" for m, n in CIFAR_GLOBALS}, named


def test_python2_style_batch_loads() -> None:
    """The real files come from Python 2: `str` data pickled as BINSTRING, numpy.core names."""
    array = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    # Hand-written protocol-2 stream of {b'data': array, b'labels': [3, 7]}, as Python 2 writes it.
    dtype_state = pickle.dumps((3, "|", None, None, None, -1, -1, 0), protocol=2)[2:-1]
    data = (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
            b"K\x00\x85U\x01b\x87Rq\x04(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
            + dtype_state + b"b\x89T" + len(array.tobytes()).to_bytes(4, "little") + array.tobytes()
            + b"tbU\x06labelsq\x07]q\x08(K\x03K\x07eu.")
    loaded = restricted_load(data)
    assert np.array_equal(loaded[b"data"], array) and loaded[b"labels"] == [3, 7]


class _Planted:
    """Unpickling this runs a shell command that writes the marker file."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "open":
            return open, (str(self.marker), "w")
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("how,global_name", [("os.system", "posix.system"), ("open", "io.open"),
                                             ("eval", "__builtin__.eval")])  # protocol 2 writes Python 2 names
def test_planted_code_never_runs(tmp_path: Path, how: str, global_name: str) -> None:
    marker = tmp_path / "PWNED"
    batch = _cifar_batch()
    batch[b"labels"] = _Planted(marker, how)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UnsafePickleError, match=rf"refused to unpickle the global {global_name} ") as err:
        restricted_load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_codecs_encode_is_latin1_only() -> None:
    evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(UnsafePickleError, match="only latin1"):
        restricted_load(evil)
    assert restricted_load(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R.") == b"abc"


def test_cifar10_dataset_refuses_a_planted_batch(tmp_path: Path) -> None:
    """Through the dataset: the error names the file and the global; the marker never appears."""
    from stages.base import StageError
    from stages.data import DataConfig
    from stages.data.catalog import DATASETS

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    marker = tmp_path / "PWNED"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = _cifar_batch()
        if name == "data_batch_1":
            batch[b"labels"] = _Planted(marker, "os.system")
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(StageError, match=r"data_batch_1.*refused to unpickle the global posix\.system"):
        DATASETS.get("cifar10")(DataConfig(name="cifar10", path=str(tmp_path)), 0)
    assert not marker.exists()
