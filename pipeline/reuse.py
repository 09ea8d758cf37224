"""Stage-level reuse: which finished stages of a run directory a changed config invalidates.

Each stage of the table names the config keys its result depends on (`Stage.inputs`). Its
fingerprint hashes those keys' resolved values together with the fingerprint of the stage
before it, so a change reaches every later stage: changing `validate` re-runs validate, export,
verify and report; changing `export` re-runs export, verify and report. Keys no stage claims go
into the `OTHER` fingerprint, so a config key added without a stage that claims it is treated
as a result-changing edit (refused without `--force`), never silently ignored.

Settings that cannot change any result (`IGNORED`: how batches are loaded, where tracking goes,
the run's name) are left out of every fingerprint.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

OTHER = "*"  # the fingerprint key of config keys no stage claims
IGNORED: tuple[str, ...] = ("name", "tracking", "data.num_workers", "data.pin_memory", "data.persistent_workers",
                            "data.prefetch_factor")


class _HasInputs(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def inputs(self) -> tuple[str, ...]: ...


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _without(resolved: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    tree = json.loads(json.dumps(resolved, default=str))  # a deep copy of plain JSON values
    for key in keys:
        _drop(tree, key)
    return tree


def fingerprints(resolved: Mapping[str, Any], stages: Iterable[_HasInputs]) -> dict[str, str]:
    """Stage name -> fingerprint, in table order, plus `OTHER` for the keys no stage claims.
    Every stage of the table gets one, enabled or not (a disabled stage's section still counts)."""
    tree = _without(resolved, IGNORED)
    out: dict[str, str] = {}
    previous = ""
    claimed: list[str] = []
    for stage in stages:
        previous = _digest([previous, stage.name, {key: _get(tree, key) for key in stage.inputs}])
        out[stage.name] = previous
        claimed += stage.inputs
    out[OTHER] = _digest(_without(tree, claimed))
    return out


def changed(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Names whose fingerprint differs (or is missing from `old`), in `new`'s order."""
    return [name for name, value in new.items() if old.get(name) != value]


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ between two resolved configs (for the reason text)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys: list[str] = []
        for key in [*old.keys(), *(k for k in new.keys() if k not in old)]:
            keys += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]
