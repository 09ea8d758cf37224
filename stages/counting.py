"""Counting a model: dense MACs and parameters for one sample, and nonzero parameters. The model
stage counts the dense model, structured pruning counts each candidate, validate the sparse one."""
from __future__ import annotations

import torch
from torch import nn

from stages.base import eval_mode


def count_macs_and_params(model: nn.Module, example_input: torch.Tensor | list[torch.Tensor]) -> tuple[int, int]:
    """Dense MACs and parameters for one sample (torch-pruning's counter); `example_input` is
    the model's input, or the list of its positional inputs (a token model's ids and mask)."""
    import torch_pruning as tp

    inputs = [t[:1] for t in example_input] if isinstance(example_input, list) else example_input[:1]
    with eval_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, inputs)
    return int(macs), int(params)


def nonzero_params(model: nn.Module) -> int:
    """Parameters that are not zero (a baked sparse model's zeros are real zeros)."""
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))
