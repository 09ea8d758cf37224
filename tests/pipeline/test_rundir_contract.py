"""The run directory's release contract (issue 12): what `--force` may clear, an unusable `--out`,
manifests of the wrong shape, artifacts re-hashed on every rerun, stage-level reuse after a config
change, failed writes and `sys.exit` in plugins recorded as failures, the external-data sidecar,
the manifest and metrics.csv after every epoch, and tracking wired into a real run.

One short run is trained once per module (`finished`); tests that rerun it work on a copy."""
import csv
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.interrupt import signal_hook
from stages.io import sha256_file
from tests.pipeline.conftest import TINY

FAST = {**TINY, "train": {"epochs": 1, "optimizer": {"lr": 0.05}},
        "sparsity": {"method": "optg", "pattern": "2:4", "train": {"epochs": 1, "optimizer": {"lr": 0.05}}}}


def _config(path: Path, **sections) -> Path:
    data = json.loads(json.dumps(FAST))
    for key, value in sections.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _run(cfg: Path, run: Path, *extra: str) -> int:
    return main(["run", str(cfg), "--out", str(run), "--quiet", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config, run dir) of one finished FAST run; copy the run dir before changing it."""
    folder = tmp_path_factory.mktemp("finished")
    cfg = _config(folder / "fast.yaml")
    assert _run(cfg, folder / "run") == 0
    return cfg, folder / "run"


@pytest.fixture
def copy_of(tmp_path, finished):
    cfg, run = finished
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------- --out and --force


def test_force_never_clears_a_directory_without_our_manifest(tmp_path, capsys):
    cfg = _config(tmp_path / "fast.yaml")
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    for flags in ([], ["--force"]):
        assert _run(cfg, home, *flags) == 2
        err = capsys.readouterr().err
        assert "no manifest.json" in err and "--force" in err and "use --force" not in err
    assert [p.name for p in home.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("content", ["[1, 2]", '{"schema": 2, "name": "x"}', '{"stages": "done"}', "{trunc"])
def test_manifest_of_the_wrong_shape_is_unreadable_exit_2(tmp_path, capsys, content):
    cfg = _config(tmp_path / "fast.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(content)
    for flags in ([], ["--force"]):  # not recognisably ours: not cleared either
        assert _run(cfg, run, *flags) == 2
        assert "unreadable manifest" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["manifest.json"]


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_is_a_file_is_exit_2_with_one_line_before_any_work(tmp_path, capsys, where):
    cfg = _config(tmp_path / "fast.yaml")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "sub"
    assert _run(cfg, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a directory" in err and str(out) in err
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "fast.yaml"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_where_nothing_can_be_written_is_exit_2_even_for_root(tmp_path, capsys):
    """/proc/self refuses new files to every user, root included: the write probe finds it."""
    assert _run(_config(tmp_path / "fast.yaml"), Path("/proc/self/optg-run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write in /proc/self" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_out_in_a_read_only_directory_is_exit_2(tmp_path, capsys):
    cfg = _config(tmp_path / "fast.yaml")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert _run(cfg, locked / "run") == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------- artifacts re-hashed


@pytest.mark.parametrize("damage", ["random_bytes", "deleted"])
def test_rerun_redoes_export_when_model_onnx_changed(finished, copy_of, capsys, damage):
    cfg, _ = finished
    run, before = copy_of, _manifest(copy_of)
    onnx_file = run / "model.onnx"
    if damage == "deleted":
        onnx_file.unlink()
    else:
        onnx_file.write_bytes(os.urandom(4096))
    assert _run(cfg, run) == 0, capsys.readouterr().err
    m = _manifest(run)
    assert m["status"] == "succeeded" and m["verify"]["passed"] is True
    for art in m["artifacts"].values():
        assert sha256_file(run / art["path"]) == art["sha256"], art
    rerun = m["reruns"][-1]
    assert rerun["stages"] == ["export", "verify", "onnx_validate", "benchmark", "report"] and rerun["reason"].startswith("model.onnx ")
    assert ("missing" if damage == "deleted" else "sha256") in rerun["reason"]
    assert m["stages"]["sparsify"] == before["stages"]["sparsify"]  # training not redone
    assert m["artifacts"]["model.safetensors"] == before["artifacts"]["model.safetensors"]


def test_rerun_rebakes_a_damaged_model_safetensors_to_the_same_bytes(finished, copy_of):
    cfg, _ = finished
    run, before = copy_of, _manifest(copy_of)
    (run / "model.safetensors").write_bytes(b"not weights")
    assert _run(cfg, run) == 0
    m = _manifest(run)
    assert m["reruns"][-1]["stages"] == ["bake", "validate", "export", "verify", "onnx_validate", "benchmark", "report"]
    assert m["artifacts"]["model.safetensors"]["sha256"] == before["artifacts"]["model.safetensors"]["sha256"]
    assert sha256_file(run / "model.safetensors") == before["artifacts"]["model.safetensors"]["sha256"]


# --------------------------------------------------------------------------- stage-level reuse


def test_changing_validate_reruns_only_validate_export_verify_report(tmp_path, finished, copy_of, capsys):
    _, run = finished
    before = _manifest(copy_of)
    cfg = _config(tmp_path / "changed.yaml", validate={"max_accuracy_drop": 0.6})
    assert _run(cfg, copy_of) == 0, capsys.readouterr().err
    m = _manifest(copy_of)
    assert m["reruns"][-1]["stages"] == ["validate", "export", "verify", "onnx_validate", "benchmark", "report"]
    assert "validate.max_accuracy_drop" in m["reruns"][-1]["reason"]
    for stage in ("data", "model", "train", "reference", "sparsify", "bake"):
        assert stage not in m["reruns"][-1]["stages"]
    for stage in ("train", "sparsify", "bake"):
        assert m["stages"][stage] == before["stages"][stage], stage
    assert sha256_file(copy_of / "model.safetensors") == sha256_file(run / "model.safetensors")
    assert m["config_hash"] != before["config_hash"] and m["status"] == "succeeded"
    assert yaml.safe_load((copy_of / "config.yaml").read_text())["validate"]["max_accuracy_drop"] == 0.6


def test_loader_and_tracking_settings_never_force_a_retrain(tmp_path, finished, copy_of):
    before = _manifest(copy_of)
    data = {**FAST["data"], "num_workers": 0, "pin_memory": False, "persistent_workers": False,
            "prefetch_factor": 3}
    cfg = _config(tmp_path / "loader.yaml", data=data, tracking={"tensorboard": {"log_dir": str(tmp_path / "tb")}})
    assert _run(cfg, copy_of) == 0
    m = _manifest(copy_of)
    assert m.get("reruns", []) == [] and m["stages"] == {**before["stages"], "report": m["stages"]["report"]}


@pytest.mark.parametrize("section,value", [("sparsity", {**FAST["sparsity"], "target": None, "pattern": "1:4"}),
                                           ("train", {"epochs": 2, "optimizer": {"lr": 0.05}}),
                                           ("seed", 3)])
def test_changing_what_training_used_is_refused_without_force(tmp_path, copy_of, capsys, section, value):
    before = (copy_of / "manifest.json").read_bytes()
    cfg = _config(tmp_path / "changed.yaml", **{section: value})
    assert _run(cfg, copy_of) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "--force" in err
    assert (copy_of / "manifest.json").read_bytes() == before


def test_changing_sparsity_target_is_refused_without_force(tmp_path, copy_of, capsys):
    cfg = _config(tmp_path / "target.yaml", sparsity={"method": "optg", "pattern": "unstructured", "target": 0.7,
                                                      "train": {"epochs": 1, "optimizer": {"lr": 0.05}}})
    assert _run(cfg, copy_of) == 2
    assert "sparsity.target" in capsys.readouterr().err


# --------------------------------------------------------------------------- the ONNX sidecar


def test_external_data_sidecar_is_atomic_and_hashed(tmp_path, copy_of, monkeypatch):
    import onnx

    monkeypatch.setattr("stages.onnx_file._EXTERNAL_DATA_BYTES", 0)  # as if the weights were over 1.8 GB
    cfg = _config(tmp_path / "opset.yaml", export={"opset": 17})
    assert _run(cfg, copy_of) == 0
    m = _manifest(copy_of)
    assert m["reruns"][-1]["stages"] == ["export", "verify", "onnx_validate", "benchmark", "report"] and m["verify"]["passed"] is True
    sidecar = m["artifacts"]["model.onnx.data"]
    assert sidecar["stage"] == "export" and sha256_file(copy_of / sidecar["path"]) == sidecar["sha256"]
    model = onnx.load(str(copy_of / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not list(copy_of.rglob("*.tmp"))
    (copy_of / "model.onnx.data").write_bytes(b"\0" * 16)  # a changed sidecar is redone like the file
    assert _run(cfg, copy_of) == 0
    assert "model.onnx.data" in _manifest(copy_of)["reruns"][-1]["reason"]


# --------------------------------------------------------------------------- failures recorded


def test_a_failed_checkpoint_write_is_recorded_as_failed_with_the_file(tmp_path, monkeypatch, capsys):
    import torch

    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # a partial temp file exists, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("stages.io.torch.save", disk_full)
    run = tmp_path / "run"
    assert _run(_config(tmp_path / "fast.yaml"), run) == 1
    m = _manifest(run)
    assert m["status"] == "failed" and m["error"]["type"] == "WriteError"
    assert m["error"]["file"] == "checkpoints/dense.pt" and m["error"]["stage"] == "train"
    assert "No space left on device" in m["error"]["message"]
    assert not list(run.rglob("*.tmp")) and not (run / "checkpoints" / "dense.pt").exists()
    assert "cannot write" in capsys.readouterr().err


def test_a_failed_artifact_write_is_recorded_as_failed_with_the_file(tmp_path, copy_of, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("onnx.save_model", refuse)
    (copy_of / "model.onnx").unlink()
    assert _run(_config(tmp_path / "fast.yaml"), copy_of) == 1
    m = _manifest(copy_of)
    assert m["status"] == "failed" and m["error"]["file"] == "model.onnx" and m["error"]["stage"] == "export"
    assert "Read-only file system" in m["error"]["message"] and not list(copy_of.rglob("*.tmp"))


@pytest.mark.parametrize("kind", ["model", "data"])
def test_a_plugin_calling_sys_exit_0_fails_the_run(tmp_path, monkeypatch, capsys, kind):
    (tmp_path / "quitter.py").write_text("import sys\n\ndef build(*args, **kwargs):\n    sys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    section = {"name": "quitter:build"} if kind == "model" else {**FAST["data"], "name": "quitter:build", "options": {}}
    run = tmp_path / "run"
    assert _run(_config(tmp_path / "fast.yaml", **{kind: section}), run) == 1
    m = _manifest(run)
    assert m["status"] == "failed" and m["error"]["type"] == "UserExit" and "sys.exit(0)" in m["error"]["message"]
    assert m["stages"][kind]["status"] == "failed" and m["error"]["stage"] == kind
    assert "sys.exit(0)" in capsys.readouterr().err


# --------------------------------------------------------------------------- following a run


def test_manifest_and_metrics_csv_hold_every_finished_epoch_of_an_interrupted_run(tmp_path):
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = _config(tmp_path / "fast.yaml", train={"epochs": 2, "optimizer": {"lr": 0.05}},
                  sparsity={**FAST["sparsity"], "train": {"epochs": 3, "optimizer": {"lr": 0.05}}}, export={"enabled": False}, verify={"enabled": False},
                  tracking={"tensorboard": {"log_dir": str(tmp_path / "tb")}})
    run = tmp_path / "run"
    interrupted = main(["run", str(cfg), "--out", str(run), "--quiet"],
                       on_step=signal_hook("sparse:2:1:INT"))  # after dense 2 epochs and sparse epoch 1
    assert interrupted == 130
    m = _manifest(run)
    assert m["status"] == "interrupted"
    assert [(h["phase"], h["epoch"]) for h in m["history"]] == [("dense", 0), ("dense", 1), ("sparse", 0)]
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [("dense", 0), ("dense", 1), ("sparse", 0)]
    assert [float(r["train_loss"]) for r in rows] == [h["train_loss"] for h in m["history"]]
    assert m["artifacts"]["metrics.csv"]["sha256"] == sha256_file(run / "metrics.csv")

    assert _run(cfg, run) == 0  # resumed: the tracker gets the earlier epochs replayed, each step once
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [("dense", 0), ("dense", 1), *(("sparse", i) for i in
                                                                                            range(3))]
    for phase, steps in (("dense", [0, 1]), ("sparse", [0, 1, 2])):
        acc = tensorboard.EventAccumulator(str(tmp_path / "tb" / "run" / phase))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train_loss")] == steps, phase


def test_a_sidecar_write_that_fails_leaves_neither_file(tmp_path, monkeypatch):
    """The staged .onnx and .data never reach their final names when the save fails midway."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from stages import onnx_file
    from stages.io import WriteError

    weight = numpy_helper.from_array(np.ones((32, 32), np.float32), "w")  # over onnx's 1 KiB inline limit
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])], [weight])
    template = helper.make_model(graph)

    def proto():  # saving with external data moves the weights out of the proto: a fresh one each time
        copy = onnx.ModelProto()
        copy.CopyFrom(template)
        return copy

    monkeypatch.setattr(onnx_file, "_EXTERNAL_DATA_BYTES", 0)
    real = onnx.save_model

    def fail_after_writing(model, path, **kwargs):
        real(model, path, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save_model", fail_after_writing)
    with pytest.raises(WriteError, match="No space left"):
        onnx_file.atomic_save(proto(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(onnx, "save_model", real)
    assert onnx_file.atomic_save(proto(), tmp_path / "m.onnx") == tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert numpy_helper.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0]).sum() == 1024
    monkeypatch.setattr(onnx_file, "_EXTERNAL_DATA_BYTES", 1 << 30)  # smaller again: the stale sidecar goes
    assert onnx_file.atomic_save(proto(), tmp_path / "m.onnx") is None
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# --------------------------------------------------------------------------- tracking


def test_a_run_with_tracking_reaches_mlflow_and_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cfg = _config(tmp_path / "fast.yaml", tracking={"mlflow": {"tracking_uri": uri, "experiment": "contract"},
                                                    "tensorboard": {"log_dir": str(tmp_path / "tb")}})
    run = tmp_path / "run"
    assert _run(cfg, run) == 0
    m = _manifest(run)
    assert m["tracking"]["warnings"] == [] and m["tracking"]["tensorboard_dir"] == str(tmp_path / "tb" / "run")
    client = MlflowClient(uri)
    got = client.get_run(m["tracking"]["mlflow_run_id"])
    assert got.info.status == "FINISHED" and got.data.tags["optg.status"] == "succeeded"
    assert got.data.params["sparsity.pattern"] == "2:4"
    assert [x.step for x in client.get_metric_history(got.info.run_id, "dense/train_loss")] == [0]
    assert got.data.metrics["sparse_accuracy"] == m["metrics"]["sparse_accuracy"]
    listed = {f.path for f in client.list_artifacts(got.info.run_id)}
    assert {"model.onnx", "manifest.json", "report.md", "metrics.csv"} <= listed
    acc = accumulator.EventAccumulator(str(tmp_path / "tb" / "run" / "sparse"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [0]
