"""Train/eval mode changes that undo themselves: every module's own flag is restored."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`with training_mode(model, False): ...` runs with `model.train(training)` and restores
    each submodule's previous flag afterwards (not just the root's: a caller may have set
    some submodules, such as frozen BatchNorms, to a mode of their own)."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
