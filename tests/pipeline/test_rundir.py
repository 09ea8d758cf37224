"""The run directory and its typed manifest: create, resume, refuse, record, and the JSON keys."""
import json

import pytest

from optg.pattern import Pattern
from pipeline.manifest import SCHEMA_VERSION, ErrorRecord, Manifest
from pipeline.rundir import RunDir, RunDirConflict, versions
from stages.io import sha256_file

START_KEYS = ["schema", "name", "status", "config_hash", "created", "updated", "resumed", "versions", "stages",
              "metrics", "artifacts", "history"]


def _json(run: RunDir) -> dict:
    return json.loads(run.manifest_path.read_text())


def test_new_run_directory_has_the_start_manifest(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.open("tiny", "h" * 64, force=False) is False
    data = _json(run)
    assert list(data) == START_KEYS
    assert data["schema"] == SCHEMA_VERSION == 5
    assert (data["name"], data["status"], data["resumed"]) == ("tiny", "running", 0)
    assert data["stages"] == {} and data["metrics"] == {} and data["artifacts"] == {} and data["history"] == []
    assert set(data["versions"]) == {"python", "torch", "onnx", "onnxruntime", "optg-pipeline"}


def test_record_stage_artifact_and_metrics_appear_once_set(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open("tiny", "h", force=False)
    run.record_stage("data", "done", 0.12345)
    (run.path / "a.txt").write_text("hello")
    run.add_artifact("a.txt", run.path / "a.txt")
    run.manifest.metrics.dense_accuracy = None  # set to null: the key is there
    run.manifest.metrics.macs = 7
    run.save()
    data = _json(run)
    assert data["stages"] == {"data": {"status": "done", "seconds": 0.123}}
    assert data["artifacts"] == {"a.txt": {"path": "a.txt", "bytes": 5, "sha256": sha256_file(run.path / "a.txt")}}
    assert data["metrics"] == {"macs": 7, "dense_accuracy": None}
    assert "export" not in data and "verify" not in data and "error" not in data
    assert run.stage_done("data") and not run.stage_done("model")
    run.record_stage("model", "failed", 1.0)
    assert not run.stage_done("model")


def test_reopening_with_the_same_config_resumes_and_clears_the_error(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open("tiny", "h", force=False)
    run.record_stage("data", "done", 1.0)
    run.manifest.status = "interrupted"
    run.manifest.error = ErrorRecord(type="KeyboardInterrupt", gate=None, message="")
    run.save()
    (run.path / "checkpoints").mkdir()
    stale = run.path / "checkpoints" / ".dense.pt.abc.tmp"
    stale.write_bytes(b"half")

    again = RunDir(tmp_path / "run")
    assert again.open("tiny", "h", force=False) is True
    assert again.manifest.resumed == 1 and again.manifest.status == "running"
    assert again.stage_done("data") and not stale.exists()
    again.save()
    data = _json(again)
    assert "error" not in data and data["resumed"] == 1


def test_resume_under_other_versions_keeps_the_old_ones(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open("tiny", "h", force=False)
    run.manifest.versions = {**versions(), "torch": "0.0.1"}
    run.save()
    again = RunDir(tmp_path / "run")
    again.open("tiny", "h", force=False)
    assert again.manifest.versions == versions()
    assert again.manifest.versions_before_resume[-1]["torch"] == "0.0.1"


def test_another_config_or_a_foreign_directory_is_refused_unless_forced(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open("tiny", "a" * 64, force=False)
    with pytest.raises(RunDirConflict, match="different config"):
        RunDir(tmp_path / "run").open("tiny", "b" * 64, force=False)
    forced = RunDir(tmp_path / "run")
    assert forced.open("tiny", "b" * 64, force=True) is False
    assert forced.manifest.config_hash == "b" * 64 and forced.manifest.resumed == 0

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for force in (False, True):  # never cleared, whatever the flags; the message offers no --force
        with pytest.raises(RunDirConflict, match="no manifest.json") as refused:
            RunDir(foreign).open("tiny", "h", force=force)
        assert "use --force" not in str(refused.value)
    assert (foreign / "keep.txt").read_text() == "mine"


OURS = {"schema": 99, "name": "x", "status": "running", "config_hash": "h"}


@pytest.mark.parametrize("content,forceable", [
    ("{not json", False), (json.dumps([1, 2]), False), (json.dumps({"schema": 99, "name": "x"}), False),
    (json.dumps(OURS), True), (json.dumps({**OURS, "schema": 2, "stages": [1]}), True),
    (json.dumps({**OURS, "schema": 2, "artifacts": {"a": 5}}), True)])
def test_unreadable_or_unknown_manifest_is_refused(tmp_path, content, forceable):
    """Unreadable -> refused; --force clears it only when it is recognisably one of ours."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "manifest.json").write_text(content)
    with pytest.raises(RunDirConflict, match="unreadable manifest"):
        RunDir(path).open("tiny", "h", force=False)
    if forceable:
        assert RunDir(path).open("tiny", "h", force=True) is False
    else:
        with pytest.raises(RunDirConflict, match="unreadable manifest.*with or without --force"):
            RunDir(path).open("tiny", "h", force=True)
        assert (path / "manifest.json").read_text() == content


def test_schema_1_manifest_loads_with_parameter_names_and_export_files():
    old = {"schema": 1, "name": "x", "status": "succeeded", "config_hash": "h", "created": "t", "updated": "t",
           "resumed": 0, "versions": {}, "stages": {"bake": {"status": "done", "seconds": 1.0}},
           "metrics": {"layers": [{"name": "features.0", "type": "Conv2d", "shape": [16, 8, 3, 3], "numel": 1152,
                                   "targeted": True, "pattern": "2:4", "sparsity": 0.5, "reason": ""}]},
           "artifacts": {"model.compact.onnx": {"path": "model.compact.onnx", "bytes": 1, "sha256": "0"}},
           "history": [], "export": {"exporter": "dynamo", "seconds": 1.0, "bytes": 10, "warnings": [], "opset": 18,
                                     "dtype": "fp32", "compact_bytes": 1}}
    m = Manifest.model_validate(old)
    assert m.schema_version == 5 and m.metrics.layers[0].parameter == "features.0.weight"
    assert (m.export.file, m.export.compact_file) == ("model.onnx", "model.compact.onnx")
    assert m.to_json()["schema"] == 5


def test_manifest_json_round_trips():
    m = Manifest.start("x", "h", "t", {"python": "3"})
    m.metrics.sparse_accuracy = 0.5
    m.error = ErrorRecord(type="GateFailure", gate="accuracy", message="too low")
    data = m.to_json()
    assert Manifest.model_validate(data).to_json() == data
    assert data["error"] == {"type": "GateFailure", "gate": "accuracy", "message": "too low"}


@pytest.mark.parametrize(("pattern", "text"), [(Pattern.nm(2, 4), "2:4"), (Pattern.unstructured(0.9), "unstructured")])
def test_manifest_pattern_is_a_value_written_as_its_text(pattern, text):
    m = Manifest.start("x", "h", "t", {"python": "3"})
    m.method, m.pattern, m.target = "optg", pattern, pattern.target
    data = m.to_json()
    assert data["pattern"] == text and data["target"] == pytest.approx(pattern.target)
    assert Manifest.model_validate(data).pattern == pattern  # unstructured: its target from `target`
