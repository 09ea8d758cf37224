"""model.weights: every checkpoint layout users bring, strict matching with listed keys, the
classifier-head option, and files that try to run code."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from stages.base import StageError
from stages.checkpoints import load_weights
from stages.model import ModelConfig, build, build_model


def _net(classes: int = 10, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="small_cnn"), (1, 8, 8), classes)


def _trained() -> dict[str, torch.Tensor]:
    model = _net()
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8))  # train-mode pass: BN buffers differ from a fresh init
        for p in model.parameters():
            p.add_(1.0)
    return model.state_dict()


def _prefixed(state: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state.items())


def _compiled(state: dict) -> dict:
    """The state dict of torch.compile(model) (an OptimizedModule; nothing is compiled)."""
    model = _net()
    model.load_state_dict(state)
    return torch.compile(model).state_dict()


LAYOUTS = {
    "plain": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 90, "arch": "small_cnn"},
    "model_state_dict": lambda s: {"model_state_dict": s, "optimizer_state_dict": {"lr": 0.1}},
    "model+args": lambda s: {"model": s, "args": argparse.Namespace(lr=0.1, epochs=90),
                             "best_acc": np.float64(0.76), "epoch": 89},  # torchvision references
    "ddp": lambda s: _prefixed(s, "module."),
    "compiled": _compiled,
    "ddp+compiled nested": lambda s: {"state_dict": _prefixed(s, "module._orig_mod.")},
    "ema only": lambda s: {"model_ema": {**_prefixed(s, "module."), "n_averaged": torch.tensor(5)}},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("suffix", [".pt", ".pth.tar"])
def test_every_layout_loads_exactly(tmp_path: Path, layout: str, suffix: str) -> None:
    state = _trained()
    path = tmp_path / f"w{suffix}"
    torch.save(LAYOUTS[layout](state), path)
    result = build(ModelConfig(name="small_cnn", weights=str(path)), (1, 8, 8), 10)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    report = result.weights
    assert report is not None and report.tensors == len(state) and report.reinitialised_head is None
    assert ("module." in report.stripped_prefixes) == (layout in ("ddp", "ddp+compiled nested", "ema only"))
    assert ("_orig_mod." in report.stripped_prefixes) == ("compiled" in layout)
    assert report.dropped_keys == (["n_averaged"] if layout == "ema only" else [])


def test_safetensors_with_ddp_prefix(tmp_path: Path) -> None:
    state = _trained()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _prefixed(state, "module.").items()}, str(path))
    result = build(ModelConfig(name="small_cnn", weights=str(path)), (1, 8, 8), 10)
    assert all(torch.equal(v, state[k]) for k, v in result.model.state_dict().items())
    assert result.weights is not None and result.weights.source == "checkpoint"


def test_weights_key_picks_the_ema_weights(tmp_path: Path) -> None:
    raw, ema = _trained(), _net(seed=7).state_dict()
    torch.save({"state_dict": raw, "state_dict_ema": ema}, tmp_path / "timm.pth.tar")
    auto = build(ModelConfig(name="small_cnn", weights=str(tmp_path / "timm.pth.tar")), (1, 8, 8), 10)
    assert torch.equal(auto.model.state_dict()["0.0.weight"], raw["0.0.weight"])
    picked = build(ModelConfig(name="small_cnn", weights=str(tmp_path / "timm.pth.tar"),
                               weights_key="state_dict_ema"), (1, 8, 8), 10)
    assert torch.equal(picked.model.state_dict()["0.0.weight"], ema["0.0.weight"])
    assert picked.weights is not None and picked.weights.source == "checkpoint['state_dict_ema']"
    with pytest.raises(StageError, match=r"no 'ema' in checkpoint \(has \['state_dict', 'state_dict_ema'\]\)"):
        build(ModelConfig(name="small_cnn", weights=str(tmp_path / "timm.pth.tar"), weights_key="ema"),
              (1, 8, 8), 10)


def test_strict_errors_list_keys_with_counts(tmp_path: Path) -> None:
    state = dict(_trained())
    del state["0.0.weight"]
    state.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    state["3.0.weight"] = torch.zeros(5, 5, 3, 3)
    torch.save({"model": _prefixed(state, "module.")}, tmp_path / "bad.pt")
    with pytest.raises(StageError) as info:
        build_model(ModelConfig(name="small_cnn", weights=str(tmp_path / "bad.pt")), (1, 8, 8), 10)
    message = str(info.value)
    assert "(read checkpoint['model'], module. prefixes removed)" in message
    assert "missing (1): 0.0.weight" in message
    assert "unexpected (7): extra.0, extra.1, extra.2, extra.3, extra.4 (+2 more)" in message
    assert "shape mismatch (1): 3.0.weight: file (5, 5, 3, 3) vs model (64, 32, 3, 3)" in message
    assert "model.reinit_head: true" in message  # the hint for a new label set


def test_reinit_head_for_a_new_label_set(tmp_path: Path) -> None:
    source = _trained()  # 10 classes
    torch.save({"state_dict": source}, tmp_path / "imagenet.pt")
    cfg = {"name": "small_cnn", "weights": str(tmp_path / "imagenet.pt")}
    with pytest.raises(StageError, match=r"shape mismatch \(2\): 6\.weight: file \(10, 64\) vs model \(3, 64\)"):
        build(ModelConfig(**cfg), (1, 8, 8), 3)
    fresh = _net(classes=3, seed=4).state_dict()
    torch.manual_seed(4)
    result = build(ModelConfig(**cfg, reinit_head=True), (1, 8, 8), 3)
    state = result.model.state_dict()
    assert torch.equal(state["6.weight"], fresh["6.weight"])  # the head keeps its seeded init
    assert all(torch.equal(state[k], source[k]) for k in state if not k.startswith("6."))
    assert result.weights is not None and result.weights.reinitialised_head == "6"
    assert result.weights.reinitialised_keys == ["6.weight", "6.bias"]
    # same label count: the head loads too, nothing is re-initialised
    same = build(ModelConfig(**cfg, reinit_head=True), (1, 8, 8), 10)
    assert same.weights is not None and same.weights.reinitialised_head is None
    assert torch.equal(same.model.state_dict()["6.weight"], source["6.weight"])
    # a named module is never loaded, whatever its shape
    named = build(ModelConfig(**cfg, reinit_head="6"), (1, 8, 8), 10)
    assert named.weights is not None and named.weights.reinitialised_head == "6"
    assert not torch.equal(named.model.state_dict()["6.weight"], source["6.weight"])


def test_reinit_head_refuses_a_mismatch_elsewhere(tmp_path: Path) -> None:
    wide = build_model(ModelConfig(name="small_cnn", options={"width": 32}), (1, 8, 8), 10)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    cfg = {"name": "small_cnn", "weights": str(tmp_path / "wide.pt")}
    with pytest.raises(StageError, match=r"reinit_head: true only skips the last layer \('6'\)"):
        build(ModelConfig(**cfg, reinit_head=True), (1, 8, 8), 10)
    with pytest.raises(StageError, match=r"no module 'fc' with parameters \(its last one is '6'\)"):
        build(ModelConfig(**cfg, reinit_head="fc"), (1, 8, 8), 10)
    with pytest.raises(ValidationError, match="reinit_head need model.weights"):
        ModelConfig(name="small_cnn", reinit_head=True)
    with pytest.raises(ValidationError, match="weights_key need model.weights"):
        ModelConfig(name="small_cnn", weights_key="ema")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _trained(), "hook": _Evil(marker)}, tmp_path / "zip.pt")
    with (tmp_path / "legacy.pth").open("wb") as fh:  # a bare pickle, not torch's zip format
        pickle.dump({"state_dict": _Evil(marker)}, fh, protocol=2)
    for name in ("zip.pt", "legacy.pth"):
        with pytest.raises(StageError, match=r"holds a Python object \((posix|nt)\.system\) that "
                                             r"loading could execute; only tensors"):
            load_weights(_net(), tmp_path / name)
    assert not marker.exists()


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pt")
    with pytest.raises(StageError, match=r"does not hold a state dict of tensors at checkpoint "
                                         r"\(found keys \['epoch', 'optimizer'\]\)"):
        load_weights(_net(), tmp_path / "no_weights.pt")
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(StageError, match="cannot read weights file"):
        load_weights(_net(), tmp_path / "w.safetensors")


# --------------------------------------------------------------------------- timm


def test_timm_names_resolve_through_create_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm itself needs torchvision, which this environment lacks: a stand-in module checks
    what the zoo asks of it."""
    calls = []

    def create_model(name, pretrained, num_classes, in_chans, **kw):
        calls.append((name, pretrained, num_classes, in_chans, kw))
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    fake = types.SimpleNamespace(
        __version__="1.0.0", create_model=create_model,
        is_model=lambda n: n.split(".")[0] in ("resnet18", "vit_tiny_patch16_224"),
        list_models=lambda: ["resnet18", "vit_tiny_patch16_224"],
    )
    monkeypatch.setitem(sys.modules, "timm", fake)
    build_model(ModelConfig(name="timm:vit_tiny_patch16_224", options={"img_size": 32}), (3, 32, 32), 7)
    assert calls == [("vit_tiny_patch16_224", False, 7, 3, {"img_size": 32})]
    with pytest.raises(StageError, match="unknown timm model 'resnet81'; close names: resnet18; timm 1.0.0 has 2"):
        build_model(ModelConfig(name="timm:resnet81"), (3, 32, 32), 7)
    with pytest.raises(StageError, match="option.s. pretrained are set by the pipeline"):
        build_model(ModelConfig(name="timm:resnet18", options={"pretrained": True}), (3, 32, 32), 7)
    with pytest.raises(StageError, match=r"expects images \(C, H, W\)"):
        build_model(ModelConfig(name="timm:resnet18"), (1, 40), 7)


@pytest.mark.parametrize("blocked", ["timm", "torchvision"])
def test_timm_missing_says_which_package_and_extra(monkeypatch: pytest.MonkeyPatch, blocked: str) -> None:
    if blocked == "torchvision":  # timm installed, its torchvision import fails
        def failing_import(name, *args, **kwargs):
            if name == "timm":
                raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
            return real_import(name, *args, **kwargs)

        import importlib

        real_import = importlib.import_module
        monkeypatch.setattr(importlib, "import_module", failing_import)
    else:
        monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(StageError, match=rf"model 'timm:resnet18' needs {blocked}, which is not "
                                         r"installed; install optg-pipeline\[timm\]"):
        build_model(ModelConfig(name="timm:resnet18"), (3, 32, 32), 7)
