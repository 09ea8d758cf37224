"""The README and docs/ stay true: the library snippet (docs/library.md) runs as written, the
README's example config passes validation, its CLI synopsis is the parser, the commands it shows
work, and the relative links of the README and docs/ resolve. The full config reference,
docs/config.md, is generated and kept in sync by tests/pipeline/test_config_docs.py."""
import re
from pathlib import Path

import torch

from pipeline.cli import build_parser
from pipeline.config import load_config, parse_yaml, validate_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LIBRARY = ROOT / "docs" / "library.md"


def test_library_snippet_runs_as_written(capsys):
    block = re.search(r"<!-- snippet: library -->\n```python\n(.*?)```", LIBRARY.read_text(), re.S)
    assert block, "docs/library.md lost its library snippet"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(block.group(1), str(LIBRARY), "exec"), namespace)
    model = namespace["model"]
    for module in model:
        assert "forward" not in module.__dict__
    for index in (2, 5):  # the 16-channel conv and the Linear carry exact 2:4
        w = model[index].weight.detach()
        groups = w.movedim(1, -1).reshape(-1, 4)
        assert torch.all((groups != 0).sum(1) <= 2)
    out = capsys.readouterr().out
    assert "dense 0.00 input channels C=1 < M=4 (stem)" in out


def test_readme_example_config_is_valid():
    """The YAML in brief passes the checks `optg check` runs (schema, values, cross-field rules,
    dataset and model options)."""
    block = re.search(r"<!-- example: config -->\n```yaml\n(.*?)```", README, re.S)
    assert block, "README lost its example config"
    cfg = validate_config(parse_yaml(block.group(1), "README"), "README")
    assert (cfg.sparsity.method, str(cfg.sparsity.pattern)) == ("optg", "2:4")


def test_relative_links_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


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
    """The install extras exist, the configs that the README and docs/guide.md run are valid (the
    main job's among them), and the test command is pytest."""
    table = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?:\n\[|\Z)", (ROOT / "pyproject.toml").read_text(),
                      re.S | re.M)
    assert table, "pyproject.toml has no optional dependencies"
    extras = set(re.findall(r"^(\w+)\s*=", table.group(1), re.M))
    shown = README + (ROOT / "docs" / "guide.md").read_text()
    for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', shown):
        assert extra in extras, extra
    assert "configs/quickstart.yaml" in re.findall(r"^optg (?:run|check) (\S+\.yaml)", README, re.M)
    configs = re.findall(r"^optg (?:run|check) (\S+\.yaml)", shown, re.M)
    assert {"configs/quickstart_structured.yaml", "configs/text_quickstart.yaml"} <= set(configs)
    for config in configs:
        assert load_config(ROOT / config).name
    assert re.search(r"^python -m pytest -q$", README, re.M)
