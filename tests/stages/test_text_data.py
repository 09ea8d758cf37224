"""Text data: the `text` folder source with its named errors, the built-in sources on text
that ships with Python, tokenisation into blocks and padded samples, batches cut to their
longest sample, and the shipped tiny model folders being what their build script writes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from stages.base import StageError  # noqa: E402
from stages.data import DataConfig, load_data  # noqa: E402
from stages.data.text import TextContext, load_tokenizer  # noqa: E402
from tests.stages.hf_cases import text_folder, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = "blocks"
LABELLED = "labelled"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(folder)
    return folder


def _load(name, tokenizer_dir, layout=BLOCKS, path=None, **options):
    cfg = DataConfig(name=name, path=None if path is None else str(path),
                     options={"tokenizer": str(tokenizer_dir), **options})
    return load_data(cfg, seed=0, text=TextContext(layout=layout))


def test_text_folder_blocks_are_the_token_stream_cut_to_seq_len(tmp_path, tokenizer_dir):
    root = text_folder(tmp_path / "data")
    bundle = _load("text", tokenizer_dir, path=root, seq_len=32)
    tok, info = load_tokenizer(tokenizer_dir / "tokenizer.json")
    stream = tok.encode((root / "train.txt").read_text(), add_special_tokens=False).ids + [info.eos_id]
    train = bundle.train
    full = len(stream) // 32
    assert torch.equal(train.input_ids[:full].reshape(-1), torch.tensor(stream[: full * 32]))
    assert int(train.attention_mask.sum()) == len(stream)  # the last partial block is kept, masked
    assert bundle.num_classes == info.vocab_size and bundle.tokenizer.eos_id == info.eos_id
    # a batch is cut to its longest sample: the last (partial) block alone is short
    last = train.get_batch(torch.tensor([len(train) - 1]))
    assert last["input_ids"].shape[1] == len(stream) - full * 32


def test_labelled_jsonl_pads_and_keeps_labels(tmp_path, tokenizer_dir):
    root = text_folder(tmp_path / "data", labelled=True)
    bundle = _load("text", tokenizer_dir, layout=LABELLED, path=root, seq_len=16)
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    assert bundle.train.labels.tolist() == [r["label"] for r in rows]
    assert bundle.num_classes == 3
    batch = bundle.train.get_batch(torch.arange(4))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] <= 16
    _, info = load_tokenizer(tokenizer_dir / "tokenizer.json")
    assert (batch["input_ids"][batch["attention_mask"] == 0] == info.pad_id).all()


@pytest.mark.parametrize("make, match", [
    (lambda r: (r / "test.txt").unlink(), r"the test split is missing: no test\.txt or test\.jsonl"),
    (lambda r: (r / "val.txt").write_text("  \n"), r"val\.txt' is empty"),
    (lambda r: (r / "train.txt").write_bytes(b"good text\n\xff\xfe bad"), r"not UTF-8: byte 0xff at byte offset 10"),
    (lambda r: (r / "val.jsonl").write_text("x"), "both val.txt and val.jsonl"),
], ids=["missing-split", "empty", "not-utf8", "two-files"])
def test_text_folder_errors_name_the_file(tmp_path, tokenizer_dir, make, match):
    root = text_folder(tmp_path / "data")
    make(root)
    with pytest.raises(StageError, match=match):
        _load("text", tokenizer_dir, path=root)


@pytest.mark.parametrize("line, match", [
    ('{"text": "a b c", "label": "two"}', r"train\.jsonl line 2: \"label\" must be an integer, got 'two'"),
    ('{"text": "a b c", "label": -1}', r"line 2: label -1 is negative"),
    ('{"text": "a b c"', r"line 2 is not JSON"),
    ('{"label": 1}', r"line 2 needs a JSON object with a string \"text\""),
])
def test_bad_jsonl_lines_are_named_by_line(tmp_path, tokenizer_dir, line, match):
    root = text_folder(tmp_path / "data", labelled=True)
    first = (root / "train.jsonl").read_text().splitlines()[0]
    (root / "train.jsonl").write_text(first + "\n" + line + "\n")
    with pytest.raises(StageError, match=match):
        _load("text", tokenizer_dir, layout=LABELLED, path=root)


def test_label_outside_the_models_num_labels_is_named(tmp_path, tokenizer_dir):
    root = text_folder(tmp_path / "data", labelled=True)
    cfg = DataConfig(name="text", path=str(root), options={"tokenizer": str(tokenizer_dir)})
    with pytest.raises(StageError, match=r"label 2 at train\.jsonl:3 is outside 0\.\.1: the model config says "
                                         r"num_labels=2"):
        load_data(cfg, seed=0, text=TextContext(layout=LABELLED, num_labels=2))


def test_missing_tokenizer_and_long_seq_len_are_refused(tmp_path, tokenizer_dir):
    root = text_folder(tmp_path / "data")
    with pytest.raises(StageError, match="no tokenizer found"):
        load_data(DataConfig(name="text", path=str(root)), seed=0, text=TextContext(layout=BLOCKS))
    with pytest.raises(StageError, match="seq_len=128 is over the model's max_position_embeddings=64"):
        load_data(DataConfig(name="text", path=str(root), options={"tokenizer": str(tokenizer_dir), "seq_len": 128}),
                  seed=0, text=TextContext(layout=BLOCKS, max_positions=64))


def test_python_docs_and_docstrings_are_real_text(tokenizer_dir):
    docs = _load("python_docs", tokenizer_dir, seq_len=64)
    assert len(docs.train) > 500 and len(docs.val) > 0 and len(docs.test) > 0
    strings = _load("python_docstrings", tokenizer_dir, layout=LABELLED, seq_len=64)
    assert strings.class_names == ["asyncio", "email", "importlib", "logging"]
    labels = np.concatenate([d.labels.numpy() for d in (strings.train, strings.val, strings.test)])
    assert set(labels.tolist()) == {0, 1, 2, 3}
    # the same seed gives the same splits
    again = _load("python_docstrings", tokenizer_dir, layout=LABELLED, seq_len=64)
    assert torch.equal(again.test.input_ids, strings.test.input_ids)
    with pytest.raises(StageError, match="no standard-library package or module 'nosuchpkg'"):
        _load("python_docstrings", tokenizer_dir, layout=LABELLED, packages=["email", "nosuchpkg"])
    with pytest.raises(StageError, match="unlabelled text for causal_lm"):
        _load("python_docs", tokenizer_dir, layout=LABELLED)


def test_shipped_tiny_model_folders_are_what_the_script_writes(tmp_path):
    script = ROOT / "configs" / "models" / "build_tiny_models.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=300)
    for name in ("tiny_llama", "tiny_bert"):
        for file in ("config.json", "tokenizer_config.json"):
            assert (tmp_path / name / file).read_text() == (ROOT / "configs" / "models" / name / file).read_text()
        built = json.loads((tmp_path / name / "tokenizer.json").read_text())
        shipped = json.loads((ROOT / "configs" / "models" / name / "tokenizer.json").read_text())
        assert built["model"]["vocab"] == shipped["model"]["vocab"], name  # stdlib text of this Python
        assert built == shipped
