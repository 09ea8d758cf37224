"""Accuracy of OptG and its peers at equal budgets: unstructured 90-99% and N:M patterns.

Protocol (also in RESULTS.md): for every (dataset, seed) the data split, the model's initial
weights and the batch order depend only on the seed. Dense and every from-scratch sparse method
(optg, gmp, snip, random, srste) train E epochs with the same optimiser and cosine schedule.
`oneshot` (NVIDIA ASP) needs a trained model: it takes the dense run of the same seed (E epochs),
prunes it once by magnitude to N:M and fine-tunes E more epochs with the mask held and the same
schedule, so it spends 2E epochs; the tables say so. Reported: test accuracy after the last epoch
(no early stopping; val is only logged), of the baked model, whose sparsity is checked.

`--protocol pretrained` (see `PretrainedSuite`): per (dataset, seed) one dense model is trained
once and cached; every method fine-tunes a copy of it for the same epochs with the same
optimiser: `optg` (the library's `start: auto`, i.e. the pretrained mode), `optg_authors` (OptG
as its authors run it, `start: scratch`), `gmp`, `oneshot` (ASP) and `srste`.

Every run is cached in `<out>/accuracy_runs.json` under a key of all its settings, so an
interrupted suite continues where it stopped and changed settings never reuse stale runs.

    python benchmarks/accuracy.py --out benchmarks/results                 # full suite
    python benchmarks/accuracy.py --quick --out /tmp/acc                   # < 60 s smoke run
    python benchmarks/accuracy.py --protocol pretrained --out benchmarks/results/pretrained
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.io import atomic_torch_save

from optg.schedules import SigmoidSchedule
from stages.data import DataBundle, DataConfig, load_data
from stages.io import atomic_write_text
from stages.model import ModelConfig, build_model
import optg
from stages.sparsify import SparsityConfig, build_sparsifier, calibrate_if_needed
from stages.train import OptimizerConfig, TrainConfig, Trainer, evaluate

DATASETS: dict[str, str] = {"mnist1d": "cnn1d", "digits": "small_cnn"}  # dataset -> model
UNSTRUCTURED_METHODS = ("optg", "gmp", "snip", "random")
NM_METHODS = ("optg", "oneshot", "srste")
ALL_METHODS = tuple(dict.fromkeys(("dense",) + UNSTRUCTURED_METHODS + NM_METHODS))
CPU = torch.device("cpu")


@dataclass(frozen=True)
class SparsePhase:
    """A method's sparse phase as the pipeline builds it: its `sparsity:` config, plus the
    `optg.SparsitySpec` keyword arguments the YAML does not take (OptG's experiment knobs:
    `score_lr_factor`, `update_every_steps`, ...), passed as `build_sparsifier(library=...)`."""

    config: SparsityConfig
    library: dict[str, Any]

    @classmethod
    def of(cls, train: TrainConfig, **fields: Any) -> "SparsePhase":
        """Keys of `sparsity:` go to the config, every other field to the library."""
        keys = set(SparsityConfig.model_fields)
        return cls(SparsityConfig(train=train, **{k: v for k, v in fields.items() if k in keys}),
                   {k: v for k, v in fields.items() if k not in keys})

    @property
    def train(self) -> TrainConfig:
        assert self.config.train is not None
        return self.config.train

    def spec(self) -> optg.SparsitySpec:
        return self.config.to_spec(**self.library)

    def build(self, model: nn.Module, steps: int, seed: int, from_trained: bool = False) -> optg.Sparsifier:
        return build_sparsifier(model, self.config, steps_per_epoch=steps, seed=seed, from_trained=from_trained,
                                library=self.library)


@dataclass(frozen=True)
class Protocol:
    """Training settings shared by every method of a suite (part of every cache key)."""

    epochs: int = 60
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 64
    warmup_epochs: int = 2
    # OptG experiment knobs (None: the library defaults)
    beta: float | None = None
    center: float | None = None
    final_epochs: int | None = None
    update_every_steps: int | None = None
    score_lr_scale: float = 1.0
    freeze_scores_last: int = 0
    # protocol knob for every method: module-name regexes left dense (e.g. the first conv)
    exclude: tuple[str, ...] = ()

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, warmup_epochs=min(self.warmup_epochs, self.epochs - 1),
                           optimizer=OptimizerConfig(lr=self.lr, weight_decay=self.weight_decay))

    def sparse_phase(self, method: str, pattern: str) -> SparsePhase:
        """The method's sparse phase; OptG's knobs (schedule, score lr factor and freeze) are
        spec fields, so the sparsifier is used exactly as the pipeline uses it."""
        unstructured = not _is_nm(pattern)
        optg_knobs = method == "optg"
        schedule = {k: v for k, v in (("beta", self.beta), ("center", self.center),
                                      ("final_epochs", self.final_epochs)) if v is not None}
        knobs = {"update_every_steps": self.update_every_steps, "score_lr_factor": self.score_lr_scale,
                 "freeze_scores_last": self.freeze_scores_last} if optg_knobs else {}
        return SparsePhase.of(
            self.train_config(), method=method, pattern="unstructured" if unstructured else pattern,
            target=float(pattern) if unstructured else None,
            schedule=schedule if optg_knobs else {}, exclude=list(self.exclude), **knobs)

    def key_fields(self, method: str) -> dict[str, Any]:
        """Settings that affect `method`: OptG knobs only enter OptG's keys, with the schedule's
        defaults resolved, so a change of the library defaults never reuses stale cached runs."""
        d = asdict(self)
        if not self.freeze_scores_last:
            d.pop("freeze_scores_last")  # added later: keeps the keys of earlier runs valid
        if not self.exclude:
            d.pop("exclude")
        else:
            d["exclude"] = list(self.exclude)
        if method == "optg":
            d.update(SigmoidSchedule(epochs=self.epochs, beta=self.beta, center=self.center,
                                     final_epochs=self.final_epochs).describe())
        else:
            for k in ("beta", "center", "final_epochs", "update_every_steps", "score_lr_scale",
                      "freeze_scores_last"):
                d.pop(k, None)
        return d


def _is_nm(pattern: str) -> bool:
    return ":" in pattern


def run_key(dataset: str, method: str, pattern: str, seed: int, proto: Protocol) -> str:
    return json.dumps({"dataset": dataset, "method": method, "pattern": pattern, "seed": seed,
                       **proto.key_fields(method)}, sort_keys=True)


class RunCache:
    """Per-run results in one JSON file. Each put re-reads the file under a lock and rewrites it
    atomically, so several suites (e.g. one per dataset) can share one --out concurrently."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.runs.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        lock = os.open(self.path.parent, os.O_RDONLY)  # lock the folder: no lock file left behind
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.runs = {**self._read(), key: record}
            atomic_write_text(self.path, json.dumps(self.runs, indent=0, sort_keys=True))
        finally:
            os.close(lock)


class Suite:
    """Runs (dataset, method, pattern, seed) cells, reusing the cache and in-process dense models."""

    def __init__(self, proto: Protocol, cache: RunCache, log=print) -> None:
        self.proto, self.cache, self.log = proto, cache, log
        self.bundles: dict[tuple[str, int], DataBundle] = {}
        self.dense_states: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def bundle(self, dataset: str, seed: int) -> DataBundle:
        if (dataset, seed) not in self.bundles:
            self.bundles[(dataset, seed)] = load_data(DataConfig(name=dataset), seed)
        return self.bundles[(dataset, seed)]

    def fresh_model(self, dataset: str, seed: int) -> nn.Module:
        bundle = self.bundle(dataset, seed)
        torch.manual_seed(seed)
        return build_model(ModelConfig(name=DATASETS[dataset]), bundle.input_shape, bundle.num_classes)

    def _trainer(self, model: nn.Module, bundle: DataBundle, cfg: TrainConfig, phase: str, seed: int,
                 sparsifier=None) -> Trainer:
        return Trainer(model, bundle, cfg, phase=phase, device=CPU, seed=seed,
                       batch_size=self.proto.batch_size, sparsifier=sparsifier, log=lambda _: None)

    def dense_model(self, dataset: str, seed: int) -> tuple[nn.Module, list]:
        """The dense run of this seed (ASP starts from it); trained once per process."""
        model = self.fresh_model(dataset, seed)
        if (dataset, seed) in self.dense_states:
            model.load_state_dict(self.dense_states[(dataset, seed)])
            return model, []
        history = self._trainer(model, self.bundle(dataset, seed), self.proto.train_config(),
                                "dense", seed).run()
        self.dense_states[(dataset, seed)] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, history

    def run(self, dataset: str, method: str, pattern: str, seed: int) -> dict[str, Any]:
        key = run_key(dataset, method, pattern, seed, self.proto)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        started = time.perf_counter()
        bundle = self.bundle(dataset, seed)
        epochs = self.proto.epochs
        layers: dict[str, float] = {}
        if method == "dense":
            model, history = self.dense_model(dataset, seed)
            sparsity = 0.0
        else:
            if method == "oneshot":
                model, _ = self.dense_model(dataset, seed)
                epochs *= 2
            else:
                model = self.fresh_model(dataset, seed)
            phase = self.proto.sparse_phase(method, pattern)
            steps = len(bundle.loader("train", self.proto.batch_size, shuffle=True, seed=0))
            sp = phase.build(model, steps, seed)
            calibrate_if_needed(sp, bundle.loader("train", self.proto.batch_size, shuffle=True, seed=seed), CPU)
            history = self._trainer(model, bundle, phase.train, "sparse", seed, sp).run()
            sp.bake()
            sparsity = sp.sparsity()
            layers = {r.name: round(r.sparsity, 4) for r in sp.report() if r.targeted}
        record = {"dataset": dataset, "model": DATASETS[dataset], "method": method, "pattern": pattern,
                  "seed": seed, "epochs_total": epochs,
                  "test_accuracy": evaluate(model, bundle, "test", CPU),
                  "val_accuracy": evaluate(model, bundle, "val", CPU),
                  "sparsity": sparsity, "layer_sparsity": layers, "seconds": time.perf_counter() - started,
                  "val_curve": [round(r.val_metric, 4) for r in history if r.val_metric is not None],
                  "settings": self.proto.key_fields(method)}
        self.cache.put(key, record)
        self.log(f"{dataset} {method} {pattern} seed {seed}: test {record['test_accuracy']:.4f} "
                 f"sparsity {sparsity:.4f} ({record['seconds']:.1f} s)")
        return record


# ----------------------------------------------------------------------------- from pretrained

PRETRAINED_UNSTRUCTURED = ("optg", "optg_authors", "gmp")
PRETRAINED_NM = ("optg", "optg_authors", "oneshot", "srste")
# dense_ft: the dense model fine-tuned with the same protocol, no sparsity: how much of a
# method's result is the extra training alone
PRETRAINED_METHODS = tuple(dict.fromkeys(("dense", "dense_ft") + PRETRAINED_UNSTRUCTURED + PRETRAINED_NM))
PRETRAINED_MODELS: dict[str, dict[str, Any]] = {"mnist1d": {"channels": 128}, "digits": {}}
FIRST_CONV = {"mnist1d": "^conv1$", "digits": r"^0\.0$"}  # left dense for every method
PRETRAINED_EPOCHS = {"mnist1d": (20, 20), "digits": (8, 12)}  # (dense, fine-tune), as the shipped configs


@dataclass(frozen=True)
class PretrainedProtocol:
    """From pretrained: a dense model trained `dense_epochs` at `dense_lr` (the dataset's shipped
    config), then every method fine-tunes it `epochs` at `lr` with the same SGD and cosine
    schedule (`warmup_epochs` linear warm-up). The first conv stays dense for every method."""

    dataset: str
    dense_epochs: int
    epochs: int
    dense_lr: float = 0.1
    lr: float = 0.05
    weight_decay: float = 5e-4
    batch_size: int = 64
    warmup_epochs: int = 1

    def dense_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.dense_epochs, warmup_epochs=min(self.warmup_epochs, self.dense_epochs - 1),
                           optimizer=OptimizerConfig(lr=self.dense_lr, weight_decay=self.weight_decay))

    def finetune_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, warmup_epochs=min(self.warmup_epochs, self.epochs - 1),
                           optimizer=OptimizerConfig(lr=self.lr, weight_decay=self.weight_decay))

    def sparse_phase(self, method: str, pattern: str, fields: dict[str, Any] | None = None) -> SparsePhase:
        """`fields`: spec fields set explicitly on this method (a candidate); for `optg` the
        pretrained preset then fills only the fields they leave unset."""
        train = self.finetune_config()
        nm = _is_nm(pattern)
        start = {"optg": {"start": "auto"}, "optg_authors": {"start": "scratch"}}.get(method, {})
        return SparsePhase.of(train, method="optg" if method.startswith("optg") else method,
                              pattern=pattern if nm else "unstructured", target=None if nm else float(pattern),
                              exclude=[FIRST_CONV[self.dataset]], **{**start, **(fields or {})})


class PretrainedSuite(Suite):
    """Cells of the from-pretrained protocol; the dense model of each (dataset, seed) is trained
    once and cached as a file in `<out>/dense_models/` (a state dict of tensors)."""

    def __init__(self, protocols: dict[str, PretrainedProtocol], cache: RunCache, out: Path, log=print,
                 candidates: dict[str, dict[str, Any]] | None = None) -> None:
        """candidates: per method name, spec fields set on it (`--optg-set`, `--gmp-set`)."""
        super().__init__(Protocol(), cache, log)
        self.protocols, self.out = protocols, out
        self.candidates = {m: fields for m, fields in (candidates or {}).items() if fields}

    def fresh_model(self, dataset: str, seed: int) -> nn.Module:
        bundle = self.bundle(dataset, seed)
        torch.manual_seed(seed)
        return build_model(ModelConfig(name=DATASETS[dataset], options=PRETRAINED_MODELS[dataset]),
                           bundle.input_shape, bundle.num_classes)

    def pretrained(self, dataset: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
        proto = self.protocols[dataset]
        tag = json.dumps({"dataset": dataset, "seed": seed, "model": PRETRAINED_MODELS[dataset],
                          **{k: v for k, v in asdict(proto).items() if k not in ("epochs", "lr")}}, sort_keys=True)
        path = self.out / "dense_models" / f"{dataset}_{seed}_{abs(hash_text(tag))}.pt"
        model = self.fresh_model(dataset, seed)
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            return model, state["info"]
        bundle = self.bundle(dataset, seed)
        history = Trainer(model, bundle, proto.dense_config(), phase="dense", device=CPU, seed=seed,
                          batch_size=proto.batch_size, log=lambda _: None).run()
        info = {"test_accuracy": evaluate(model, bundle, "test", CPU), "end_loss": history[-1].train_loss}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"model": model.state_dict(), "info": info}, path)
        return model, info

    def key(self, dataset: str, method: str, pattern: str, seed: int) -> str:
        proto = self.protocols[dataset]
        fields: dict[str, Any] = {"protocol": "pretrained", **asdict(proto), "model_options": PRETRAINED_MODELS[dataset]}
        if method.startswith("optg"):  # the settings in force, so a new default reruns these cells
            steps = math.ceil(len(self.bundle(dataset, seed).split("train")) / proto.batch_size)
            spec = proto.sparse_phase(method, pattern, self.candidates.get(method)).spec().for_start(True, steps)
            fields["optg"] = spec.model_dump(mode="json", include=set(OPTG_SETTINGS))
        elif method in self.candidates:
            fields[method] = self.candidates[method]
        return json.dumps({"dataset": dataset, "method": method, "pattern": pattern, "seed": seed, **fields},
                          sort_keys=True)

    def run(self, dataset: str, method: str, pattern: str, seed: int) -> dict[str, Any]:
        key = self.key(dataset, method, pattern, seed)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        started = time.perf_counter()
        proto, bundle = self.protocols[dataset], self.bundle(dataset, seed)
        model, info = self.pretrained(dataset, seed)
        history, sparsity, layers, deltas = [], 0.0, {}, []
        if method == "dense_ft":
            history = Trainer(model, bundle, proto.finetune_config(), phase="dense", device=CPU, seed=seed,
                              batch_size=proto.batch_size, log=lambda _: None).run()
        elif method != "dense":
            phase = proto.sparse_phase(method, pattern, self.candidates.get(method))
            steps = len(bundle.loader("train", proto.batch_size, shuffle=True, seed=0))
            sp = phase.build(model, steps, seed, from_trained=True)
            trainer = Trainer(model, bundle, phase.train, phase="sparse", device=CPU, seed=seed,
                              batch_size=proto.batch_size, sparsifier=sp, log=lambda _: None)
            history = trainer.run()
            deltas = [round(e.delta, 4) for e in trainer.guard.events] if trainer.guard else []
            sp.bake()
            sparsity = sp.sparsity()
            layers = {r.name: round(r.sparsity, 4) for r in sp.report() if r.targeted}
        record = {"dataset": dataset, "model": DATASETS[dataset], "method": method, "pattern": pattern,
                  "seed": seed, "epochs_total": proto.epochs, "protocol": "pretrained",
                  "test_accuracy": evaluate(model, bundle, "test", CPU) if method != "dense" else info["test_accuracy"],
                  "val_accuracy": evaluate(model, bundle, "val", CPU), "dense_end_loss": info["end_loss"],
                  "sparsity": sparsity, "layer_sparsity": layers, "seconds": time.perf_counter() - started,
                  "train_loss_curve": [round(r.train_loss, 4) for r in history], "guard_deltas": deltas,
                  "val_curve": [round(r.val_metric, 4) for r in history if r.val_metric is not None]}
        self.cache.put(key, record)
        self.log(f"[pretrained] {dataset} {method} {pattern} seed {seed}: test {record['test_accuracy']:.4f} "
                 f"sparsity {sparsity:.4f} peak loss {max(record['train_loss_curve'], default=0):.3f} "
                 f"({record['seconds']:.1f} s)")
        return record


OPTG_SETTINGS = ("start", "schedule", "update_every_steps", "score_momentum", "score_lr_factor",
                 "score_warmup_steps", "score_lr_coupled", "score_init", "score_init_scale",
                 "score_normalization", "max_swap_fraction")


def hash_text(text: str) -> int:
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def pretrained_cells(datasets: list[str], methods: list[str], sparsities: list[str],
                     patterns: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for d in datasets:
        out += [(d, m, "dense") for m in ("dense", "dense_ft") if m in methods]
        out += [(d, m, s) for s in sparsities for m in methods if m in PRETRAINED_UNSTRUCTURED]
        out += [(d, m, p) for p in patterns for m in methods if m in PRETRAINED_NM]
    return out


def cells(datasets: list[str], methods: list[str], sparsities: list[str], patterns: list[str],
          nm_datasets: list[str]) -> list[tuple[str, str, str]]:
    """(dataset, method, pattern) to run: unstructured methods x sparsities, N:M methods x patterns."""
    out = []
    for d in datasets:
        if "dense" in methods:
            out.append((d, "dense", "dense"))
        out += [(d, m, s) for s in sparsities for m in methods if m in UNSTRUCTURED_METHODS]
        if d in nm_datasets:
            out += [(d, m, p) for p in patterns for m in methods if m in NM_METHODS]
    return out


# ----------------------------------------------------------------------------- reporting


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(dataset, method, pattern) -> mean/std (percent) over seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"], r["pattern"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        accs = [100 * r["test_accuracy"] for r in rs]
        out[k] = {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                  "n": len(accs), "sparsity": statistics.fmean(r["sparsity"] for r in rs),
                  "epochs_total": rs[0]["epochs_total"], "seeds": sorted(r["seed"] for r in rs)}
    return out


def _cell(stats: dict[str, float] | None) -> str:
    return "–" if stats is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def markdown_table(dataset: str, agg: dict, sparsities: list[str], patterns: list[str],
                   methods: list[str], proto: Protocol) -> str:
    """Unstructured table (method x sparsity) and N:M table (method x pattern), test accuracy %."""
    dense = agg.get((dataset, "dense", "dense"))
    any_stats = next((v for k, v in agg.items() if k[0] == dataset), None)
    n = any_stats["n"] if any_stats else 0
    lines = [f"### {dataset} ({DATASETS[dataset]}), test accuracy %, mean ± std over {n} seed(s), "
             f"{proto.epochs} epochs", ""]
    if dense:
        lines += [f"Dense: **{_cell(dense)}**", ""]
    rows = [m for m in methods if m in UNSTRUCTURED_METHODS]
    if rows and sparsities:
        lines += ["| method | " + " | ".join(f"{100 * float(s):g}%" for s in sparsities) + " |",
                  "|---" * (len(sparsities) + 1) + "|"]
        for m in rows:
            lines.append(f"| {m} | " + " | ".join(_cell(agg.get((dataset, m, s))) for s in sparsities) + " |")
        lines.append("")
    rows = [m for m in methods if m in NM_METHODS]
    nm = [p for p in patterns if any((dataset, m, p) in agg for m in rows)]
    if rows and nm:
        lines += ["| method (epochs) | " + " | ".join(nm) + " |", "|---" * (len(nm) + 1) + "|"]
        for m in rows:
            stats = [agg.get((dataset, m, p)) for p in nm]
            ep = next((s["epochs_total"] for s in stats if s), proto.epochs)
            lines.append(f"| {m} ({ep}) | " + " | ".join(_cell(s) for s in stats) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(dataset: str, agg: dict, sparsities: list[str], patterns: list[str], methods: list[str],
         path: Path) -> None:
    """Left: accuracy vs unstructured sparsity (x = -log10 density). Right: accuracy per N:M pattern.
    One line per method with a std band/error bar; dense as a horizontal line on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_nm = any((dataset, m, p) in agg for m in NM_METHODS for p in patterns)
    fig, axes = plt.subplots(1, 2 if has_nm else 1, figsize=(11 if has_nm else 6, 4.2), squeeze=False)
    axes = list(axes[0])
    dense = agg.get((dataset, "dense", "dense"))
    for ax in axes:
        if dense:
            ax.axhline(dense["mean"], color="black", ls="--", lw=1, label=f"dense {dense['mean']:.1f}")
    for m in [m for m in methods if m in UNSTRUCTURED_METHODS]:
        pts = [(float(s), agg[(dataset, m, s)]) for s in sparsities if (dataset, m, s) in agg]
        if pts:
            xs = [-math.log10(1 - s) for s, _ in pts]
            axes[0].errorbar(xs, [a["mean"] for _, a in pts], yerr=[a["std"] for _, a in pts],
                             marker="o", capsize=3, label=m)
    ticks = [float(s) for s in sparsities]
    axes[0].set_xticks([-math.log10(1 - s) for s in ticks], [f"{100 * s:g}%" for s in ticks])
    axes[0].set_xlabel("unstructured sparsity")
    axes[0].set_ylabel("test accuracy %")
    axes[0].set_title(f"{dataset}: unstructured")
    for m in [m for m in methods if m in NM_METHODS and has_nm]:
        pts = [(i, agg[(dataset, m, p)]) for i, p in enumerate(patterns) if (dataset, m, p) in agg]
        if pts:
            axes[1].errorbar([i for i, _ in pts], [a["mean"] for _, a in pts],
                             yerr=[a["std"] for _, a in pts], marker="s", capsize=3, label=m)
    if has_nm:
        axes[1].set_xticks(range(len(patterns)), patterns)
        axes[1].set_xlabel("N:M pattern")
        axes[1].set_title(f"{dataset}: N:M")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pretrained_report(dataset: str, agg: dict, records: list[dict[str, Any]], columns: list[str],
                      methods: list[str], proto: PretrainedProtocol, path: Path,
                      labels: dict[str, str] | None = None) -> str:
    """From-pretrained table (method x sparsity/pattern, test accuracy %, mean ± std) with the
    peak fine-tuning train loss per cell, and a plot of accuracy per column."""
    dense = agg.get((dataset, "dense", "dense"))
    dense_ft = agg.get((dataset, "dense_ft", "dense"))
    n = max((v["n"] for k, v in agg.items() if k[0] == dataset), default=0)
    label = {"optg": "optg (pretrained default)", "optg_authors": "optg as the authors run it",
             "oneshot": "oneshot (ASP)", **(labels or {})}
    peaks: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r["dataset"] == dataset and r["train_loss_curve"]:
            peaks.setdefault((r["method"], r["pattern"]), []).append(max(r["train_loss_curve"]))
    head = [f"{100 * float(c):g}%" if not _is_nm(c) else c for c in columns]
    lines = [f"### {dataset} ({DATASETS[dataset]} {PRETRAINED_MODELS[dataset]}), from pretrained: dense "
             f"{proto.dense_epochs} epochs, then {proto.epochs} fine-tuning epochs per method; test accuracy %, "
             f"mean ± std over {n} seed(s)", ""]
    if dense:
        lines += [f"Dense (the starting point): **{_cell(dense)}**", ""]
    if dense_ft:
        lines += [f"Dense fine-tuned {proto.epochs} more epochs with the same protocol, no sparsity: "
                  f"**{_cell(dense_ft)}**", ""]
    lines += ["| method | " + " | ".join(head) + " |", "|---" * (len(columns) + 1) + "|"]
    rows = [m for m in methods if m not in ("dense", "dense_ft")]
    for m in rows:
        cells_ = [_cell(agg.get((dataset, m, c))) if (dataset, m, c) in agg else "" for c in columns]
        lines.append(f"| {label.get(m, m)} | " + " | ".join(cells_) + " |")
    lines += ["", "Peak fine-tuning train loss (mean over seeds; dense end-of-training loss "
              f"{statistics.fmean(r['dense_end_loss'] for r in records if r['dataset'] == dataset):.3f}):", "",
              "| method | " + " | ".join(head) + " |", "|---" * (len(columns) + 1) + "|"]
    for m in rows:
        cells_ = [f"{statistics.fmean(peaks[(m, c)]):.3f}" if (m, c) in peaks else "" for c in columns]
        lines.append(f"| {label.get(m, m)} | " + " | ".join(cells_) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    if dense:
        ax.axhline(dense["mean"], color="black", ls="--", lw=1, label=f"dense {dense['mean']:.1f}")
    for i, m in enumerate(rows):
        pts = [(j, agg[(dataset, m, c)]) for j, c in enumerate(columns) if (dataset, m, c) in agg]
        if pts:
            ax.errorbar([j + 0.08 * (i - len(rows) / 2) for j, _ in pts], [a["mean"] for _, a in pts],
                        yerr=[a["std"] for _, a in pts], marker="o", capsize=3, ls="", label=label.get(m, m))
    ax.set_xticks(range(len(columns)), head)
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{dataset}: fine-tuning a trained model sparse")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return "\n".join(lines) + "\n"


def pretrained_main(a: argparse.Namespace) -> dict[str, Any]:
    """The from-pretrained suite: cells, tables, plots and a summary in `a.out`."""
    protocols = {}
    for d in a.datasets:
        dense_epochs, epochs = PRETRAINED_EPOCHS[d]
        protocols[d] = PretrainedProtocol(d, a.dense_epochs or dense_epochs, a.finetune_epochs or epochs)
    methods = [m for m in (a.methods or PRETRAINED_METHODS) if m in PRETRAINED_METHODS]
    sparsities = [s for s in a.sparsities if float(s) <= 0.98] if a.sparsities else ["0.9", "0.95", "0.98"]
    patterns = [p for p in a.patterns if p in ("2:4", "1:4")] or ["2:4", "1:4"]
    a.out.mkdir(parents=True, exist_ok=True)
    candidates = {method: {k: json.loads(v) for k, v in (item.split("=", 1) for item in items)}
                  for method, items in (("optg", a.optg_set), ("gmp", a.gmp_set)) if items}
    suite = PretrainedSuite(protocols, RunCache(a.out / "accuracy_runs.json"), a.out, candidates=candidates)
    todo = pretrained_cells(a.datasets, methods, sparsities, patterns)
    records = [suite.run(d, m, pat, seed) for seed in a.seeds for d, m, pat in todo]
    agg = aggregate(records)
    summary: dict[str, Any] = {"protocol": {d: asdict(p) for d, p in protocols.items()}, "seeds": a.seeds,
                               "cells": [{"dataset": k[0], "method": k[1], "pattern": k[2], **v}
                                         for k, v in sorted(agg.items())]}
    # a candidate's tables go beside the default's, named by its settings
    suffix = f"_candidate_{abs(hash_text(json.dumps(candidates, sort_keys=True))) % 10**6}" if candidates else ""
    labels = {m: f"{m}, candidate {json.dumps(fields, sort_keys=True)}" for m, fields in candidates.items()}
    for d in a.datasets:
        text = pretrained_report(d, agg, records, sparsities + patterns, methods, protocols[d],
                                 a.out / f"pretrained_{d}{suffix}.png", labels)
        (a.out / f"pretrained_{d}{suffix}.md").write_text(text)
        print(text)
    (a.out / f"pretrained_summary{suffix}.json").write_text(json.dumps(summary, indent=1))
    return summary


def tuning_table(cache: RunCache, seeds: list[int]) -> str:
    """Every OptG setting in a cache, per pattern, over `seeds`: mean ± std (the knob study)."""
    names = {"beta": "beta", "center": "center", "final_epochs": "final_epochs",
             "update_every_steps": "update_every_steps", "score_lr_scale": "score_lr_scale",
             "freeze_scores_last": "freeze_scores_last"}
    defaults = {"update_every_steps": None, "score_lr_scale": 1.0, "freeze_scores_last": 0}
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in cache.runs.values():
        if r["method"] != "optg" or r["seed"] not in seeds:
            continue
        knobs = [f"{label}={r['settings'][k]:.3g}" if isinstance(r["settings"][k], float)
                 else f"{label}={r['settings'][k]}" for k, label in names.items()
                 if r["settings"].get(k, defaults.get(k)) != defaults.get(k, object())]
        groups.setdefault((r["dataset"], r["pattern"], ", ".join(knobs), r["settings"]["epochs"]), []).append(r)
    lines = ["| dataset | pattern | epochs | OptG settings | test acc % | seeds |", "|---|---|---|---|---|---|"]
    for (d, pat, knobs, epochs), rs in sorted(groups.items()):
        accs = [100 * r["test_accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {d} | {pat} | {epochs} | {knobs} | {statistics.fmean(accs):.2f} ± {std:.2f} | "
                     f"{sorted(r['seed'] for r in rs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=["scratch", "pretrained"], default="scratch",
                   help="scratch: every method trains from initialisation (default); pretrained: every "
                        "method fine-tunes the same trained dense model")
    p.add_argument("--dense-epochs", type=int, help="pretrained protocol: dense epochs (default per dataset)")
    p.add_argument("--finetune-epochs", type=int, help="pretrained protocol: fine-tuning epochs (per dataset)")
    p.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=sorted(DATASETS))
    p.add_argument("--methods", nargs="+", default=None, choices=tuple(dict.fromkeys(ALL_METHODS + PRETRAINED_METHODS)))
    p.add_argument("--sparsities", nargs="+", default=["0.9", "0.95", "0.98", "0.99"])
    p.add_argument("--patterns", nargs="+", default=["2:4", "1:4", "2:8"])
    p.add_argument("--nm-datasets", nargs="+", default=None, help="datasets that get N:M runs (all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=Protocol.epochs)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, few cells: a smoke test")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--exclude", nargs="+", default=[], metavar="REGEX",
                   help="module names left dense for every method (e.g. '^conv1$', the first conv)")
    g = p.add_argument_group("OptG experiment knobs (default: library defaults)")
    g.add_argument("--optg-set", nargs="+", default=[], metavar="FIELD=JSON",
                   help="pretrained protocol: spec fields set on the optg method (a candidate), e.g. "
                        "score_init_scale=1.0 'schedule={\"final_epochs\": 6}'")
    g.add_argument("--gmp-set", nargs="+", default=[], metavar="FIELD=JSON",
                   help="pretrained protocol: spec fields set on the gmp method, e.g. 'schedule={\"end\": 4.8}'")
    g.add_argument("--beta", type=float)
    g.add_argument("--center", type=float)
    g.add_argument("--final-epochs", type=int)
    g.add_argument("--update-every-steps", type=int)
    g.add_argument("--score-lr-scale", type=float, default=1.0)
    g.add_argument("--freeze-scores-last", type=int, default=0, help="no score updates in the last k epochs")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.protocol == "pretrained":
        if a.quick:
            a.datasets, a.methods, a.sparsities, a.patterns, a.seeds = ["digits"], None, ["0.9"], ["2:4"], [0]
            a.dense_epochs, a.finetune_epochs = 2, 2
        return pretrained_main(a)
    a.methods = [m for m in (a.methods or ALL_METHODS) if m in ALL_METHODS]
    if a.quick:
        a.datasets, a.methods, a.sparsities = ["mnist1d"], ["dense", "optg", "gmp", "oneshot"], ["0.9"]
        a.patterns, a.seeds, a.epochs = ["2:4"], [0], 2
    torch.set_num_threads(a.threads)
    proto = Protocol(epochs=a.epochs, beta=a.beta, center=a.center, final_epochs=a.final_epochs,
                     update_every_steps=a.update_every_steps, score_lr_scale=a.score_lr_scale,
                     freeze_scores_last=a.freeze_scores_last, exclude=tuple(a.exclude))
    a.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(proto, RunCache(a.out / "accuracy_runs.json"))
    todo = cells(a.datasets, a.methods, a.sparsities, a.patterns, a.nm_datasets or a.datasets)
    records = [suite.run(d, m, pat, seed) for seed in a.seeds for d, m, pat in todo]
    agg = aggregate(records)
    summary: dict[str, Any] = {"protocol": asdict(proto), "seeds": a.seeds, "cells": []}
    for d in a.datasets:
        (a.out / f"accuracy_{d}.md").write_text(
            markdown_table(d, agg, a.sparsities, a.patterns, a.methods, proto))
        plot(d, agg, a.sparsities, a.patterns, a.methods, a.out / f"accuracy_{d}.png")
    summary["cells"] = [{"dataset": k[0], "method": k[1], "pattern": k[2], **v} for k, v in sorted(agg.items())]
    (a.out / "accuracy_summary.json").write_text(json.dumps(summary, indent=1))
    (a.out / "optg_settings.md").write_text(tuning_table(suite.cache, a.seeds))
    for d in a.datasets:
        print((a.out / f"accuracy_{d}.md").read_text())
    return summary


if __name__ == "__main__":
    main()
