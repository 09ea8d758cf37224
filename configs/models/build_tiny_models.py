"""Build the tiny Hugging Face model folders the text configs use (config.json + tokenizer.json).

    python configs/models/build_tiny_models.py        # rewrites configs/models/tiny_llama, tiny_bert

No weights are written: the folders hold a config and a tokenizer, so `model.name: hf:<dir>`
builds the model randomly initialised from the config (seeded by the run's `seed`) and the
dense phase trains it. Each tokenizer is a byte-level BPE trained with the `tokenizers`
library on text that ships with Python, and never on the text its model is evaluated on:

- `tiny_llama` (causal LM on `python_docs`, the pydoc topics): its tokenizer learns from the
  standard library's docstrings;
- `tiny_bert` (sequence classification on `python_docstrings`): its tokenizer learns from the
  pydoc topics, and prepends a `[CLS]` token whose final state BERT's pooler classifies.

The output is deterministic; `tests/stages/test_text_data.py` checks that the shipped files
are what this script writes.
"""
from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB = 1024

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
    "initializer_range": 0.02, "use_cache": False, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": None,
}
BERT = {
    "architectures": ["BertForSequenceClassification"], "model_type": "bert", "vocab_size": VOCAB,
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 256, "type_vocab_size": 1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": 1,
    "num_labels": 4, "id2label": {"0": "asyncio", "1": "email", "2": "importlib", "3": "logging"},
    "label2id": {"asyncio": 0, "email": 1, "importlib": 2, "logging": 3},
}


def stdlib_docstrings() -> list[str]:
    """Every docstring of the standard library's own .py files (read with ast; nothing runs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idle_test", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def bpe(texts: list[str], specials: list[str], cls: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if cls is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A", special_tokens=[(cls, tokenizer.token_to_id(cls))])
    return tokenizer


def write(folder: Path, config: dict, tokenizer, special: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def main(out: Path = HERE) -> None:
    write(out / "tiny_llama", LLAMA, bpe(stdlib_docstrings(), ["<|endoftext|>"]),
          {"eos_token": "<|endoftext|>"})
    write(out / "tiny_bert", BERT, bpe(pydoc_topics(), ["[CLS]", "[PAD]"], cls="[CLS]"),
          {"cls_token": "[CLS]", "pad_token": "[PAD]"})


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
