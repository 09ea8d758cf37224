"""The runner: config -> stages -> artifacts, with a manifest and resume.

Stage order: data, model, train (dense, optional), reference, sparsify, bake, validate,
export, verify, report. A stage recorded as done in the manifest is not run again; the
training stages also resume mid-phase from their last epoch checkpoint. Outcomes map to
exit codes in cli.py: 0 ok, 2 config/usage, 3 gate failed, 1 anything else.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, PipelineConfig, config_hash, dump_yaml
from pipeline.rundir import RunDir
from stages import bake as bake_stage
from stages import report as report_stage
from stages import sparsify as sparsify_stage
from stages import validate as validate_stage
from stages import verify as verify_stage
from stages.base import GateFailure
from stages.data import DataBundle, load_data
from stages.export import export_onnx
from stages.io import atomic_torch_save, atomic_write_text, safe_torch_load
from stages.model import build_model
from optg import parse_nm
from stages.train import Trainer, TrainConfig, evaluate


@dataclass
class RunOptions:
    out: Path | None = None
    force: bool = False
    quiet: bool = False
    progress: bool = False


def nm_density(pattern: str) -> float:
    n, m = parse_nm(pattern)
    return n / m


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device: 'cuda' requested but torch sees no CUDA device; use --device cpu or auto"])
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Runner:
    def __init__(self, cfg: PipelineConfig, options: RunOptions, log: Callable[[str], None] | None = None) -> None:
        self.cfg, self.options = cfg, options
        self.log = log or ((lambda msg: None) if options.quiet else (lambda msg: print(msg, file=sys.stderr)))
        self.run = RunDir(options.out or Path("runs") / cfg.name)
        self.device = resolve_device(cfg.device)
        self.bundle: DataBundle | None = None
        self.model: torch.nn.Module | None = None
        self.sparsifier = None

    # ------------------------------------------------------------------ helpers
    def _stage(self, name: str, fn: Callable[[], None], always: bool = False) -> None:
        """Run `fn` unless the manifest says `name` is done (or `always`: cheap rebuilds)."""
        if self.run.stage_done(name) and not always:
            self.log(f"[{name}] done earlier, skipped")
            return
        started = time.perf_counter()
        self.log(f"[{name}] ...")
        try:
            fn()
        except BaseException:
            self.run.record_stage(name, "failed", time.perf_counter() - started)
            raise
        seconds = time.perf_counter() - started
        if not self.run.stage_done(name):
            self.run.record_stage(name, "done", seconds)
        self.log(f"[{name}] done in {seconds:.1f}s")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.run.manifest["metrics"]

    def _trainer(self, phase: str, cfg: TrainConfig, sparsifier=None) -> Trainer:
        return Trainer(self.model, self.bundle, cfg, phase=phase, device=self.device, seed=self.cfg.seed,
                       batch_size=self.cfg.data.batch_size, eval_batch_size=self.cfg.data.eval_batch_size,
                       sparsifier=sparsifier, progress=self.options.progress, log=self.log)

    def _run_phase(self, trainer: Trainer, checkpoint: Path) -> None:
        if checkpoint.exists():
            trainer.load_state_dict(safe_torch_load(checkpoint, map_location=self.device))
            self.log(f"[{trainer.phase}] resuming at epoch {trainer.next_epoch + 1}/{trainer.cfg.epochs}")
        trainer.run(on_epoch_end=lambda t: atomic_torch_save(t.state_dict(), checkpoint))
        self.run.manifest["history"] = [h for h in self.run.manifest["history"] if h["phase"] != trainer.phase]
        self.run.manifest["history"] += [asdict(r) for r in trainer.history]

    # ------------------------------------------------------------------ stages
    def _data(self) -> None:
        self.bundle = load_data(self.cfg.data, self.cfg.seed)
        self.metrics["data"] = {"name": self.bundle.name, "input_shape": list(self.bundle.input_shape),
                                "num_classes": self.bundle.num_classes,
                                "sizes": {s: len(getattr(self.bundle, s)) for s in ("train", "val", "test")}}

    def _model(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(self.cfg.model, self.bundle.input_shape, self.bundle.num_classes).to(self.device)
        example = self.bundle.tensors("val", limit=1)[0].to(self.device)
        macs, params = report_stage.count_macs_and_params(self.model, example)
        self.metrics.update(macs=macs, params=params)
        try:  # plan the target layers now: a config that sparsifies nothing fails before training
            sparsify_stage.plan(self.model, self.cfg.sparsity)
        except ValueError as exc:
            raise ConfigError([f"sparsity: {exc}"], str(self.cfg.name)) from None

    def _dense(self) -> None:
        self._run_phase(self._trainer("dense", self.cfg.train), self.run.checkpoints / "dense.pt")

    def _restore_dense(self) -> None:
        state = safe_torch_load(self.run.checkpoints / "dense.pt", map_location=self.device)
        self.model.load_state_dict(state["model"])

    def _reference(self) -> None:
        self.metrics["dense_accuracy"] = evaluate(self.model, self.bundle, "test", self.device,
                                                  self.cfg.data.eval_batch_size)
        self.log(f"[reference] dense test accuracy {self.metrics['dense_accuracy']:.4f}")

    def _sparsify(self) -> None:
        cfg = self.cfg.sparsity
        steps = len(self.bundle.loader("train", self.cfg.data.batch_size, shuffle=True))
        self.sparsifier = sparsify_stage.build_sparsifier(self.model, cfg, steps_per_epoch=steps, seed=self.cfg.seed,
                                                          from_trained=self.cfg.train is not None or self.cfg.model.weights is not None)
        checkpoint = self.run.checkpoints / "sparse.pt"
        trainer = self._trainer("sparse", cfg, self.sparsifier)
        if not checkpoint.exists():
            sparsify_stage.calibrate_if_needed(
                self.sparsifier, self.bundle.loader("train", self.cfg.data.batch_size, shuffle=True,
                                                    seed=self.cfg.seed), cfg, self.device)
        self._run_phase(trainer, checkpoint)

    def _bake(self) -> None:
        result = bake_stage.bake(self.sparsifier)
        self.metrics.update(targeted_sparsity=result.targeted_sparsity, model_sparsity=result.model_sparsity,
                            layers=[r.to_dict() for r in result.layers])
        path = bake_stage.save_safetensors(self.model, self.run.path / "model.safetensors",
                                           {"config_hash": self.run.manifest["config_hash"]})
        self.run.add_artifact("model.safetensors", path)

    def _restore_baked(self) -> None:
        self.model.load_state_dict(load_file(str(self.run.path / "model.safetensors"), device=str(self.device)))

    def _validate(self) -> None:
        sparse = evaluate(self.model, self.bundle, "test", self.device, self.cfg.data.eval_batch_size)
        result = validate_stage.validate(sparse, self.metrics.get("dense_accuracy"), self.cfg.validate)
        self.metrics.update(sparse_accuracy=sparse, accuracy_drop=result.accuracy_drop,
                            nonzero_params=report_stage.nonzero_params(self.model))
        self.log(f"[validate] sparse test accuracy {sparse:.4f}"
                 + (f", drop {result.accuracy_drop * 100:.2f} points" if result.accuracy_drop is not None else ""))
        validate_stage.raise_on_failure(result)

    def _onnx_inputs(self) -> torch.Tensor:
        return self.bundle.tensors("val", limit=self.cfg.verify.num_samples)[0]

    def _export(self) -> None:
        s = self.cfg.sparsity
        metadata = {"optg.config_hash": self.run.manifest["config_hash"], "optg.method": s.method,
                    "optg.pattern": s.pattern,
                    "optg.target": str(s.target if s.target is not None else 1 - nm_density(s.pattern)),
                    "optg.targeted_sparsity": f"{self.metrics.get('targeted_sparsity', 0):.6f}",
                    "optg.version": self.run.manifest["versions"]["optg-pipeline"]}
        self.model.eval().cpu()
        result = export_onnx(self.model, self._onnx_inputs()[:2], self.run.path / "model.onnx", self.cfg.export, metadata)
        self.run.add_artifact("model.onnx", result.path)
        if result.compact_path is not None:
            self.run.add_artifact("model.compact.onnx", result.compact_path)
        self.run.manifest["export"] = {"exporter": result.exporter, "seconds": result.seconds,
                                       "bytes": result.size_bytes, "warnings": result.warnings,
                                       "opset": self.cfg.export.opset, "dtype": self.cfg.export.dtype,
                                       "compact_bytes": result.compact_size_bytes}
        for note in result.warnings:
            self.log(f"[export] note: {note}")

    def _verify(self) -> None:
        self.model.eval().cpu()
        expectations = [verify_stage.LayerExpectation(f"{r['name']}.weight", r["pattern"], r["sparsity"])
                        for r in self.metrics.get("layers", [])]
        result = verify_stage.verify_onnx(self.run.path / "model.onnx", self.model, self._onnx_inputs(),
                                          expectations, self.cfg.verify, dtype=self.cfg.export.dtype)
        self.run.manifest["verify"] = result.to_dict()
        errors = [o.get("max_abs_err") for o in result.outputs if isinstance(o.get("max_abs_err"), (int, float))]
        self.metrics["parity_max_abs_error"] = max(errors) if errors else None
        verify_stage.raise_on_failure(result)

    def _report(self) -> None:
        written = report_stage.write_report(self.run.path, self._manifest_for_report(),
                                            self.run.manifest["history"], self.cfg.report)
        for path in written:
            self.run.add_artifact(path.name, path)

    def _manifest_for_report(self) -> dict[str, Any]:
        s = self.cfg.sparsity
        return {**self.run.manifest, "summary": {"method": s.method, "pattern": s.pattern, "target": s.target}}

    # ------------------------------------------------------------------ main
    def execute(self) -> dict[str, Any]:
        """Run every stage not yet done. Raises GateFailure / StageError after recording them."""
        cfg = self.cfg
        resumed = self.run.open(cfg.name, config_hash(cfg), self.options.force)
        self.log(f"{'resuming' if resumed else 'starting'} run {cfg.name!r} in {self.run.path} on {self.device}")
        atomic_write_text(self.run.path / "config.yaml", dump_yaml(cfg))
        self.run.add_artifact("config.yaml", self.run.path / "config.yaml")
        try:
            self._stage("data", self._data, always=True)
            self._stage("model", self._model, always=True)
            if cfg.train is not None:
                self._stage("train", self._dense)
                if self.run.stage_done("train"):
                    self._restore_dense()
            if cfg.train is not None or cfg.model.weights is not None:
                self._stage("reference", self._reference)
            if not self.run.stage_done("bake"):
                self._stage("sparsify", self._sparsify, always=True)
                self._stage("bake", self._bake)
            else:
                self._restore_baked()
            self._stage("validate", self._validate)
            if cfg.export.enabled:
                self._stage("export", self._export)
            if cfg.verify.enabled:
                self._stage("verify", self._verify)
            self.run.manifest["status"] = "succeeded"  # every gate passed; the report says so
            self._stage("report", self._report, always=True)
        except GateFailure as exc:
            self._fail("gate_failed", exc, gate=exc.gate)
            raise
        except KeyboardInterrupt as exc:
            self._fail("interrupted", exc)
            raise
        except Exception as exc:
            self._fail("failed", exc)
            raise
        finally:
            self.run.save()
        return self.run.manifest

    def _fail(self, status: str, exc: BaseException, gate: str | None = None) -> None:
        self.run.manifest["status"] = status
        self.run.manifest["error"] = {"type": type(exc).__name__, "gate": gate, "message": str(exc)}
        if status == "gate_failed":
            try:  # a failed gate still leaves a readable report of what was measured
                self._report()
            except Exception as report_exc:  # noqa: BLE001
                self.log(f"[report] could not be written: {report_exc}")
