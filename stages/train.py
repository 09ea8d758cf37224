"""The training stage: one loop for the dense phase and for sparse training.

Deterministic on CPU given the seed: each epoch's shuffle is seeded by (seed, epoch), and
the full state (model, optimiser, LR schedule, sparsifier, RNG, history) is returned by
`state_dict()` after every epoch so a resumed run reaches the same result.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import Field, Strict, model_validator
from torch import nn
from tqdm.auto import tqdm

from optg import LossGuard, Sparsifier
from stages.base import ConfigFieldError, FieldProblem, StageError, StrictModel, eval_mode
from stages.context import RunContext, Stage
from stages.data import DataBundle
from stages.data.loading import EpochLoader
from stages.io import atomic_torch_save, safe_torch_load
from stages.tasks import ClassificationTask, Task

PHASE_SEEDS = {"dense": 1, "sparse": 2}  # offsets so each phase's random stream is its own
FINITE_CHECK_EVERY = 100  # steps between reads of the device-side non-finite-loss flag (and at epoch end)
Beta = Annotated[float, Strict(), Field(ge=0, lt=1)]


class OptimizerConfig(StrictModel):
    """SGD (momentum, optional Nesterov) or AdamW. Weight decay applies to weights only,
    never to OptG scores (those have their own optimiser)."""

    name: Literal["sgd", "adamw"] = "sgd"
    """sgd or adamw"""
    lr: float = Field(0.1, gt=0)
    """peak learning rate of the weights"""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum"""
    nesterov: bool = False
    """SGD with Nesterov momentum"""
    weight_decay: float = Field(5e-4, ge=0)
    """on weights only, never on OptG scores"""
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), strict=False,  # a YAML list fills it; items stay strict
                                     description="AdamW's (beta1, beta2), each in [0, 1)")


class TrainConfig(StrictModel):
    """A training phase: epochs, optimiser, cosine LR with linear warm-up."""

    epochs: int = Field(ge=1)
    """epochs of this phase"""
    optimizer: OptimizerConfig = OptimizerConfig()
    warmup_epochs: int = Field(0, ge=0)
    """linear learning-rate warm-up, then cosine to zero, per step"""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """cross-entropy label smoothing"""
    amp: bool = Field(True, description="bf16 autocast on CUDA devices that support it; ignored on CPU")
    grad_clip: float | None = Field(None, gt=0)
    """clip the gradient norm to this value; null: no clipping"""
    compile: bool = Field(False, description="torch.compile the training forward/backward; needs a "
                          "C++ compiler on CPU, and compiling takes a while before the first step")

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> "TrainConfig":
        if self.epochs and self.warmup_epochs >= self.epochs:  # 0 epochs (one-shot sparsity): nothing runs
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        return self


@dataclass
class EpochRecord:
    """One finished epoch. `train_metric` / `val_metric` are the task's metric (`metric` names
    it); as JSON, CSV and tracking metrics they are `train_<metric>` / `val_<metric>`
    (`train_accuracy`, `val_perplexity`...), see `to_dict`."""

    phase: str
    epoch: int
    train_loss: float
    train_metric: float | None
    val_metric: float | None
    sparsity: float
    lr: float
    seconds: float
    samples_per_second: float | None = None  # training samples (all ranks) per second of the epoch's steps
    mask_update_loss_delta: float | None = None  # largest guard-measured rise this epoch
    metric: str = "accuracy"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the metric under its own name: {..., "train_accuracy": ..., "val_accuracy": ...}."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "metric":
                continue
            key = f.name.replace("_metric", f"_{self.metric}") if f.name in ("train_metric", "val_metric") else f.name
            out[key] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochRecord:
        """Inverse of `to_dict` (also reads the plain field names): the metric is the one whose
        `val_<name>` key the row has."""
        if isinstance(data, EpochRecord):
            return data
        if "val_metric" in data:
            return cls(**data)
        own = {f.name for f in fields(cls)}
        metric = next((k[4:] for k in data if k.startswith("val_") and k not in own), "accuracy")
        rest = {k: v for k, v in data.items() if k in own}
        return cls(**rest, train_metric=data.get(f"train_{metric}"), val_metric=data.get(f"val_{metric}"),
                   metric=metric)


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up to 1, then cosine to 0 over the rest."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _compile_failure(exc: BaseException) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed  # imported only when compile was on

    return isinstance(exc, BackendCompilerFailed)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last pays on CUDA (cuDNN's NHWC kernels, tensor cores) for 2-D conv models;
    on CPU it is left alone."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def metric_sums(model: nn.Module, loader: EpochLoader, device: torch.device, task: Task,
                channels_last: bool = False) -> torch.Tensor:
    """The task's metric sums (e.g. [correct, seen] for accuracy, [nll, tokens] for perplexity)
    over this process's batches, on `device`: one host sync when the caller reads them, none
    per batch."""
    sums = task.empty_sums(device)
    with eval_mode(model):
        for batch in loader:
            batch = task.to_device(batch, device, channels_last)
            sums += task.metric_sums(task.forward(model, batch), batch)
    return sums


def reduce_counts(counts: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `counts` over the processes of `group` (the default group when None); a no-op
    without an initialised process group. With NCCL the tensor must be on the rank's GPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def evaluate(model: nn.Module, bundle: DataBundle, split: str, device: torch.device,
             batch_size: int = 256, *, rank: int = 0, world_size: int = 1, group: Any = None,
             loader: EpochLoader | None = None, task: Task | None = None) -> float | None:
    """The task's metric on a split (top-1 accuracy by default); None for an empty split (e.g.
    val_fraction: 0).

    With world_size > 1 each rank counts its shard (`bundle.loader(..., rank, world_size)`)
    and the sums are added over `group`, so every rank returns the metric of the whole split.
    Pass the plain module, not a DDP wrapper. `loader` reuses an existing one.
    """
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise StageError(f"evaluate: world_size={world_size} needs an initialised process group")
    task = task or ClassificationTask()
    if loader is None:
        loader = bundle.loader(split, batch_size, shuffle=False, rank=rank,
                               world_size=world_size, device=device)
    sums = metric_sums(model, loader, device, task, use_channels_last(model, device))
    return task.metric_value(reduce_counts(sums, group).tolist())


StepHook = Callable[["Trainer", int, int], None]
"""Called after every optimiser step with (trainer, epoch, step), both 1-based."""


class Trainer:
    """Runs epochs [next_epoch, cfg.epochs) of one phase, optionally with a sparsifier.

    `on_step` (optional) is called after every optimiser step (trainer, epoch, step; 1-based):
    the seam a caller that embeds the runner uses (`RunOptions.on_step`), e.g. the tests'
    interrupts at an exact step (tests/interrupt.py).
    """

    def __init__(self, model: nn.Module, bundle: DataBundle, cfg: TrainConfig, *, phase: str,
                 device: torch.device, seed: int, batch_size: int, eval_batch_size: int = 256,
                 sparsifier: Sparsifier | None = None, progress: bool = False,
                 log: Callable[[str], None] = print, rank: int = 0, world_size: int = 1,
                 on_step: StepHook | None = None, task: Task | None = None) -> None:
        self.model, self.bundle, self.cfg, self.phase = model, bundle, cfg, phase
        self.task = task or ClassificationTask()
        self.device, self.seed, self.batch_size = device, seed, batch_size
        self.eval_batch_size = eval_batch_size
        self.sparsifier, self.progress, self.log = sparsifier, progress, log
        self.on_step = on_step
        self.rank, self.world_size = rank, world_size
        self.optimizer = make_optimizer(model.parameters(), cfg.optimizer)
        # one loader per phase (persistent workers); epoch e shuffles with seed * 100_003 + e
        self.train_loader = bundle.loader("train", batch_size, shuffle=True, seed=seed * 100_003,
                                          rank=rank, world_size=world_size, device=device)
        self.val_loader = bundle.loader("val", eval_batch_size, rank=rank, world_size=world_size,
                                        device=device)
        self.steps_per_epoch = len(self.train_loader)
        self.channels_last = use_channels_last(model, device)
        self.forward: nn.Module = model  # torch.compile(model) while running with train.compile
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.epochs * self.steps_per_epoch,
                                          cfg.warmup_epochs * self.steps_per_epoch))
        self.autocast = (device.type == "cuda" and cfg.amp and torch.cuda.is_bf16_supported())
        self.next_epoch = 0
        self.history: list[EpochRecord] = []
        self.guard = self._guard()

    def _guard(self) -> LossGuard | None:
        """The mask-update guard the sparsifier's settings ask for (`guard: {batches,
        threshold}`), on the first batches of a fixed-seed pass over the training data."""
        spec = getattr(self.sparsifier, "spec", None)
        settings = getattr(spec, "guard", None)
        if self.sparsifier is None or settings is None:
            return None
        batches = []
        loader = self.bundle.loader("train", self.batch_size, shuffle=True, seed=self.seed, rank=self.rank,
                                    world_size=self.world_size, device=self.device)
        loader.set_epoch(0)
        for batch in loader:
            batches.append(self.task.to_device(batch, self.device))
            if len(batches) == settings.batches:
                break
        guard = LossGuard(batches, self.task.batch_loss, settings.threshold)
        self.sparsifier.add_mask_hook(guard)
        return guard

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Only tensors, numbers, strings, None, lists and dicts (RNG states are ByteTensors), so
        the checkpoint loads with `torch.load(weights_only=True)` and a tampered one is refused."""
        return {
            "phase": self.phase, "next_epoch": self.next_epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sparsifier": self.sparsifier.state_dict() if self.sparsifier else None,
            "history": [r.to_dict() for r in self.history],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["phase"] != self.phase:
            raise StageError(f"checkpoint is for phase {state['phase']!r}, not {self.phase!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state["sparsifier"])
        self.history = [EpochRecord.from_dict(r) for r in state["history"]]
        self.next_epoch = state["next_epoch"]
        torch.set_rng_state(state["rng"].cpu())  # RNG states are CPU ByteTensors, whatever map_location did
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])

    # ------------------------------------------------------------------ loop
    def run(self, on_epoch_end: Callable[["Trainer"], None] | None = None) -> list[EpochRecord]:
        self.model.to(self.device).train()
        if self.channels_last:  # restored below: safetensors and export want contiguous weights
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        try:
            self._run_epochs(on_epoch_end)
        finally:
            if self.channels_last:
                self.model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        return self.history

    def _compiled(self) -> nn.Module:
        """The module the steps call: DistributedDataParallel over the model when world_size > 1
        (gradients averaged across ranks; `self.model` stays the plain module for state_dict and
        evaluation), then torch.compile with train.compile."""
        module: nn.Module = self.model
        if self.world_size > 1:
            module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index if self.device.index is not None
                                        else torch.cuda.current_device()] if self.device.type == "cuda" else None)
        if not self.cfg.compile:
            return module
        try:
            return torch.compile(module)  # type: ignore[return-value]
        except RuntimeError as exc:  # e.g. a Python version torch.compile does not support
            raise StageError(f"train.compile: torch.compile is not available here: {exc}; "
                             "set compile: false") from exc

    def _run_epochs(self, on_epoch_end: Callable[[Trainer], None] | None) -> None:
        self.forward = self._compiled()
        if self.next_epoch == 0:  # a phase starts from its own seed, resumed or not
            torch.manual_seed(self.seed * 1_000 + PHASE_SEEDS.get(self.phase, 0))
        for epoch in range(self.next_epoch, self.cfg.epochs):
            started = time.perf_counter()
            seen_events = len(self.guard.events) if self.guard else 0
            if self.sparsifier is not None:
                self.sparsifier.start_epoch(epoch)
            try:
                train_loss, train_metric, seen, train_seconds = self._train_epoch(epoch)
            except Exception as exc:  # torch.compile compiles lazily, at the first steps
                if self.cfg.compile and _compile_failure(exc):
                    raise StageError(f"train.compile: torch.compile failed on this machine ({exc}); "
                                     "set compile: false") from exc
                raise
            events = self.guard.events[seen_events:] if self.guard else []
            val = evaluate(self.model, self.bundle, "val", self.device, loader=self.val_loader,
                           world_size=self.world_size, task=self.task)
            sparsity = self.sparsifier.sparsity() if self.sparsifier else 0.0
            metric = self.task.metric
            record = EpochRecord(self.phase, epoch, train_loss, train_metric,
                                 val, sparsity, self.optimizer.param_groups[0]["lr"],
                                 time.perf_counter() - started, seen / max(train_seconds, 1e-9),
                                 max((e.delta for e in events), default=None), metric=metric.name)
            self.history.append(record)
            self.next_epoch = epoch + 1
            self.log(f"[{self.phase}] epoch {epoch + 1}/{self.cfg.epochs} loss {record.train_loss:.4f} "
                     f"val_{metric.name} {metric.format(val)} sparsity {sparsity:.3f} "
                     f"({record.seconds:.1f}s)")
            for event in events:
                if event.warning:
                    self.log(f"[{self.phase}] WARNING: {event.message()}")
            if on_epoch_end is not None:
                on_epoch_end(self)

    def _loss_weight(self, step: int, batch: Any, units: torch.Tensor) -> float | torch.Tensor:
        """Scale of this rank's mean loss so that DDP's average over ranks is the mean over the
        global batch's loss units: local_units * world_size / global_units (1 in one process).
        Per-sample losses know the global count from the sampler; a per-token loss sums the
        ranks' counts (one small collective per step, no host sync)."""
        if self.world_size == 1:
            return 1.0
        if self.task.loss_per_token:
            total = reduce_counts(units.clone())
            return units * self.world_size / total.clamp_min(1)
        sampler = self.train_loader.sampler
        global_n = min(sampler.batch_size, sampler.size - step * sampler.batch_size)
        return self.task.num_samples(batch) * self.world_size / global_n

    def _train_epoch(self, epoch: int) -> tuple[float, float | None, int, float]:
        """One pass over this rank's shard: the mean loss and the task's train metric over all
        ranks, the samples of all ranks, and the seconds the steps took.

        No host sync per step: the loss, the metric sums and a non-finite-loss flag (the first
        bad step and its loss) stay on the device; the flag is read every FINITE_CHECK_EVERY
        steps and at the end of the epoch, and names the first step whose loss was not finite."""
        loader, task = self.train_loader, self.task
        loader.set_epoch(epoch)
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"{self.phase} {epoch + 1}/{self.cfg.epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        smoothing = self.cfg.label_smoothing
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        units_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = task.empty_sums(self.device)
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        seen = 0
        for step, batch in enumerate(bar):
            batch = task.to_device(batch, self.device, self.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = task.forward(self.forward, batch)
                loss = task.loss(logits.float(), batch, label_smoothing=smoothing)
            first_bad = (bad_step < 0) & ~torch.isfinite(loss.detach())
            bad_step = torch.where(first_bad, step, bad_step)
            bad_loss = torch.where(first_bad, loss.detach().float(), bad_loss)
            self.optimizer.zero_grad(set_to_none=True)
            units = task.loss_units(batch)
            weight = self._loss_weight(step, batch, units)
            (loss if isinstance(weight, float) and weight == 1.0 else loss * weight).backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if self.sparsifier is not None:
                self.sparsifier.step(lr=lr)
            self.scheduler.step()
            loss_sum += loss.detach().double() * units
            units_sum += units
            sums += task.train_metric_sums(logits, batch, loss, smoothing)
            seen += task.num_samples(batch)
            if self.progress:
                bar.set_postfix(loss=f"{float(loss):.3f}")  # a display only exists with a terminal
            if (step + 1) % FINITE_CHECK_EVERY == 0:
                self._raise_if_not_finite(bad_step, bad_loss, epoch)
            if self.on_step is not None:
                self.on_step(self, epoch + 1, step + 1)
        self._raise_if_not_finite(bad_step, bad_loss, epoch)
        totals = torch.cat([torch.stack([loss_sum, units_sum, loss_sum.new_full((), seen)]), sums.double()])
        if self.world_size > 1:  # the epoch's numbers are the job's, not this rank's shard's
            totals = reduce_counts(totals)
        values = totals.tolist()
        train_loss, seen = values[0] / max(1.0, values[1]), int(values[2])
        metric_sums_ = values[3:] if sums.dtype.is_floating_point else [int(v) for v in values[3:]]
        return train_loss, task.metric_value(metric_sums_), seen, time.perf_counter() - started

    def _raise_if_not_finite(self, bad_step: torch.Tensor, bad_loss: torch.Tensor, epoch: int) -> None:
        """One host read of the device-side flag; ConfigFieldError names the first bad step."""
        step = int(bad_step)
        if step >= 0:
            raise ConfigFieldError(FieldProblem(
                "optimizer.lr", f"{self.phase}: loss is {float(bad_loss)} at epoch {epoch + 1}, step {step + 1}; "
                f"lower {{field}} (now {self.cfg.optimizer.lr}) or check the data"))


# --------------------------------------------------------------------------- the pipeline row


def phase_trainer(ctx: RunContext, phase: str, cfg: TrainConfig, sparsifier: Sparsifier | None = None) -> Trainer:
    """A Trainer for one phase of the run (dense, sparse, a fine-tune) on the run's model and data."""
    return Trainer(ctx.model, ctx.bundle, cfg, phase=phase, device=ctx.device, seed=ctx.cfg.seed,
                   batch_size=ctx.cfg.data.batch_size, eval_batch_size=ctx.cfg.data.eval_batch_size,
                   sparsifier=sparsifier, progress=ctx.progress, log=ctx.log, on_step=ctx.on_step,
                   rank=ctx.dist.rank, world_size=ctx.dist.world_size, task=ctx.task)


def evaluate_run(ctx: RunContext, split: str) -> float | None:
    """The task's metric on `split` for the run's model, each rank counting its shard, summed
    over the ranks."""
    return evaluate(ctx.model, ctx.bundle, split, ctx.device, ctx.cfg.data.eval_batch_size,
                    rank=ctx.dist.rank, world_size=ctx.dist.world_size, task=ctx.task)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint of this run, read safely (weights only)."""
    return safe_torch_load(path, map_location=device)


def run_phase(ctx: RunContext, trainer: Trainer, checkpoint: Path) -> None:
    """Train one phase from its last epoch checkpoint (if any), saving one after every epoch.
    Rank 0 writes the checkpoints; on a resume every rank loads the one rank 0 found."""
    if ctx.on_disk(checkpoint):
        trainer.load_state_dict(load_checkpoint(checkpoint, ctx.device))
        ctx.log(f"[{trainer.phase}] resuming at epoch {trainer.next_epoch + 1}/{trainer.cfg.epochs}")
    manifest = ctx.run.manifest
    for record in trainer.history:  # epochs of an earlier session (tracking skips those it has)
        if ctx.on_epoch is not None:
            ctx.on_epoch(record)

    def save(t: Trainer) -> None:
        """Checkpoint, then the manifest's history and metrics.csv: a long run can be followed."""
        atomic_torch_save(t.state_dict(), checkpoint)
        manifest.history = [h for h in manifest.history if h.phase != t.phase] + list(t.history)
        ctx.run.write_metrics_csv()
        ctx.run.save()
        if ctx.on_epoch is not None and t.history:
            ctx.on_epoch(t.history[-1])

    trainer.run(on_epoch_end=save if ctx.dist.writer else None)
    manifest.history = [h for h in manifest.history if h.phase != trainer.phase] + list(trainer.history)


def run_dense(ctx: RunContext) -> None:
    assert ctx.cfg.train is not None  # enabled only with a train section
    run_phase(ctx, phase_trainer(ctx, "dense", ctx.cfg.train), ctx.run.checkpoints / "dense.pt")


def restore_dense(ctx: RunContext) -> None:
    ctx.model.load_state_dict(load_checkpoint(ctx.run.checkpoints / "dense.pt", ctx.device)["model"])


ROW = Stage("train", run_dense, enabled=lambda c: c.train is not None, restore=restore_dense, state="weights",
            section="train", inputs=("train",))
