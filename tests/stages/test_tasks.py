"""The task seam: loss and metric by hand on hand-set logits, padding invariance on real
Hugging Face models (GPT-2, LLaMA, BERT built from a config here), the export view, the registry."""
import math

import pytest
import torch
import torch.nn.functional as F

from stages.base import StageError
from stages.tasks import (
    TASKS,
    CausalLMTask,
    ClassificationTask,
    SequenceClassificationTask,
    export_view,
    logits_of,
    resolve_task,
)

pytest.importorskip("transformers")

from tests.stages.hf_cases import bert_config, gpt2_config, llama_config  # noqa: E402


def test_causal_lm_loss_counts_only_real_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [4, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask}
    task = CausalLMTask()
    # sample 0: positions 0..2 predict 2, 3, 4; sample 1: position 0 predicts 3; nothing else
    pairs = [(0, 0, 2), (0, 1, 3), (0, 2, 4), (1, 0, 3)]
    by_hand = torch.stack([F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in pairs]).mean()
    assert torch.allclose(task.loss(logits, batch), by_hand)
    assert int(task.loss_units(batch)) == 4
    sums = task.metric_sums(logits, batch)
    assert task.metric_value(sums.tolist()) == pytest.approx(math.exp(float(by_hand)), rel=1e-6)
    # what the trainer records from the loss it already has equals the metric's own sums
    assert torch.allclose(task.train_metric_sums(logits, batch, task.loss(logits, batch), 0.0), sums)
    # changing a padded position's logits or ids changes nothing
    logits2, ids2 = logits.clone(), ids.clone()
    logits2[1, 1:] += 100.0
    ids2[1, 2:] = 2
    assert torch.allclose(task.loss(logits2, {"input_ids": ids2, "attention_mask": mask}), by_hand)


def test_accuracy_tasks_count_correct_labels():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    sums = ClassificationTask().metric_sums(logits, (torch.zeros(3, 1), labels))
    assert sums.tolist() == [2, 3]
    seq = SequenceClassificationTask()
    batch = {"input_ids": torch.ones(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2, dtype=torch.long),
             "labels": labels}
    assert seq.metric_value(seq.metric_sums(logits, batch).tolist()) == pytest.approx(2 / 3)
    assert torch.allclose(seq.loss(logits, batch), F.cross_entropy(logits, labels))


def _padded_pair(vocab: int, long: int = 12, short: int = 7, pad: int = 1):
    torch.manual_seed(1)
    a = torch.randint(3, vocab, (long,))
    b = torch.randint(3, vocab, (short,))
    ids = torch.full((2, long), pad)
    mask = torch.zeros(2, long, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :short], mask[1, :short] = b, 1
    return a, b, {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("config", [gpt2_config, llama_config], ids=["gpt2", "llama"])
def test_causal_lm_loss_and_perplexity_do_not_depend_on_padding(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    task = CausalLMTask()
    a, b, batch = _padded_pair(model.config.vocab_size)
    with torch.no_grad():
        padded = task.metric_sums(task.forward(model, batch), batch)
        alone = sum(task.metric_sums(task.forward(model, s), s) for s in (
            {"input_ids": a[None], "attention_mask": torch.ones(1, len(a), dtype=torch.long)},
            {"input_ids": b[None], "attention_mask": torch.ones(1, len(b), dtype=torch.long)}))
    assert padded[1] == alone[1] == len(a) - 1 + len(b) - 1
    assert torch.allclose(padded, alone, rtol=1e-5)
    # more padding on the right: same sums
    wider = {k: F.pad(v, (0, 5), value=1 if k == "input_ids" else 0) for k, v in batch.items()}
    with torch.no_grad():
        assert torch.allclose(task.metric_sums(task.forward(model, wider), wider), padded, rtol=1e-5)


def test_sequence_classification_logits_do_not_depend_on_padding():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(bert_config()).eval()
    task = SequenceClassificationTask()
    a, b, batch = _padded_pair(model.config.vocab_size)
    batch["labels"] = torch.tensor([0, 2])
    with torch.no_grad():
        padded = task.forward(model, batch)
        short = task.forward(model, {"input_ids": b[None], "attention_mask": torch.ones(1, len(b), dtype=torch.long)})
    assert torch.allclose(padded[1], short[0], atol=1e-5)


def test_export_view_takes_positional_inputs_and_keeps_parameter_names():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt2_config()).eval()
    task = CausalLMTask()
    names = [n for n, _ in model.named_parameters()]
    _, _, batch = _padded_pair(model.config.vocab_size)
    with torch.no_grad():
        expected = model(**batch).logits
        with export_view(model, task) as view:
            assert view is model and [n for n, _ in view.named_parameters()] == names
            got = view(batch["input_ids"], batch["attention_mask"])
            import inspect

            assert list(inspect.signature(view.forward).parameters) == ["input_ids", "attention_mask"]
    assert torch.equal(got, expected)
    assert "forward" not in model.__dict__  # removed afterwards
    assert torch.equal(logits_of(model(**batch)), expected)


def test_resolve_task_names_the_valid_ones():
    assert set(TASKS.names()) >= {"classification", "sequence_classification", "causal_lm"}
    with pytest.raises(StageError, match="causal_lm"):
        resolve_task("language_modeling")
    with pytest.raises(StageError, match="must return an instance"):
        resolve_task("builtins:dict")


def test_logits_of_refuses_an_output_without_logits():
    with pytest.raises(StageError, match="logits"):
        logits_of({"hidden": torch.zeros(1)})
