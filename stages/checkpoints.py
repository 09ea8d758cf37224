"""Read users' checkpoints safely and load them into a model strictly.

Formats: `.safetensors`, or a `torch.save` file (`.pt`, `.pth`, `.bin`, `.ckpt`, `.tar` as
in `checkpoint.pth.tar`) read with `torch.load(weights_only=True)`: tensors and plain data
only, plus `argparse.Namespace` and numpy scalars, which training scripts (timm,
torchvision's references) store beside the weights. Nothing in a file can run code.

Layouts: a plain `name -> tensor` state dict, or a dict holding one under the first of
`NESTED_KEYS` present (`weights_key` picks another, e.g. "state_dict_ema"), nested up to
three levels. Keys saved from a DDP-wrapped model (`module.` prefix) or a torch.compile'd
one (`_orig_mod.` anywhere) are matched to the model's own names; torchvision's
AveragedModel counter `n_averaged` is dropped.

Loading is strict: every key present with the model's shape, nothing extra; the error lists
the missing, unexpected and shape-mismatched keys (the first few of each, with counts).
`reinit_head` loads everything except the classifier head (see `load_weights`).
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.base import StageError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module",
               "state_dict_ema", "model_ema", "ema")
_SHOW = 5  # how many offending keys an error message lists
_WRAPPERS = ("module.", "_orig_mod.")  # DDP's leading prefix; torch.compile's, anywhere
_DROPPED = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel's step counter


def _safe_globals() -> list[Any]:
    """Plain-data types real training checkpoints hold besides tensors; none runs code."""
    numeric = [type(np.dtype(c)) for c in "?bhilqBHILQefdgFD"]
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [argparse.Namespace, core.multiarray.scalar, np.dtype, *numeric]


@dataclass
class WeightsReport:
    """What `load_weights` did, for the run's manifest."""

    path: str
    source: str  # where the state dict was in the file, e.g. "checkpoint['model']"
    tensors: int  # tensors loaded from the file
    stripped_prefixes: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)
    reinitialised_head: str | None = None  # module name kept at its fresh initialisation
    reinitialised_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_checkpoint(path: str | Path) -> Any:
    """The object stored in a weights file, read without running any code from it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise StageError(f"weights file not found: {str(file)!r}")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except Exception as exc:  # header or data corrupt
            raise StageError(f"cannot read weights file {str(file)!r}: {exc}") from exc
    if suffix not in TORCH_SUFFIXES:
        raise StageError(
            f"weights file {str(file)!r}: unknown extension {suffix!r}; use .safetensors or a "
            f"torch.save file ({', '.join(TORCH_SUFFIXES)})"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise StageError(
                f"cannot read weights file {str(file)!r}: it holds a Python object "
                f"({refused.group(1)}) that loading could execute; only tensors and plain data "
                "are read (weights_only=True). Save the state dict alone: "
                "torch.save(model.state_dict(), path), or use .safetensors"
            ) from None
        raise StageError(f"cannot read weights file {str(file)!r}: {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, path: str, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it was) from a checkpoint object; `key` is a dotted path."""
    where = "checkpoint"
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                have = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
                raise StageError(f"weights file {path!r}: no {part!r} in {where} (has {have})")
            obj, where = obj[part], f"{where}[{part!r}]"
    for _ in range(3):
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        inner = next((k for k in NESTED_KEYS if k in obj), None)
        if inner is None:
            break
        obj, where = obj[inner], f"{where}[{inner!r}]"
    if not _is_state_dict(obj):
        found = (f"keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping)
                 else f"a {type(obj).__name__}")
        raise StageError(
            f"weights file {path!r} does not hold a state dict of tensors at {where} (found "
            f"{found}); expected a name -> tensor mapping, bare or under one of "
            f"{', '.join(NESTED_KEYS)} (model.weights_key names another)"
        )
    return dict(obj), where


def _unwrap(key: str) -> str:
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def match_names(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename DDP/compile-wrapped keys when that matches the model better; drop counters.

    Returns (state, stripped prefixes, dropped keys).
    """
    stripped: list[str] = []
    renamed = {_unwrap(k): v for k, v in state.items()}
    if len(renamed) == len(state) and (
        len(set(renamed) & set(expected)) > len(set(state) & set(expected))
    ):
        stripped = [w for w in _WRAPPERS
                    if any(k.startswith("module.") if w == "module." else w in f".{k}" for k in state)]
        state = renamed
    dropped = [k for k in _DROPPED if k in state and k not in expected]
    for k in dropped:
        del state[k]
    return state, stripped, dropped


def _listing(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{label} ({len(items)}): {', '.join(items[:_SHOW])}{more}"


def _head_module(model: nn.Module) -> str:
    """The last module (registration order) that owns parameters: the classifier head of
    torchvision, timm and this project's models."""
    owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return owners[-1] if owners else ""


def load_weights(model: nn.Module, path: str | Path, *, key: str | None = None,
                 reinit_head: bool | str = False) -> WeightsReport:
    """Load a checkpoint into `model` strictly and say what was loaded.

    reinit_head: False: every key must match. True: keys that are missing from the file or
    have another shape are allowed only when they all belong to the model's classifier head
    (its last module with parameters, e.g. `fc`), which then keeps its fresh
    initialisation (fine-tuning to a new label set); an identical head is loaded. A module
    name ("fc", "heads.head"): that module is never loaded, whatever the file holds for it.
    """
    state, source = extract_state_dict(read_checkpoint(path), str(path), key)
    expected = model.state_dict()
    state, stripped, dropped = match_names(state, expected)
    head: str | None = None
    if isinstance(reinit_head, str):
        head = reinit_head
        if not any(k.startswith(head + ".") for k in expected):
            raise StageError(
                f"model.reinit_head: the model has no module {head!r} with parameters "
                f"(its last one is {_head_module(model)!r})"
            )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if reinit_head is True and (missing or shapes):
        owners = sorted({k.rpartition(".")[0] for k in missing + shapes})
        last = _head_module(model)
        if owners == [last] and not [k for k in unexpected if not k.startswith(last + ".")]:
            head = last
    prefix = None if head is None else head + "."
    if prefix is not None:
        missing = [k for k in missing if not k.startswith(prefix)]
        unexpected = [k for k in unexpected if not k.startswith(prefix)]
        shapes = [k for k in shapes if not k.startswith(prefix)]
    if missing or unexpected or shapes:
        where = f" (read {source}" + (f", {'/'.join(stripped)} prefixes removed" if stripped else "") + ")"
        problems = [_listing(label, items) for label, items in (
            ("missing", missing), ("unexpected", unexpected),
            ("shape mismatch", [f"{k}: file {tuple(state[k].shape)} vs model "
                                f"{tuple(expected[k].shape)}" for k in shapes]),
        ) if items]
        hint = ""
        if reinit_head is False and (missing or shapes):
            hint = ("; to fine-tune to a new label set, model.reinit_head: true loads all but "
                    f"the classifier head ({_head_module(model)!r})")
        elif reinit_head is True:
            hint = (f"; reinit_head: true only skips the last layer ({_head_module(model)!r}); "
                    "name another module with reinit_head: <module name>")
        raise StageError(f"weights file {str(path)!r}{where} does not match the model: "
                         + "; ".join(problems) + hint)
    head_keys = [k for k in expected if prefix is not None and k.startswith(prefix)]
    to_load = {k: v for k, v in state.items() if k in expected and k not in head_keys}
    to_load.update({k: expected[k] for k in head_keys})  # the fresh head, as initialised
    model.load_state_dict(to_load, strict=True)
    return WeightsReport(
        path=str(path), source=source, tensors=len(to_load) - len(head_keys),
        stripped_prefixes=stripped, dropped_keys=dropped,
        reinitialised_head=head if head_keys else None, reinitialised_keys=head_keys,
    )
