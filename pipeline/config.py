"""The run config: one YAML file, validated strictly, with `--set` overrides.

YAML is read with a resolver that keeps `2:4` a string (PyYAML's YAML 1.1 default reads it
as the base-60 integer 124) and reads `1e-4` as a float. All problems are collected into
one ConfigError whose lines name the dotted path, the bad value and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from stages.base import StrictModel
from stages.data import DataConfig
from stages.export import ExportConfig
from stages.model import ModelConfig
from stages.report import ReportConfig
from stages.sparsify import SparsityConfig
from stages.train import TrainConfig
from stages.validate import ValidateConfig
from stages.verify import VerifyConfig


class ConfigError(ValueError):
    """An invalid config or override. `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class _Loader(yaml.SafeLoader):
    """SafeLoader without sexagesimal ints (so `2:4` stays text) and with YAML 1.2 floats."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str = "config") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error at {where}: {problem}"], source) from None


with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"')

    class PipelineConfig(StrictModel):
        """The whole run. `train` is the optional dense phase before sparse training."""

        name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
        seed: int = Field(0, ge=0)
        device: Literal["auto", "cpu", "cuda"] = "auto"
        data: DataConfig
        model: ModelConfig
        train: TrainConfig | None = None
        sparsity: SparsityConfig
        validate: ValidateConfig = ValidateConfig()  # type: ignore[assignment]  # shadows BaseModel.validate
        export: ExportConfig = ExportConfig()
        verify: VerifyConfig = VerifyConfig()
        report: ReportConfig = ReportConfig()

        @model_validator(mode="after")
        def _cross_checks(self) -> "PipelineConfig":
            has_reference = self.train is not None or self.model.weights is not None
            errors = []
            if self.validate.max_accuracy_drop is not None and not has_reference:
                errors.append("validate.max_accuracy_drop needs a dense reference: add a `train` (dense) "
                              "phase or `model.weights`, or gate on validate.min_accuracy instead")
            if self.sparsity.method == "oneshot" and not has_reference:
                errors.append("sparsity.method 'oneshot' prunes a trained model: add a `train` phase or "
                              "`model.weights`")
            if self.verify.enabled and not self.export.enabled:
                errors.append("verify.enabled needs export.enabled (nothing to verify)")
            if errors:
                raise ValueError("; ".join(errors))
            return self


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))) or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc` (for listing valid keys)."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _format_loc(loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = ", ".join(owner.model_fields) if owner else "see the README's config reference"
            problems.append(f"{path}: unknown key (valid keys here: {valid})")
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            problems.append(f"{path}: required key is missing")
        else:
            value = err.get("input")
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            problems.append(f"{path}: {message} (got {shown})")
    return problems


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b=value`: values parsed as YAML (so `1:4` stays text), typed later by the schema."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_^$\\.*+?()\[\]|-]+)*", key):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. sparsity.target=0.95")
            continue
        try:
            value = parse_yaml(text, "--set") if text.strip() else ""
        except ConfigError as exc:
            problems.append(f"--set {item!r}: {exc.problems[0]}")
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part} is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "--set")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate. Raises ConfigError naming every problem."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError([f"no such config file: {path}"], source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config: {exc}"], source) from None
    raw = parse_yaml(text, source)
    if raw is None:
        raise ConfigError(["config file is empty; it needs at least name, data, model and sparsity"], source)
    if not isinstance(raw, dict):
        raise ConfigError([f"config must be a mapping of keys (name: ..., data: ...), "
                           f"got a {type(raw).__name__}"], source)
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source)


def validate_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc), source) from None


def resolved_dict(cfg: PipelineConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML; loading it back gives an equal config."""
    return yaml.safe_dump(resolved_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: PipelineConfig) -> str:
    canonical = json.dumps(resolved_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
