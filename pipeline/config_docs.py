"""The config reference, generated from the schema (`optg schema --markdown`, `docs/config.md`).

Every key of a run config is rendered as a Markdown table row: dotted path, type (with its
bounds), default and description. The rows come from the pydantic models that validate a
config (`pipeline.config.PipelineConfig` and the stage configs it holds), so the reference
cannot name a key the schema lacks or miss one it has; `tests/pipeline/test_config_docs.py`
fails when `docs/config.md` is not this module's output. Per-name schemas get their own
tables: the options of every built-in dataset (`data.options`) and model (`model.options`),
and the settings of every registered schedule (`sparsity.schedule`).

A description is the field's own: `Field(description=...)` or the docstring right below the
field (pydantic's `use_attribute_docstrings`, on every config model), else its entry in the
owning model's docstring (`name: text` lines, as some stage configs write them).
"""
from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from optg.schedules import SCHEDULES
from pipeline.config import (
    INHERITED_FROM_TRAIN,
    MAX_CONFIG_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    PipelineConfig,
)
from stages.data.catalog import DATASET_SCHEMAS, DATASETS
from stages.data.text import TEXT_SCHEMAS, TEXT_SOURCES
from stages.zoo import MODELS, options_schema

REGENERATE = "optg schema --markdown > docs/config.md"

@dataclass(frozen=True)
class Row:
    """One key of a table: where it is, what it takes, what it defaults to, what it does."""

    key: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    """A heading with its prose and the rows of its keys."""

    title: str
    intro: str
    rows: list[Row]


# --------------------------------------------------------------------------- types and values


def _constraints(metadata: list[Any]) -> list[str]:
    """Bounds, lengths and patterns of a field as short text (`>= 0`, `length <= 100`)."""
    out: list[str] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += _constraints(item.metadata)
        elif isinstance(item, annotated_types.Gt):
            out.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            out.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            out.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            out.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.MinLen):
            out.append(f"length >= {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            out.append(f"length <= {item.max_length}")
        elif getattr(item, "pattern", None):
            out.append(f"matching `{item.pattern}`")
    return out


def _with_constraints(text: str, metadata: list[Any]) -> str:
    bounds = _constraints(metadata)
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models (config sections) an annotation admits: `X`, `X | None`."""
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def type_text(annotation: Any) -> str | None:
    """A YAML-level name of a type (`int`, `"auto" | int (>= 0)`, `list[str]`); None for a type
    no YAML value can have (a library-only class such as a `Schedule` instance)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Annotated:
        inner = type_text(args[0])
        return None if inner is None else _with_constraints(inner, list(args[1:]))
    if origin in (Union, types.UnionType):
        parts = [t for t in (type_text(a) for a in args) if t is not None]
        return " | ".join(dict.fromkeys(parts)) or None
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (list, tuple, dict):
        items = [type_text(a) or "any" for a in args if a is not Ellipsis]
        if origin is tuple:
            return "[" + ", ".join(items) + "]"
        return f"{origin.__name__}[{', '.join(items)}]" if items else origin.__name__
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if annotation in (int, float, str, bool, list, dict):
        return annotation.__name__
    return None


def _plain(value: Any) -> Any:
    """A default as JSON-ready data: models dumped, tuples as lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def default_text(field: FieldInfo) -> str:
    """`required`, or the default as inline YAML (JSON is valid YAML flow style)."""
    if field.is_required():
        return "required"
    return f"`{json.dumps(_plain(field.get_default(call_default_factory=True)))}`"


# --------------------------------------------------------------------------- docstrings

_ENTRY = re.compile(r"^([a-z_][a-z0-9_]*(?:\s*[,/]\s*[a-z_][a-z0-9_]*)*):\s+(.*)$")


def docstring_parts(doc: str | None, names: set[str]) -> tuple[str, dict[str, str]]:
    """Split a model docstring into its prose and its field entries.

    An entry is a line `name: text` (or `a / b: text`, `a, b: text`) whose names are fields of
    the model, continued by the more-indented lines after it. The prose is everything else,
    paragraphs joined by blank lines."""
    entries: dict[str, str] = {}
    prose: list[str] = []
    current: list[str] | None = None
    keys: list[str] = []
    for line in inspect.cleandoc(doc or "").splitlines():
        match = _ENTRY.match(line)
        group = re.split(r"\s*[,/]\s*", match.group(1)) if match else []
        if match and set(group) <= names:
            current, keys = [match.group(2)], group
            for key in keys:
                entries[key] = ""
        elif current is not None and line.startswith(" ") and line.strip():
            current.append(line.strip())
        else:
            current = None
            prose.append(line)
        if current is not None:
            for key in keys:
                entries[key] = " ".join(current)
    paragraphs = re.split(r"\n\s*\n", "\n".join(prose))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip()), entries


def _owner_docs(model: type) -> tuple[str, dict[str, str]]:
    """The model's own prose, and the field entries of every docstring in its MRO (nearest first)."""
    fields = set(_fields(model))
    prose, entries = docstring_parts(model.__dict__.get("__doc__"), fields)
    for base in model.__mro__[1:]:
        for key, text in docstring_parts(base.__dict__.get("__doc__"), fields)[1].items():
            entries.setdefault(key, text)
    return prose, entries


def _fields(model: type) -> Mapping[str, FieldInfo]:
    """The fields of a pydantic model or pydantic dataclass."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model.model_fields
    return getattr(model, "__pydantic_fields__", {})


# --------------------------------------------------------------------------- sections


def _own_description(model: type, name: str) -> str | None:
    """What the model itself says about a field: `Field(description=...)` or its docstring entry."""
    return _fields(model)[name].description or _owner_docs(model)[1].get(name)


def _rows(model: type, prefix: str, skip: tuple[str, ...] = ()) -> list[Row]:
    """One row per field of `model`, keys dotted under `prefix`."""
    rows = []
    for name, field in _fields(model).items():
        if name in skip:
            continue
        sections = _sections_in(field.annotation)
        kind = type_text(field.annotation) or "any"
        description = _own_description(model, name) or ""
        default = default_text(field)
        if sections:
            kind = kind.replace("mapping", "section")
            description = description or _first_paragraph(sections[0].__doc__)
            if not field.is_required() and field.get_default() is not None:
                default = "(the defaults below)"
        if prefix == "sparsity.train." and name in INHERITED_FROM_TRAIN:
            default += f"; with `train`: `train.{name}`" + (" (key by key)" if name == "optimizer" else "")
        rows.append(Row(f"{prefix}{name}", _with_constraints(kind, field.metadata), default, description))
    return rows


def config_sections() -> list[Section]:
    """The sections of the config, top level first, each nested section after its parent."""
    def walk(model: type[BaseModel], path: str) -> Iterator[Section]:
        prose, _ = _owner_docs(model)
        yield Section(f"`{path}`" if path else "Top level", prose, _rows(model, f"{path}." if path else ""))
        for name, field in model.model_fields.items():
            for sub in _sections_in(field.annotation):
                yield from walk(sub, f"{path}.{name}" if path else name)

    return list(walk(PipelineConfig, ""))


def _path_text(what: str | None) -> str:
    return f"`data.path`: required, {what}." if what else "`data.path`: not taken."


def option_sections() -> list[Section]:
    """Per-name tables: built-in datasets' options, built-in models' options, schedules' settings."""
    out: list[Section] = []
    for name, schema in DATASET_SCHEMAS.items():
        intro = f"{_first_paragraph(DATASETS.get(name).__doc__)} {_path_text(schema.path)}"
        out.append(Section(f"`data.name: {name}`", intro, _rows(schema.options, "data.options.")))
    for name, (options, what) in TEXT_SCHEMAS.items():
        intro = f"Text (for `task: causal_lm` or `sequence_classification`). " \
                f"{_first_paragraph(TEXT_SOURCES.get(name).__doc__)} {_path_text(what)}"
        out.append(Section(f"`data.name: {name}`", intro, _rows(options, "data.options.")))
    for name in MODELS.names():
        out.append(Section(f"`model.name: {name}`", _first_paragraph(MODELS.get(name).__doc__),
                           _rows(options_schema(name), "model.options.")))
    for name in SCHEDULES.names():
        cls = SCHEDULES.get(name)
        out.append(Section(f"`sparsity.schedule.name: {name}`", _first_paragraph(cls.__doc__),
                           _rows(cls, "sparsity.schedule.", skip=("epochs",))))
    return out


def undescribed_keys() -> list[str]:
    """Config keys the reference leaves without a description."""
    return [row.key for section in config_sections() for row in section.rows if not row.description]


def _first_paragraph(doc: str | None) -> str:
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


# --------------------------------------------------------------------------- Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Row]) -> list[str]:
    if not rows:
        return ["No options."]
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |" for r in rows]
    return lines


def _render(section: Section, level: str) -> list[str]:
    lines = [f"{level} {section.title}", ""]
    if section.intro:
        lines += [section.intro, ""]
    return lines + _table(section.rows) + [""]


INTRO = f"""# Config reference

Generated from the schema by `pipeline/config_docs.py`: do not edit by hand, run `{REGENERATE}`.
`optg schema` prints the same schema as JSON Schema (editor completion, CI validation).

One YAML file per run; `optg check CONFIG` validates it without running anything, and reports
every problem at once with its dotted path, the bad value and what is allowed. Unknown keys are
errors. Types are not coerced: `seed: true`, `lr: '0.1'` and `epochs: 3.0` are errors (an int
is a valid float), and floats must be finite (`.nan`, `.inf` are errors). `pattern: 2:4` may be
written without quotes. A key given twice in one mapping, nesting deeper than {MAX_YAML_DEPTH}
levels, a file over {MAX_CONFIG_BYTES} bytes and more than {MAX_YAML_NODES} values once anchors
and aliases are expanded are errors too. `--set KEY=VALUE` takes the same dotted keys.
"""


def render_markdown() -> str:
    """The whole reference, as `docs/config.md` holds it."""
    sections = config_sections()
    lines = [INTRO, "Sections: " + ", ".join(s.title for s in sections[1:]) + "; then the per-name options.", ""]
    for section in sections:
        lines += _render(section, "##")
    lines += ["## Per-name options", "",
              "`data.options` and `model.options` are checked against the schema of the dataset or model "
              "named, `sparsity.schedule` against the settings of the schedule named; a plugin "
              "(`package.module:callable`) takes the parameters of its callable. `torchvision:<name>` and "
              "`timm:<name>` pass `model.options` to the library's constructor.", ""]
    for section in option_sections():
        lines += _render(section, "###")
    return "\n".join(lines).rstrip() + "\n"
