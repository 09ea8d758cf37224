"""Hugging Face folders built in the test: a config from `transformers`, weights saved as
safetensors, and a byte-level BPE tokenizer trained by `tokenizers` on text that ships with
Python (the pydoc topics). Tiny on purpose: every model here runs a forward pass in milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300


def train_tokenizer(folder: Path, specials: tuple[str, ...] = ("<|endoftext|>", "[PAD]", "[CLS]"),
                    cls: str | None = None) -> Path:
    """tokenizer.json (+ tokenizer_config.json naming eos/pad) in `folder`."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer=trainer)
    if cls is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A", special_tokens=[(cls, tokenizer.token_to_id(cls))])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "[PAD]"}))
    return folder / "tokenizer.json"


def gpt2_config(**extra):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2, use_cache=False,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **extra)


def llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, use_cache=False, **extra)


def bert_config(**extra):
    from transformers import BertConfig

    extra.setdefault("num_labels", 3)
    return BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, type_vocab_size=1,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1, **extra)


def save_folder(folder: Path, config, auto_class: str, *, weights: bool = True, seed: int = 0,
                tokenizer: bool = True) -> Path:
    """`config` saved in `folder`, with seeded safetensors weights when `weights`, and a tokenizer."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(seed)
        model = getattr(transformers, auto_class).from_config(config)
        model.save_pretrained(str(folder), safe_serialization=True)
    else:
        config.save_pretrained(str(folder))
    if tokenizer:
        train_tokenizer(folder, cls="[CLS]" if auto_class.endswith("SequenceClassification") else None)
    return folder


def text_folder(root: Path, labelled: bool = False) -> Path:
    """A `text` dataset folder: train/val/test from pydoc topics (.txt), or .jsonl with labels 0..2."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    root.mkdir(parents=True, exist_ok=True)
    parts = {"train": keys[:30], "val": keys[30:36], "test": keys[36:42]}
    for split, names in parts.items():
        if labelled:
            rows = [json.dumps({"text": p, "label": i % 3})
                    for i, p in enumerate(q for k in names for q in topics[k].split("\n\n") if q.strip())]
            (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        else:
            (root / f"{split}.txt").write_text("\n\n".join(topics[k] for k in names), encoding="utf-8")
    return root
