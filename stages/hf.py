"""Hugging Face model folders: `model.name: hf:<dir>`.

A folder as `save_pretrained` writes it: `config.json`, weights as `*.safetensors` (one file or
shards), usually `tokenizer.json` beside them. It loads with
`AutoModelFor<task>.from_pretrained(dir, local_files_only=True, use_safetensors=True)` in float32;
a folder with `config.json` and no weight file builds the model from its config, randomly
initialised (seed torch first), for from-scratch runs and tests.

Never loaded: pickles. A folder whose only weights are `pytorch_model.bin` (or any `.bin`,
`.pt`, `.pth`, `.ckpt`) is refused before `transformers` is called, so no pickle is ever
opened; a config with `auto_map` (code shipped with the model) is refused too, since it would
need `trust_remote_code`.

`check_folder` is what `optg check` runs: the folder exists, `config.json` parses as a
model config, its `model_type` has an `AutoModelFor<task>` class (when `transformers` is
installed), and it holds safetensors weights or none at all. Nothing is loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from stages.base import StageConfigError, StageError, missing_extra

HF_PREFIX = "hf:"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAPPINGS = {"AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
             "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
             "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"}


def hf_dir(name: str) -> Path | None:
    """The folder of an `hf:<dir>` model name, None for any other name."""
    return Path(name[len(HF_PREFIX):]).expanduser() if name.startswith(HF_PREFIX) else None


@dataclass(frozen=True)
class FolderFacts:
    """What `config.json` says, read without `transformers`."""

    config: dict[str, Any]
    weights: list[Path]  # safetensors files
    pickles: list[Path]

    @property
    def model_type(self) -> str | None:
        value = self.config.get("model_type")
        return value if isinstance(value, str) else None

    @property
    def num_labels(self) -> int | None:
        """`num_labels` as the config states it (itself or through `id2label`), else None."""
        if isinstance(self.config.get("num_labels"), int):
            return int(self.config["num_labels"])
        labels = self.config.get("id2label")
        return len(labels) if isinstance(labels, dict) and labels else None

    @property
    def max_positions(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            if isinstance(self.config.get(key), int):
                return int(self.config[key])
        return None


def read_folder(folder: Path) -> FolderFacts:
    """The folder's config.json and weight files; StageConfigError names what is wrong."""
    if not folder.is_dir():
        raise StageConfigError(f"model folder {str(folder)!r} does not exist (hf:<dir> is relative to the config file)")
    path = folder / "config.json"
    if not path.is_file():
        raise StageConfigError(f"model folder {str(folder)!r} has no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StageConfigError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise StageConfigError(f"{path} is not a model config (a JSON object with a \"model_type\")")
    if "auto_map" in config:
        raise StageConfigError(f"{path} names custom code (auto_map); loading it would run code shipped with the "
                               "model (trust_remote_code), which this pipeline never does")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return FolderFacts(config, [p for p in files if p.suffix == ".safetensors"],
                       [p for p in files if p.suffix in PICKLE_SUFFIXES])


def _auto_class(name: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise missing_extra("a hf: model", exc, "hf") from exc
    return getattr(transformers, name)


def check_folder(folder: Path, auto_class: str | None, task: str) -> list[str]:
    """Problems of an `hf:` folder for `task` ([] when it can be loaded), without loading it."""
    try:
        facts = read_folder(folder)
    except StageConfigError as exc:
        return [str(exc)]
    problems = []
    if facts.pickles and not facts.weights:
        problems.append(f"model folder {str(folder)!r} holds only pickled weights ("
                        f"{', '.join(p.name for p in facts.pickles)}); pickles are never loaded: convert them "
                        "to safetensors (save_pretrained(..., safe_serialization=True))")
    if auto_class is None:
        problems.append(f"task {task!r} has no Hugging Face auto class; hf: models need classification, "
                        "sequence_classification or causal_lm")
        return problems
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return problems  # the run says which extra to install; the folder itself is fine
    names = getattr(modeling_auto, _MAPPINGS[auto_class])
    if facts.model_type not in names:
        problems.append(f"model folder {str(folder)!r}: model_type {facts.model_type!r} has no {auto_class} "
                        f"(task {task!r}); it does not fit this task")
    return problems


def load_model(folder: Path, auto_class: str, task: str, *, num_labels: int | None = None,
               pad_token_id: int | None = None) -> nn.Module:
    """The folder's model for the task's auto class, float32, weights from safetensors (or a
    fresh initialisation from config.json when the folder holds no weights). `num_labels`: the
    data's class count for sequence classification; a config that states another is refused."""
    facts = read_folder(folder)
    problems = check_folder(folder, auto_class, task)
    if problems:
        raise StageConfigError("; ".join(problems))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if num_labels is not None and auto_class == "AutoModelForSequenceClassification":
        stated = facts.num_labels
        if stated is not None and stated != num_labels:
            raise StageConfigError(f"model folder {str(folder)!r}: config.json says num_labels={stated}, the data "
                                   f"has {num_labels} classes")
        if stated is None:
            config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
            config.pad_token_id = pad_token_id  # decoder classifiers find each sequence's end by it
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no key/value cache while training, evaluating or exporting
    cls = _auto_class(auto_class)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights: 100%": the run's log is the pipeline's own
    try:
        if facts.weights:
            model = cls.from_pretrained(str(folder), config=config, local_files_only=True, use_safetensors=True,
                                        trust_remote_code=False)
        else:
            model = cls.from_config(config)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise StageError(f"model folder {str(folder)!r}: {auto_class} could not load it: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.float()  # no dtype argument: its name changed across transformers 4.x/5.x
