"""Text data for the token tasks: sources, the tokenizer, and token datasets.

A text source gives documents per split (`causal_lm`: plain text) or `(text, label)` samples
(`sequence_classification`); the task's layout decides how they become token batches:

- `blocks` (causal LM): each split's documents are tokenised, joined with the tokenizer's end
  of text token (or a blank line when it has none) and cut into `seq_len` blocks; a last partial
  block of at least 2 tokens is kept, padded (attention_mask 0 on the padding).
- `labelled` (sequence classification): each text is tokenised with the tokenizer's special
  tokens, truncated to `seq_len` and padded; batches are cut to their longest sample.

Sources (`TEXT_SOURCES`): `text` (a folder of `train`, optional `val`, `test` files, each
`.txt` or `.jsonl`), and two corpora that ship with Python itself: `python_docs` (the English
language and library reference topics of `pydoc_data`, paragraph by paragraph) and
`python_docstrings` (docstrings of standard-library packages, parsed with `ast` - nothing is
imported or run - and labelled by their package).

The tokenizer is a Hugging Face `tokenizer.json` read by the `tokenizers` library (JSON
only, nothing in it runs): `data.options.tokenizer` (the file or its folder), else the
`hf:` model folder's. Tokenising happens once per run, in memory; nothing is written.
Bad input is named: a missing split, an empty file, non-UTF-8 bytes (file and byte offset),
a line that is not a JSON object with a string `text` and an integer `label` (line number), a
label outside 0..num_labels-1 (line number), no tokenizer, `seq_len` over the model's positions.
"""
from __future__ import annotations

import ast
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import Dataset

from optg.registry import Registry
from stages.base import StageError, StrictModel
from stages.data.bundle import DataBundle, DataConfig, split_arrays

Layout = Literal["blocks", "labelled"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>")
MAX_SEQ_LEN = 1 << 16


class TextOptions(StrictModel):
    """Options of every text source: `seq_len` tokens per sample (block length for causal LM,
    truncation/padding length for classification), and `tokenizer`: a tokenizer.json file or
    the folder holding one (relative to the config file; default: the `hf:` model folder's)."""

    seq_len: int = Field(128, ge=2, le=MAX_SEQ_LEN)
    """tokens per sample: block length (causal LM), truncation/padding length (classification)"""
    tokenizer: str | None = None
    """a tokenizer.json file or its folder, relative to the config file; default: the `hf:` model folder's"""


class DocstringOptions(TextOptions):
    """`python_docstrings`: which standard-library packages (or top-level modules) give the
    classes, and the shortest docstring kept."""

    packages: list[str] = Field(default_factory=lambda: ["asyncio", "email", "importlib", "logging"],
                                min_length=2)
    """standard-library packages (or top-level modules) whose docstrings are the classes"""
    min_chars: int = Field(40, ge=1)
    """shortest docstring kept"""


@dataclass(frozen=True)
class TextContext:
    """What the data stage knows besides `data:`: the task's layout, the model folder whose
    tokenizer is the default, and the model config's `num_labels` / positions when stated."""

    layout: Layout
    model_dir: Path | None = None
    num_labels: int | None = None
    max_positions: int | None = None


@dataclass
class TokenizerInfo:
    """The tokenizer a run used: its files (copied into the run directory as artifacts, so the
    run directory alone serves the model), vocabulary size and the ids that matter."""

    path: Path  # tokenizer.json
    files: list[Path]
    vocab_size: int
    pad_id: int
    eos_id: int | None

    def describe(self) -> dict[str, Any]:
        return {"files": [f.name for f in self.files], "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                "eos_id": self.eos_id}


@dataclass
class RawText:
    """A source's splits: documents (blocks) or texts with labels (labelled); a missing val or
    test split is None and gets carved from train."""

    train: list[str]
    val: list[str] | None = None
    test: list[str] | None = None
    labels: dict[str, list[int]] = field(default_factory=dict)  # split -> labels (labelled sources)
    where: dict[str, list[str]] = field(default_factory=dict)  # split -> "file:line" of each sample
    class_names: list[str] | None = None


# --------------------------------------------------------------------------- the tokenizer


def _tokenizer_file(spec: str | Path) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise StageError(f"no tokenizer found: {str(path)!r} does not exist (data.options.tokenizer takes "
                         "a tokenizer.json file or the folder holding one)")
    return path


def find_tokenizer(cfg: DataConfig, context: TextContext) -> Path:
    """The tokenizer.json to use: `data.options.tokenizer`, else the model folder's."""
    given = cfg.options.get("tokenizer")
    if given is not None:
        return _tokenizer_file(given)
    if context.model_dir is not None and (context.model_dir / "tokenizer.json").is_file():
        return context.model_dir / "tokenizer.json"
    where = f" and the model folder {str(context.model_dir)!r} has no tokenizer.json" if context.model_dir else ""
    raise StageError(f"no tokenizer found: set data.options.tokenizer (a tokenizer.json file or its folder){where}")


def _special(folder: Path, key: str) -> str | None:
    """A special token named in tokenizer_config.json or special_tokens_map.json (text or {content})."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StageError(f"tokenizer: cannot read {path}: {exc}") from exc
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def load_tokenizer(path: Path) -> tuple[Any, TokenizerInfo]:
    """The `tokenizers.Tokenizer` at `path` and what the run records of it."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        from stages.base import missing_extra

        raise missing_extra("text data", exc, "hf") from exc
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        raise StageError(f"tokenizer: cannot read {str(path)!r} as a tokenizer.json: {exc}") from exc

    def known(token: str | None) -> int | None:
        return None if token is None else tokenizer.token_to_id(token)

    folder = path.parent
    pad = known(_special(folder, "pad_token"))
    if pad is None and tokenizer.padding is not None:
        pad = tokenizer.padding.get("pad_id")
    pad = pad if pad is not None else next((i for i in map(known, PAD_CANDIDATES) if i is not None), 0)
    eos = known(_special(folder, "eos_token"))
    eos = eos if eos is not None else next((i for i in map(known, EOS_CANDIDATES) if i is not None), None)
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()] if path.name == "tokenizer.json" \
        else [path]
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, TokenizerInfo(path, files, tokenizer.get_vocab_size(with_added_tokens=True), int(pad), eos)


# --------------------------------------------------------------------------- token datasets


class TokenDataset(Dataset):
    """Token ids in memory, served a batch at a time (`stages.data.loading.BatchDataset`):
    `{"input_ids", "attention_mask"[, "labels"]}`, each batch cut to its longest sample."""

    augments = False  # nothing random per sample: no per-sample seeds needed

    def __init__(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None) -> None:
        self.input_ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.attention_mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        self.labels = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        self.lengths = self.attention_mask.sum(1)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def get_batch(self, indices: Tensor, seeds: Tensor | None = None) -> dict[str, Tensor]:
        length = max(1, int(self.lengths[indices].max())) if len(indices) else 1
        batch = {"input_ids": self.input_ids[indices, :length], "attention_mask": self.attention_mask[indices, :length]}
        if self.labels is not None:
            batch["labels"] = self.labels[indices]
        return batch

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.get_batch(torch.tensor([index])).items()}


def _blocks(docs: list[str], tokenizer: Any, info: TokenizerInfo, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> one token stream (end-of-text between documents) -> [n, seq_len] blocks."""
    if info.eos_id is None:
        encoded = [tokenizer.encode("\n\n".join(docs), add_special_tokens=False).ids] if docs else []
    else:
        encoded = [e.ids + [info.eos_id] for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
    stream = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded]) if encoded \
        else np.zeros(0, dtype=np.int64)
    full, rest = divmod(len(stream), seq_len)
    used = len(stream) if rest >= 2 else full * seq_len  # a last block of one token predicts nothing
    count = -(-used // seq_len)
    ids = np.full((count, seq_len), info.pad_id, dtype=np.int64)
    mask = np.zeros((count, seq_len), dtype=np.int64)
    ids.reshape(-1)[:used] = stream[:used]
    mask.reshape(-1)[:used] = 1
    return ids, mask


def _padded(texts: list[str], tokenizer: Any, info: TokenizerInfo, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text with special tokens, truncated to `seq_len` and right-padded with the pad id."""
    tokenizer.enable_truncation(seq_len)
    try:
        encoded = tokenizer.encode_batch(texts, add_special_tokens=True)
    finally:
        tokenizer.no_truncation()
    ids = np.full((len(texts), seq_len), info.pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), seq_len), dtype=np.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    return ids, mask


# --------------------------------------------------------------------------- sources

TextReader = Callable[[DataConfig, int, TextContext], RawText]
TEXT_SOURCES: Registry[TextReader] = Registry[TextReader]("text source")
TEXT_SCHEMAS: dict[str, tuple[type[TextOptions], str | None]] = {}  # name -> (options, what `path` names)


def _decode(path: Path) -> str:
    """The file as UTF-8; non-UTF-8 bytes are named with the byte offset, an empty file too."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StageError(f"text data: cannot read {str(path)!r}: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StageError(f"text data: {str(path)!r} is not UTF-8: byte 0x{raw[exc.start]:02x} at byte offset "
                         f"{exc.start} ({exc.reason})") from None
    if not text.strip():
        raise StageError(f"text data: {str(path)!r} is empty")
    return text


def _jsonl(path: Path, layout: Layout) -> tuple[list[str], list[int], list[str]]:
    texts: list[str] = []
    labels: list[int] = []
    where: list[str] = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{path.name}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise StageError(f"text data: {path} line {number} is not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise StageError(f"text data: {path} line {number} needs a JSON object with a string \"text\"")
        if layout == "labelled":
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, int):
                raise StageError(f"text data: {path} line {number}: \"label\" must be an integer, got {label!r}")
            if label < 0:
                raise StageError(f"text data: {path} line {number}: label {label} is negative")
            labels.append(label)
        texts.append(row["text"])
        where.append(at)
    if not texts:
        raise StageError(f"text data: {str(path)!r} has no samples")
    return texts, labels, where


@TEXT_SOURCES.register("text")
def read_text_folder(cfg: DataConfig, seed: int, context: TextContext) -> RawText:
    """`data.path`: a folder with `train` and `test` (and optionally `val`) files, each `.txt`
    (causal LM only: one document) or `.jsonl` (`{"text": ..., "label": int}` per line)."""
    if cfg.path is None:
        raise StageError("dataset 'text' needs `path`: a folder with train/val/test .txt or .jsonl files")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise StageError(f"dataset 'text': {str(root)!r} is not a folder")
    raw = RawText(train=[])
    for split in ("train", "val", "test"):
        found = [root / f"{split}{ext}" for ext in (".txt", ".jsonl") if (root / f"{split}{ext}").is_file()]
        if len(found) > 1:
            raise StageError(f"dataset 'text': both {found[0].name} and {found[1].name} in {str(root)!r}; keep one")
        if not found:
            if split == "val":
                continue
            raise StageError(f"dataset 'text': the {split} split is missing: no {split}.txt or {split}.jsonl "
                             f"in {str(root)!r}")
        path = found[0]
        if path.suffix == ".txt":
            if context.layout == "labelled":
                raise StageError(f"dataset 'text': {path.name} has no labels; sequence_classification reads "
                                 f"{split}.jsonl with {{\"text\": ..., \"label\": int}} per line")
            texts, labels, where = [_decode(path)], list[int](), [path.name]
        else:
            texts, labels, where = _jsonl(path, context.layout)
        setattr(raw, split, texts)
        raw.where[split] = where
        if context.layout == "labelled":
            raw.labels[split] = labels
    return raw


TEXT_SCHEMAS["text"] = (TextOptions, "a folder with train, test (and optional val) .txt or .jsonl files")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@TEXT_SOURCES.register("python_docs")
def read_python_docs(cfg: DataConfig, seed: int, context: TextContext) -> RawText:
    """English reference text that ships with Python: the topics of `pydoc_data.topics` (what
    `help("if")` shows), one document per paragraph, in topic order; val/test are carved by
    paragraph (`data.val_fraction`, `data.test_fraction`, by seed)."""
    if context.layout != "blocks":
        raise StageError("dataset 'python_docs' is unlabelled text for causal_lm; for sequence_classification "
                         "use python_docstrings or a text folder of .jsonl files")
    from pydoc_data.topics import topics

    paragraphs = [p for key in sorted(topics) for p in _paragraphs(topics[key])]
    return RawText(train=paragraphs, where={"train": [f"pydoc_data.topics #{i}" for i in range(len(paragraphs))]})


TEXT_SCHEMAS["python_docs"] = (TextOptions, None)


@TEXT_SOURCES.register("python_docstrings")
def read_python_docstrings(cfg: DataConfig, seed: int, context: TextContext) -> RawText:
    """Docstrings of the standard library's own source files (read with `ast`: nothing is
    imported), each labelled by its package: label i is `packages[i]`. Files under test
    folders are skipped. Works for causal LM too (the docstrings as documents)."""
    opts = DocstringOptions.model_validate(cfg.options)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, labels, where = [], [], []
    for label, package in enumerate(opts.packages):
        root = stdlib / package
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
        files = [f for f in files if f.is_file() and not {"test", "tests", "idle_test"} & set(f.parts)]
        if not files:
            raise StageError(f"dataset 'python_docstrings': no standard-library package or module {package!r} "
                             f"under {stdlib}")
        for path in files:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= opts.min_chars:
                        texts.append(doc)
                        labels.append(label)
                        where.append(f"{path.relative_to(stdlib)}:{getattr(node, 'lineno', 1)}")
    return RawText(train=texts, labels={"train": labels}, where={"train": where}, class_names=list(opts.packages))


TEXT_SCHEMAS["python_docstrings"] = (DocstringOptions, None)


# --------------------------------------------------------------------------- the bundle


def _carve(raw: RawText, split: Literal["val", "test"], fraction: float, seed: int, layout: Layout) -> None:
    """Move `fraction` of the train samples (by seed, stratified by label when labelled) to `split`."""
    index = np.arange(len(raw.train))
    y = np.asarray(raw.labels["train"]) if layout == "labelled" else np.zeros(len(index), dtype=np.int64)
    (keep, _), (carved, _) = split_arrays(index, y, fraction, seed)
    if len(keep) == 0:
        raise StageError(f"cannot carve {split} from {len(index)} training samples and keep any")
    take = lambda items, rows: [items[i] for i in rows]  # noqa: E731
    setattr(raw, split, take(raw.train, carved))
    raw.where[split] = take(raw.where.get("train", [""] * len(index)), carved)
    if layout == "labelled":
        raw.labels[split] = take(raw.labels["train"], carved)
        raw.labels["train"] = take(raw.labels["train"], keep)
    raw.where["train"] = take(raw.where.get("train", [""] * len(index)), keep)
    raw.train = take(raw.train, keep)


def _num_labels(raw: RawText, context: TextContext) -> int:
    """The class count: the model config's `num_labels` when it states one (every label must be
    below it: the first one that is not is named with its file and line), else the labels'."""
    count = max([len(raw.class_names or [])] + [max(v) + 1 for v in raw.labels.values() if v])
    if context.num_labels is None:
        return count
    for split in ("train", "val", "test"):
        for label, where in zip(raw.labels.get(split, []), raw.where.get(split, [])):
            if label >= context.num_labels:
                raise StageError(f"text data: label {label} at {where} is outside 0..{context.num_labels - 1}: the "
                                 f"model config says num_labels={context.num_labels}")
    return context.num_labels


def load_text(cfg: DataConfig, seed: int, context: TextContext) -> DataBundle:
    """Read the source, tokenise once, build a bundle of `TokenDataset` splits."""
    reader = TEXT_SOURCES.get(cfg.name)
    schema, _ = TEXT_SCHEMAS[cfg.name]
    opts = schema.model_validate(cfg.options)
    if context.max_positions is not None and opts.seq_len > context.max_positions:
        raise StageError(f"data.options.seq_len={opts.seq_len} is over the model's max_position_embeddings="
                         f"{context.max_positions}")
    tokenizer, info = load_tokenizer(find_tokenizer(cfg, context))
    raw = reader(cfg, seed, context)
    if raw.test is None:
        _carve(raw, "test", cfg.test_fraction, seed, context.layout)
    if raw.val is None:
        _carve(raw, "val", cfg.val_fraction, seed + 1, context.layout)
    datasets: dict[str, TokenDataset] = {}
    for split in ("train", "val", "test"):
        texts = getattr(raw, split) or []
        if context.layout == "blocks":
            ids, mask = _blocks(texts, tokenizer, info, opts.seq_len)
            labels = None
        else:
            ids, mask = _padded(texts, tokenizer, info, opts.seq_len)
            labels = np.asarray(raw.labels.get(split, []), dtype=np.int64)
        if split == "train" and len(ids) == 0:
            raise StageError(f"dataset {cfg.name!r}: the train split holds no {opts.seq_len}-token sample")
        datasets[split] = TokenDataset(ids, mask, labels)
    num_classes = _num_labels(raw, context) if context.layout == "labelled" else info.vocab_size
    top = max(int(d.input_ids.max()) if len(d) else 0 for d in datasets.values())
    return DataBundle(name=cfg.name, train=datasets["train"], val=datasets["val"], test=datasets["test"],
                      input_shape=(opts.seq_len,), num_classes=int(num_classes), class_names=raw.class_names,
                      tokenizer=info, max_token_id=top)
