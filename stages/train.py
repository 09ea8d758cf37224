"""The training stage: one loop for the dense phase and for sparse training.

Deterministic on CPU given the seed: each epoch's shuffle is seeded by (seed, epoch), and
the full state (model, optimiser, LR schedule, sparsifier, RNG, history) is returned by
`state_dict()` after every epoch so a resumed run reaches the same result.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Callable, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, Strict, model_validator
from torch import nn
from tqdm.auto import tqdm

from optg import LossGuard, Sparsifier
from stages.base import ConfigFieldError, FieldProblem, StageError, StrictModel, eval_mode
from stages.data import DataBundle
from stages.data.loading import EpochLoader

PHASE_SEEDS = {"dense": 1, "sparse": 2}  # offsets so each phase's random stream is its own
Beta = Annotated[float, Strict(), Field(ge=0, lt=1)]


class OptimizerConfig(StrictModel):
    """SGD (momentum, optional Nesterov) or AdamW. Weight decay applies to weights only,
    never to OptG scores (those have their own optimiser)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), strict=False,  # a YAML list fills it; items stay strict
                                     description="AdamW's (beta1, beta2), each in [0, 1)")


class TrainConfig(StrictModel):
    """A training phase: epochs, optimiser, cosine LR with linear warm-up."""

    epochs: int = Field(ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: bool = Field(True, description="bf16 autocast on CUDA devices that support it; ignored on CPU")
    grad_clip: float | None = Field(None, gt=0)
    compile: bool = Field(False, description="torch.compile the training forward/backward; needs a "
                          "C++ compiler on CPU, and compiling takes a while before the first step")

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> "TrainConfig":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        return self


@dataclass
class EpochRecord:
    phase: str
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None
    sparsity: float
    lr: float
    seconds: float
    mask_update_loss_delta: float | None = None  # largest guard-measured rise this epoch


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


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Copy a batch to `device` without waiting (pinned memory makes it asynchronous)."""
    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def count_correct(model: nn.Module, loader: EpochLoader, device: torch.device,
                  channels_last: bool = False) -> torch.Tensor:
    """[correct, seen] top-1 counts (int64, on `device`) over this process's batches.

    Counts stay on the device: one host sync when the caller reads them, none per batch.
    """
    counts = torch.zeros(2, dtype=torch.long, device=device)
    with eval_mode(model):
        for x, y in loader:
            y = y.to(device, non_blocking=True)
            logits = model(to_device(x, device, channels_last))
            counts[0] += (logits.argmax(1) == y).sum()
            counts[1] += y.numel()
    return counts


def reduce_counts(counts: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `counts` over the processes of `group` (the default group when None); a no-op
    without an initialised process group. With NCCL the tensor must be on the rank's GPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def evaluate(model: nn.Module, bundle: DataBundle, split: str, device: torch.device,
             batch_size: int = 256, *, rank: int = 0, world_size: int = 1, group: Any = None,
             loader: EpochLoader | None = None) -> float | None:
    """Top-1 accuracy on a split; None for an empty split (e.g. val_fraction: 0).

    With world_size > 1 each rank counts its shard (`bundle.loader(..., rank, world_size)`)
    and the counts are summed over `group`, so every rank returns the accuracy of the whole
    split. Pass the plain module, not a DDP wrapper. `loader` reuses an existing one.
    """
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise StageError(f"evaluate: world_size={world_size} needs an initialised process group")
    if loader is None:
        loader = bundle.loader(split, batch_size, shuffle=False, rank=rank,
                               world_size=world_size, device=device)
    counts = count_correct(model, loader, device, use_channels_last(model, device))
    correct, total = (int(v) for v in reduce_counts(counts, group).tolist())
    return correct / total if total else None


StepHook = Callable[["Trainer", int, int], None]
"""Called after every optimiser step with (trainer, epoch, step), both 1-based."""


class Trainer:
    """Runs epochs [next_epoch, cfg.epochs) of one phase, optionally with a sparsifier.

    `on_step` (optional) is called after every optimiser step; the pipeline uses it only for its
    documented debug hook that interrupts a run at an exact step (README, "The tests").
    """

    def __init__(self, model: nn.Module, bundle: DataBundle, cfg: TrainConfig, *, phase: str,
                 device: torch.device, seed: int, batch_size: int, eval_batch_size: int = 256,
                 sparsifier: Sparsifier | None = None, progress: bool = False,
                 log: Callable[[str], None] = print, rank: int = 0, world_size: int = 1,
                 on_step: StepHook | None = None) -> None:
        self.model, self.bundle, self.cfg, self.phase = model, bundle, cfg, phase
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
        for x, y in loader:
            batches.append((x.to(self.device), y.to(self.device)))
            if len(batches) == settings.batches:
                break
        guard = LossGuard(batches, lambda logits, y: F.cross_entropy(logits.float(), y), settings.threshold)
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
            "history": [asdict(r) for r in self.history],
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
        self.history = [EpochRecord(**r) for r in state["history"]]
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
        if not self.cfg.compile:
            return self.model
        try:
            return torch.compile(self.model)  # type: ignore[return-value]
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
                loss_sum, correct, seen = self._train_epoch(epoch)
            except Exception as exc:  # torch.compile compiles lazily, at the first steps
                if self.cfg.compile and _compile_failure(exc):
                    raise StageError(f"train.compile: torch.compile failed on this machine ({exc}); "
                                     "set compile: false") from exc
                raise
            events = self.guard.events[seen_events:] if self.guard else []
            val = evaluate(self.model, self.bundle, "val", self.device, loader=self.val_loader,
                           world_size=self.world_size)
            sparsity = self.sparsifier.sparsity() if self.sparsifier else 0.0
            record = EpochRecord(self.phase, epoch, loss_sum / max(1, seen), correct / max(1, seen),
                                 val, sparsity, self.optimizer.param_groups[0]["lr"],
                                 time.perf_counter() - started,
                                 max((e.delta for e in events), default=None))
            self.history.append(record)
            self.next_epoch = epoch + 1
            self.log(f"[{self.phase}] epoch {epoch + 1}/{self.cfg.epochs} loss {record.train_loss:.4f} "
                     f"val_acc {'n/a' if val is None else f'{val:.4f}'} sparsity {sparsity:.3f} "
                     f"({record.seconds:.1f}s)")
            for event in events:
                if event.warning:
                    self.log(f"[{self.phase}] WARNING: {event.message()}")
            if on_epoch_end is not None:
                on_epoch_end(self)

    def _train_epoch(self, epoch: int) -> tuple[float, int, int]:
        loader = self.train_loader
        loader.set_epoch(epoch)
        bar = tqdm(loader, desc=f"{self.phase} {epoch + 1}/{self.cfg.epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        loss_sum, seen = 0.0, 0
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for step, (x, y) in enumerate(bar):
            x, y = to_device(x, self.device, self.channels_last), y.to(self.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):
                raise ConfigFieldError(FieldProblem(
                    "optimizer.lr", f"{self.phase}: loss is {value} at epoch {epoch + 1}, step {step + 1}; "
                    f"lower {{field}} (now {self.cfg.optimizer.lr}) or check the data"))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if self.sparsifier is not None:
                self.sparsifier.step(lr=lr)
            self.scheduler.step()
            loss_sum += value * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            bar.set_postfix(loss=f"{value:.3f}")
            if self.on_step is not None:
                self.on_step(self, epoch + 1, step + 1)
        return loss_sum, int(correct), seen
