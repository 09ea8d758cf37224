"""Experiment tracking against the real backends, no mocks: a local MLflow sqlite store read back
with MlflowClient, TensorBoard event files read back with EventAccumulator, reruns of the same
run directory, failures that become warnings, and missing packages as config errors."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import config_hash, resolved_dict, validate_config
from pipeline.tracking import Tracking, build_tracking, flatten_config, record_metrics
from pipeline.tracking_config import TrackingConfig
from stages.train import EpochRecord
from tests.pipeline.conftest import TINY

ARTIFACTS = {"model.onnx": b"\x08\x07onnx-bytes", "manifest.json": b'{"status": "succeeded"}\n',
             "report.md": b"# report\n"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Nothing may land outside tmp_path: run in an empty cwd, without MLflow env redirects."""
    for name in [n for n in os.environ if n.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not any(cwd.iterdir()), f"tracking wrote into the working directory: {list(cwd.iterdir())}"


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory):
    """An empty, migrated MLflow sqlite database. Creating one runs MLflow's schema migrations
    (seconds), so it is made once here and each test works on its own copy."""
    pytest.importorskip("mlflow", reason='needs the mlflow extra: pip install "optg-pipeline[mlflow]"')
    pytest.importorskip("sqlalchemy", reason='needs the mlflow extra: pip install "optg-pipeline[mlflow]"')
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow_template")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def store(tmp_path, mlflow_template):
    """(tracking_uri, client) on a fresh copy of the template database inside tmp_path."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    return uri, MlflowClient(uri)


@pytest.fixture
def tensorboard():
    return pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                               reason='needs the tensorboard extra: pip install "optg-pipeline[tensorboard]"')


def resolved(tracking: dict | None = None, **top) -> dict:
    """The resolved config of the tiny test run (real schema), with a tracking section."""
    raw = {**json.loads(json.dumps(TINY)), **top}
    if tracking is not None:
        raw["tracking"] = tracking
    return resolved_dict(validate_config(raw))


def epoch(phase: str, index: int, loss: float, val: float | None = 0.5) -> EpochRecord:
    return EpochRecord(phase=phase, epoch=index, train_loss=loss, train_metric=0.25 * index, val_metric=val,
                       sparsity=0.5 if phase == "sparse" else 0.0, lr=0.1 / (index + 1), seconds=0.01)


def write_artifacts(run_dir: Path) -> list[Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in ARTIFACTS.items():
        (run_dir / name).write_bytes(data)
    return [run_dir / name for name in ARTIFACTS]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_run_holds_params_epochs_final_metrics_artifacts_and_status(tmp_path, store):
    uri, client = store
    config = resolved({"mlflow": {"tracking_uri": uri, "experiment": "tiny-exp"}})
    messages: list[str] = []
    tracking = build_tracking(TrackingConfig.model_validate(config["tracking"]), messages.append)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)

    started = tracking.start(config, run_dir)
    for i, loss in enumerate([1.5, 1.2, 0.9]):
        tracking.log_epoch("dense", i, record_metrics(epoch("dense", i, loss, val=None if i == 0 else 0.4 + i / 10)))
    for i, loss in enumerate([0.8, 0.7]):
        tracking.log_epoch("sparse", i, record_metrics(epoch("sparse", i, loss)))
    tracking.log_final({"dense_accuracy": 0.75, "sparse_accuracy": 0.7, "parity_max_abs_error": None,
                        "data": {"name": "synthetic", "num_classes": 3}})
    tracking.log_artifacts(write_artifacts(run_dir))
    summary = tracking.finish("succeeded")

    run_id = started["mlflow_run_id"]
    assert summary == {"mlflow_run_id": run_id, "mlflow_experiment_id": started["mlflow_experiment_id"],
                       "mlflow_run_reused": False, "warnings": []}
    assert messages == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optg.status"] == "succeeded"
    assert run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-exp"
    params = run.data.params
    assert params == {k: v for k, v in flatten_config(config).items() if not k.startswith("tracking")}
    assert (params["sparsity.pattern"], params["train.optimizer.lr"], params["data.options.shape"],
            params["seed"], params["validate.min_accuracy"]) == ("2:4", "0.05", "[8, 6, 6]", "0", "null")
    assert not any(k.startswith("tracking") for k in params)  # a tracking URI may carry credentials

    assert history(client, run_id, "dense/train_loss") == [(0, 1.5), (1, 1.2), (2, 0.9)]
    assert history(client, run_id, "dense/val_accuracy") == [(1, pytest.approx(0.5)), (2, pytest.approx(0.6))]
    assert history(client, run_id, "sparse/sparsity") == [(0, 0.5), (1, 0.5)]
    assert "dense/epoch" not in run.data.metrics and "dense/phase" not in run.data.metrics
    assert run.data.metrics["sparse_accuracy"] == 0.7 and run.data.metrics["data.num_classes"] == 3
    assert "parity_max_abs_error" not in run.data.metrics

    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())
    listed = {f.path for f in client.list_artifacts(run_id)}
    assert listed == {*ARTIFACTS, "resolved_config.json"}
    fetched = Path(client.download_artifacts(run_id, "model.onnx", str(tmp_path / "fetched")))
    assert fetched.read_bytes() == ARTIFACTS["model.onnx"]
    full = json.loads(Path(client.download_artifacts(run_id, "resolved_config.json", str(tmp_path / "fetched"))).read_text())
    assert full == {k: v for k, v in config.items() if k != "tracking"}


def test_mlflow_param_values_fit_its_length_limit(tmp_path, store):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri, client = store
    tracking = build_tracking(TrackingConfig.model_validate({"mlflow": {"tracking_uri": uri, "experiment": "e"}}))
    config = {"name": "long", "model": {"options": {"note": "x" * (MAX_PARAM_VAL_LENGTH + 500)}},
              "sparsity": {"overrides": {"^fc$": "dense", "conv.*": "2:4"}}}
    run_id = tracking.start(config, tmp_path / "run")["mlflow_run_id"]
    tracking.finish("succeeded")
    params = client.get_run(run_id).data.params
    assert len(params["model.options.note"]) == MAX_PARAM_VAL_LENGTH
    assert params["model.options.note"].endswith(f"[{MAX_PARAM_VAL_LENGTH + 500} chars; see resolved_config.json]")
    assert json.loads(params["sparsity.overrides"]) == {"^fc$": "dense", "conv.*": "2:4"}  # regex keys stay one value
    assert tracking.warnings == []


def test_rerun_of_the_same_run_dir_continues_the_mlflow_run(tmp_path, store):
    uri, client = store
    tcfg = TrackingConfig.model_validate({"mlflow": {"tracking_uri": uri, "experiment": "e", "run_name": "r"}})
    run_dir = tmp_path / "run"
    first = build_tracking(tcfg)
    run_id = first.start({"name": "tiny", "seed": 0}, run_dir)["mlflow_run_id"]
    for i in range(2):
        first.log_epoch("sparse", i, {"train_loss": 1.0 - i / 10})
    first.finish("interrupted")
    assert client.get_run(run_id).info.status == "KILLED"
    assert json.loads((run_dir / "tracking" / "mlflow.json").read_text())["run_id"] == run_id

    second = build_tracking(tcfg)
    started = second.start({"name": "tiny", "seed": 1}, run_dir)
    assert (started["mlflow_run_id"], started["mlflow_run_reused"]) == (run_id, True)
    assert client.get_run(run_id).info.status == "RUNNING"
    for i in range(4):  # the runner may replay the history it has: epochs logged before are skipped
        second.log_epoch("sparse", i, {"train_loss": 1.0 - i / 10})
    assert second.finish("succeeded")["mlflow_run_id"] == run_id

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optg.status"] == "succeeded"
    assert history(client, run_id, "sparse/train_loss") == [(0, 1.0), (1, 0.9), (2, 0.8), (3, pytest.approx(0.7))]
    assert run.data.params["seed"] == "0"  # MLflow params cannot change; the warning says so
    assert len(second.warnings) == 1 and "seed" in second.warnings[0] and "cannot change" in second.warnings[0]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]

    other = build_tracking(tcfg)
    assert other.start({"name": "tiny"}, tmp_path / "another_run")["mlflow_run_id"] != run_id
    other.finish("failed")
    assert len(client.search_runs([run.info.experiment_id])) == 2


def test_mlflow_run_deleted_from_the_store_gives_a_new_run_and_a_warning(tmp_path, store):
    uri, client = store
    tcfg = TrackingConfig.model_validate({"mlflow": {"tracking_uri": uri, "experiment": "e"}})
    first = build_tracking(tcfg)
    old = first.start({"name": "a"}, tmp_path / "run")["mlflow_run_id"]
    first.finish("failed")
    assert client.get_run(old).info.status == "FAILED"
    client.delete_run(old)
    second = build_tracking(tcfg)
    new = second.start({"name": "a"}, tmp_path / "run")["mlflow_run_id"]
    second.finish("succeeded")
    assert new != old and client.get_run(new).info.status == "FINISHED"
    assert any(old in w and "no longer exists" in w for w in second.warnings)


def test_tensorboard_event_files_read_back(tmp_path, tensorboard, monkeypatch):
    log_dir = tmp_path / "tb"
    tcfg = TrackingConfig.model_validate({"tensorboard": {"log_dir": str(log_dir)}})
    run_dir = tmp_path / "runs" / "tiny"
    tracking = build_tracking(tcfg)
    assert tracking.start({"name": "tiny"}, run_dir)["tensorboard_dir"] == str(log_dir / "tiny")
    for i, loss in enumerate([1.5, 1.2, 0.9]):
        tracking.log_epoch("dense", i, record_metrics(epoch("dense", i, loss)))
    tracking.log_epoch("sparse", 0, record_metrics(epoch("sparse", 0, 0.8, val=None)))
    tracking.log_final({"sparse_accuracy": 0.7, "dense_accuracy": 0.75, "note": "text is skipped"})
    tracking.log_artifacts(write_artifacts(run_dir))  # TensorBoard keeps no files: a no-op
    assert tracking.finish("succeeded") == {"tensorboard_dir": str(log_dir / "tiny"), "warnings": []}

    def scalars(group: str) -> dict[str, list[tuple[int, float]]]:
        acc = tensorboard.EventAccumulator(str(log_dir / "tiny" / group))
        acc.Reload()
        return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    dense = scalars("dense")
    assert set(dense) == {"train_loss", "train_accuracy", "val_accuracy", "sparsity", "lr", "seconds"}
    assert dense["train_loss"] == [(0, 1.5), (1, 1.2), (2, 0.9)]
    assert dense["lr"] == [(0, 0.1), (1, 0.05), (2, round(0.1 / 3, 6))]
    sparse = scalars("sparse")
    assert "val_accuracy" not in sparse and sparse["sparsity"] == [(0, 0.5)]
    assert scalars("final") == {"sparse_accuracy": [(0, 0.7)], "dense_accuracy": [(0, 0.75)]}

    # A rerun replays epochs from 1 with new values: TensorBoard shows each step once, the newest.
    # Event files are named by the second they were opened (then a per-process counter) and read
    # in name order; a real rerun starts seconds later, so open the rerun's files 2 s on (within
    # one second, a counter going from 9 to 10 would sort the rerun's file first).
    now = time.time()
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: now + 2)
        again = build_tracking(tcfg)
        again.start({"name": "tiny"}, run_dir)
        for i, loss in [(1, 1.1), (2, 0.85), (3, 0.6)]:
            again.log_epoch("dense", i, {"train_loss": loss})
        again.finish("succeeded")
    assert scalars("dense")["train_loss"] == [(0, 1.5), (1, 1.1), (2, 0.85), (3, 0.6)]
    assert all(f.stat().st_size > 0 for f in (log_dir / "tiny" / "dense").iterdir())


def test_a_failing_backend_becomes_a_warning_and_the_others_go_on(tmp_path, store, tensorboard):
    uri, client = store
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where TensorBoard wants its folder")
    messages: list[str] = []
    tracking = build_tracking(TrackingConfig.model_validate(
        {"mlflow": {"tracking_uri": uri, "experiment": "e"}, "tensorboard": {"log_dir": str(blocker)}}),
        messages.append)
    run_id = tracking.start({"name": "tiny"}, tmp_path / "run")["mlflow_run_id"]
    tracking.log_epoch("dense", 0, {"train_loss": 1.0})  # TensorBoard cannot create its folder
    tracking.log_epoch("dense", 1, {"train_loss": 0.5})
    summary = tracking.finish("gate_failed")
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("tensorboard: log_epoch(dense, 0) failed")
    assert "tensorboard tracking is off for the rest of this run" in summary["warnings"][0]
    assert messages == [f"[tracking] warning: {summary['warnings'][0]}"]
    assert history(client, run_id, "dense/train_loss") == [(0, 1.0), (1, 0.5)]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["optg.status"] == "gate_failed"

    deleted = client.create_experiment("gone", (tmp_path / "gone").as_uri())
    client.delete_experiment(deleted)
    tracking = build_tracking(TrackingConfig.model_validate({"mlflow": {"tracking_uri": uri, "experiment": "gone"}}))
    summary = tracking.start({"name": "tiny"}, tmp_path / "run2")
    tracking.log_epoch("dense", 0, {"train_loss": 1.0})
    summary = tracking.finish("succeeded")
    assert "mlflow_run_id" not in summary and len(summary["warnings"]) == 1
    assert "start failed" in summary["warnings"][0] and "'gone' is deleted" in summary["warnings"][0]


def test_no_tracking_section_means_no_trackers(tmp_path):
    tracking = build_tracking(None)
    assert isinstance(tracking, Tracking) and not tracking.enabled
    assert tracking.start({"name": "x"}, tmp_path / "run") == {"warnings": []}
    tracking.log_epoch("dense", 0, {"train_loss": 1.0})
    assert tracking.finish("succeeded") == {"warnings": []}
    assert not (tmp_path / "run").exists()


def test_tracking_does_not_change_the_config_hash():
    pytest.importorskip("mlflow", reason='needs the mlflow extra: pip install "optg-pipeline[mlflow]"')
    with_tracking = validate_config({**TINY, "tracking": {"mlflow": {"tracking_uri": "https://mlflow.example",
                                                                     "experiment": "e"}}})
    assert config_hash(with_tracking) == config_hash(validate_config(dict(TINY)))


MISSING = [
    ("mlflow", {"mlflow": {"tracking_uri": "sqlite:///m.db", "experiment": "e"}},
     ["tracking.mlflow: tracking.mlflow needs 'mlflow'", 'pip install "optg-pipeline[mlflow]"']),
    ("sqlalchemy", {"mlflow": {"tracking_uri": "sqlite:///m.db", "experiment": "e"}},
     ["sqlite: store needs 'sqlalchemy'", 'pip install "optg-pipeline[mlflow]"']),
    ("tensorboard", {"tensorboard": {"log_dir": "tb"}},
     ["tracking.tensorboard: tracking.tensorboard needs 'tensorboard'", 'pip install "optg-pipeline[tensorboard]"']),
]


@pytest.mark.parametrize("module, section, expected", MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch, capsys, module, section, expected):
    monkeypatch.setitem(sys.modules, module, None)  # Python's own "this module cannot be imported"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "tracking": section}))
    for argv in (["check", str(path)], ["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err
    assert not (tmp_path / "out").exists()


def test_file_store_needs_mlflows_opt_in_and_unknown_keys_are_errors(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow", reason='needs the mlflow extra: pip install "optg-pipeline[mlflow]"')
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "tracking": {"mlflow": {"tracking_uri": str(tmp_path / "mlruns"),
                                                                     "experiment": "e"}}}))
    assert main(["check", str(path)]) == 2
    assert "MLFLOW_ALLOW_FILE_STORE=true" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(["check", str(path)]) == 0
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    for uri in ("databricks", "https://mlflow.example:5000"):  # not file stores
        path.write_text(yaml.safe_dump({**TINY, "tracking": {"mlflow": {"tracking_uri": uri, "experiment": "e"}}}))
        assert main(["check", str(path)]) == 0
    path.write_text(yaml.safe_dump({**TINY, "tracking": {"wandb": {}, "tensorboard": {"logdir": "x"}}}))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tracking.wandb: unknown key (valid keys here: mlflow, tensorboard)" in err
    assert "tracking.tensorboard.logdir: unknown key (valid keys here: log_dir)" in err
