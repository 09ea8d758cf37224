"""The README stays true: its library snippet runs as written, and it shows the main job."""
import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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


def test_readme_shows_install_main_job_and_tests():
    assert "pip install -e \".[dev]\"" in README
    assert "optg run configs/quickstart.yaml" in README
    assert "python -m pytest -q" in README
