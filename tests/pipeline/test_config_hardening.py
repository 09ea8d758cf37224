"""Hostile and sloppy config input: YAML bombs, deep nesting, duplicate keys, loose types,
non-finite floats, dotted `--set` keys, and a tampered checkpoint in a run directory.

Config problems exit 2 before anything is written, with a message that names the key.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, load_config, parse_yaml

ROOT = Path(__file__).resolve().parents[2]


def _run_config_error(tmp_path: Path, path: Path, capsys, *args: str) -> str:
    """`optg run` must exit 2, without a traceback and without writing anything."""
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "RecursionError" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return err


# ------------------------------------------------------------------------- YAML


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


def test_billion_laughs_is_refused_within_seconds(tmp_path: Path, tiny_config, capsys) -> None:
    """`optg run` in a subprocess with a timeout first (without the alias bound it runs for
    hours), then `optg check` in-process."""
    path = tmp_path / "bomb.yaml"
    path.write_text(tiny_config().read_text().replace("name: tiny\n", "") + _billion_laughs())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--out", str(tmp_path / "run")],
                          check=False, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "more than 20000 values with aliases expanded" in done.stderr and "billion laughs" in done.stderr
    assert not (tmp_path / "run").exists()
    started = time.perf_counter()
    assert main(["check", str(path)]) == 2
    assert "billion laughs" in capsys.readouterr().err
    assert time.perf_counter() - started < 5


def test_alias_bomb_is_refused_quickly_in_process() -> None:
    started = time.perf_counter()
    with pytest.raises(Exception, match="billion laughs"):
        parse_yaml(_billion_laughs(12))
    assert time.perf_counter() - started < 2


def test_deep_nesting_is_a_config_error(tmp_path: Path, tiny_config, capsys) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(tiny_config().read_text() + "colour: " + "[" * 5000 + "]" * 5000 + "\n")
    err = _run_config_error(tmp_path, path, capsys)
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in err
    block = "".join(" " * (2 * i) + f"k{i}:\n" for i in range(600))  # block style, too
    path.write_text(tiny_config().read_text() + block)
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in _run_config_error(tmp_path, path, capsys)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path: Path, tiny_config, capsys) -> None:
    text = tiny_config().read_text()
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("seed:")) + 1
    path = tmp_path / "dup.yaml"
    path.write_text(text + "seed: 7\n")
    err = _run_config_error(tmp_path, path, capsys)
    assert f"line {len(lines) + 1}: duplicate key 'seed' in the top level (first at line {first})" in err
    nested = text.replace("    lr: 0.05\n", "    lr: 0.05\n    lr: 0.5\n", 1)
    path.write_text(nested)
    lr_line = next(i for i, line in enumerate(nested.splitlines()) if line == "    lr: 0.05") + 1
    err = _run_config_error(tmp_path, path, capsys)
    assert f"duplicate key 'lr' in train.optimizer (first at line {lr_line})" in err


def test_recursive_alias_and_oversized_file_are_config_errors(tmp_path: Path, tiny_config, capsys) -> None:
    path = tmp_path / "rec.yaml"
    path.write_text(tiny_config().read_text() + "colour: &loop [1, *loop]\n")
    assert "alias *loop is used inside the node it names" in _run_config_error(tmp_path, path, capsys)
    path.write_text(tiny_config().read_text() + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert f"the limit is {MAX_CONFIG_BYTES}" in _run_config_error(tmp_path, path, capsys)


def test_anchors_and_merge_keys_still_work_and_set_changes_one_place(tmp_path: Path, tiny_config) -> None:
    raw = yaml.safe_load(tiny_config().read_text())
    raw.pop("train")
    raw.pop("sparsity")
    text = yaml.safe_dump(raw, sort_keys=False) + (
        "train: &phase\n  epochs: 2\n  optimizer: &opt {lr: 0.05}\n"
        "sparsity:\n  method: optg\n  pattern: 2:4\n  train:\n    <<: *phase\n    epochs: 3\n    optimizer: *opt\n")
    path = tmp_path / "anchors.yaml"
    path.write_text(text)
    cfg = load_config(path, ["train.optimizer.lr=0.01"])
    assert (cfg.train.epochs, cfg.sparsity.train.epochs) == (2, 3)
    assert (cfg.train.optimizer.lr, cfg.sparsity.train.optimizer.lr) == (0.01, 0.05)


def test_resolver_behaviour_is_kept() -> None:
    assert parse_yaml("p: 2:4\nlr: 1e-4\nn: 12\nx: 0x10\n") == {"p": "2:4", "lr": 1e-4, "n": 12, "x": 16}


# ------------------------------------------------------------------------- strict types

STRICT = [
    ("seed true", "seed: true", "seed: Input should be a valid integer (got true)"),
    ("seed huge", "seed: 99999999999999999999", "seed: Input should be less than or equal to 4294967295"),
    ("seed float", "seed: 4.0e13", "seed: Input should be a valid integer"),
    ("batch size bool", "data.batch_size: true", "data.batch_size: Input should be a valid integer"),
    ("epochs text", "sparsity.train.epochs: '3'", "sparsity.train.epochs: Input should be a valid integer (got \"3\")"),
    ("lr text", "sparsity.train.optimizer.lr: '0.001'", "sparsity.train.optimizer.lr: Input should be a valid number"),
    ("lr bool", "sparsity.train.optimizer.lr: true", "sparsity.train.optimizer.lr: Input should be a valid number"),
    ("atol inf", "verify.atol: .inf", "verify.atol: Input should be a finite number"),
    ("rtol nan", "verify.rtol: .nan", "verify.rtol: Input should be a finite number"),
    ("min accuracy nan", "validate.min_accuracy: .nan", "validate.min_accuracy: Input should be a finite number"),
    ("schedule center nan", "sparsity.schedule.center: .nan", "sparsity.schedule.center: Input should be a finite number"),
    ("schedule beta inf", "sparsity.schedule.beta: .inf", "sparsity.schedule.beta: Input should be a finite number"),
    ("betas nan", "train.optimizer.betas: [.nan, 0.999]", "train.optimizer.betas.0: Input should be a finite number"),
    ("betas bool", "train.optimizer.betas: [true, 0.999]", "train.optimizer.betas.0: Input should be a valid number"),
    ("betas range", "train.optimizer.betas: [0.9, 1.5]", "train.optimizer.betas.1: Input should be less than 1"),
    ("override inf", "sparsity.overrides: {'^fc': .inf}", "sparsity.overrides.^fc.float: Input should be a finite number"),
    ("grad clip -inf", "train.grad_clip: -.inf", "train.grad_clip: Input should be a finite number"),
]


def _with(path: Path, dotted: str, value_yaml: str) -> None:
    raw = yaml.safe_load(path.read_text())
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value_yaml)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("label,setting,expected", STRICT, ids=[s[0] for s in STRICT])
def test_loose_types_and_non_finite_floats_exit_2(tmp_path: Path, tiny_config, capsys, label, setting, expected):
    path = tiny_config()
    key, _, value = setting.partition(": ")
    _with(path, key, value)
    assert expected in _run_config_error(tmp_path, path, capsys)


def test_ints_are_floats_and_lists_fill_tuples(tiny_config) -> None:
    cfg = load_config(tiny_config(), ["sparsity.train.optimizer.lr=1", "train.optimizer.name=adamw",
                                      "train.optimizer.betas=[0, 0.99]", "verify.atol=0"])
    assert cfg.sparsity.train.optimizer.lr == 1.0 and isinstance(cfg.sparsity.train.optimizer.lr, float)
    assert cfg.train.optimizer.betas == (0.0, 0.99) and cfg.verify.atol == 0.0


# ------------------------------------------------------------------------- --set keys


def test_set_keeps_dots_in_regex_keys_under_mapping_fields(tiny_config) -> None:
    cfg = load_config(tiny_config(), [r"sparsity.overrides.^fc\.0$=dense", r"sparsity.overrides.conv.*=1:4",
                                      "data.options.num_samples=120", "sparsity.schedule.beta=2"])
    assert cfg.sparsity.overrides == {r"^fc\.0$": "dense", "conv.*": "1:4"}
    assert cfg.data.options["num_samples"] == 120 and cfg.sparsity.schedule.beta == 2.0


@pytest.mark.parametrize("item,expected", [
    (r"sparsity.overides.^fc\.0$=dense", "sparsity.overides: unknown key (valid keys here:"),
    ("sparsity.overrides.=dense", "expected KEY=VALUE"),
    ("1seed=3", "expected KEY=VALUE"),
    ("seed..x=3", "expected KEY=VALUE"),
])
def test_bad_set_keys_are_config_errors(tmp_path: Path, tiny_config, capsys, item, expected) -> None:
    assert expected in _run_config_error(tmp_path, tiny_config(), capsys, "--set", item)


# ------------------------------------------------------------------------- run directory


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tampered_checkpoint_is_refused_on_rerun(tmp_path: Path, tiny_config, capsys) -> None:
    """A finished run's dense.pt replaced by a pickle that runs a command: a rerun reads the
    checkpoint with weights_only, refuses it naming the file, and the command never runs."""
    run = tmp_path / "run"
    args = ["run", str(tiny_config()), "--out", str(run), "--quiet",
            "--set", "export.enabled=false", "--set", "verify.enabled=false", "--set", "sparsity.train.epochs=1"]
    assert main(args) == 0, capsys.readouterr().err
    checkpoint = run / "checkpoints" / "dense.pt"
    state = torch.load(checkpoint, weights_only=True)  # what we write is plain data
    marker = tmp_path / "PWNED"
    state["history"] = _Planted(marker)
    torch.save(state, checkpoint)
    # a finished run restores only its baked weights; as if it had stopped after the dense
    # phase, the rerun must restore the dense weights from dense.pt
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in ("data", "model", "train", "reference")}
    (run / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "posix.system" in err and "refused" in err
    assert not marker.exists()
