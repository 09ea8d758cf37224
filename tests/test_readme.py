"""The README stays true: its library snippet runs as written, its config reference is the
schema (keys and defaults), its CLI synopsis is the parser, and the commands it shows work."""
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from pipeline.cli import build_parser
from pipeline.config import PipelineConfig, load_config, parse_yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLE_VALUES = {"sparsity.target"}  # shown with an example value instead of the default (None)


def test_readme_library_snippet_runs_as_written(capsys):
    block = re.search(r"<!-- snippet: library -->\n```python\n(.*?)```", README, re.S)
    assert block, "README lost its library snippet"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    model = namespace["model"]
    for module in model:
        assert "forward" not in module.__dict__
    for index in (2, 5):  # the 16-channel conv and the Linear carry exact 2:4
        w = model[index].weight.detach()
        groups = w.movedim(1, -1).reshape(-1, 4)
        assert torch.all((groups != 0).sum(1) <= 2)
    out = capsys.readouterr().out
    assert "dense 0.00 input channels C=1 < M=4 (stem)" in out


def _config_reference() -> str:
    block = re.search(r"## Config reference\n.*?```yaml\n(.*?)```", README, re.S)
    assert block, "README lost its config reference"
    return block.group(1)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def reference_drift(model: type[BaseModel], documented: dict, words: set[str], path: str = "") -> list[str]:
    """Keys the README documents that the schema lacks, schema keys the README never names (as a
    key or in a comment), and documented values that differ from the schema's defaults."""
    problems = []
    for key, value in documented.items():
        field = model.model_fields.get(key)
        if field is None:
            problems.append(f"README documents {path}{key}, which the schema does not have")
            continue
        sub = _submodel(field.annotation)
        if sub is not None and isinstance(value, dict):
            problems += reference_drift(sub, value, words, f"{path}{key}.")
        elif not field.is_required() and f"{path}{key}" not in EXAMPLE_VALUES:
            default = field.get_default(call_default_factory=True)
            default = default.model_dump() if isinstance(default, BaseModel) else default
            default = list(default) if isinstance(default, tuple) else default
            if default != value:
                problems.append(f"{path}{key}: README says {value!r}, the default is {default!r}")
    problems += [f"schema key {path}{key} is not in the README's config reference"
                 for key in model.model_fields if key not in documented and key not in words]
    return problems


def test_readme_config_reference_is_the_schema():
    text = _config_reference()
    documented = parse_yaml(text, "README")  # the loader configs are read with (2:4 text, 5e-4 float)
    words = set(re.findall(r"[A-Za-z_]+", text))
    assert reference_drift(PipelineConfig, documented, words) == []


def test_reference_drift_notices_a_stale_key_and_a_wrong_default():
    documented = parse_yaml(_config_reference(), "README")
    documented["data"]["shuffle_buffer"] = 10
    documented["data"]["batch_size"] = 65
    problems = reference_drift(PipelineConfig, documented, set())
    assert "README documents data.shuffle_buffer, which the schema does not have" in problems
    assert "data.batch_size: README says 65, the default is 64" in problems
    assert any("schema key sparsity.optimizer" in p for p in problems)  # named only in comments


def _documented_flags() -> dict[str, set[str]]:
    block = re.search(r"## CLI\n+```\n(.*?)```", README, re.S)
    assert block, "README lost its CLI synopsis"
    flags: dict[str, set[str]] = {}
    for line in block.group(1).splitlines():
        command = line.split()[1]
        flags[command] = set(re.findall(r"--[a-z][a-z-]*", line))
    return flags


def test_readme_cli_synopsis_is_the_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    actual = {name: {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
              for name, p in sub.choices.items()}
    assert _documented_flags() == actual


def test_readme_commands_work():
    """The install extras exist, the main job's config is valid, and the test command is pytest."""
    table = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?:\n\[|\Z)", (ROOT / "pyproject.toml").read_text(),
                      re.S | re.M)
    assert table, "pyproject.toml has no optional dependencies"
    extras = set(re.findall(r"^(\w+)\s*=", table.group(1), re.M))
    for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', README):
        assert extra in extras, extra
    configs = re.findall(r"^optg (?:run|check) (\S+\.yaml)", README, re.M)
    assert "configs/quickstart.yaml" in configs
    for config in configs:
        assert load_config(ROOT / config).name
    assert re.search(r"^python -m pytest -q$", README, re.M)
