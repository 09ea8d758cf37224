"""The data stage: load a dataset by name into train/val/test splits with deterministic seeds.

Built-in sources live in `stages.data.catalog.DATASETS`; "package.module:callable" names a user
plugin. `stages.data.bundle` owns what all sources share: the config, the bundle, array
validation and the deterministic test/val carving.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from optg.registry import UnknownNameError
from stages.base import StageError
from stages.data.bundle import (
    SPLITS,
    Arrays,
    DataBundle,
    DataConfig,
    LoaderOptions,
    bundle_from_arrays,
    split_arrays,
    to_dataset,
    validate_arrays,
)
from stages.data.catalog import DATASET_SCHEMAS, DATASETS, check_builtin
from stages.data.text import TEXT_SCHEMAS, TEXT_SOURCES, TextContext, load_text
from stages.plugins import check_options, import_callable, schema_problems

__all__ = [
    "DATASETS", "SPLITS", "TEXT_SOURCES", "Arrays", "TextContext", "check_data_config",
    "DataBundle", "DataConfig", "LoaderOptions", "bundle_from_arrays", "load_data",
    "split_arrays", "to_dataset", "validate_arrays",
]


# --------------------------------------------------------------------------- entry point


def _load_plugin(cfg: DataConfig, seed: int) -> DataBundle:
    """A user's "module:callable": called with (seed=seed, **options)."""
    factory = import_callable(cfg.name, "dataset")
    check_options(factory, cfg.options, f"dataset {cfg.name!r}", reserved=("seed",))
    result = factory(seed=seed, **cfg.options)
    if isinstance(result, DataBundle):
        return result
    if not isinstance(result, Mapping):
        raise StageError(
            f"dataset {cfg.name!r}: plugin returned {type(result).__name__}; expected a "
            "DataBundle or a dict with 'train' (and optionally 'val', 'test', 'num_classes')"
        )
    allowed = {"train", "val", "test", "num_classes"}
    extra = sorted(set(result) - allowed)
    if extra or "train" not in result:
        raise StageError(
            f"dataset {cfg.name!r}: plugin dict has keys {sorted(result)}; needs 'train' and "
            f"may have {', '.join(sorted(allowed - {'train'}))}"
        )

    def pair(key: str) -> Arrays | None:
        value = result.get(key)
        if value is None:
            return None
        if not isinstance(value, Sequence) or len(value) != 2:
            raise StageError(f"dataset {cfg.name!r}: plugin {key!r} must be an (x, y) pair")
        return value[0], value[1]

    train = pair("train")
    if train is None:
        raise StageError(f"dataset {cfg.name!r}: plugin 'train' is None; it must be an (x, y) pair")
    return bundle_from_arrays(
        cfg.name, cfg, seed, train, test=pair("test"), val=pair("val"),
        num_classes=result.get("num_classes"),
    )


def check_data_config(cfg: DataConfig, layout: str | None = None, task: str = "classification"
                      ) -> list[tuple[str, str]]:
    """Everything about `cfg` that can be checked without loading data, as (key inside
    `data`, message) pairs: the name is known (or the plugin imports and is callable), the
    options fit the dataset's schema (or the plugin's signature), and the data fits the task
    (`layout`: the task's text layout, None for tensor data). `optg check` runs it."""
    if cfg.name in TEXT_SCHEMAS:
        if layout is None:
            return [("name", f"dataset {cfg.name!r} is text: it needs a token task (task: sequence_classification "
                             f"or causal_lm), not {task!r}")]
        options, path = TEXT_SCHEMAS[cfg.name]
        problems = schema_problems(options, cfg.options, f"dataset {cfg.name!r}")
        if path is not None and cfg.path is None:
            problems.append(("path", f"dataset {cfg.name!r} needs `path`: {path}"))
        if path is None and cfg.path is not None:
            problems.append(("path", f"dataset {cfg.name!r} is built in and takes no path"))
        return problems
    if layout is not None and cfg.name in DATASET_SCHEMAS:
        return [("name", f"dataset {cfg.name!r} holds tensors, not text; task {task!r} reads a text source: "
                         f"{', '.join(TEXT_SOURCES.names())} (or a 'package.module:callable' giving token batches)")]
    if ":" in cfg.name:
        try:
            factory = import_callable(cfg.name, "dataset")
            check_options(factory, cfg.options, f"dataset {cfg.name!r}", reserved=("seed",))
        except StageError as exc:
            return [("name" if "option" not in str(exc) else "options", str(exc))]
        return []
    if cfg.name not in DATASET_SCHEMAS:
        try:
            DATASETS.get(cfg.name)
        except UnknownNameError as exc:
            return [("name", f"{exc}; or 'package.module:callable'")]
        return []  # registered by a plugin at import time: its factory checks its own options
    return check_builtin(cfg.name, cfg)


def load_data(cfg: DataConfig, seed: int, text: TextContext | None = None) -> DataBundle:
    """Load `cfg.name` with train/val/test splits that depend only on (cfg, seed). `text`: the
    token task's context (layout, model folder...), needed for a text source."""
    if cfg.name in TEXT_SOURCES:
        if text is None:
            raise StageError(f"dataset {cfg.name!r} is text: it needs a token task (sequence_classification or "
                             "causal_lm)")
        bundle = load_text(cfg, seed, text)
    elif ":" in cfg.name:
        bundle = _load_plugin(cfg, seed)
    else:
        try:
            factory = DATASETS.get(cfg.name)
        except UnknownNameError as exc:
            raise StageError(f"{exc}; or 'package.module:callable'") from None
        bundle = factory(cfg, seed)
    bundle.loading = LoaderOptions.from_config(cfg)  # data.num_workers etc.
    return bundle
