"""The run directory and its manifest.json: what a release step reads.

Every write is atomic. The manifest (`pipeline.manifest.Manifest`) is rewritten after each
stage, so at any moment it says which stages finished; `resume` trusts it together with the
config hash.
"""
from __future__ import annotations

import csv
import datetime as dt
import fcntl
import io
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from pipeline import reuse
from pipeline.manifest import Artifact, Manifest, Rerun, StageRecord
from stages.io import atomic_write_json, atomic_write_text, sha256_file

RUNNER_FILES = ("config.yaml", "metrics.csv")  # artifacts the runner rewrites on every (re)open


def looks_ours(raw: Any) -> bool:
    """Recognisably a manifest this tool wrote (any schema version): what `--force` may clear."""
    return (isinstance(raw, dict) and isinstance(raw.get("schema"), int) and not isinstance(raw.get("schema"), bool)
            and all(isinstance(raw.get(key), str) for key in ("name", "status", "config_hash")))


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


_HELD: dict[str, list[int]] = {}  # lock file -> [fd, how many RunDirs of this process hold it]


class RunDir:
    """A run directory: `manifest.json`, `config.yaml`, artifacts, `checkpoints/`.

    writer=False (the ranks other than 0 of a distributed run): the manifest lives in memory
    only, taken from rank 0 with `adopt`; `save` and `add_artifact` write nothing.
    """

    def __init__(self, path: Path, writer: bool = True, results: Mapping[str, Sequence[str]] | None = None) -> None:
        """results: per stage, the manifest sections that are its result alone (the stage rows'
        `results`); a stage that is redone or gone drops them."""
        self.path = Path(path)
        self.writer = writer
        self.results = dict(results or {})
        self.manifest_path = self.path / "manifest.json"
        self.checkpoints = self.path / "checkpoints"
        self._manifest: Manifest | None = None
        self._reasons: list[str] = []
        self.new_reruns: list[Rerun] = []  # what this open decided to redo, and why
        self.current_stage: str | None = None  # set by the runner: the stage add_artifact credits
        self._locked = False  # holds a share of this process's flock on the directory

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError(f"run directory {self.path} is not open")
        return self._manifest

    def open(self, name: str, config_hash: str, force: bool, fingerprints: dict[str, str] | None = None,
             redoable: Collection[str] = (), resolved: dict[str, Any] | None = None) -> bool:
        """Create or reopen. Returns True when resuming (or reusing finished stages).

        Refuses (RunDirConflict, exit 2) whatever the flags: an `--out` that is not a writable
        directory, and a non-empty directory without a manifest of ours (`--force` only ever
        clears a run directory). Without `--force` it also refuses another config's directory,
        unless only stages in `redoable` changed (`pipeline.reuse`): those are redone, and
        `reruns` says which and why. On every reopen, each recorded artifact's sha256 is
        checked; a stage whose file changed or vanished is redone (see `check_artifacts`).
        """
        self._check_writable()
        if self.writer:
            self.lock()
        if self.manifest_path.exists() or self.manifest_path.is_symlink():
            old = self._read_manifest(force)
            if old is not None and not force:
                reused = old.config_hash == config_hash or self._reuse(old, fingerprints, redoable, resolved)
                if not reused:
                    raise RunDirConflict(
                        f"run directory {self.path} was made by a different config (hash "
                        f"{old.config_hash[:12]} vs {config_hash[:12]}"
                        + (f"; changed: {', '.join(self._reasons)}" if self._reasons else "")
                        + "); use --force to start over there, or --out to pick another directory")
                for stale in list(self.path.rglob(".*.tmp")):  # left by a hard kill mid-write
                    if stale.is_dir() and not stale.is_symlink():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
                self._manifest = old
                old.config_hash = config_hash
                if fingerprints is not None:
                    old.fingerprints = dict(fingerprints)
                old.resumed += 1
                now = versions()
                if now != old.versions:  # resumed under other software: say so
                    old.versions_before_resume = [*old.versions_before_resume, old.versions]
                    old.versions = now
                old.status = "running"
                old.unset("error")
                return True
            shutil.rmtree(self.path)  # forced, and the manifest is ours
        elif self.path.exists() and any(self.path.iterdir()):
            raise RunDirConflict(f"{self.path} is not empty and holds no manifest.json of an optg run; "
                                 "it is never written into or cleared, with or without --force: "
                                 "pick another --out, or empty or remove it yourself")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirConflict(f"cannot create run directory {self.path}: {exc.strerror or exc}") from None
        self._manifest = Manifest.start(name, config_hash, _now(), versions())
        if fingerprints is not None:
            self._manifest.fingerprints = dict(fingerprints)
        self.save()
        return False

    @property
    def lock_path(self) -> Path:
        """Beside the directory, not in it: `--force` clears the directory, never the lock."""
        return self.path.parent / f".{self.path.name}.optg-lock"

    def lock(self) -> None:
        """Hold an exclusive `flock` on the run directory for this process's life (the other
        ranks of a torchrun job work under rank 0's). A directory in use by a live run of
        another process is a RunDirConflict naming its PID and start time; a lock left by a
        killed process is free, since the kernel drops a flock with its holder. Within one
        process the lock is shared (counted), so reopening a directory there is not refused."""
        if self._locked:
            return
        key = str(self.lock_path.absolute())
        if key in _HELD:
            _HELD[key][1] += 1
            self._locked = True
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirConflict(f"cannot create the lock {self.lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirConflict(f"run directory {self.path} is in use by another optg run ({holder}); wait for it "
                                 "to finish, or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {_now()}".encode(), 0)
        _HELD[key] = [fd, 1]
        self._locked = True

    def unlock(self) -> None:
        """Release this directory's share of the lock (the process ending releases it too)."""
        if not self._locked:
            return
        self._locked = False
        key = str(self.lock_path.absolute())
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            os.close(held[0])
            del _HELD[key]

    def adopt(self, manifest: dict) -> None:
        """Take the manifest rank 0 opened (a non-writer never reads the directory itself)."""
        self._manifest = Manifest.model_validate(manifest)
    # ------------------------------------------------------------------ open's checks
    def _check_writable(self) -> None:
        """`--out` must be (or become) a directory this process can write: one line, exit 2."""
        existing = next((p for p in (self.path, *self.path.parents) if p.exists() or p.is_symlink()), None)
        if existing is not None and not existing.is_dir():
            what = "is not a directory" if existing == self.path else f"is inside {existing}, which is not a directory"
            raise RunDirConflict(f"--out {self.path} {what}")
        if existing is None:
            return
        try:  # permission bits do not say it all (root, read-only mounts): try it
            fd, probe = tempfile.mkstemp(prefix=".optg-write-probe.", suffix=".tmp", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise RunDirConflict(f"--out {self.path}: cannot write in {existing} ({exc.strerror or exc})") from None

    def _read_manifest(self, force: bool) -> Manifest | None:
        """The manifest, or None when it is ours but unreadable and `force` clears it. A file
        that is not recognisably ours is refused even with `force`: the directory stays."""
        try:
            raw = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunDirConflict(f"unreadable manifest {self.manifest_path} ({exc}); the directory is left "
                                 "untouched, with or without --force: pick another --out, or remove it yourself")
        if not looks_ours(raw):
            raise RunDirConflict(f"unreadable manifest {self.manifest_path}: not the manifest of an optg run "
                                 "(a JSON object with schema, name, status, config_hash); the directory is left "
                                 "untouched, with or without --force: pick another --out, or remove it yourself")
        try:
            return Manifest.model_validate(raw)
        except (ValueError, ValidationError) as exc:
            if force:
                return None
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunDirConflict(f"unreadable manifest {self.manifest_path} ({detail}); use --force to start "
                                 "over there, or --out to pick another directory") from None

    def _reuse(self, old: Manifest, fingerprints: dict[str, str] | None, redoable: Collection[str],
               resolved: dict[str, Any] | None) -> bool:
        """Another config: True when only redoable stages changed (they are marked to redo)."""
        self._reasons = []
        if fingerprints is None or not old.fingerprints:
            return False
        stale = reuse.changed(old.fingerprints, fingerprints)
        self._reasons = self._changed_keys(resolved) or [f"the inputs of {', '.join(stale)}"]
        if not stale or any(name not in redoable for name in stale):
            return not stale
        reason = "config changed: " + ", ".join(self._reasons)
        self._manifest = old
        self.invalidate(stale, reason)
        self._manifest = None
        return True

    def _changed_keys(self, resolved: dict[str, Any] | None) -> list[str]:
        """The dotted keys that differ from the run's recorded config.yaml (for messages)."""
        if resolved is None:
            return []
        try:
            old = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return []
        ignored = set(reuse.IGNORED)
        return [key for key in reuse.changed_keys(old, resolved) if not any(
            key == i or key.startswith(i + ".") for i in ignored)]

    # ------------------------------------------------------------------ artifacts and reruns
    def invalidate(self, stages: Iterable[str], reason: str) -> list[str]:
        """Forget that `stages` finished (their artifacts too, files included) so they run again;
        records a `reruns` entry. Returns the stages that had finished."""
        names = [s for s in stages if s in self.manifest.stages]
        if not names:
            return []
        for name in names:
            del self.manifest.stages[name]
            for section in self.results.get(name, ()):  # its result goes too: a stage now disabled leaves none
                self.manifest.unset(section)
        for key, artifact in list(self.manifest.artifacts.items()):
            if artifact.stage in names:
                (self.path / artifact.path).unlink(missing_ok=True)
                del self.manifest.artifacts[key]
        rerun = Rerun(at=_now(), stages=names, reason=reason)
        self.manifest.reruns = [*self.manifest.reruns, rerun]
        self.new_reruns.append(rerun)
        return names

    def check_artifacts(self, order: Sequence[str]) -> None:
        """Re-hash every recorded artifact. One that is missing or changed makes the stage that
        wrote it, and every later stage in `order`, run again (a `reruns` entry names the file);
        an artifact no stage owns is refused naming the file, except those the runner rewrites
        itself (config.yaml, metrics.csv)."""
        for key, artifact in list(self.manifest.artifacts.items()):
            path = self.path / artifact.path
            if not path.is_file():
                problem = "is missing"
            elif sha256_file(path) != artifact.sha256:
                problem = f"does not match the sha256 in the manifest ({artifact.sha256[:12]}...)"
            else:
                continue
            if artifact.stage is None:
                if key in RUNNER_FILES:
                    continue
                raise RunDirConflict(f"{path} {problem}, and the manifest does not say which stage wrote it; "
                                     "use --force to start over, or restore the file")
            if artifact.stage not in order:
                raise RunDirConflict(f"{path} {problem}, and its stage {artifact.stage!r} is not in this "
                                     "pipeline; use --force to start over, or restore the file")
            later = list(order)[list(order).index(artifact.stage):]
            self.invalidate(later, f"{artifact.path} {problem}")

    def save(self) -> None:
        if not self.writer:
            return
        self.manifest.updated = _now()
        atomic_write_json(self.manifest_path, self.manifest.to_json())

    def stage_done(self, stage: str) -> bool:
        return self.manifest.stage_done(stage)

    def record_stage(self, stage: str, status: Literal["done", "failed"], seconds: float) -> None:
        self.manifest.stages[stage] = StageRecord(status=status, seconds=round(seconds, 3))
        self.save()

    def add_artifact(self, key: str, path: Path) -> None:
        if not self.writer:
            return
        path = Path(path)
        self.manifest.artifacts[key] = Artifact(path=str(path.relative_to(self.path)), bytes=path.stat().st_size,
                                                sha256=sha256_file(path),
                                                **({"stage": self.current_stage} if self.current_stage else {}))

    def write_metrics_csv(self) -> None:
        """`metrics.csv`: one row per finished epoch (the manifest's history), for following a run."""
        if not self.writer:
            return
        history = self.manifest.history
        metric = self.manifest.metrics.metric or (history[0].metric if history else "accuracy")
        fields = ["phase", "epoch", "train_loss", f"train_{metric}", f"val_{metric}", "sparsity", "lr", "seconds"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for record in history:
            writer.writerow(record.to_dict())
        path = atomic_write_text(self.path / "metrics.csv", buffer.getvalue())
        stage, self.current_stage = self.current_stage, None
        try:
            self.add_artifact("metrics.csv", path)
        finally:
            self.current_stage = stage
