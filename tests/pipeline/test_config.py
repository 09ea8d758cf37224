"""Config loading: strict schema, collected errors, N:M text, --set, round trip, shipped configs."""
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, dump_yaml, load_config, parse_yaml, validate_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_unquoted_nm_pattern_stays_text(tmp_path, tiny_config):
    path = tmp_path / "c.yaml"
    path.write_text(tiny_config().read_text().replace("pattern: '2:4'", "pattern: 2:4"))
    assert "pattern: 2:4\n" in path.read_text()
    assert load_config(path).sparsity.pattern == "2:4"
    assert parse_yaml("p: 2:4") == {"p": "2:4"}
    assert parse_yaml("lr: 1e-4") == {"lr": 1e-4}
    assert parse_yaml("n: 12") == {"n": 12}


def test_set_overrides_are_typed_by_the_schema(tiny_config):
    cfg = load_config(tiny_config(), ["sparsity.pattern=1:4", "seed=3", "sparsity.train.optimizer.lr=1e-3"])
    assert (cfg.sparsity.pattern, cfg.seed, cfg.sparsity.train.optimizer.lr) == ("1:4", 3, 1e-3)
    cfg = load_config(tiny_config(), ["sparsity.pattern=unstructured", "sparsity.target=0.98"])
    assert cfg.sparsity.target == 0.98


def test_resolved_config_round_trips(tiny_config):
    cfg = load_config(tiny_config())
    assert validate_config(parse_yaml(dump_yaml(cfg))) == cfg


INVALID = [
    ("empty file", "", ["config file is empty"]),
    ("not a mapping", "- a\n- b\n", ["must be a mapping", "list"]),
    ("yaml syntax", "name: x\ndata: {name: digits\n", ["YAML syntax error at line 3"]),
    ("unknown top key", "EXTRA", ["colour: unknown key (valid keys here: name, seed, device"]),
    ("unknown nested key", "sparsity.targt=0.9", ["sparsity.targt: unknown key", "target"]),
    ("bad method", "sparsity.method=optq", ["sparsity.method: unknown method 'optq'; valid: gmp, oneshot, optg"]),
    ("bad pattern", "sparsity.pattern=4:2", ["sparsity.pattern", "1 <= N < M"]),
    ("pattern garbage", "sparsity.pattern=two-four", ["must look like '2:4'"]),
    ("target with N:M", "sparsity.target=0.5", ["target is implied by pattern '2:4'"]),
    ("unstructured w/o target", "sparsity.pattern=unstructured", ["needs target"]),
    ("target out of range", ["sparsity.pattern=unstructured", "sparsity.target=1.5"], ["sparsity.target", "less than 1", "1.5"]),
    ("srste unstructured", ["sparsity.method=srste", "sparsity.pattern=unstructured", "sparsity.target=0.9"], ["N:M patterns only"]),
    ("schedule option mismatch", ["sparsity.schedule.start=1"], ["schedule 'sigmoid' takes ['beta', 'center', 'final_epochs']"]),
    ("bad regex", ["sparsity.exclude=['(']"], ["sparsity.exclude"]),
    ("schedule value vs epochs", ["sparsity.schedule.final_epochs=50"], ["final_epochs must be in [1, epochs=3], got 50"]),
    ("cubic end past epochs", ["sparsity.schedule.name=cubic", "sparsity.schedule.end=40"],
     ["cubic schedule needs 0 <= start < end <= epochs=3"]),
    ("negative lr", "sparsity.train.optimizer.lr=-1", ["sparsity.train.optimizer.lr: Input should be greater than 0 (got -1)"]),
    ("bad device", "device=tpu", ["device", "'auto', 'cpu' or 'cuda'"]),
    ("many errors at once", ["seed=-1", "data.batch_size=0", "export.dtype=int4"],
     ["seed:", "data.batch_size:", "export.dtype:"]),
    ("gate without reference", ["train=null"], ["max_accuracy_drop needs a dense reference"]),
    ("bad set syntax", ["novalue"], ["expected KEY=VALUE"]),
    ("missing required", "MISSING", ["model: required key is missing"]),
]


@pytest.mark.parametrize("label,change,expected", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_configs_exit_2_with_named_problems(tmp_path, tiny_config, capsys, label, change, expected):
    path = tiny_config()
    args: list[str] = []
    if isinstance(change, str) and (change in ("", "- a\n- b\n") or change.startswith("name: x")):
        path.write_text(change)
    elif change == "EXTRA":
        path.write_text(path.read_text() + "colour: blue\n")
    elif change == "MISSING":
        path.write_text("\n".join(l for l in path.read_text().splitlines() if not l.startswith("model:")
                                  and not l.startswith("  name: small_cnn")))
    else:
        for item in [change] if isinstance(change, str) else change:
            args += ["--set", item]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["run", str(path), "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_missing_file_is_a_usage_error(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_passes_check(path, capsys):
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    assert ": ok (" in capsys.readouterr().out


def test_shipped_configs_include_the_documented_ones():
    names = {p.name for p in SHIPPED}
    assert {"quickstart.yaml", "mnist1d_optg95.yaml", "resnet50_imagenet_optg90.yaml",
            "resnet50_imagenet_optg24.yaml"} <= names


def test_config_error_lists_each_problem():
    with pytest.raises(ConfigError) as err:
        validate_config({"name": "bad name!", "data": {"name": "digits"}, "model": {"name": "small_cnn"},
                         "sparsity": {"method": "optg", "pattern": "2:4", "train": {"epochs": 0}}})
    assert len(err.value.problems) == 2


def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, tiny_config, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", str(tiny_config()), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_that_sparsifies_nothing_fails_before_training(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["run", str(tiny_config()), "--out", str(run), "--quiet",
                 "--set", "sparsity.include=['^nothing$']"]) == 2
    err = capsys.readouterr().err
    assert "no layer can be sparsified" in err and "not matched by include" in err
    assert not (run / "checkpoints").exists()  # no training happened


def test_a_config_in_the_flat_sparsity_layout_exits_2_naming_each_new_place(tmp_path, capsys):
    """The layout before per-method settings: every old key reported at once, nothing written."""
    from tests.pipeline.conftest import TINY, write_config

    old = {**TINY, "sparsity": {"method": "optg", "pattern": "2:4", "epochs": 3, "optimizer": {"lr": 0.05},
                                "score_init": "live", "srste_decay": 1e-4, "score_lr_factor": 2.0}}
    run = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path / "old.yaml", old)), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "5 problem(s)" in err
    for line in ("sparsity.epochs: moved to sparsity.train.epochs",
                 "sparsity.optimizer: moved to sparsity.train.optimizer",
                 "sparsity.score_init: moved to sparsity.optg.score_init",
                 "sparsity.srste_decay: moved to sparsity.srste.decay",
                 "sparsity.score_lr_factor: no longer a config key: `start` sets it"):
        assert line in err
    assert not run.exists()
