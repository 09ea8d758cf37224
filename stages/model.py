"""The model stage: resolve a model name to a factory, build it for the data, load weights.

Names resolve in this order: `torchvision:<name>` or `timm:<name>` (optional extras),
`package.module:callable` (a user factory), else a built-in from `stages.zoo.MODELS`.
Every factory is called as `factory(input_shape, num_classes, **options)`. Weights files are
read by `stages.checkpoints`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from optg.registry import UnknownNameError
from stages import hf
from stages import sparsify as sparsify_stage
from stages.base import StageConfigError, StageError, StrictModel
from stages.checkpoints import WeightsReport, load_weights
from stages.context import RunContext, Stage
from stages.counting import count_macs_and_params
from stages.plugins import check_options, import_callable, schema_problems
from stages.structured_groups import trial_problems
from stages.tasks import export_view
from stages.zoo import MODELS, options_schema, timm_model, torchvision_model

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
ZOOS: dict[str, Callable[..., nn.Module]] = {TORCHVISION_PREFIX: torchvision_model,
                                             TIMM_PREFIX: timm_model}


class ModelConfig(StrictModel):
    """Which model to build and, optionally, which state dict to start from.

    name: a built-in (see `stages.zoo.MODELS`), "package.module:callable",
        "torchvision:<name>" (needs the `vision` extra), "timm:<name>" (the `timm` extra) or
        "hf:<dir>" (a Hugging Face model folder, relative to the config file; the `hf` extra;
        see `stages.hf`), loaded for the run's task.
    options: keyword arguments for the factory; unknown ones are rejected with the valid list.
    weights: a `.safetensors` file or a torch.save checkpoint (.pt .pth .bin .ckpt .tar),
        read safely (weights_only) and loaded strictly; the layouts are listed in
        `stages.checkpoints` (plain, under state_dict/model/..., DDP/compile prefixes).
    weights_key: where the state dict is inside the checkpoint, dotted (e.g.
        "state_dict_ema"); default: found automatically.
    reinit_head: fine-tuning to a new label set: true loads everything but a classifier head
        whose shape differs (the model's last layer); a module name skips that module.
        The re-initialised head is named in the run's manifest.
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    weights_key: str | None = None
    reinit_head: bool | str = False

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model name must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _weights_options_need_weights(self) -> ModelConfig:
        if self.weights is None:
            used = [k for k in ("weights_key", "reinit_head") if getattr(self, k) not in (None, False)]
            if used:
                raise ValueError(f"{' and '.join(used)} need model.weights")
        if isinstance(self.reinit_head, str) and not self.reinit_head.strip():
            raise ValueError("reinit_head must be true, false or a module name")
        return self


@dataclass
class ModelResult:
    """The built model and, when `weights` was given, what was loaded (for the manifest)."""

    model: nn.Module
    weights: WeightsReport | None = None


def resolve_model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory for a model name: torchvision/timm, module:callable, or built-in."""
    for prefix, zoo in ZOOS.items():
        if name.startswith(prefix):
            return partial(zoo, name[len(prefix):])
    if ":" in name:
        return import_callable(name, "model")
    try:
        return MODELS.get(name)
    except UnknownNameError as exc:
        raise StageError(
            f"{exc}; or 'package.module:callable', 'torchvision:<name>' or 'timm:<name>'"
        ) from None


_ZOO_RESERVED = {TORCHVISION_PREFIX: ("weights", "num_classes"),
                 TIMM_PREFIX: ("pretrained", "num_classes", "in_chans")}


def _zoo_problems(prefix: str, name: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    """torchvision/timm names: no reserved options, and the model exists when the extra is
    installed (a config may be checked on a machine without it; the run then says which extra
    to install). The options go to the library's builder and are only checked when it builds."""
    what = f"model '{prefix}{name}'"
    clash = sorted(set(options) & set(_ZOO_RESERVED[prefix]))
    problems = [("options", f"{what}: option(s) {', '.join(clash)} are set by the pipeline "
                            "(pretrained weights load through model.weights)")] if clash else []
    try:
        if prefix == TORCHVISION_PREFIX:
            known = name in importlib.import_module("torchvision.models").list_models()
        else:
            known = bool(importlib.import_module("timm").is_model(name))
    except ImportError:
        return problems
    if not known:
        problems.insert(0, ("name", f"unknown {prefix.rstrip(':')} model {name!r}"))
    return problems


def starts_trained(cfg: ModelConfig) -> bool:
    """Whether the model is built with trained weights: `weights`, or an `hf:` folder that
    holds safetensors (a folder with config.json alone is a random initialisation)."""
    if cfg.weights is not None:
        return True
    folder = hf.hf_dir(cfg.name)
    if folder is None or not folder.is_dir():
        return False
    return any(p.suffix == ".safetensors" for p in folder.iterdir())


def check_model_config(cfg: ModelConfig, task: str = "classification",
                       auto_class: str | None = "AutoModelForImageClassification") -> list[tuple[str, str]]:
    """Everything about `cfg` that can be checked without building: the name resolves (a
    plugin imports, a torchvision/timm model exists, an hf: folder fits `task`) and the options
    fit the factory (a built-in's schema with bounds, a plugin's signature). (key inside
    `model`, message) pairs."""
    folder = hf.hf_dir(cfg.name)
    if folder is not None:
        problems = [("name", p) for p in hf.check_folder(folder, auto_class, task)]
        if cfg.options:
            problems.append(("options", f"model {cfg.name!r}: an hf: model is configured by its config.json; "
                                        "it takes no options"))
        return problems
    for prefix in ZOOS:
        if cfg.name.startswith(prefix):
            return _zoo_problems(prefix, cfg.name[len(prefix):], cfg.options)
    try:
        factory = resolve_model_factory(cfg.name)
    except StageError as exc:
        return [("name", str(exc))]
    what = f"model {cfg.name!r}"
    if ":" not in cfg.name:
        try:
            schema = options_schema(cfg.name)
        except Exception:  # noqa: BLE001 - a registered factory whose signature cannot be typed
            schema = None
        if schema is not None:
            return schema_problems(schema, cfg.options, what)
    try:
        check_options(factory, cfg.options, what, skip=2)
    except StageError as exc:
        return [("options", str(exc))]
    return []


def build_model(
    cfg: ModelConfig, input_shape: Sequence[int], num_classes: int, task: Any = None, pad_token_id: int | None = None
) -> nn.Module:
    """`build(...).model`: the model alone."""
    return build(cfg, input_shape, num_classes, task, pad_token_id).model


def build(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int, task: Any = None,
          pad_token_id: int | None = None) -> ModelResult:
    """Build the configured model for one-sample `input_shape` and `num_classes` (for a causal
    LM: the vocabulary size), then load `cfg.weights` if given. `task` (a `stages.tasks.Task`,
    default classification) picks an hf: folder's auto class; `pad_token_id` is the data's pad
    token (a decoder classifier finds sequence ends by it). Seed torch before calling for
    reproducible initial weights (a re-initialised head keeps them)."""
    folder = hf.hf_dir(cfg.name)
    if folder is not None:
        auto_class = getattr(task, "hf_auto_class", "AutoModelForImageClassification")
        task_name = getattr(task, "name", "classification")
        if auto_class is None:
            raise StageError(f"model {cfg.name!r}: task {task_name!r} has no Hugging Face auto class")
        labels = int(num_classes) if auto_class == "AutoModelForSequenceClassification" else None
        model = hf.load_model(folder, auto_class, task_name, num_labels=labels, pad_token_id=pad_token_id)
        report = None if cfg.weights is None else load_weights(model, cfg.weights, key=cfg.weights_key,
                                                                 reinit_head=cfg.reinit_head)
        return ModelResult(model, report)
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise StageError(f"model {cfg.name!r}: invalid input_shape {tuple(input_shape)}")
    if int(num_classes) < 1:
        raise StageError(f"model {cfg.name!r}: num_classes must be >= 1, got {num_classes}")
    factory = resolve_model_factory(cfg.name)
    if not cfg.name.startswith(tuple(ZOOS)):  # zoo kwargs vary per model
        check_options(factory, cfg.options, f"model {cfg.name!r}", skip=2)
    try:
        model = factory(shape, int(num_classes), **cfg.options)
    except StageError:
        raise
    except (TypeError, ValueError) as exc:
        raise StageError(
            f"model {cfg.name!r} could not be built with options {cfg.options}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise StageError(
            f"model {cfg.name!r}: factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    if cfg.weights is None:
        return ModelResult(model)
    report = load_weights(model, cfg.weights, key=cfg.weights_key, reinit_head=cfg.reinit_head)
    return ModelResult(model, report)


# --------------------------------------------------------------------------- the pipeline row


def run_model(ctx: RunContext) -> None:
    """Build the model on the run's device and count its MACs; plan the sparse layers and try
    channel pruning now, so a config that cannot work fails (exit 2) before any training."""
    torch.manual_seed(ctx.cfg.seed)
    bundle, task = ctx.bundle, ctx.task
    pad = bundle.tokenizer.pad_id if bundle.tokenizer is not None else None
    ctx.model_ = build_model(ctx.cfg.model, bundle.input_shape, bundle.num_classes, task, pad).to(ctx.device)
    _check_vocabulary(ctx)
    example = task.to_device(bundle.batch("val", 1), ctx.device)
    metrics = ctx.run.manifest.metrics
    with export_view(ctx.model, task) as view:  # positional inputs, whatever the model's keywords
        metrics.macs, metrics.params = count_macs_and_params(view, task.inputs(example))
    try:  # plan the target layers now: a config that sparsifies nothing fails before training
        sparsify_stage.plan(ctx.model, ctx.cfg.sparsity)
    except ValueError as exc:
        raise StageConfigError(str(exc), section="sparsity") from None
    if ctx.cfg.structured is not None:  # a model channel pruning would break is refused now, not after training
        trial = trial_problems(ctx.model, ctx.cfg.structured,
                                                ctx.bundle.tensors("train", limit=2)[0].to(ctx.device))
        if trial:
            raise StageConfigError(trial, section="structured")


def _check_vocabulary(ctx: RunContext) -> None:
    """Token data whose ids the model's embedding cannot look up fails here, not mid-training."""
    top = ctx.bundle.max_token_id
    embeddings = getattr(ctx.model, "get_input_embeddings", None)
    table = embeddings() if callable(embeddings) else None
    if top is not None and isinstance(table, nn.Embedding) and top >= table.num_embeddings:
        raise StageConfigError(f"the tokenizer gives token id {top}, the model's embedding has "
                               f"{table.num_embeddings} rows (vocab_size); use the model's own tokenizer",
                               section="data")


ROW = Stage("model", run_model, rerun=True, inputs=("model",))
