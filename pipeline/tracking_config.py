"""The `tracking:` config section: optional MLflow and TensorBoard logging of a run.

Both backends are optional extras. Their packages are looked up here with
`importlib.util.find_spec` (no heavy import at config time), so `optg check` reports a
missing package as a config error that names the extra to install, before anything runs.
"""
from __future__ import annotations

import importlib.util
import os
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from stages.base import StrictModel

INSTALL_HINT = 'pip install "optg-pipeline[{extra}]"'
# MLflow's SQLAlchemy-backed stores (scheme or scheme+driver); they need sqlalchemy and alembic.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_TRUE = ("true", "1", "yes", "y", "on")


def missing_modules(*modules: str) -> list[str]:
    """The top-level modules among `modules` that cannot be imported here (none are imported)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or half-removed install counts as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def _require(modules: tuple[str, ...], extra: str, why: str) -> None:
    missing = missing_modules(*modules)
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise ValueError(f"{why} needs {names}, which is not installed; install it with: "
                         + INSTALL_HINT.format(extra=extra))


def uri_scheme(uri: str) -> str:
    """The URI's scheme without a `+driver` suffix; '' for a plain path."""
    if uri.strip().lower() in ("databricks", "databricks-uc", "uc"):  # MLflow's bare scheme names
        return uri.strip().lower()
    scheme = urlsplit(uri).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter (C:\\...) is a path, not a scheme
        return ""
    return scheme.split("+", 1)[0]


class MlflowConfig(StrictModel):
    """Log params, per-epoch and final metrics and the artifacts to an MLflow tracking store."""

    tracking_uri: str = Field(min_length=1, description=(
        "where runs are stored: sqlite:///path/mlflow.db (local), http(s)://server, databricks, "
        "or a DB URL; relative sqlite paths are relative to the working directory"))
    experiment: str = Field(min_length=1, max_length=500, description="created if it does not exist")
    run_name: str | None = Field(None, min_length=1, max_length=250,
                                 description="default: the config's `name`")
    artifact_location: str | None = Field(None, min_length=1, description=(
        "where a new experiment stores artifacts; default for sqlite:///DIR/x.db: DIR/mlartifacts; "
        "an existing experiment keeps its own"))

    @model_validator(mode="after")
    def _backend_available(self) -> MlflowConfig:
        _require(("mlflow",), "mlflow", "tracking.mlflow")
        scheme = uri_scheme(self.tracking_uri)
        if scheme in DATABASE_SCHEMES:
            _require(("sqlalchemy", "alembic"), "mlflow", f"tracking.mlflow with a {scheme}: store")
        if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in _TRUE:
            raise ValueError(
                f"tracking_uri {self.tracking_uri!r} is an MLflow file store, which MLflow 3 refuses "
                "unless MLFLOW_ALLOW_FILE_STORE=true is set; use a local database instead, e.g. "
                "sqlite:///mlruns/mlflow.db")
        return self


class TensorBoardConfig(StrictModel):
    """Write scalars to TensorBoard event files under `log_dir/<run directory name>/<phase>`."""

    log_dir: str = Field(min_length=1, description="relative paths are relative to the working directory")

    @model_validator(mode="after")
    def _backend_available(self) -> TensorBoardConfig:
        _require(("tensorboard",), "tensorboard", "tracking.tensorboard")
        return self


class TrackingConfig(StrictModel):
    """Experiment tracking; each backend is off unless its section is present."""

    mlflow: MlflowConfig | None = None
    """log to MLflow (the `mlflow` extra)"""
    tensorboard: TensorBoardConfig | None = None
    """log to TensorBoard (the `tensorboard` extra)"""
