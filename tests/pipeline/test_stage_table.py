"""The runner walks a stage table: order, enabled-by, resume (skip, restore the latest state,
rerun), the epilogue after success and after a failed gate, and errors named by config section.
The tables here are made up; adding a stage to the pipeline is the same: one `Stage` row."""
import json

import pytest

from pipeline.config import ConfigError, validate_config
from pipeline.runner import Runner, RunOptions
from pipeline.stage_table import STAGES, RunContext, Stage
from stages.base import ConfigFieldError, FieldProblem, GateFailure, StageConfigError

CONFIG = {"name": "table", "device": "cpu", "data": {"name": "digits"}, "model": {"name": "small_cnn"},
          "sparsity": {"method": "optg", "pattern": "2:4", "train": {"epochs": 1}}}


def runner(tmp_path, stages, **changes):
    return Runner(validate_config({**CONFIG, **changes}), RunOptions(out=tmp_path / "run", quiet=True),
                  stages=stages)


def table(calls: list[str], fail: dict[str, BaseException] | None = None) -> list[Stage]:
    fail = fail or {}

    def step(name: str, what: str = "run"):
        def go(ctx: RunContext) -> None:
            calls.append(f"{what} {name}")
            if what == "run" and name in fail:
                raise fail.pop(name)
        return go

    return [
        Stage("load", step("load"), rerun=True),
        Stage("skipped", step("skipped"), enabled=lambda c: c.train is not None),
        Stage("dense", step("dense"), restore=step("dense", "restore"), state="weights"),
        Stage("measure", step("measure"), section="validate"),
        Stage("sparse", step("sparse"), restore=step("sparse", "restore"), state="weights", section="sparsity"),
        Stage("publish", step("publish")),
        Stage("summary", step("summary"), epilogue=True),
    ]


def _manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "manifest.json").read_text())


def test_enabled_stages_run_in_table_order_and_are_recorded(tmp_path):
    calls: list[str] = []
    manifest = runner(tmp_path, table(calls)).execute()
    assert calls == ["run load", "run dense", "run measure", "run sparse", "run publish", "run summary"]
    assert manifest.status == "succeeded"
    assert list(_manifest(tmp_path)["stages"]) == ["load", "dense", "measure", "sparse", "publish", "summary"]
    with_train = runner(tmp_path / "other", table([]), train={"epochs": 1})
    assert [s.name for s in with_train.stages][:2] == ["load", "skipped"]  # enabled by this config


def test_resume_skips_done_stages_restores_only_the_latest_state_and_reruns_cheap_ones(tmp_path):
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path, table(calls, {"publish": KeyboardInterrupt()})).execute()
    m = _manifest(tmp_path)
    assert m["status"] == "interrupted" and m["error"]["type"] == "KeyboardInterrupt"
    assert m["stages"]["publish"]["status"] == "failed" and "summary" not in m["stages"]

    calls.clear()
    runner(tmp_path, table(calls)).execute()
    # dense is done but superseded by sparse (same state): only sparse restores
    assert calls == ["run load", "restore sparse", "run publish", "run summary"]
    m = _manifest(tmp_path)
    assert m["status"] == "succeeded" and m["resumed"] == 1 and "error" not in m


def test_a_restore_runs_when_the_later_stage_of_its_state_is_not_done(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="disk"):
        runner(tmp_path, table(calls, {"sparse": RuntimeError("disk")})).execute()
    assert _manifest(tmp_path)["status"] == "failed"
    calls.clear()
    runner(tmp_path, table(calls)).execute()
    assert calls == ["run load", "restore dense", "run sparse", "run publish", "run summary"]


def test_failed_gate_runs_the_epilogue_and_names_the_config_section(tmp_path):
    calls: list[str] = []
    gate = GateFailure("accuracy", problems=[FieldProblem("min_accuracy", "below {field}=0.9")])
    with pytest.raises(GateFailure, match=r"^below validate\.min_accuracy=0\.9$"):
        runner(tmp_path, table(calls, {"measure": gate})).execute()
    assert calls == ["run load", "run dense", "run measure", "run summary"]  # report of what was measured
    m = _manifest(tmp_path)
    assert m["status"] == "gate_failed" and m["error"] == {
        "type": "GateFailure", "gate": "accuracy", "message": "below validate.min_accuracy=0.9", "stage": "measure"}
    assert m["stages"]["measure"]["status"] == "failed" and "summary" not in m["stages"]


def test_stage_errors_name_fields_under_the_stage_section(tmp_path):
    calls: list[str] = []
    error = ConfigFieldError(FieldProblem("optimizer.lr", "loss is nan; lower {field}"))
    with pytest.raises(ConfigFieldError, match=r"lower sparsity\.optimizer\.lr$"):
        runner(tmp_path, table(calls, {"sparse": error})).execute()
    assert "run summary" not in calls  # the epilogue follows success or a failed gate only
    assert _manifest(tmp_path)["error"]["message"] == "loss is nan; lower sparsity.optimizer.lr"



@pytest.mark.parametrize(("field", "stage", "shown"), [
    ("ignore", "sparse", "sparsity.ignore: nothing to prune"),  # a section: the field under it
    (None, "publish", "publish: nothing to prune"),             # no section: the stage's name
])
def test_a_stage_config_error_is_a_config_error_naming_its_field(tmp_path, field, stage, shown):
    """Typed, not matched by text: the stage raises StageConfigError with its field; the runner
    places it under the stage's section, and the CLI turns it into exit 2."""
    calls: list[str] = []
    with pytest.raises(ConfigError) as info:
        runner(tmp_path, table(calls, {stage: StageConfigError("nothing to prune", field=field)})).execute()
    assert info.value.problems == [shown]
    assert _manifest(tmp_path)["stages"][stage]["status"] == "failed"

def test_the_pipeline_table():
    assert [s.name for s in STAGES] == ["data", "model", "train", "reference", "reference_onnx", "structured",
                                        "sparsify", "bake", "validate", "export", "verify", "onnx_validate",
                                        "benchmark", "report"]
    assert [s.name for s in STAGES if s.epilogue] == ["report"]
    assert {s.name for s in STAGES if s.state == "weights"} == {"train", "sparsify", "bake"}
    sections = {s.name: s.section for s in STAGES if s.section}
    assert sections["train"] == "train" and sections["sparsify"] == "sparsity" and sections["validate"] == "validate"
    plain = validate_config(CONFIG)
    assert [s.name for s in STAGES if s.enabled(plain)] == ["data", "model", "reference_onnx", "sparsify", "bake",
                                                             "validate", "export", "verify", "onnx_validate", "benchmark",
                                                             "report"]
    full = validate_config({**CONFIG, "train": {"epochs": 1}, "verify": {"enabled": False},
                            "benchmark": {"enabled": False}, "structured": {"ratio": 0.5}})
    assert [s.name for s in STAGES if s.enabled(full)] == ["data", "model", "train", "reference", "structured",
                                                            "sparsify", "bake", "validate", "export", "onnx_validate",
                                                            "report"]
    assert {s.name: s.state for s in STAGES if s.restore}["structured"] == "architecture"  # restores beside weights


def test_a_stage_error_about_another_section_names_that_section_and_every_problem(tmp_path):
    calls: list[str] = []
    error = StageConfigError(["the tokenizer gives id 90", "the vocabulary has 64 rows"], section="data")
    with pytest.raises(ConfigError) as info:
        runner(tmp_path, table(calls, {"sparse": error})).execute()
    assert info.value.problems == ["data: the tokenizer gives id 90", "data: the vocabulary has 64 rows"]


# ---------------------------------------------------------------------- adding a stage


def run_onnx_size(ctx: RunContext) -> None:
    """A stage as a user would add one: it reads what export left and writes an artifact."""
    from stages.io import atomic_write_json

    size = (ctx.run.path / "model.onnx").stat().st_size
    ctx.run.add_artifact("onnx_size.json", atomic_write_json(ctx.run.path / "onnx_size.json", {"bytes": size}))


ONNX_SIZE_ROW = Stage("onnx_size", run_onnx_size, enabled=lambda c: c.export.enabled, all_ranks=False,
                      redoable=True)


def test_a_new_stage_is_its_row_added_to_the_table(tmp_path, tiny_config):
    from pipeline.config import load_config

    cfg = load_config(tiny_config(benchmark={"enabled": False}))
    stages = STAGES + (ONNX_SIZE_ROW,)
    Runner(cfg, RunOptions(out=tmp_path / "run", quiet=True), stages=stages).execute()
    m = _manifest(tmp_path)
    assert list(m["stages"])[-2:] == ["onnx_size", "report"]  # after the others, before the epilogue
    assert m["artifacts"]["onnx_size.json"]["stage"] == "onnx_size"
    assert json.loads((tmp_path / "run" / "onnx_size.json").read_text())["bytes"] == m["export"]["bytes"]
    again = Runner(cfg, RunOptions(out=tmp_path / "run", quiet=True), stages=stages).execute()
    assert again.resumed == 1 and again.stages["onnx_size"].status == "done"


def test_pipeline_holds_no_stage_specific_code():
    """Every row comes from a stage module; no function in pipeline/ runs or restores a stage
    (takes a RunContext); the table module defines nothing but STAGES."""
    import ast
    import inspect
    from pathlib import Path

    import pipeline.stage_table as stage_table

    for stage in STAGES:
        assert stage.run.__module__.startswith("stages."), stage.name
        assert stage.restore is None or stage.restore.__module__.startswith("stages."), stage.name
    for path in Path(stage_table.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations = [ast.unparse(a.annotation) for a in node.args.args if a.annotation is not None]
                assert "RunContext" not in annotations, f"{path.name}: {node.name} is a stage's code"
    body = ast.parse(inspect.getsource(stage_table)).body
    assert not [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
