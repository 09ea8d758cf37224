"""What all stages share: field-named errors the pipeline locates, and the eval-mode helper."""
import pytest
import torch
from torch import nn

from stages.base import ConfigFieldError, FieldProblem, GateFailure, StageError, eval_mode


def _mixed() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5)))
    model.train()
    model[1].eval()       # a frozen BatchNorm inside a training model
    model[3].eval()       # a whole sub-tree in eval
    return model


def test_eval_mode_sets_eval_and_gives_every_module_its_mode_back():
    model = _mixed()
    before = [m.training for m in model.modules()]
    assert before == [True, True, False, True, False, False]
    with eval_mode(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
        x = torch.randn(8, 4)
        assert torch.equal(model(x), model(x))  # dropout off
    assert [m.training for m in model.modules()] == before


def test_eval_mode_restores_modes_when_the_block_raises():
    model = _mixed()
    before = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="boom"):
        with eval_mode(model):
            raise ValueError("boom")
    assert [m.training for m in model.modules()] == before


def test_field_problem_renders_with_and_without_a_section():
    problem = FieldProblem("optimizer.lr", "loss is nan; lower {field} (now 1e+30)")
    assert problem.render() == "loss is nan; lower optimizer.lr (now 1e+30)"
    assert problem.render("sparsity") == "loss is nan; lower sparsity.optimizer.lr (now 1e+30)"


def test_config_field_error_is_a_stage_error_that_the_pipeline_locates():
    exc = ConfigFieldError(FieldProblem("optimizer.lr", "lower {field}"))
    assert isinstance(exc, StageError) and exc.field == "optimizer.lr"
    assert str(exc) == "lower optimizer.lr"
    exc.locate("train")
    assert str(exc) == "lower train.optimizer.lr"


def test_gate_failure_joins_message_and_located_problems():
    exc = GateFailure("accuracy", problems=[FieldProblem("max_accuracy_drop", "drop over {field}=0.0"),
                                            FieldProblem("min_accuracy", "below {field}=0.9")])
    assert str(exc) == "drop over max_accuracy_drop=0.0; below min_accuracy=0.9"
    exc.locate("validate")
    assert exc.gate == "accuracy"
    assert str(exc) == "drop over validate.max_accuracy_drop=0.0; below validate.min_accuracy=0.9"
    plain = GateFailure("onnx_parity", "ONNX verification failed")
    plain.locate("verify")
    assert str(plain) == "ONNX verification failed"
