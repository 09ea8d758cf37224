"""The data stage's row: load the dataset the config names (for a token task with the hf:
model folder's tokenizer) and record its summary in the manifest."""
from __future__ import annotations

from stages import hf
from stages.context import RunContext, Stage
from stages.data import TextContext, load_data
from stages.records import DataSummary


def _text_context(ctx: RunContext) -> TextContext | None:
    """What a token task's text source needs besides `data:`: the layout, and the hf: model
    folder (its tokenizer is the default; its config's num_labels and positions bound the data)."""
    layout = ctx.task.text_layout
    if layout is None:
        return None
    folder = hf.hf_dir(ctx.cfg.model.name)
    facts = hf.read_folder(folder) if folder is not None else None
    return TextContext(layout, folder, facts.num_labels if facts else None, facts.max_positions if facts else None)


def run_data(ctx: RunContext) -> None:
    bundle = ctx.bundle_ = load_data(ctx.cfg.data, ctx.cfg.seed, _text_context(ctx))
    metrics = ctx.run.manifest.metrics
    metrics.task, metrics.metric = ctx.task.name, ctx.task.metric.name
    summary = DataSummary(
        name=bundle.name, input_shape=list(bundle.input_shape), num_classes=bundle.num_classes,
        sizes={s: len(bundle.split(s)) for s in ("train", "val", "test")})  # type: ignore[arg-type]
    if bundle.tokenizer is not None:
        summary.tokenizer = bundle.tokenizer.describe()
    metrics.data = summary


ROW = Stage("data", run_data, rerun=True, inputs=("seed", "device", "data"))
