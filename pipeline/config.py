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
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline.tracking_config import TrackingConfig
from stages.base import StageError, StrictModel
from stages.benchmark import BenchmarkConfig
from stages.data import DataConfig
from stages.export import ExportConfig
from stages.model import ModelConfig
from stages.plugins import set_plugin_dirs
from stages.report import ReportConfig
from stages.sparsify import SparsityConfig
from stages.structured import StructuredConfig
from stages.train import TrainConfig
from stages.validate import ValidateConfig
from stages.verify import VerifyConfig


class ConfigError(ValueError):
    """An invalid config or override. `problems` holds one line per problem; `items` the same
    problems as {"path": dotted key or "" when no key applies, "message": ...} (`optg check --json`)."""

    def __init__(self, problems: list[str], source: str = "config",
                 items: list[dict[str, str]] | None = None) -> None:
        self.problems = problems
        self.source = source
        self.items = items if items is not None else [{"path": "", "message": p} for p in problems]
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class KeyedProblems(ValueError):
    """Raised by a validator for problems it can place exactly: (dotted path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


# Settings of the sparse phase that come from `train:` when `sparsity.train:` does not give them
# (the optimizer key by key). Epoch counts and warm-up belong to each phase and are not inherited.
INHERITED_FROM_TRAIN = ("optimizer", "label_smoothing", "amp", "grad_clip", "compile")


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; refuse anything over 1 MiB unread
MAX_YAML_DEPTH = 64  # nesting levels; a config needs about 5
MAX_YAML_NODES = 20_000  # values after alias expansion; a config has a few hundred


class YamlLimitError(yaml.YAMLError):
    """A YAML document refused before it is built: too deep, too big once aliases are
    expanded, a recursive alias, or a key given twice in one mapping."""


class _Loader(yaml.SafeLoader):
    """SafeLoader without sexagesimal ints (so `2:4` stays text) and with YAML 1.2 floats.

    Composition is bounded: every node counts once, every alias counts as the size of the
    node it names (so nested aliases, the "billion laughs" bomb, are refused after
    MAX_YAML_NODES nodes instead of expanding exponentially later), nesting stops at
    MAX_YAML_DEPTH levels (no RecursionError), and a mapping may not repeat a key (PyYAML
    would let the last one silently win).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._weights: dict[yaml.Node, int] = {}  # node -> its size with aliases expanded
        self._total = 0
        self._from_aliases = 0
        self._depth = 0
        self._path: list[str] = []  # dotted location of the node being composed, for messages

    def _count(self, weight: int, mark: Any, alias: bool = False) -> None:
        self._total += weight
        self._from_aliases += weight if alias else 0
        if self._total > MAX_YAML_NODES:
            why = (" (aliases repeat most of them: nested aliases, a 'billion laughs' bomb?)"
                   if 2 * self._from_aliases > self._total else "")
            raise YamlLimitError(f"line {mark.line + 1}: the document holds more than {MAX_YAML_NODES} values "
                                 f"with aliases expanded{why}; a config holds a few hundred")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is reported by PyYAML itself
                weight = self._weights.get(target)
                if weight is None:
                    raise YamlLimitError(f"line {event.start_mark.line + 1}: alias *{event.anchor} is used "
                                         "inside the node it names (a recursive structure)")
                self._count(weight, event.start_mark, alias=True)
            return super().compose_node(parent, index)
        if self._depth >= MAX_YAML_DEPTH:
            raise YamlLimitError(f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}: "
                                 f"nested deeper than {MAX_YAML_DEPTH} levels")
        self._count(1, event.start_mark)
        if isinstance(parent, yaml.SequenceNode):
            self._path.append(str(index))
        elif isinstance(parent, yaml.MappingNode):
            self._path.append(str(index.value) if isinstance(index, yaml.ScalarNode) else "?")
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if parent is not None:
                self._path.pop()
        if isinstance(node, yaml.SequenceNode):
            weight = 1 + sum(self._weights[child] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            weight = 1 + sum(self._weights[k] + self._weights[v] for k, v in node.value)
        else:
            weight = 1
        self._weights[node] = weight
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                where = ".".join(self._path) or "the top level"
                raise YamlLimitError(
                    f"line {key.start_mark.line + 1}: duplicate key {key.value!r} in {where} "
                    f"(first at line {first.start_mark.line + 1}); each key may appear once in a mapping")
        return node


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _unshare(value: Any) -> Any:
    """A tree copy: aliases give shared objects, and `--set` must change one place only."""
    if isinstance(value, dict):
        return {k: _unshare(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshare(v) for v in value]
    return value


def parse_yaml(text: str, source: str = "config") -> Any:
    """Parse one YAML document safely and within bounds; ConfigError says what is wrong."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"YAML text is {len(text)} characters; the limit is {MAX_CONFIG_BYTES}"], source)
    try:
        return _unshare(yaml.load(text, Loader=_Loader))  # _Loader is a SafeLoader
    except YamlLimitError as exc:
        raise ConfigError([str(exc)], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error at {where}: {problem}"], source) from None
    except RecursionError:  # a safety net: the depth limit above should make this unreachable
        raise ConfigError([f"YAML nested too deeply (limit {MAX_YAML_DEPTH} levels)"], source) from None


with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"')

    class PipelineConfig(StrictModel):
        """The whole run. `train` is the optional dense phase before sparse training."""

        name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
        """run directory `runs/<name>`; letters, digits, `_ . -`"""
        seed: int = Field(0, ge=0, le=2**32 - 1, description="0 .. 4294967295")
        device: Literal["auto", "cpu", "cuda"] = "auto"
        """where training runs; auto: CUDA when available. CPU runs are deterministic given the seed"""
        task: str = Field("classification", description="classification | sequence_classification | causal_lm | "
                          "package.module:callable (see stages.tasks)")
        data: DataConfig
        model: ModelConfig
        train: TrainConfig | None = None
        """optional dense phase; its test metric is the gates' reference"""
        structured: StructuredConfig | None = None
        """optional: remove whole channels before sparse training"""
        sparsity: SparsityConfig
        validate: ValidateConfig = ValidateConfig()  # type: ignore[assignment]  # shadows BaseModel.validate
        export: ExportConfig = ExportConfig()
        verify: VerifyConfig = VerifyConfig()
        benchmark: BenchmarkConfig = BenchmarkConfig()
        report: ReportConfig = ReportConfig()
        """report.md (and its figure) in the run directory"""
        tracking: TrackingConfig | None = None
        """optional: log the run to MLflow and/or TensorBoard"""

        @model_validator(mode="after")
        def _inherit_train_settings(self) -> "PipelineConfig":
            """Keys of INHERITED_FROM_TRAIN not given under `sparsity.train` take `train`'s values
            (a sparse phase after an AdamW dense phase continues with AdamW, not SGD at lr 0.1)."""
            sparse = self.sparsity.train
            if self.train is None or sparse is None:
                return self
            given = sparse.model_fields_set
            update: dict[str, Any] = {k: getattr(self.train, k) for k in INHERITED_FROM_TRAIN
                                      if k not in given and k != "optimizer"}
            if "optimizer" not in given:
                update["optimizer"] = self.train.optimizer.model_copy()
            else:
                own = sparse.optimizer
                inherit = {k: getattr(self.train.optimizer, k) for k in type(own).model_fields
                           if k not in own.model_fields_set}
                update["optimizer"] = own.model_copy(update=inherit)
            # no assignment: validate_assignment would re-run the validators; the values are
            # already validated fields of the same types
            self.sparsity.__dict__["train"] = sparse.model_copy(update=update)
            return self

        @model_validator(mode="after")
        def _factories_accept_options(self) -> "PipelineConfig":
            """The task, dataset and model names resolve, their options fit the factories'
            schemas (plugins are imported), the data and an hf: model folder fit the task, and
            `seq_len` fits the model folder's positions, so `optg check` catches what would
            fail at run time."""
            from stages.data import check_data_config
            from stages.hf import hf_dir, read_folder
            from stages.model import check_model_config
            from stages.tasks import resolve_task

            try:
                task = resolve_task(self.task)
            except StageError as exc:
                raise KeyedProblems([("task", str(exc))]) from None
            problems = [(f"data.{path}", message) for path, message in
                        check_data_config(self.data, task.text_layout, task.name)]
            problems += [(f"model.{path}", message) for path, message in
                         check_model_config(self.model, task.name, task.hf_auto_class)]
            folder = hf_dir(self.model.name)
            seq_len = self.data.options.get("seq_len")
            if folder is not None and isinstance(seq_len, int) and not problems:
                positions = read_folder(folder).max_positions
                if positions is not None and seq_len > positions:
                    problems.append(("data.options.seq_len", f"{seq_len} is over the model's "
                                     f"max_position_embeddings={positions} ({folder / 'config.json'})"))
            if task.text_layout is not None and not problems:
                problems += _tokenizer_problems(self.data, folder)
            if self.structured is not None and task.name != "classification":
                problems.append(("structured", f"structured (channel) pruning serves task 'classification'; "
                                 f"task {task.name!r} is made sparse by `sparsity:` alone"))
            if problems:
                raise KeyedProblems(problems)
            return self

        @property
        def has_reference(self) -> bool:
            """A dense reference exists: a dense phase, or a model built with trained weights."""
            from stages.model import starts_trained

            return self.train is not None or starts_trained(self.model)

        @model_validator(mode="after")
        def _cross_checks(self) -> "PipelineConfig":
            from stages.tasks import resolve_task
            from stages.validate import gate_problems

            has_reference = self.has_reference
            task = resolve_task(self.task)  # resolvable: the validator above ran first
            errors = gate_problems(self.validate, task.metric, task.name, has_reference)
            settings = self.sparsity.settings
            init = getattr(settings, "score_init", None)
            if init in ("wanda", "sparsegpt") and not has_reference:
                errors.append(f"sparsity.optg.score_init {init!r} starts OptG from that one-shot "
                              "method's mask of a trained model: add a `train` phase or `model.weights`")
            if self.structured is not None and self.structured.finetune_epochs and self.train is None \
                    and self.sparsity.train is None:
                errors.append("structured.finetune_epochs fine-tunes with the optimiser of `train` or "
                              "`sparsity.train`, and the config has neither")
            if self.sparsity.method == "oneshot" and not has_reference:
                errors.append("sparsity.method 'oneshot' prunes a trained model: add a `train` phase or "
                              "`model.weights`")
            if self.verify.enabled and not self.export.enabled:
                errors.append("verify.enabled needs export.enabled (nothing to verify)")
            if self.validate.max_latency_ratio is not None and not self.benchmark_active:
                errors.append("validate.max_latency_ratio needs the benchmark stage: benchmark.enabled and "
                              "export.enabled (it times the exported file)")
            if self.validate.max_quantized_drop is not None:
                if not (self.export.enabled and self.export.quantize == "int8"):
                    errors.append("validate.max_quantized_drop gates the INT8 file: set export.quantize: int8 "
                                  "(with export.enabled)")
                elif not has_reference:
                    errors.append("validate.max_quantized_drop needs a dense reference: add a `train` (dense) "
                                  "phase or `model.weights`")
            if errors:
                raise ValueError("; ".join(errors))
            return self

        @property
        def benchmark_active(self) -> bool:
            """The benchmark stage runs: on by default (every run has `sparsity`), off with
            `benchmark.enabled: false`, and only when there is an exported file to time."""
            return self.benchmark.enabled and self.export.enabled


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


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted path, message) per problem; "" as path where the problem spans keys."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _format_loc(loc)
        keyed = (err.get("ctx") or {}).get("error")
        if isinstance(keyed, KeyedProblems):
            prefix = "" if path == "(top level)" else path + "."
            problems += [(prefix + p, m) for p, m in keyed.problems]
            continue
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = ", ".join(owner.model_fields) if owner else "see docs/config.md (optg schema --markdown)"
            problems.append((path, f"unknown key (valid keys here: {valid})"))
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            problems.append((path, "required key is missing"))
        else:
            value = err.get("input")
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            problems.append((path, f"{message} (got {shown})"))
    return problems


def format_validation_error(exc: ValidationError) -> list[str]:
    return [f"{path}: {message}" for path, message in validation_problems(exc)]


def _mapping_field_types(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model inside `annotation`, whether it is a dict) for `X`, `X | None`, `dict[...]`."""
    candidates = getattr(annotation, "__args__", (annotation,)) if get_origin(annotation) is not dict else ()
    model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    is_dict = get_origin(annotation) is dict or any(get_origin(c) is dict or c is dict for c in candidates)
    return model, is_dict


def split_override_key(key: str) -> list[str]:
    """Split a `--set` key at dots, but only as deep as the schema has sections.

    Below a mapping field (`data.options`, `model.options`, `sparsity.overrides`) the rest
    of the key is one key, dots and all: `sparsity.overrides.^fc\\.0$` sets the regex
    `^fc\\.0$`. Below an unknown name the key is split at every dot, so the schema can name it.
    """
    parts: list[str] = []
    model: type[BaseModel] | None = PipelineConfig
    rest = key
    while True:
        head, dot, rest = rest.partition(".")
        parts.append(head)
        if not dot:
            return parts
        field = model.model_fields.get(head) if model is not None else None
        model, is_dict = _mapping_field_types(field.annotation) if field is not None else (None, False)
        if model is None and is_dict:
            parts.append(rest)
            return parts


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b=value`: values parsed as YAML (so `1:4` stays text), typed later by the schema.

    Keys are split by `split_override_key`, so a regex key under `sparsity.overrides` keeps its dots.
    """
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = split_override_key(key) if key else []
        if not sep or not parts or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", parts[0]) or not all(parts):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. sparsity.target=0.95")
            continue
        try:
            value = parse_yaml(text, "--set") if text.strip() else ""
        except ConfigError as exc:
            problems.append(f"--set {item!r}: {exc.problems[0]}")
            continue
        node = raw
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
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:  # checked before reading: never load a huge file into memory
            raise ConfigError([f"config file is {size} bytes; the limit is {MAX_CONFIG_BYTES}"], source)
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
    set_plugin_dirs([path.parent, Path.cwd()])  # `module:callable` plugins next to the config
    return validate_config(resolve_config_paths(raw, path.parent), source)


def _tokenizer_problems(data: DataConfig, folder: Path | None) -> list[tuple[str, str]]:
    """Where a text source's tokenizer would come from, and why it cannot (the data stage
    reads the same place: `stages.data.text.find_tokenizer`)."""
    from stages.data.text import TextContext, find_tokenizer

    try:
        find_tokenizer(data, TextContext(layout="blocks", model_dir=folder))
    except StageError as exc:
        return [("data.options.tokenizer", str(exc))]
    return []


def resolve_config_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Paths docs/config.md defines relative to the config file, made absolute: `model.name:
    hf:<dir>` and `data.options.tokenizer`. The resolved config (and its hash) then names the
    folder it used wherever it is reloaded from (the run directory's config.yaml)."""
    model, data = raw.get("model"), raw.get("data")
    if isinstance(model, dict) and isinstance(model.get("name"), str) and model["name"].startswith("hf:"):
        model["name"] = "hf:" + str(_absolute(model["name"][3:], base))
    options = data.get("options") if isinstance(data, dict) else None
    if isinstance(options, dict) and isinstance(options.get("tokenizer"), str):
        options["tokenizer"] = str(_absolute(options["tokenizer"], base))
    return raw


def _absolute(text: str, base: Path) -> Path:
    path = Path(text.strip()).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def validate_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError([f"{p}: {m}" if p else m for p, m in problems], source,
                          [{"path": p, "message": m} for p, m in problems]) from None


def config_json_schema() -> dict[str, Any]:
    """The config's JSON Schema (`optg schema`), for editor completion and CI validation."""
    schema = PipelineConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", "optg-pipeline config")
    return schema


def resolved_dict(cfg: PipelineConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML; loading it back gives an equal config."""
    return yaml.safe_dump(resolved_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: PipelineConfig) -> str:
    """Identifies what the run computes; `tracking` is left out (it only observes the run), so
    adding or moving a tracking store neither forces a retrain nor changes older runs' hashes."""
    computed = {k: v for k, v in resolved_dict(cfg).items() if k != "tracking"}
    canonical = json.dumps(computed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
