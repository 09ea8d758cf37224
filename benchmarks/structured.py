"""Structured pruning: accuracy vs MACs removed, ORT CPU latency vs dense, and 2:4 compounded.

Protocol (also in RESULTS.md once a full run is recorded): per (model, seed) a dense model is
trained E epochs (data split, initial weights and batch order depend only on the seed). Each cell
(importance, ratio) starts from that dense model, removes `ratio` of the prunable channels in one
step (stem and classifier outputs kept, round_to 8, global allocation) and fine-tunes F epochs
(same optimiser, cosine schedule). `optg` learns its scores for S steps first, training the
weights too (OptG trains both), so it sees S more batches than magnitude/taylor; the table says
so. Then the slimmed model is trained 2:4 with OptG for F epochs (`optg.create('optg',
pattern='2:4')`), baked, and 2:4 is read back from its ONNX along the reduction axis.

Latency: the dense model and every candidate are exported the same way and timed in ONNX Runtime
on the CPU (1 intra-op thread by default), interleaved, median of R calls, at batch 1 and 32;
ratio = candidate / dense (seed 0 only: channel counts barely depend on the seed). ORT has no 2:4
kernels, so the 2:4 columns show what the compounded file costs on CPU, not a sparse speedup.

Models: resnet20 and mobilenet_v1 (width 1.0) on sklearn digits upscaled to 3x32x32, cnn1d on
MNIST-1D. Every cell is cached in `<out>/structured_runs.json` (key: all its settings) and the
dense weights in `<out>/structured_cache/`, so an interrupted run resumes where it stopped.

    python benchmarks/structured.py --out benchmarks/results            # full run
    python benchmarks/structured.py --quick --out /tmp/structured       # smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

import optg
from stages.benchmark import BenchmarkConfig, measure_latency
from stages.data import DataBundle, DataConfig, load_data
from stages.export import ExportConfig, export_onnx
from stages.io import atomic_write_json, atomic_write_text
from stages.model import ModelConfig, build_model
from stages.onnx_sparsity import check_nm, collect_weights, load_model, must_hold
from stages.structured import (
    StructuredConfig,
    batch_source,
    prune_channels,
    trainer_finetune,
)
from stages.train import OptimizerConfig, TrainConfig, Trainer, evaluate

CPU = torch.device("cpu")
MODELS = {"resnet20": ("digits32", {}), "mobilenet_v1": ("digits32", {"width_mult": 1.0}),
          "cnn1d": ("mnist1d", {})}


def quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class Protocol:
    dense_epochs: int = 30
    finetune_epochs: int = 10
    nm_epochs: int = 10
    lr: float = 0.05
    batch_size: int = 64
    optg_steps: int = 100
    optg_train_weights: bool = True
    taylor_batches: int = 8
    round_to: int = 8
    latency_repeats: int = 30
    latency_warmup: int = 5
    threads: int = 1
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    mnist1d_samples: int | None = None
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    importances: tuple[str, ...] = ("optg", "magnitude", "taylor")
    nm: bool = True

    def train(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, warmup_epochs=1 if epochs > 1 else 0,
                           optimizer=OptimizerConfig(lr=self.lr, weight_decay=5e-4))


QUICK = Protocol(dense_epochs=2, finetune_epochs=1, nm_epochs=1, optg_steps=5, taylor_batches=2,
                 latency_repeats=3, latency_warmup=1, exporter="torchscript", mnist1d_samples=500,
                 ratios=(0.5,))


def load_bundle(dataset: str, seed: int, proto: Protocol) -> DataBundle:
    if dataset == "mnist1d":
        options = {"num_samples": proto.mnist1d_samples} if proto.mnist1d_samples else {}
        return load_data(DataConfig(name="mnist1d", options=options), seed)
    digits = load_data(DataConfig(name="digits"), seed)

    def up(ds: Any) -> TensorDataset:  # 1x8x8 -> 3x32x32, bilinear
        x, y = ds.tensors
        return TensorDataset(F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1), y)

    return DataBundle("digits32", up(digits.train), up(digits.val), up(digits.test), (3, 32, 32),
                      digits.num_classes)


class Cache:
    def __init__(self, out: Path) -> None:
        self.path = out / "structured_runs.json"
        self.weights = out / "structured_cache"
        self.runs: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.runs[key] = record
        atomic_write_json(self.path, self.runs)


def key(proto: Protocol, **fields: Any) -> str:
    settings = {k: v for k, v in asdict(proto).items() if k not in ("ratios", "importances", "nm")}
    return json.dumps({**fields, **settings}, sort_keys=True)


def check_24(path: Path) -> dict[str, int]:
    """2:4 read back from the ONNX: weights that must hold it (C % 4 == 0, ungrouped) and holding."""
    weights = [w for w in collect_weights(load_model(path)) if must_hold(w, 4)[0]]
    holding = sum(check_nm(w.values, w.reduction_axis, 2, 4).holds for w in weights)
    return {"required": len(weights), "holding": int(holding)}


class Suite:
    def __init__(self, proto: Protocol, out: Path, log: Any = print) -> None:
        self.proto, self.out, self.log = proto, out, log
        self.cache = Cache(out)
        self.onnx = out / "structured_onnx"
        self.bundles: dict[tuple[str, int], DataBundle] = {}

    def bundle(self, dataset: str, seed: int) -> DataBundle:
        if (dataset, seed) not in self.bundles:
            self.bundles[(dataset, seed)] = load_bundle(dataset, seed, self.proto)
        return self.bundles[(dataset, seed)]

    def trainer(self, model: nn.Module, bundle: DataBundle, epochs: int, phase: str, seed: int,
                sparsifier: optg.Sparsifier | None = None) -> Trainer:
        return Trainer(model, bundle, self.proto.train(epochs), phase=phase, device=CPU, seed=seed,
                       batch_size=self.proto.batch_size, sparsifier=sparsifier, log=quiet)

    def dense(self, name: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
        dataset, options = MODELS[name]
        bundle = self.bundle(dataset, seed)
        torch.manual_seed(seed)
        model = build_model(ModelConfig(name=name, options=options), bundle.input_shape, bundle.num_classes)
        k = key(self.proto, model=name, seed=seed, cell="dense")
        file = self.cache.weights / f"dense-{name}-{seed}.safetensors"
        if k in self.cache.runs and file.exists():
            model.load_state_dict(load_file(str(file)))
            return model, self.cache.runs[k]
        self.trainer(model, bundle, self.proto.dense_epochs, "dense", seed).run()
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(file))
        x = bundle.tensors("test", 1)[0]
        record = {"model": name, "seed": seed, "accuracy": evaluate(model, bundle, "test", CPU),
                  **dict(zip(("macs", "params"), _count(model, x)))}
        self.cache.put(k, record)
        return model, record

    def export(self, model: nn.Module, x: torch.Tensor, name: str) -> Path:
        path = self.onnx / f"{name}.onnx"
        export_onnx(copy.deepcopy(model), x, path, ExportConfig(exporter=self.proto.exporter), metadata={})
        return path

    def latency(self, reference: Path, candidate: Path, shape: tuple[int, ...]) -> dict[str, float]:
        cfg = BenchmarkConfig(batch_sizes=[1, 32], repeats=self.proto.latency_repeats,
                              warmup=self.proto.latency_warmup, threads=self.proto.threads, cuda=False)
        result = measure_latency(reference, candidate, shape, cfg)
        return {f"b{r.batch_size}": r.ratio for r in result.rows}

    def cell(self, name: str, seed: int, importance: str, ratio: float) -> dict[str, Any]:
        k = key(self.proto, model=name, seed=seed, importance=importance, ratio=ratio)
        if k in self.cache.runs:
            return self.cache.runs[k]
        started = time.perf_counter()
        dense, dense_record = self.dense(name, seed)
        bundle = self.bundle(MODELS[name][0], seed)
        x = bundle.tensors("test", 2)[0]
        p = self.proto
        cfg = StructuredConfig(ratio=ratio, importance=importance, optg_steps=p.optg_steps,
                               optg_train_weights=p.optg_train_weights,
                               taylor_batches=p.taylor_batches, finetune_epochs=p.finetune_epochs,
                               round_to=p.round_to)
        model = copy.deepcopy(dense)
        result = prune_channels(model, cfg, x, batches=batch_source(bundle, p.batch_size, seed),
                                finetune=trainer_finetune(bundle, p.train(p.finetune_epochs), device=CPU,
                                                          seed=seed, batch_size=p.batch_size, log=quiet),
                                seed=seed, log=quiet)
        record: dict[str, Any] = {
            "model": name, "seed": seed, "importance": importance, "ratio": ratio,
            "accuracy": evaluate(model, bundle, "test", CPU), "dense_accuracy": dense_record["accuracy"],
            "macs": result.macs_after, "params": result.params_after,
            "macs_reduction": 1 - result.macs_after / result.macs_before,
            "params_reduction": 1 - result.params_after / result.params_before,
            "channels": {n: c["after"]["out"] for n, c in result.to_dict()["channels"].items()},
        }
        tag = f"{name}-{seed}-{importance}-{ratio}"
        if seed == 0:
            dense_onnx = self.export(dense, x, f"dense-{name}")
            record["latency"] = self.latency(dense_onnx, self.export(model, x, tag), bundle.input_shape)
        if p.nm:
            sp = optg.create("optg", model, pattern="2:4", epochs=p.nm_epochs).attach()
            self.trainer(model, bundle, p.nm_epochs, "sparse", seed, sp).run()
            sp.bake()
            record["nm_accuracy"] = evaluate(model, bundle, "test", CPU)
            nm_onnx = self.export(model, x, tag + "-2of4")
            record["nm_check"] = check_24(nm_onnx)
            if seed == 0:
                record["nm_latency"] = self.latency(self.onnx / f"dense-{name}.onnx", nm_onnx, bundle.input_shape)
        record["seconds"] = time.perf_counter() - started
        self.cache.put(k, record)
        self.log(f"{name} seed {seed} {importance} {ratio:.0%}: acc {record['accuracy']:.4f} "
                 f"(dense {record['dense_accuracy']:.4f}), MACs -{record['macs_reduction']:.1%}, "
                 f"latency {record.get('latency')}, 2:4 acc {record.get('nm_accuracy')}")
        return record


def _count(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    from stages.counting import count_macs_and_params

    return count_macs_and_params(model, x)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def render(records: list[dict[str, Any]], dense: dict[str, list[dict[str, Any]]], proto: Protocol) -> str:
    lines = ["# Structured pruning: accuracy vs MACs, ORT CPU latency, 2:4 compounded", "",
             (f"Dense {proto.dense_epochs} epochs; each cell prunes once and fine-tunes "
              f"{proto.finetune_epochs} epochs; optg learns scores for {proto.optg_steps} extra steps "
              f"({'weights trained too' if proto.optg_train_weights else 'weights frozen'}); "
              f"2:4 (OptG) {proto.nm_epochs} more epochs. Latency: ONNX Runtime CPU, {proto.threads} "
              f"thread(s), median of {proto.latency_repeats} interleaved calls, ratio vs dense (seed 0)."), ""]
    for name in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == name]
        d = dense[name]
        lines += [f"## {name} ({MODELS[name][0]})", "",
                  f"Dense: accuracy {_mean_std([r['accuracy'] for r in d])}, MACs {d[0]['macs']}, params {d[0]['params']}.", "",
                  ("| importance | channels removed | MACs removed | params removed | accuracy | latency b1 "
                   "| latency b32 | 2:4 accuracy | 2:4 latency b1 | 2:4 latency b32 | 2:4 read back |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for imp in dict.fromkeys(r["importance"] for r in rows):
            for ratio in sorted({r["ratio"] for r in rows if r["importance"] == imp}):
                cell = [r for r in rows if r["importance"] == imp and r["ratio"] == ratio]
                first = next((r for r in cell if r["seed"] == 0), cell[0])
                lat, nml = first.get("latency", {}), first.get("nm_latency", {})
                checks = [r["nm_check"] for r in cell if "nm_check" in r]
                read_back = "-" if not checks else ("ok" if all(c["holding"] == c["required"] for c in checks)
                                                    else "FAILED") + f" ({checks[0]['required']} weights)"
                lines.append(
                    f"| {imp} | {ratio:.0%} | {statistics.mean(r['macs_reduction'] for r in cell):.1%} "
                    f"| {statistics.mean(r['params_reduction'] for r in cell):.1%} "
                    f"| {_mean_std([r['accuracy'] for r in cell])} "
                    f"| {_fmt(lat.get('b1'))} | {_fmt(lat.get('b32'))} "
                    f"| {_mean_std([r['nm_accuracy'] for r in cell if 'nm_accuracy' in r])} "
                    f"| {_fmt(nml.get('b1'))} | {_fmt(nml.get('b32'))} | {read_back} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="smoke run: cnn1d, one seed, ratio 0.5, tiny budgets")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--ratios", nargs="+", type=float, default=None)
    parser.add_argument("--importances", nargs="+", choices=["optg", "magnitude", "taylor"], default=None)
    parser.add_argument("--no-nm", action="store_true", help="skip the 2:4 compounded runs")
    parser.add_argument("--optg-frozen-weights", action="store_true",
                        help="optg learns scores with the weights frozen (equal training budget)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--dense-epochs", type=int, default=None, help="override the protocol's dense epochs")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="override the fine-tune epochs per cell")
    parser.add_argument("--nm-epochs", type=int, default=None, help="override the 2:4 OptG epochs per cell")
    parser.add_argument("--optg-steps", type=int, default=None, help="override the optg score-learning steps")
    parser.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default=None,
                        help="override the ONNX exporter (torchscript exports faster on a loaded CPU)")
    args = parser.parse_args(argv)

    proto = QUICK if args.quick else Protocol()
    updates: dict[str, Any] = {"threads": args.threads, "nm": not args.no_nm,
                               "optg_train_weights": not args.optg_frozen_weights}
    for field in ("dense_epochs", "finetune_epochs", "nm_epochs", "optg_steps", "exporter"):
        if getattr(args, field) is not None:
            updates[field] = getattr(args, field)
    if args.ratios:
        updates["ratios"] = tuple(args.ratios)
    if args.importances:
        updates["importances"] = tuple(args.importances)
    proto = Protocol(**{**asdict(proto), **updates})
    models = args.models or (["cnn1d"] if args.quick else list(MODELS))
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    suite = Suite(proto, args.out)
    records, dense = [], {}
    for name in models:
        dense[name] = [suite.dense(name, seed)[1] for seed in seeds]
        for seed in seeds:
            for importance in proto.importances:
                for ratio in proto.ratios:
                    records.append(suite.cell(name, seed, importance, ratio))
    atomic_write_text(args.out / "structured.md", render(records, dense, proto))
    atomic_write_json(args.out / "structured_summary.json",
                      {"protocol": asdict(proto), "models": models, "seeds": seeds, "cells": records,
                       "dense": dense})
    print(f"wrote {args.out / 'structured.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
