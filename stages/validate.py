"""The validate stage: the baked model's metric against the dense reference, gated.

Which gates apply follows the task's metric (`stages.tasks.Metric.gates`): accuracy tasks take
`max_accuracy_drop` (absolute: 0.01 = one point) and `min_accuracy`; perplexity (causal LM)
takes `max_perplexity_increase` (relative: 0.05 = the sparse perplexity at most 5% above the
dense one) and `max_perplexity`. A gate of the other family is a config error
(`gate_problems`, found by `optg check`). Relative gates need a dense reference (a `train`
phase or `model.weights`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field

from stages.base import FieldProblem, GateFailure, StageError, StrictModel
from stages.context import RunContext, Stage
from stages.counting import nonzero_params
from stages.tasks import ACCURACY, Metric
from stages.train import evaluate_run

GATES = {"accuracy": ("max_accuracy_drop", "min_accuracy"),
         "perplexity": ("max_perplexity_increase", "max_perplexity")}
RELATIVE_GATES = ("max_accuracy_drop", "max_perplexity_increase")


class ValidateConfig(StrictModel):
    """Gates on the test split; see the module docstring for which apply to which task."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    """dense minus sparse test accuracy, e.g. 0.01 = one point; needs `train` or `model.weights`"""
    min_accuracy: float | None = Field(None, ge=0, le=1)
    """absolute gate on the sparse test accuracy; needs no dense reference"""
    max_perplexity_increase: float | None = Field(
        None, ge=0, description="relative: 0.05 = sparse perplexity at most 5% above the dense model's")
    max_perplexity: float | None = Field(None, ge=1, description="absolute bound on the sparse perplexity")
    max_quantized_drop: float | None = Field(
        None, ge=0, description="the INT8 file's (export.quantize: int8) own relative gate against the dense model, "
        "in the task's unit: accuracy points (0.01 = one point) or relative perplexity increase; unset: the INT8 "
        "file is held to the run's own gates")
    max_latency_ratio: float | None = Field(
        None, gt=0, description="worst ONNX Runtime CPU latency ratio final / dense reference over the "
        "benchmark's batch sizes; checked by the benchmark stage (after export), exit 3 when above")


def gate_problems(cfg: ValidateConfig, metric: Metric, task: str, has_reference: bool) -> list[str]:
    """Gates that do not fit the task's metric, and relative gates without a dense reference."""
    problems = []
    for family, names in GATES.items():
        if family == metric.gates:
            continue
        for name in names:
            if getattr(cfg, name) is not None:
                problems.append(f"validate.{name} gates {family}; task {task!r} measures {metric.name}: use "
                                + " or ".join(f"validate.{n}" for n in GATES[metric.gates]))
    for name in RELATIVE_GATES:
        if getattr(cfg, name) is not None and name in GATES[metric.gates] and not has_reference:
            absolute = GATES[metric.gates][1]
            problems.append(f"validate.{name} needs a dense reference: add a `train` (dense) phase or "
                            f"`model.weights`, or gate on validate.{absolute} instead")
    return problems


@dataclass
class ValidateResult:
    """The measured metric of the dense reference and the sparse model, their `change` (accuracy:
    the drop dense - sparse; perplexity: the relative increase sparse / dense - 1) and every gate
    they failed, each naming its config field."""

    dense: float | None
    sparse: float
    change: float | None
    failures: list[FieldProblem] = field(default_factory=list)
    metric: Metric = ACCURACY

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def dense_accuracy(self) -> float | None:
        return self.dense if self.metric.gates == "accuracy" else None

    @property
    def sparse_accuracy(self) -> float | None:
        return self.sparse if self.metric.gates == "accuracy" else None

    @property
    def accuracy_drop(self) -> float | None:
        return self.change if self.metric.gates == "accuracy" else None


def validate(sparse: float, dense: float | None, cfg: ValidateConfig, metric: Metric = ACCURACY) -> ValidateResult:
    """Compare against the configured gates; every failed gate is listed, none is raised here."""
    failures = []
    if metric.gates == "perplexity":
        change = None if dense is None else sparse / dense - 1.0
        if cfg.max_perplexity_increase is not None and change is not None and change > cfg.max_perplexity_increase:
            failures.append(FieldProblem("max_perplexity_increase", (
                f"perplexity rose {change * 100:.2f}% (dense {dense:.4f} -> sparse {sparse:.4f}), over "
                f"{{field}}={cfg.max_perplexity_increase}")))
        if cfg.max_perplexity is not None and sparse > cfg.max_perplexity:
            failures.append(FieldProblem("max_perplexity", (
                f"sparse perplexity {sparse:.4f} is above {{field}}={cfg.max_perplexity}")))
        return ValidateResult(dense, sparse, change, failures, metric)
    change = None if dense is None else dense - sparse
    if cfg.max_accuracy_drop is not None and change is not None and change > cfg.max_accuracy_drop:
        failures.append(FieldProblem("max_accuracy_drop", (
            f"accuracy dropped {change * 100:.2f} points (dense {dense:.4f} -> sparse "
            f"{sparse:.4f}), over {{field}}={cfg.max_accuracy_drop}")))
    if cfg.min_accuracy is not None and sparse < cfg.min_accuracy:
        failures.append(FieldProblem("min_accuracy", (
            f"sparse accuracy {sparse:.4f} is below {{field}}={cfg.min_accuracy}")))
    return ValidateResult(dense, sparse, change, failures, metric)


def validate_quantized(quantized: float, dense: float | None, cfg: ValidateConfig,
                       metric: Metric = ACCURACY) -> ValidateResult:
    """The INT8 file's gates: the run's own, with `max_quantized_drop` (when set) in place of the
    task's relative gate (`max_accuracy_drop` / `max_perplexity_increase`), named as itself."""
    if cfg.max_quantized_drop is None:
        return validate(quantized, dense, cfg, metric)
    relative = GATES[metric.gates][0]
    result = validate(quantized, dense, cfg.model_copy(update={relative: cfg.max_quantized_drop}), metric)
    result.failures = [FieldProblem("max_quantized_drop", p.text) if p.field == relative else p
                       for p in result.failures]
    return result


def raise_on_failure(result: ValidateResult) -> None:
    """GateFailure named after the metric ("accuracy", "perplexity") naming every failed gate;
    the pipeline adds the config section."""
    if not result.passed:
        raise GateFailure(result.metric.gates, problems=result.failures)


def check_latency(max_ratio: float, cfg: ValidateConfig) -> None:
    """GateFailure("latency") when the measured worst latency ratio (final / dense reference,
    ONNX Runtime CPU) is above `max_latency_ratio`; nothing when the gate is unset."""
    if cfg.max_latency_ratio is not None and max_ratio > cfg.max_latency_ratio:
        raise GateFailure("latency", problems=[FieldProblem("max_latency_ratio", (
            f"the final model runs at {max_ratio:.3f}x the dense reference's latency (worst batch "
            f"size, ONNX Runtime CPU), over {{field}}={cfg.max_latency_ratio}"))])


# --------------------------------------------------------------------------- the pipeline row


def run_reference(ctx: RunContext) -> None:
    value, metric = evaluate_run(ctx, "test"), ctx.task.metric
    setattr(ctx.run.manifest.metrics, f"dense_{metric.gates}", value)
    ctx.log(f"[reference] dense test {metric.name} {value:.4f}" if value is not None
            else f"[reference] empty test split: no dense {metric.name}")


def run_validate(ctx: RunContext) -> None:
    sparse, metric = evaluate_run(ctx, "test"), ctx.task.metric
    if sparse is None:
        raise StageError("the test split is empty: nothing to validate on (lower data.val_fraction or add data)")
    metrics = ctx.run.manifest.metrics
    dense = getattr(metrics, f"dense_{metric.gates}")
    result = validate(sparse, dense, ctx.cfg.validate, metric)
    if metric.gates == "perplexity":
        metrics.sparse_perplexity, metrics.perplexity_increase = sparse, result.change
        change = f", +{result.change * 100:.2f}%" if result.change is not None else ""
    else:
        metrics.sparse_accuracy, metrics.accuracy_drop = sparse, result.change
        change = f", drop {result.change * 100:.2f} points" if result.change is not None else ""
    metrics.nonzero_params = nonzero_params(ctx.model)
    ctx.log(f"[validate] sparse test {metric.name} {sparse:.4f}{change}")
    raise_on_failure(result)


REFERENCE_ROW = Stage("reference", run_reference, enabled=lambda c: c.has_reference)
ROW = Stage("validate", run_validate, section="validate", inputs=("validate",), redoable=True)
