"""The train stage on a tiny linear model: LR schedule, evaluation, the step hook, exact resume,
and a diverging loss named by its config field."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from stages.base import ConfigFieldError, StageError
from stages.data import DataConfig, bundle_from_arrays
from stages.train import OptimizerConfig, TrainConfig, Trainer, evaluate, make_optimizer, warmup_cosine

CPU = torch.device("cpu")


def toy_bundle(n: int = 96, seed: int = 0):
    """Label = sign of feature 0; 48 train, 24 val, 24 test samples of shape (1, 6)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return bundle_from_arrays("toy", DataConfig(name="toy", val_fraction=1 / 3, test_fraction=0.25), seed, (x, y))


class Feature0(nn.Module):
    """Predicts class 1 exactly when feature 0 is positive (or never, `inverted`)."""

    def __init__(self, inverted: bool = False) -> None:
        super().__init__()
        self.sign = -1.0 if inverted else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.sign * x[:, 0, 0]
        return torch.stack([-f, f], dim=1)


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 2))


def trainer(model: nn.Module, bundle, epochs: int = 3, **kw) -> Trainer:
    cfg = TrainConfig(epochs=epochs, optimizer=OptimizerConfig(lr=0.1), warmup_epochs=1)
    return Trainer(model, bundle, cfg, phase="dense", device=CPU, seed=7, batch_size=16, log=lambda m: None, **kw)


def test_warmup_cosine_values():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]                         # linear warm-up
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)  # cosine to zero
    assert warmup_cosine(4, 0)(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_evaluate_counts_exactly_and_gives_the_mode_back():
    bundle = toy_bundle()
    assert len(bundle.test) == 24
    assert evaluate(Feature0(), bundle, "test", CPU, batch_size=5) == 1.0
    assert evaluate(Feature0(inverted=True), bundle, "test", CPU) == 0.0
    y = bundle.tensors("test")[1]
    always_zero = nn.Sequential(nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        always_zero[1].weight.zero_()
        always_zero[1].bias.copy_(torch.tensor([1.0, 0.0]))
    assert evaluate(always_zero, bundle, "test", CPU) == float((y == 0).sum()) / 24
    model = linear().train()
    evaluate(model, bundle, "val", CPU)
    assert model.training
    empty = bundle_from_arrays("e", DataConfig(name="e", val_fraction=0.0, test_fraction=0.25), 0,
                               (np.zeros((8, 6), np.float32), np.arange(8) % 2))
    assert evaluate(linear(), empty, "val", CPU) is None


def test_step_hook_sees_every_step_in_order_and_history_is_per_epoch():
    bundle = toy_bundle()
    seen: list[tuple[str, int, int]] = []
    t = trainer(linear(), bundle, on_step=lambda tr, epoch, step: seen.append((tr.phase, epoch, step)))
    history = t.run()
    assert t.steps_per_epoch == 3  # 48 training samples / batch 16
    assert seen == [("dense", e, s) for e in (1, 2, 3) for s in (1, 2, 3)]
    assert [h.epoch for h in history] == [0, 1, 2] and t.next_epoch == 3
    assert all(h.phase == "dense" and h.sparsity == 0.0 and 0 <= h.train_metric <= 1 for h in history)
    schedule = warmup_cosine(total_steps=9, warmup_steps=3)  # the LR each epoch ends at
    assert [h.lr for h in history] == pytest.approx([0.1 * schedule(3), 0.1 * schedule(6), 0.0])


def test_resume_from_an_epoch_checkpoint_equals_an_uninterrupted_run():
    bundle = toy_bundle()
    straight = trainer(linear(0), bundle)
    straight.run()

    saved: list[dict] = []
    first = trainer(linear(0), bundle, epochs=3)

    def stop_after_first(t: Trainer) -> None:
        saved.append(t.state_dict())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(on_epoch_end=stop_after_first)
    resumed = trainer(linear(123), bundle)  # other initial weights: the checkpoint must win
    resumed.load_state_dict(saved[0])
    assert resumed.next_epoch == 1
    resumed.run()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    strip = [(h.epoch, h.train_loss, h.val_metric, h.lr) for h in straight.history]
    assert strip == [(h.epoch, h.train_loss, h.val_metric, h.lr) for h in resumed.history]


def test_checkpoint_of_another_phase_is_refused():
    bundle = toy_bundle()
    state = trainer(linear(), bundle, epochs=2).state_dict()
    state["phase"] = "sparse"
    with pytest.raises(StageError, match="checkpoint is for phase 'sparse', not 'dense'"):
        trainer(linear(), bundle).load_state_dict(state)


def test_diverging_loss_names_the_learning_rate_field():
    bundle = toy_bundle()
    cfg = TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=1e30, momentum=0.0))
    t = Trainer(linear(), bundle, cfg, phase="sparse", device=CPU, seed=0, batch_size=16, log=lambda m: None)
    with pytest.raises(ConfigFieldError) as info:
        t.run()
    assert info.value.field == "optimizer.lr"
    assert "lower optimizer.lr (now 1e+30) or check the data" in str(info.value)
    info.value.locate("sparsity")
    assert "lower sparsity.optimizer.lr (now 1e+30)" in str(info.value)
    info.value.nest("train")  # the sparse phase's TrainConfig is `train` of the sparsity section
    assert info.value.field == "train.optimizer.lr"
    assert "lower sparsity.train.optimizer.lr (now 1e+30)" in str(info.value)


def test_make_optimizer():
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, OptimizerConfig(lr=0.5, momentum=0.0, nesterov=True, weight_decay=0.0))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"] is False  # needs momentum
    adamw = make_optimizer(params, OptimizerConfig(name="adamw", lr=1e-3, betas=(0.8, 0.9)))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
