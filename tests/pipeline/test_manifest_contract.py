"""A real run's manifest against its documented schema (docs/manifest.md), and the deployment facts in
both the manifest and model.onnx's metadata_props."""
import json
import re
from pathlib import Path

import onnx
import pytest

from pipeline.cli import main
from pipeline.manifest import SCHEMA_VERSION, Manifest

from .conftest import TINY, write_config

DOC = (Path(__file__).resolve().parents[2] / "docs" / "manifest.md").read_text()
CONDITIONAL = {"error", "versions_before_resume", "reruns", "tracking", "structured"}  # after a failure, a resume under
# other software, a rerun that redid stages, with `tracking` configured


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    data = json.loads(json.dumps(TINY))
    data.update(data={"name": "digits", "batch_size": 128}, train={"epochs": 1},
                sparsity={"method": "optg", "pattern": "2:4", "train": {"epochs": 1}}, verify={"num_samples": 16})
    config = write_config(tmp / "digits.yaml", data)
    out = tmp / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) in (0, 3)
    return out, json.loads((out / "manifest.json").read_text())


def documented_top_level_keys() -> set[str]:
    section = DOC.split("`manifest.json` (`pipeline/manifest.py` is its typed model)")[1].split("\n## ")[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, re.M))


def test_every_documented_key_is_in_a_real_manifest_and_back(digits_run):
    _, manifest = digits_run
    documented = documented_top_level_keys()
    assert {"schema", "method", "pattern", "target", "environment", "deployment"} <= documented
    assert documented - CONDITIONAL == set(manifest), (documented ^ set(manifest))
    aliases = {info.alias or name for name, info in Manifest.model_fields.items()}
    assert CONDITIONAL <= aliases and documented == aliases
    assert manifest["schema"] == SCHEMA_VERSION == int(re.search(r"\| `schema` \| manifest schema version: (\d)",
                                                                  DOC).group(1))


def test_manifest_says_what_ran_where_and_how_to_deploy(digits_run):
    out, manifest = digits_run
    assert (manifest["method"], manifest["pattern"], manifest["target"]) == ("optg", "2:4", 0.5)
    # a dense phase ran, so `start: auto` became the pretrained mode, with its ramp for 1 epoch
    assert manifest["sparsity"]["start"] == "pretrained" and manifest["sparsity"]["score_init"] == "live"
    assert manifest["sparsity"]["schedule"] == {"name": "SigmoidSchedule", "beta": 20.0, "center": 0.1,
                                                "final_epochs": 1}
    env = manifest["environment"]
    assert env["command"][1:] == ["run", str(out.parent / "digits.yaml"), "--out", str(out), "--quiet"]
    assert env["cuda_available"] is False and env["device"] == "cpu" and env["cpu_threads"] >= 1
    assert env["python"] and env["torch"].startswith("2.") and env["os"]
    deployment = manifest["deployment"]
    assert deployment["inputs"] == [{"name": "input", "shape": [deployment["inputs"][0]["shape"][0], 1, 8, 8],
                                     "dtype": "float32"}]
    assert isinstance(deployment["inputs"][0]["shape"][0], str)  # the dynamic batch, by name
    assert deployment["outputs"][0]["name"] == "logits" and deployment["outputs"][0]["shape"][1:] == [10]
    assert deployment["class_names"] == [str(i) for i in range(10)]
    assert "pixel / 16" in deployment["preprocessing"]["scale"]
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["optg.inputs"]) == deployment["inputs"]
    assert json.loads(props["optg.outputs"]) == deployment["outputs"]
    assert json.loads(props["optg.class_names"]) == deployment["class_names"]
    assert json.loads(props["optg.preprocessing"]) == deployment["preprocessing"]
    assert (props["optg.method"], props["optg.pattern"], props["optg.target"]) == ("optg", "2:4", "0.5")


def test_cifar_bundle_carries_class_names_and_mean_std(tmp_path):
    import pickle

    import numpy as np

    from stages.data import DataConfig, load_data
    from stages.data.catalog import CIFAR10_MEAN, CIFAR10_STD

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    bundle = load_data(DataConfig(name="cifar10", path=str(tmp_path)), seed=0)
    assert bundle.class_names is not None and bundle.class_names[0] == "airplane" and len(bundle.class_names) == 10
    assert bundle.preprocessing == {"layout": "N x 3 x 32 x 32 RGB", "scale": "pixel / 255",
                                    "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
