"""The release contract for configs: every config problem `optg run` would hit is found by
`optg check` (exit 2, the key named, nothing written), plugins import from next to the config,
the sparse phase inherits `train`'s settings, and the CLI's machine-readable interfaces."""
import json
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config

from .conftest import TINY, write_config


def _config(tmp_path: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        data[key] = value
    return write_config(tmp_path / "c.yaml", data)


BAD = [
    ("unknown dataset", {"data": {"name": "imagenet_please"}}, "data.name", "unknown dataset 'imagenet_please'"),
    ("unknown data option", {"data": {"name": "synthetic", "options": {"nois": 1.0}}}, "data.options.nois",
     "unknown option; valid: shape, num_classes, num_samples, noise"),
    ("unknown model option", {"model": {"name": "small_cnn", "options": {"depth": 3}}}, "model.options.depth",
     "unknown option; valid: width"),
    ("npz without path", {"data": {"name": "npz"}}, "data.path", "needs `path`"),
    ("built-in with a path", {"data": {"name": "digits", "path": "x"}}, "data.path", "takes no path"),
    ("num_samples 4e13", {"data": {"name": "synthetic", "options": {"num_samples": 4e13}}},
     "data.options.num_samples", "valid integer"),
    ("num_samples too many", {"data": {"name": "synthetic", "options": {"num_samples": 10**12}}},
     "data.options.num_samples", "less than or equal to 100000000"),
    ("synthetic too big", {"data": {"name": "synthetic", "options": {"shape": [3, 1024, 1024],
                                                                     "num_samples": 1000}}},
     "data.options", "the limit is 1073741824"),
    ("model width 1e9", {"model": {"name": "small_cnn", "options": {"width": 10**9}}}, "model.options.width",
     "less than or equal to 4096"),
    ("transformer dim", {"model": {"name": "transformer", "options": {"dim": 10**6}}}, "model.options.dim",
     "less than or equal to 8192"),
    ("unknown model", {"model": {"name": "resnet9000"}}, "model.name", "unknown model 'resnet9000'"),
    ("torchvision reserved", {"model": {"name": "torchvision:resnet18", "options": {"weights": "IMAGENET1K_V1"}}},
     "model.options", "weights are set by the pipeline"),
    ("imagefolder resize < image_size", {"data": {"name": "imagefolder", "path": "x",
                                                  "options": {"image_size": 64, "resize": 32}}},
     "data.options", "resize (32) must be >= image_size (64)"),
    ("unimportable plugin", {"model": {"name": "no_such_pkg_zz:make"}}, "model.name",
     "cannot import module 'no_such_pkg_zz'"),
]


@pytest.mark.parametrize("sections,path,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_check_and_run_refuse_with_exit_2_and_write_nothing(tmp_path, capsys, sections, path, message):
    config = _config(tmp_path, **sections)
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{path}" in err and message in err, err
    assert main(["check", str(config), "--json"]) == 2
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert any(e["path"].startswith(path) and message in e["message"] for e in errors), errors
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def _write_plugin(folder: Path) -> str:
    """A package `pkg_<random>` with a model factory; returns its name (unique per test, so
    no module cached by an earlier test answers the import)."""
    name = f"pkg_{uuid.uuid4().hex[:10]}"
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(
        "from torch import nn\n\n"
        "def make(input_shape, num_classes, hidden: int = 16):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(288, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n")
    return name


def test_plugin_next_to_the_config_imports_without_pythonpath(tmp_path, monkeypatch, capsys):
    configs = tmp_path / "project"
    name = _write_plugin(configs)
    config = write_config(configs / "c.yaml", dict(json.loads(json.dumps(TINY)),
                                                   model={"name": f"{name}:make", "options": {"hidden": 32}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["check", str(config)]) == 0, capsys.readouterr().err
    # the plugin's options are checked against its signature when check imports it
    bad = write_config(configs / "bad.yaml", dict(json.loads(json.dumps(TINY)),
                                                  model={"name": f"{name}:make", "options": {"hiden": 32}}))
    assert main(["check", str(bad)]) == 2
    assert "model.options" in capsys.readouterr().err


def test_plugin_in_the_working_directory_imports(tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    name = _write_plugin(cwd)
    config = write_config(tmp_path / "c.yaml", dict(json.loads(json.dumps(TINY)), model={"name": f"{name}:make"}))
    monkeypatch.chdir(cwd)
    assert main(["check", str(config)]) == 0, capsys.readouterr().err


def test_plugin_that_fails_to_import_is_a_check_error(tmp_path, capsys):
    name = f"pkg_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('broken plugin')\n")
    config = _config(tmp_path, data={"name": f"{name}:load"})
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.name" in err and "broken plugin" in err


def test_sparse_phase_inherits_train_settings_unless_given(tmp_path, capsys):
    config = _config(tmp_path, train={"epochs": 2, "label_smoothing": 0.1,
                                      "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
                     sparsity={"method": "optg", "pattern": "2:4", "train": {"epochs": 3}})
    cfg = load_config(config)
    sparse = cfg.sparsity.train
    assert (sparse.optimizer.name, sparse.optimizer.lr, sparse.optimizer.weight_decay, sparse.label_smoothing) \
        == ("adamw", 1e-3, 0.05, 0.1)
    assert sparse.warmup_epochs == 0  # per phase, not inherited
    # keys given under sparsity.train win, key by key inside the optimizer too
    cfg = load_config(config, ["sparsity.train.optimizer.lr=0.01", "sparsity.train.label_smoothing=0.0"])
    sparse = cfg.sparsity.train
    assert (sparse.optimizer.name, sparse.optimizer.lr, sparse.optimizer.weight_decay, sparse.label_smoothing) \
        == ("adamw", 0.01, 0.05, 0.0)
    # `check --print` (and the run's config.yaml, the same dump) shows the resolved values
    assert main(["check", str(config), "--print"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("\n" + str(config))[0])
    assert printed["sparsity"]["train"]["optimizer"] == {**printed["train"]["optimizer"], "name": "adamw", "lr": 1e-3}
    # without `train` the sparse phase keeps its own defaults
    cfg = load_config(config, ["train=null", "validate.max_accuracy_drop=null"])
    assert (cfg.sparsity.train.optimizer.name, cfg.sparsity.train.optimizer.lr) == ("sgd", 0.1)


def test_imagefolder_resize_follows_image_size(tmp_path):
    """image_size 32 evaluates on a 32-px crop of a 37-px resize (ImageNet's 256/224 ratio), not
    of the default 256-px upscale; an explicit resize wins."""
    from PIL import Image

    from stages.data import DataConfig, load_data
    from stages.data.catalog import ImageFolderOptions

    assert ImageFolderOptions(image_size=32).resize == 37
    assert ImageFolderOptions().resize == 256
    assert ImageFolderOptions(image_size=32, resize=40).resize == 40
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (48, 40), (i * 60, 0, 0)).save(tmp_path / split / label / f"{i}.png")
    bundle = load_data(DataConfig(name="imagefolder", path=str(tmp_path), options={"image_size": 32}), seed=0)
    assert bundle.preprocessing is not None and bundle.preprocessing["resize_shorter_side"] == 37
    assert bundle.class_names == ["a", "b"] and bundle.input_shape == (3, 32, 32)
    assert tuple(bundle.test[0][0].shape) == (3, 32, 32)


def test_version_schema_and_check_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    import optg

    assert capsys.readouterr().out.strip() == f"optg {optg.__version__}"
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"name", "data", "model", "sparsity", "train", "export"} <= set(schema["properties"])
    assert set(schema["required"]) == {"name", "data", "model", "sparsity"}
    config = _config(tmp_path)
    assert main(["check", str(config), "--json"]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["ok"] is True and ok["config"]["sparsity"]["pattern"] == "2:4" and len(ok["config_hash"]) == 64


def test_shipped_configs_validate_against_the_printed_schema(capsys):
    """What `optg schema` prints is usable by a standard validator: the shipped configs pass,
    an unknown key fails."""
    jsonschema = pytest.importorskip("jsonschema")
    from pipeline.config import parse_yaml

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "configs").glob("*.yaml")):
        jsonschema.validate(parse_yaml(path.read_text()), schema)
    bad = json.loads(json.dumps(TINY))
    bad["data"]["colour"] = 1
    with pytest.raises(jsonschema.ValidationError, match="colour"):
        jsonschema.validate(bad, schema)
