"""The generated config reference: `docs/config.md` is exactly what `optg schema --markdown`
prints, it names every key of the JSON Schema (an independent walk of the same models), and every
config key has a description."""
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from pipeline.config import config_json_schema
from pipeline.config_docs import (
    REGENERATE,
    config_sections,
    docstring_parts,
    option_sections,
    type_text,
    undescribed_keys,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "config.md"


def test_docs_config_md_is_the_generators_output():
    """A fresh process, so registrations made by other tests cannot leak into the output."""
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "schema", "--markdown"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert DOC.is_file(), f"docs/config.md is missing: run `{REGENERATE}`"
    assert DOC.read_text() == out, f"docs/config.md is out of date with the schema: run `{REGENERATE}`"


def _json_schema_keys(node: dict[str, Any], defs: dict[str, Any], path: str = "") -> set[str]:
    """Dotted keys of a JSON Schema: properties, followed through $ref and anyOf."""
    if "$ref" in node:
        return _json_schema_keys(defs[node["$ref"].rsplit("/", 1)[1]], defs, path)
    keys: set[str] = set()
    for option in node.get("anyOf", []):
        keys |= _json_schema_keys(option, defs, path)
    for name, sub in node.get("properties", {}).items():
        dotted = f"{path}{name}"
        keys |= {dotted} | _json_schema_keys(sub, defs, dotted + ".")
    return keys


def test_the_reference_names_every_key_of_the_json_schema():
    schema = config_json_schema()
    expected = _json_schema_keys(schema, schema["$defs"])
    documented = {row.key for section in config_sections() for row in section.rows}
    assert documented == expected


def test_every_config_key_is_described_and_every_note_is_used():
    assert undescribed_keys() == [], "describe these fields where they are declared (Field(description=...) or a docstring below)"


def test_rows_carry_type_bounds_and_defaults():
    rows = {row.key: row for section in config_sections() for row in section.rows}
    assert (rows["data.batch_size"].type, rows["data.batch_size"].default) == ("int (> 0)", "`64`")
    assert rows["name"].default == "required" and "length <= 100" in rows["name"].type
    assert rows["device"].type == '"auto" | "cpu" | "cuda"'
    assert rows["data.num_workers"].type == '"auto" | int (>= 0)'
    assert rows["structured"].default == "`null`" and rows["structured"].type == "section | null"
    assert rows["sparsity.train.amp"].default == "`true`; with `train`: `train.amp`"
    assert rows["sparsity.train"].default == "`null`" and rows["sparsity.optg"].type == "section | null"
    options = {row.key for section in option_sections() for row in section.rows}
    assert {"data.options.num_samples", "model.options.width", "sparsity.schedule.beta"} <= options
    assert "sparsity.schedule.epochs" not in options  # set from sparsity.train.epochs, not a YAML setting


def test_docstring_entries_and_prose_are_split():
    doc = """What the section is.

    alpha: the first
        setting, continued.
    beta / gamma: shared text.
    unknown: stays prose because it is not a field.
    """
    prose, entries = docstring_parts(doc, {"alpha", "beta", "gamma"})
    assert entries == {"alpha": "the first setting, continued.", "beta": "shared text.", "gamma": "shared text."}
    assert prose == "What the section is.\n\nunknown: stays prose because it is not a field."


@pytest.mark.parametrize("annotation, text", [
    (int, "int"), (int | None, "int | null"), (Literal["a", "b"], '"a" | "b"'), (list[str], "list[str]"),
    (dict[str, Any], "dict[str, any]"), (tuple[float, float], "[float, float]"), (object, None),
])
def test_type_text(annotation, text):
    assert type_text(annotation) == text
