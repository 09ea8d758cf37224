"""The validate stage: exact drop, every failed gate listed with its field, raised as one gate."""
import pytest

from stages.base import FieldProblem, GateFailure
from stages.validate import ValidateConfig, raise_on_failure, validate


def test_passing_result_has_the_exact_drop():
    result = validate(0.90, 0.95, ValidateConfig(max_accuracy_drop=0.06, min_accuracy=0.9))
    assert result.passed and result.failures == []
    assert result.accuracy_drop == pytest.approx(0.05)
    assert (result.dense_accuracy, result.sparse_accuracy) == (0.95, 0.90)
    raise_on_failure(result)  # no exception


def test_without_a_reference_only_the_absolute_gate_applies():
    result = validate(0.5, None, ValidateConfig(max_accuracy_drop=0.0, min_accuracy=0.4))
    assert result.passed and result.accuracy_drop is None


def test_each_failed_gate_names_its_field_and_the_pipeline_adds_the_section():
    result = validate(0.80, 0.95, ValidateConfig(max_accuracy_drop=0.1, min_accuracy=0.85))
    assert not result.passed
    assert [f.field for f in result.failures] == ["max_accuracy_drop", "min_accuracy"]
    assert result.failures[0] == FieldProblem(
        "max_accuracy_drop", "accuracy dropped 15.00 points (dense 0.9500 -> sparse 0.8000), over {field}=0.1")
    with pytest.raises(GateFailure) as info:
        raise_on_failure(result)
    assert info.value.gate == "accuracy"
    info.value.locate("validate")
    assert str(info.value) == ("accuracy dropped 15.00 points (dense 0.9500 -> sparse 0.8000), over "
                               "validate.max_accuracy_drop=0.1; sparse accuracy 0.8000 is below "
                               "validate.min_accuracy=0.85")


def test_a_drop_equal_to_the_limit_passes():
    assert validate(0.75, 1.0, ValidateConfig(max_accuracy_drop=0.25)).passed
    assert not validate(0.75, 1.0, ValidateConfig(max_accuracy_drop=0.2499)).passed
