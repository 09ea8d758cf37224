"""Writing an ONNX file atomically: export, the INT8 quantizer and every other writer of a
shipped .onnx use `atomic_save`, so no reader ever sees a truncated file or an .onnx before its
weights."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from stages.io import WriteError, atomic_write

_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold 2 GB: spill weights to "<name>.data"


def atomic_save(proto: onnx.ModelProto, path: Path) -> Path | None:
    """Write through `stages.io.atomic_write` (temp file, fsync, rename): never a truncated file.

    Models over ~1.8 GB (`_EXTERNAL_DATA_BYTES`) keep their weights in "<name>.data" beside the
    file: both are written into a hidden staging folder next to `path`, then the sidecar and
    after it the .onnx are renamed into place, each atomically, so the .onnx never appears
    before its weights. Returns the sidecar's path (None when the weights are inline; a stale
    sidecar of an earlier, larger export is removed then).
    """
    path = Path(path)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    sidecar = path.with_name(path.name + ".data")
    if weight_bytes <= _EXTERNAL_DATA_BYTES:
        atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp)))
        sidecar.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent) as staging:
        staged = Path(staging) / path.name
        try:
            onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=sidecar.name)
        except (OSError, ValueError) as exc:
            raise WriteError(sidecar, f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)) from exc
        staged_data = Path(staging) / sidecar.name
        if staged_data.exists():
            atomic_write(sidecar, lambda tmp: os.replace(staged_data, tmp))
        atomic_write(path, lambda tmp: os.replace(staged, tmp))
    return sidecar if sidecar.exists() else None
