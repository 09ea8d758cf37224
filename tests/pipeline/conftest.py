"""Tiny configs that run end to end on CPU in a few seconds."""
from pathlib import Path

import pytest
import yaml

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "synthetic", "options": {"shape": [8, 6, 6], "num_classes": 3, "num_samples": 240},
             "batch_size": 32},
    "model": {"name": "small_cnn"},
    "train": {"epochs": 2, "optimizer": {"lr": 0.05}},
    "sparsity": {"method": "optg", "pattern": "2:4", "train": {"epochs": 3, "optimizer": {"lr": 0.05}}},
    "validate": {"max_accuracy_drop": 0.5},
    "verify": {"num_samples": 32},
}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    import copy

    def make(**changes):
        data = copy.deepcopy(TINY)
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(last, None)
            else:
                node[last] = value
        return write_config(tmp_path / "tiny.yaml", data)

    return make
