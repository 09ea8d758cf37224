"""The stage table: which stages a run has, in this order. Each row is declared by its stage's
module in `stages/` (its `run(ctx)` / `restore(ctx)`, when it is enabled, its config section and
the manifest sections it fills); `pipeline.runner` walks the table and knows nothing about any
one stage. Adding a stage is its module, with its `ROW`, and one line here.
"""
from __future__ import annotations

from stages import bake, benchmark, export, model, onnx_eval, report, sparsify, structured, train, validate, verify
from stages.context import RunContext, Stage
from stages.data import stage as data

__all__ = ["STAGES", "RunContext", "Stage"]

STAGES: tuple[Stage, ...] = (
    data.ROW,
    model.ROW,
    train.ROW,
    validate.REFERENCE_ROW,
    benchmark.REFERENCE_ONNX_ROW,
    structured.ROW,
    sparsify.ROW,
    bake.ROW,
    validate.ROW,
    export.ROW,
    verify.ROW,
    onnx_eval.ROW,
    benchmark.ROW,
    report.ROW,
)
