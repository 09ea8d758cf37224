"""The run directory and its manifest.json: what a release step reads.

Every write is atomic. The manifest (`pipeline.manifest.Manifest`) is rewritten after each
stage, so at any moment it says which stages finished; `resume` trusts it together with the
config hash.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from pipeline.manifest import Artifact, Manifest, StageRecord
from stages.io import atomic_write_json, sha256_file


class RunDirConflict(RuntimeError):
    """The run directory belongs to another config (or isn't ours); exit code 2."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"
    return {"python": platform.python_version(), "torch": version("torch"), "onnx": version("onnx"),
            "onnxruntime": version("onnxruntime"), "optg-pipeline": version("optg-pipeline")}


class RunDir:
    """A run directory: `manifest.json`, `config.yaml`, artifacts, `checkpoints/`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        self.checkpoints = self.path / "checkpoints"
        self._manifest: Manifest | None = None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError(f"run directory {self.path} is not open")
        return self._manifest

    def open(self, name: str, config_hash: str, force: bool) -> bool:
        """Create or reopen. Returns True when resuming. Refuses another config's directory."""
        if self.manifest_path.exists():
            old: Manifest | None = None
            try:
                old = Manifest.model_validate(json.loads(self.manifest_path.read_text()))
            except (OSError, ValueError, ValidationError) as exc:
                if not force:
                    raise RunDirConflict(f"{self.manifest_path} is unreadable ({exc}); use --force to start over")
            if old is not None and old.config_hash == config_hash and not force:
                for stale in self.path.rglob(".*.tmp"):  # left by a hard kill mid-write
                    stale.unlink()
                self._manifest = old
                old.resumed += 1
                now = versions()
                if now != old.versions:  # resumed under other software: say so
                    old.versions_before_resume = [*old.versions_before_resume, old.versions]
                    old.versions = now
                old.status = "running"
                old.unset("error")
                return True
            if not force:
                assert old is not None
                raise RunDirConflict(
                    f"run directory {self.path} was made by a different config (hash "
                    f"{old.config_hash[:12]} vs {config_hash[:12]}); use --force to start "
                    f"over there, or --out to pick another directory")
            shutil.rmtree(self.path)
        elif self.path.exists() and any(self.path.iterdir()):
            if not force:
                raise RunDirConflict(f"{self.path} exists, is not empty and has no manifest.json; "
                                     "refusing to write into it (use --force to replace it, or --out)")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest = Manifest.start(name, config_hash, _now(), versions())
        self.save()
        return False

    def save(self) -> None:
        self.manifest.updated = _now()
        atomic_write_json(self.manifest_path, self.manifest.to_json())

    def stage_done(self, stage: str) -> bool:
        return self.manifest.stage_done(stage)

    def record_stage(self, stage: str, status: Literal["done", "failed"], seconds: float) -> None:
        self.manifest.stages[stage] = StageRecord(status=status, seconds=round(seconds, 3))
        self.save()

    def add_artifact(self, key: str, path: Path) -> None:
        path = Path(path)
        self.manifest.artifacts[key] = Artifact(path=str(path.relative_to(self.path)), bytes=path.stat().st_size,
                                                sha256=sha256_file(path))
