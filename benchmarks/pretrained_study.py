"""Which from-pretrained remedy for OptG: candidates side by side on a shipped config.

For a config with a dense `train` phase (quickstart, mnist1d_optg95), the dense phase runs once
per (config, seed) and is cached (`<out>/dense_<config>_<seed>.pt`, a state dict of tensors);
every candidate then runs the config's sparse phase from those weights with its `sparsity`
overrides. Per candidate: train loss per sparse epoch, its peak, the loss at the end of the
dense phase, the guard's loss rise per mask update, final test accuracy of the baked model.
Results are cached per (config, seed, candidate, overrides) in `<out>/study_runs.json`.

    python benchmarks/pretrained_study.py --config configs/quickstart.yaml --out benchmarks/results/pretrained_study
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from optg import LossGuard, supervised
from stages.data import DataConfig, load_data
from stages.model import ModelConfig, build_model
from stages.sparsify import SparsityConfig, build_sparsifier
from stages.train import TrainConfig, Trainer, evaluate

CPU = torch.device("cpu")


def load_config(config: Path) -> SimpleNamespace:
    """The config as the pipeline resolves it (`optg check --json`: strict YAML, sparse keys
    inherited from `train`), typed by the stages' own config classes. Benchmarks use the CLI,
    never `pipeline` internals."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", str(config), "--json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config}: optg check failed:\n{proc.stdout}{proc.stderr}")
    raw = json.loads(proc.stdout)["config"]
    return SimpleNamespace(name=raw["name"], data=DataConfig.model_validate(raw["data"]),
                           model=ModelConfig.model_validate(raw["model"]),
                           train=TrainConfig.model_validate(raw["train"]) if raw.get("train") else None,
                           sparsity=SparsityConfig.model_validate(raw["sparsity"]))
# name -> sparsity overrides (every candidate also gets `start` as written)
CANDIDATES: dict[str, dict[str, Any]] = {
    "authors": {"start": "scratch"},
    "decoupled_lr": {"start": "scratch", "score_lr_coupled": False},
    "warmup": {"start": "scratch", "score_warmup_steps": "auto", "score_lr_coupled": False},
    "every10": {"start": "scratch", "update_every_steps": 10},
    "layer_norm": {"start": "scratch", "score_normalization": "layer", "score_lr_coupled": False},
    "prior1": {"start": "scratch", "score_init": "magnitude", "score_init_scale": 1.0, "score_lr_coupled": False},
    "prior0.1": {"start": "scratch", "score_init": "magnitude", "score_init_scale": 0.1, "score_lr_coupled": False},
    "prior0.01": {"start": "scratch", "score_init": "magnitude", "score_init_scale": 0.01, "score_lr_coupled": False},
    "swap1%": {"start": "scratch", "max_swap_fraction": 0.01, "score_lr_coupled": False},
    "warmup+prior1": {"start": "scratch", "score_warmup_steps": "auto", "score_init": "magnitude",
                      "score_init_scale": 1.0, "score_lr_coupled": False},
    "warmup+prior0.1": {"start": "scratch", "score_warmup_steps": "auto", "score_init": "magnitude",
                        "score_init_scale": 0.1, "score_lr_coupled": False},
    "prior1+cubic": {"start": "scratch", "score_init": "magnitude", "score_init_scale": 1.0,
                     "score_lr_coupled": False, "schedule": {"name": "cubic"}},
    "live1": {"start": "scratch", "score_init": "live", "score_init_scale": 1.0, "score_lr_coupled": False},
    "live0.1": {"start": "scratch", "score_init": "live", "score_init_scale": 0.1, "score_lr_coupled": False},
    "live0.01": {"start": "scratch", "score_init": "live", "score_init_scale": 0.01, "score_lr_coupled": False},
    "prior0.001": {"start": "scratch", "score_init": "magnitude", "score_init_scale": 0.001, "score_lr_coupled": False},
    "pretrained": {"start": "pretrained"},
    "gmp": {"start": "scratch", "method": "gmp"},
}


def run(config: Path, seed: int, name: str, overrides: dict[str, Any], out: Path,
        target: float | None = None) -> dict[str, Any]:
    cfg = load_config(config)
    bundle = load_data(cfg.data, seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    dense_path = out / f"dense_{cfg.name}_{seed}.pt"
    if dense_path.exists():
        state = torch.load(dense_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        dense_hist = state["history"]
    else:
        trainer = Trainer(model, bundle, cfg.train, phase="dense", device=CPU, seed=seed,
                          batch_size=cfg.data.batch_size, log=lambda _: None)
        dense_hist = [r.train_loss for r in trainer.run()]
        torch.save({"model": model.state_dict(), "history": dense_hist}, dense_path)
    dense_acc = evaluate(model, bundle, "test", CPU)
    steps = len(bundle.loader("train", cfg.data.batch_size, shuffle=True))
    raw = {**cfg.sparsity.model_dump(exclude_unset=True), **overrides,
           **({"target": target} if target is not None else {})}
    assert cfg.sparsity.train is not None, f"{config}: the study needs a sparse phase (sparsity.train)"
    if raw.get("score_warmup_steps") == "auto":
        raw["score_warmup_steps"] = int(0.1 * steps * cfg.sparsity.train.epochs)
    if raw.get("method", "optg") != "optg":
        raw = {k: v for k, v in raw.items() if not k.startswith("score_") and k != "optg"}
    # keys of `sparsity:` build the config; the candidates' other knobs are library keyword
    # arguments (the YAML does not take them: measured, not adopted)
    keys = set(SparsityConfig.model_fields)
    scfg = SparsityConfig.model_validate({k: v for k, v in raw.items() if k in keys})
    library = {k: v for k, v in raw.items() if k not in keys}
    started = time.perf_counter()
    sp = build_sparsifier(model, scfg, steps_per_epoch=steps, seed=seed, from_trained=True, library=library)
    assert scfg.train is not None
    trainer = Trainer(model, bundle, scfg.train, phase="sparse", device=CPU, seed=seed,
                      batch_size=cfg.data.batch_size, sparsifier=sp, log=lambda _: None)
    if trainer.guard is None:  # every candidate is measured by the guard, warnings or not
        batches = [b for _, b in zip(range(2), bundle.loader("train", cfg.data.batch_size, shuffle=True, seed=seed))]
        trainer.guard = LossGuard(batches, supervised(F.cross_entropy), 0.5)
        sp.add_mask_hook(trainer.guard)
    history = trainer.run()
    sp.bake()
    losses = [r.train_loss for r in history]
    return {"config": cfg.name, "seed": seed, "candidate": name, "overrides": overrides,
            "dense_end_loss": dense_hist[-1], "dense_accuracy": dense_acc,
            "losses": [round(v, 4) for v in losses], "peak_loss": max(losses),
            "guard_deltas": [round(e.delta, 4) for e in trainer.guard.events],
            "sparsity": sp.sparsity(), "test_accuracy": evaluate(model, bundle, "test", CPU),
            "seconds": time.perf_counter() - started, "spec": sp.spec.model_dump(mode="json", exclude={"optimizer"})}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--target", type=float, help="override the config's unstructured target")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrained_study"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    cache_path = a.out / "study_runs.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for seed in a.seeds:
        for name in a.candidates:
            key = json.dumps({"config": str(a.config), "seed": seed, "candidate": name,
                              "overrides": CANDIDATES[name], "target": a.target}, sort_keys=True)
            if key not in cache:
                cache[key] = run(a.config, seed, name, CANDIDATES[name], a.out, a.target)
                cache = {**(json.loads(cache_path.read_text()) if cache_path.exists() else {}), key: cache[key]}
                cache_path.write_text(json.dumps(cache, indent=0, sort_keys=True))
            r = cache[key]
            print(f"{r['config']} {a.target or ''} seed {seed} {name:16s} peak {r['peak_loss']:.3f} (dense end "
                  f"{r['dense_end_loss']:.3f}) test {100 * r['test_accuracy']:.2f} (dense "
                  f"{100 * r['dense_accuracy']:.2f}) max guard rise {max(r['guard_deltas'], default=0):.3f} "
                  f"losses {r['losses']}", flush=True)


if __name__ == "__main__":
    main()
