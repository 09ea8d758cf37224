"""Transformers through the whole pipeline on CPU: Hugging Face folders built in the test
(LLaMA and GPT-2 causal LMs, a BERT classifier) with text folders, the shipped text configs
shortened, the config errors a text run can make (exit 2, nothing written), and pickled weights
that are refused and never unpickled."""
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("transformers")

from pipeline.cli import main  # noqa: E402
from tests.pipeline.conftest import write_config  # noqa: E402
from tests.stages.hf_cases import (  # noqa: E402
    bert_config,
    gpt2_config,
    llama_config,
    save_folder,
    text_folder,
)

ROOT = Path(__file__).resolve().parents[2]


def _causal(model_dir: Path, data_dir: Path, **extra) -> dict:
    cfg = {
        "name": "text_lm", "seed": 0, "task": "causal_lm",
        "data": {"name": "text", "path": str(data_dir), "options": {"seq_len": 32}, "batch_size": 16},
        "model": {"name": f"hf:{model_dir}"},
        "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 3e-3}},
        "sparsity": {"method": "optg", "pattern": "2:4", "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 1e-3}}},
        "validate": {"max_perplexity_increase": 5.0},
        "verify": {"num_samples": 8},
        "benchmark": {"enabled": False},
    }
    cfg.update(extra)
    return cfg


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    return text_folder(tmp_path_factory.mktemp("lmdata"))


@pytest.mark.parametrize("config", [llama_config, gpt2_config], ids=["llama", "gpt2"])
def test_causal_lm_run_exports_token_onnx_that_matches_pytorch(tmp_path, lm_data, config, capsys):
    folder = save_folder(tmp_path / "model", config(), "AutoModelForCausalLM")
    path = write_config(tmp_path / "lm.yaml", _causal(folder, lm_data))
    run = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    m = _manifest(run)
    metrics = m["metrics"]
    assert (metrics["task"], metrics["metric"]) == ("causal_lm", "perplexity")
    assert metrics["dense_perplexity"] > 1 and metrics["sparse_perplexity"] > 1
    assert metrics["perplexity_increase"] == pytest.approx(
        metrics["sparse_perplexity"] / metrics["dense_perplexity"] - 1, rel=1e-6)
    assert "dense_accuracy" not in metrics or metrics["dense_accuracy"] is None
    assert "tokenizer.json" in m["artifacts"] and (run / "tokenizer.json").is_file()
    assert m["history"][0].get("val_perplexity") is not None
    # every attention and MLP weight is 2:4 in PyTorch; the embedding and the head are dense
    layers = {l["parameter"]: l for l in metrics["layers"]}
    sparse = [n for n, l in layers.items() if l["pattern"] == "2:4"]
    assert len(sparse) >= 4
    # the file: int64 input_ids/attention_mask, dynamic batch and sequence, inspect-clean
    proto = onnx.load(str(run / "model.onnx"))
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in t.shape.dim] == ["batch", "sequence"]
    assert main(["inspect", str(run / "model.onnx"), "--pattern", "2:4"]) == 0, capsys.readouterr()
    assert "2:4 coverage:" in capsys.readouterr().out
    # the dense head (tied or output head) is the only weight MACs off the pattern
    assert 0.2 < metrics["pattern_coverage"] < 1.0 or m["metrics"]["pattern_coverage"] is not None
    # verify compared two sequence lengths
    shapes = {tuple(r["input_shape"]) for r in m["verify"]["outputs"]}
    assert len({s[1] for s in shapes}) == 2
    # ORT on a batch with padding gives the baked PyTorch model's logits
    from transformers import AutoModelForCausalLM

    from stages.bake import load_safetensors

    model = AutoModelForCausalLM.from_config(config())
    load_safetensors(model, run / "model.safetensors")
    model.eval()
    ids = torch.randint(3, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    real = mask.numpy().astype(bool)
    assert np.abs(got - want)[real].max() < 1e-3


def test_sequence_classification_run_on_a_jsonl_folder(tmp_path, capsys):
    folder = save_folder(tmp_path / "bert", bert_config(), "AutoModelForSequenceClassification")
    data = text_folder(tmp_path / "data", labelled=True)
    cfg = {
        "name": "text_cls", "seed": 0, "task": "sequence_classification",
        "data": {"name": "text", "path": str(data), "options": {"seq_len": 32}, "batch_size": 16},
        "model": {"name": f"hf:{folder}"},
        "sparsity": {"method": "optg", "pattern": "2:4", "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 1e-3}}},
        "validate": {"max_accuracy_drop": 1.0},
        "verify": {"num_samples": 8},
        "benchmark": {"enabled": False},
    }
    run = tmp_path / "run"
    assert main(["run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(run), "--quiet"]) == 0, \
        capsys.readouterr().err
    m = _manifest(run)
    assert (m["metrics"]["task"], m["metrics"]["metric"]) == ("sequence_classification", "accuracy")
    assert 0 <= m["metrics"]["sparse_accuracy"] <= 1
    assert m["deployment"]["outputs"][0]["shape"][1] == 3
    assert main(["inspect", str(run / "model.onnx"), "--pattern", "2:4"]) == 0


def test_causal_lm_int8_file_keeps_2_4_on_every_projection(tmp_path, lm_data, capsys):
    folder = save_folder(tmp_path / "model", llama_config(), "AutoModelForCausalLM")
    path = write_config(tmp_path / "lm.yaml", _causal(folder, lm_data, export={"quantize": "int8"}))
    run = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    m = _manifest(run)
    rows = m["verify"]["quantized"]
    required = [r for r in rows if r["required"]]  # q, k, v, o, gate, up, down per layer; lm_head dense
    assert len(required) == 7 * llama_config().num_hidden_layers and len(rows) == len(required) + 1
    assert all(r["op"] == "MatMul" and r["sparse_int8_form"] for r in rows)
    assert all(r["pattern_ok"] for r in required)
    files = {r["file"]: r for r in m["metrics"]["onnx"]}
    assert files["model.int8.onnx"]["metric"] == "perplexity" and files["model.int8.onnx"]["value"] > 1
    capsys.readouterr()
    assert main(["inspect", str(run / "model.int8.onnx"), "--pattern", "2:4"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", ["text_quickstart.yaml", "text_classify.yaml"])
def test_shipped_text_configs_run_shortened(tmp_path, name, capsys):
    run = tmp_path / "run"
    gate = "validate.max_perplexity_increase=100" if "quickstart" in name else "validate.max_accuracy_drop=1.0"
    sets = ["train.epochs=1", "train.warmup_epochs=0", "sparsity.train.epochs=1", gate, "benchmark.enabled=false"]
    code = main(["run", str(ROOT / "configs" / name), "--out", str(run), "--quiet",
                 *(arg for s in sets for arg in ("--set", s))])
    assert code == 0, capsys.readouterr().err
    assert _manifest(run)["verify"]["passed"] is True


class _Planted:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path, lm_data, capsys):
    marker = tmp_path / "EXECUTED"
    only_pickle = save_folder(tmp_path / "pickled", llama_config(), "AutoModelForCausalLM", weights=False)
    (only_pickle / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    path = write_config(tmp_path / "c.yaml", _causal(only_pickle, lm_data))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds only pickled weights (pytorch_model.bin)" in err and "safetensors" in err
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert not (tmp_path / "run").exists()
    # beside safetensors the pickle is ignored: the run loads the safetensors and never the .bin
    both = save_folder(tmp_path / "both", llama_config(), "AutoModelForCausalLM")
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    from stages.hf import load_model

    load_model(both, "AutoModelForCausalLM", "causal_lm")
    assert not marker.exists()


def _errors(tmp_path, capsys, cfg) -> str:
    path = write_config(tmp_path / "bad.yaml", cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "never"), "--quiet"]) == 2
    assert not (tmp_path / "never").exists()
    return capsys.readouterr().err


def test_text_config_errors_exit_2_before_anything_is_written(tmp_path, lm_data, capsys):
    folder = save_folder(tmp_path / "model", llama_config(), "AutoModelForCausalLM", weights=False)
    err = _errors(tmp_path, capsys, _causal(folder, lm_data, data={
        "name": "text", "path": str(lm_data), "options": {"seq_len": 128}}))
    assert "data.options.seq_len: 128 is over the model's max_position_embeddings=64" in err
    err = _errors(tmp_path, capsys, _causal(folder, lm_data, validate={"max_accuracy_drop": 0.01}))
    assert "max_accuracy_drop" in err and "perplexity" in err
    err = _errors(tmp_path, capsys, _causal(folder, lm_data, data={"name": "digits"}))
    assert "holds tensors, not text" in err
    err = _errors(tmp_path, capsys, _causal(folder, lm_data, structured={"ratio": 0.5}))
    assert "structured" in err and "causal_lm" in err
    bare = tmp_path / "bare"
    save_folder(bare, llama_config(), "AutoModelForCausalLM", weights=False, tokenizer=False)
    err = _errors(tmp_path, capsys, _causal(bare, lm_data))
    assert "no tokenizer found" in err
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    err = _errors(tmp_path, capsys, _causal(bare, lm_data))
    assert "auto_map" in err and "never" in err
    err = _errors(tmp_path, capsys, _causal(folder, lm_data, task="classification", data={"name": "digits"},
                                            validate={}))
    assert "model_type 'llama' has no AutoModelForImageClassification" in err


def test_causal_lm_under_torchrun_equals_one_process(tmp_path, lm_data, capsys):
    """Two gloo ranks through torchrun train the causal LM like one process (token batches
    split over the ranks, the loss averaged over non-padding tokens of the global batch)."""
    import os
    import subprocess
    import sys

    folder = save_folder(tmp_path / "model", llama_config(), "AutoModelForCausalLM")
    cfg = _causal(folder, lm_data, export={"enabled": False}, verify={"enabled": False})
    cfg["train"]["epochs"], cfg["sparsity"]["train"]["epochs"] = 1, 1
    path = write_config(tmp_path / "lm.yaml", cfg)
    one = tmp_path / "one"
    assert main(["run", str(path), "--out", str(one), "--quiet"]) == 0, capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", OPTG_DIST_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--max-restarts=0", "--standalone",
                           "--nproc-per-node=2", "-m", "pipeline.cli", "run", str(path), "--out", str(two), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _manifest(one), _manifest(two)
    assert b["distributed"]["world_size"] == 2 and b["metrics"]["metric"] == "perplexity"
    assert b["metrics"]["sparse_perplexity"] == pytest.approx(a["metrics"]["sparse_perplexity"], rel=1e-3)
    assert b["metrics"]["dense_perplexity"] == pytest.approx(a["metrics"]["dense_perplexity"], rel=1e-3)
