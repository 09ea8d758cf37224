"""Experiment tracking: the run's config, per-epoch and final metrics and its artifacts sent
to MLflow and/or TensorBoard, as configured under `tracking:`.

Tracking is an observer. Once a run has started, a backend that fails (server down, disk full,
permission denied) is switched off for the rest of the run with a warning; the run's outcome
and exit code never depend on it, and `Tracking.summary()["warnings"]` says what was lost so
the runner can record it in the manifest. Missing packages are config errors instead
(`pipeline.tracking_config`), found by `optg check` before anything runs.

Resume: the MLflow run id is kept in `<run dir>/tracking/mlflow.json`; a rerun of the same run
directory continues that MLflow run (status back to RUNNING, params already logged kept,
epochs already logged skipped). TensorBoard writers reopen with `purge_step` at the first
epoch logged again, so TensorBoard hides any stale points from an interrupted session.

The heavy packages (mlflow, torch.utils.tensorboard) are imported in `start()` only.
"""
from __future__ import annotations

import abc
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking_config import (
    MlflowConfig,
    TensorBoardConfig,
    TrackingConfig,
    uri_scheme,
)
from stages.io import atomic_write_json

STATE_DIR = "tracking"  # under the run directory: what a rerun needs to continue tracking
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BAD_NAME_CHARS = re.compile(r"[^\w.\- :/]")
_MLFLOW_STATUS = {"succeeded": "FINISHED", "interrupted": "KILLED"}  # anything else: FAILED
# Fallbacks for MLflow's own limits (mlflow.utils.validation), used if it stops exporting them.
_MAX_PARAM_VALUE, _MAX_KEY, _PARAMS_PER_BATCH = 6000, 250, 100


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted keys -> text. A mapping is expanded only when all its keys
    are identifiers (schema sections, model/data options); one keyed by free text (regexes in
    `sparsity.overrides`) stays one JSON value, so two keys can never collapse into one."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and all(isinstance(k, str) and _IDENTIFIER.match(k) for k in value):
            flat.update(flatten_config(value, dotted + "."))
        elif isinstance(value, str):
            flat[dotted] = value
        else:
            flat[dotted] = json.dumps(value, default=str)
    return flat


def numeric_items(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in `metrics` (nested mappings flattened with dots); None, text, bools dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(numeric_items(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def record_metrics(record: Any) -> dict[str, float]:
    """An epoch record (stages.train.EpochRecord or a dict of it) as metrics: its numeric
    fields except the epoch index (the step) itself."""
    fields = record.to_dict() if hasattr(record, "to_dict") else dict(record)
    fields.pop("epoch", None)
    return numeric_items(fields)


def metric_name(name: str) -> str:
    """A name every backend accepts: letters, digits, _ - . space : / (others become _)."""
    return _BAD_NAME_CHARS.sub("_", name).strip("/") or "_"


class Tracker(abc.ABC):
    """One tracking backend. `start` and `finish` return facts for the manifest."""

    name = "tracker"

    def __init__(self) -> None:
        self.notes: list[str] = []  # non-fatal things the run should know (collected by Tracking)

    @abc.abstractmethod
    def start(self, resolved_config: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        """Open (or reopen, on a rerun of `run_dir`) the run; log the config."""

    @abc.abstractmethod
    def log_epoch(self, phase: str, epoch: int, metrics: Mapping[str, float]) -> None:
        """Metrics of one finished epoch of `phase`; `epoch` is the step (0-based, as in the
        manifest's history). Logging an epoch already logged for this run is a no-op."""

    @abc.abstractmethod
    def log_final(self, metrics: Mapping[str, Any]) -> None:
        """The run's final numbers (nested mappings flattened with dots; non-numbers skipped)."""

    @abc.abstractmethod
    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Files (or folders) to keep with the run."""

    @abc.abstractmethod
    def finish(self, status: str) -> dict[str, Any]:
        """Close with the run's status: succeeded, failed, gate_failed or interrupted."""


class MlflowTracker(Tracker):
    """MLflow through `MlflowClient` only (no fluent API: no global active run, no git or
    environment probing). Params are the resolved config flattened to dotted keys; metrics
    are `<phase>/<name>` with step = epoch; tag `optg.status` carries the run's status."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_id = ""
        self._client: Any = None
        self._reused = False
        self._last_step: dict[str, int] = {}

    def start(self, resolved_config: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        run_dir = Path(run_dir)
        experiment_id = self._experiment_id()
        state_path = run_dir / STATE_DIR / "mlflow.json"
        store = hashlib.sha256(self.cfg.tracking_uri.encode()).hexdigest()  # no credentials on disk
        run = self._previous_run(state_path, store, experiment_id)
        self._reused = run is not None
        tags = {"optg.status": "running", "optg.run_dir": str(run_dir.resolve())}
        if run is None:
            run_name = self.cfg.run_name or str(resolved_config.get("name", run_dir.name))
            run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
        else:
            self._client.update_run(run.info.run_id, status="RUNNING")
            for key, value in tags.items():
                self._client.set_tag(run.info.run_id, key, value)
        self.run_id = run.info.run_id
        atomic_write_json(state_path, {"store_sha256": store, "experiment_id": experiment_id, "run_id": self.run_id})
        config = {k: v for k, v in resolved_config.items() if k != "tracking"}  # URIs may hold credentials
        self._log_params(flatten_config(config), dict(run.data.params) if self._reused else {})
        self._client.log_dict(self.run_id, config, "resolved_config.json")  # the full text of truncated params
        return {"mlflow_run_id": self.run_id, "mlflow_experiment_id": experiment_id, "mlflow_run_reused": self._reused}

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.cfg.experiment)
        if found is None:
            try:
                return str(self._client.create_experiment(self.cfg.experiment, self._artifact_location()))
            except MlflowException:  # created meanwhile by a concurrent run
                found = self._client.get_experiment_by_name(self.cfg.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {self.cfg.experiment!r} is deleted; restore it "
                               "(mlflow experiments restore) or choose another tracking.mlflow.experiment")
        return str(found.experiment_id)

    def _artifact_location(self) -> str | None:
        """Where a new experiment's artifacts go. MLflow's default for a database store is
        `./mlruns` in whatever the working directory is; for a local sqlite file we keep them
        beside the database instead."""
        if self.cfg.artifact_location is not None:
            return self.cfg.artifact_location
        if uri_scheme(self.cfg.tracking_uri) == "sqlite":
            db = self.cfg.tracking_uri.split(":///", 1)[-1]
            if db and db != ":memory:":
                return (Path(db).expanduser().resolve().parent / "mlartifacts").as_uri()
        return None

    def _previous_run(self, state_path: Path, store: str, experiment_id: str) -> Any:
        """The MLflow run this run directory logged to before, if it is still there to continue."""
        if not state_path.is_file():
            return None
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            run_id = str(state["run_id"])
            same_place = state.get("store_sha256") == store and state.get("experiment_id") == experiment_id
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.notes.append(f"mlflow: {state_path} unreadable ({exc}); started a new MLflow run")
            return None
        if not same_place:
            self.notes.append(f"mlflow: the earlier MLflow run {run_id} is in another store or experiment; "
                              "started a new MLflow run")
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            self.notes.append(f"mlflow: the earlier MLflow run {run_id} no longer exists (or is deleted); "
                              "started a new MLflow run")
            return None
        return run

    def _log_params(self, params: dict[str, str], existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils import validation as limits
            max_value = int(getattr(limits, "MAX_PARAM_VAL_LENGTH", _MAX_PARAM_VALUE))
            max_key = int(getattr(limits, "MAX_ENTITY_KEY_LENGTH", _MAX_KEY))
            per_batch = int(getattr(limits, "MAX_PARAMS_TAGS_PER_BATCH", _PARAMS_PER_BATCH))
        except ImportError:
            max_value, max_key, per_batch = _MAX_PARAM_VALUE, _MAX_KEY, _PARAMS_PER_BATCH
        fitted: dict[str, str] = {}
        for key, value in params.items():
            key = metric_name(key)
            if len(key) > max_key:  # keep keys distinct: cut, then a digest of the whole key
                key = key[: max_key - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]
            if len(value) > max_value:
                tail = f"...[{len(value)} chars; see resolved_config.json]"
                value = value[: max_value - len(tail)] + tail
            fitted[key] = value
        changed = sorted(k for k, v in fitted.items() if k in existing and existing[k] != v)
        if changed:
            self.notes.append("mlflow: config changed since this MLflow run started; MLflow params cannot "
                              f"change, so they keep their first values ({', '.join(changed)}); "
                              "resolved_config.json holds the new config")
        todo = [Param(k, v) for k, v in fitted.items() if k not in existing]
        for i in range(0, len(todo), per_batch):
            self._client.log_batch(self.run_id, params=todo[i:i + per_batch])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's MAX_METRICS_PER_BATCH
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_epoch(self, phase: str, epoch: int, metrics: Mapping[str, float]) -> None:
        values = {f"{phase}/{k}": v for k, v in numeric_items(metrics).items()}
        if phase not in self._last_step:  # a continued run: find what an earlier session logged
            self._last_step[phase] = max(
                (m.step for k in values for m in self._client.get_metric_history(self.run_id, metric_name(k))),
                default=-1) if self._reused else -1
        if epoch <= self._last_step[phase] or not values:
            return
        self._log_metrics(values, epoch)
        self._last_step[phase] = epoch

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        values = numeric_items(metrics)
        if values:
            self._log_metrics(values, 0)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for path in map(Path, paths):
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self._client.log_artifact(self.run_id, str(path))
            else:
                self.notes.append(f"mlflow: artifact {path} does not exist; not logged")

    def finish(self, status: str) -> dict[str, Any]:
        self._client.set_tag(self.run_id, "optg.status", status)
        self._client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FAILED"))
        return {}


class TensorBoardTracker(Tracker):
    """Scalars through `torch.utils.tensorboard.SummaryWriter`, one writer (a TensorBoard run)
    per phase under `<log_dir>/<run dir name>/`: `dense/`, `sparse/` with step = epoch, and
    `final/` at step 0. Flushed after every call so a long run can be followed; closed at finish."""

    name = "tensorboard"

    def __init__(self, cfg: TensorBoardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.root = Path()
        self._writers: dict[str, Any] = {}
        self._last_step: dict[str, int] = {}
        self._writer_class: Any = None

    def start(self, resolved_config: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.root = Path(self.cfg.log_dir).expanduser().resolve() / Path(run_dir).resolve().name
        return {"tensorboard_dir": str(self.root)}

    def _writer(self, group: str, first_step: int) -> Any:
        """The writer of `group`, opened with purge_step = the first step it logs in this
        process: TensorBoard then hides what an earlier session logged from that step on."""
        if group not in self._writers:
            self._writers[group] = self._writer_class(log_dir=str(self.root / metric_name(group)),
                                                      purge_step=first_step)
        return self._writers[group]

    def _write(self, group: str, step: int, values: dict[str, float]) -> None:
        writer = self._writer(group, step)
        for key, value in values.items():
            writer.add_scalar(metric_name(key), value, global_step=step)
        writer.flush()

    def log_epoch(self, phase: str, epoch: int, metrics: Mapping[str, float]) -> None:
        values = numeric_items(metrics)
        if epoch <= self._last_step.get(phase, -1) or not values:
            return
        self._write(phase, epoch, values)
        self._last_step[phase] = epoch

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        values = numeric_items(metrics)
        if values:
            self._write("final", 0, values)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """TensorBoard keeps scalars, not files."""

    def finish(self, status: str) -> dict[str, Any]:
        writers, self._writers = list(self._writers.values()), {}
        for writer in writers:
            writer.close()  # flushes
        return {}


class Tracking(Tracker):
    """Fans every call out to the configured trackers. Never raises `Exception`: a tracker that
    fails is switched off for the rest of the run and the failure becomes a warning (in
    `warnings`, passed to `log`, and in `summary()` for the manifest)."""

    name = "tracking"

    def __init__(self, trackers: list[Tracker], log: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.trackers = list(trackers)
        self.log = log or (lambda message: None)
        self.warnings: list[str] = []
        self.facts: dict[str, Any] = {}
        self._started: list[Tracker] = []  # start() succeeded
        self._active: list[Tracker] = []  # started and not failed since

    @property
    def enabled(self) -> bool:
        return bool(self.trackers)

    def _fan_out(self, action: str, call: Callable[[Tracker], Any], trackers: list[Tracker]) -> list[Tracker]:
        """Call each tracker; returns those that did not fail."""
        succeeded = []
        for tracker in trackers:
            try:
                facts = call(tracker)
            except Exception as exc:  # noqa: BLE001 - tracking never changes the run's outcome
                was_active = tracker in self._active
                if was_active:
                    self._active.remove(tracker)
                self._warn(f"{tracker.name}: {action} failed ({type(exc).__name__}: {exc})"
                           + (f"; {tracker.name} tracking is off for the rest of this run" if was_active else ""))
            else:
                succeeded.append(tracker)
                if isinstance(facts, dict):
                    self.facts.update(facts)
            for note in tracker.notes:
                self._warn(note)
            tracker.notes.clear()
        return succeeded

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log(f"[tracking] warning: {message}")

    def start(self, resolved_config: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        self._active = list(self.trackers)
        self._started = self._fan_out("start", lambda t: t.start(resolved_config, run_dir), list(self.trackers))
        return self.summary()

    def log_epoch(self, phase: str, epoch: int, metrics: Mapping[str, float]) -> None:
        self._fan_out(f"log_epoch({phase}, {epoch})", lambda t: t.log_epoch(phase, epoch, metrics), list(self._active))

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        self._fan_out("log_final", lambda t: t.log_final(metrics), list(self._active))

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        paths = list(paths)
        self._fan_out("log_artifacts", lambda t: t.log_artifacts(paths), list(self._active))

    def finish(self, status: str) -> dict[str, Any]:
        """Closes every tracker that started, also one switched off by a later failure (best
        effort, so an MLflow run does not stay RUNNING after an artifact upload failed)."""
        started, self._started, self._active = self._started, [], []
        self._fan_out("finish", lambda t: t.finish(status), started)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """For the manifest's `tracking` entry: run ids, TensorBoard folder, warnings."""
        return {**self.facts, "warnings": list(self.warnings)}


def build_tracking(cfg: TrackingConfig | None, log: Callable[[str], None] | None = None) -> Tracking:
    """The trackers `cfg` asks for (none when `tracking:` is absent: every call is a no-op)."""
    trackers: list[Tracker] = []
    if cfg is not None and cfg.mlflow is not None:
        trackers.append(MlflowTracker(cfg.mlflow))
    if cfg is not None and cfg.tensorboard is not None:
        trackers.append(TensorBoardTracker(cfg.tensorboard))
    return Tracking(trackers, log)
