"""Data-aware one-shot criteria that read each layer's inputs: Wanda and SparseGPT.

- `wanda` (Sun et al. 2023): score `|W_ij| * ||X_j||_2`, the norm of input feature j over
  every calibration token / position; no weight update. One forward pass over the batches.
- `sparsegpt` (Frantar & Alistarh 2023): layer-wise reconstruction. Per layer, in model
  order, `H = X^T X` of its inputs (computed with the layers before it already pruned, as the
  paper does), dampened by `percdamp * mean(diag H)`; then columns in blocks of `blocksize`:
  the weights to prune are chosen by `w^2 / [H^-1]_jj^2` (per block for unstructured, per
  group of M for N:M) and the error of removing them is spread over the columns not yet
  visited through the Cholesky factor of `H^-1`. The weights are updated in place (pruned ones
  become exact zeros); the scores it leaves mark the kept weights, so the mask rule picks
  exactly its mask. One layer's Hessian is held at a time; each layer costs one forward pass
  over the calibration batches (the columns are a loop of vector ops, as in the reference).

Columns are the reduction axis, ordered so that M consecutive columns are M consecutive input
features at one kernel position (the N:M groups of `optg.nm.to_groups`): a Linear's input
features, a Conv2d/Conv1d's unfolded input channels at each kernel position, a transformers
Conv1D's rows. Targets whose input a module hook cannot see (the projections inside
`nn.MultiheadAttention`) are refused with their names: leave them out with `types`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from optg.criteria import CRITERIA, LossFn
from optg.distributed import all_reduce_sum
from optg.modes import training_mode

if TYPE_CHECKING:
    from optg.spec import SparsitySpec
    from optg.targets import LayerPlan

INPUT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv1D")  # whose input a forward hook sees


def input_problems(method: str, plans: Iterable[LayerPlan]) -> list[str]:
    """Targets a data-aware method cannot read the inputs of ([] when it can serve them all)."""
    bad = [p.name for p in plans if p.kind != "dense" and (p.type_name or "Linear") not in INPUT_TYPES]
    if not bad:
        return []
    return [f"method {method!r} reads each layer's input with a forward hook, which these targets do not have "
            f"(their owner reads them functionally): {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; "
            f"set sparsity.types to a subset of {list(INPUT_TYPES)}"]


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's input as [rows, columns], columns in the N:M group order (input feature
    fastest within a kernel position); float32."""
    x = x.detach().float()
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"{type(module).__name__} with groups={module.groups}, padding={module.padding!r}, "
                             f"padding_mode={module.padding_mode!r}: only ungrouped, zero, numeric padding is read")
        one_d = isinstance(module, nn.Conv1d)
        if one_d:
            x = x.unsqueeze(-2)
        kernel = (1, *module.kernel_size) if one_d else module.kernel_size
        stride = (1, *module.stride) if one_d else module.stride
        padding = (0, *module.padding) if one_d else module.padding  # type: ignore[misc]
        dilation = (1, *module.dilation) if one_d else module.dilation
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
        b, _, length = cols.shape
        c = module.in_channels
        cols = cols.reshape(b, c, -1, length).transpose(1, 2).reshape(b, -1, length)  # [B, k*C, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _as_matrix(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """[out, columns] with the reduction axis fastest (a copy in float32)."""
    moved = weight.detach().movedim(axis, -1).float()
    return moved.reshape(moved.shape[0], -1).clone()


def _from_matrix(matrix: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    moved_shape = list(like.shape)
    moved_shape.append(moved_shape.pop(axis))
    return matrix.reshape(moved_shape).movedim(-1, axis).to(like.dtype)


class _Inputs:
    """Forward hooks that hand each target module's input to `sink(name, columns)`."""

    def __init__(self, modules: dict[str, nn.Module], sink) -> None:
        self.handles = [m.register_forward_hook(self._hook(name, m, sink)) for name, m in modules.items()]

    @staticmethod
    def _hook(name: str, module: nn.Module, sink):
        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            sink(name, _columns(module, args[0]))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _run(model: nn.Module, batches: list[Any], loss_fn: LossFn) -> None:
    """Every calibration batch through the model (eval mode, no grad): what the hooks read."""
    with torch.no_grad(), training_mode(model, False):
        for batch in batches:
            loss_fn(model, batch)


class _DataAware:
    learned = False
    needs_calibration = True
    reads_inputs = True

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.plans: dict[str, LayerPlan] = {}
        self.modules: dict[str, nn.Module] = {}

    def setup(self, weights: dict[str, torch.Tensor], *, seed: int) -> None:
        self.tensors = {}

    def bind(self, plans: dict[str, LayerPlan], modules: dict[str, nn.Module]) -> None:
        """The targets' plans (axis, pattern) and owner modules, from the sparsifier at attach."""
        self.plans, self.modules = plans, modules

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.tensors[name]


@CRITERIA.register("wanda")
class Wanda(_DataAware):
    """|W| x ||X_j||_2 per input feature j (see the module docstring)."""

    def calibrate(self, model: nn.Module, weights: dict[str, torch.Tensor],
                  batches: Iterable[Any], loss_fn: LossFn) -> int:
        squares: dict[str, torch.Tensor] = {}

        def sink(name: str, cols: torch.Tensor) -> None:
            total = cols.square().sum(0)
            squares[name] = squares[name] + total if name in squares else total

        kept = list(batches)
        if not kept:
            raise ValueError("Wanda calibration got no batches")
        hooks = _Inputs({n: self.modules[n] for n in weights}, sink)
        try:
            _run(model, kept, loss_fn)
        finally:
            hooks.close()
        names = list(weights)
        norms = [squares[n] for n in names]
        all_reduce_sum(norms)  # the same scores on every rank
        for name, sq in zip(names, norms):
            w, axis = weights[name], self.plans[name].axis
            matrix = _as_matrix(w, axis).abs() * sq.sqrt().to(w.device)
            self.tensors[name] = _from_matrix(matrix, w, axis).float()
        return len(kept)


@CRITERIA.register("sparsegpt")
class SparseGPT(_DataAware):
    """Layer-wise reconstruction (see the module docstring); `percdamp`, `blocksize`."""

    def __init__(self, percdamp: float = 0.01, blocksize: int = 128) -> None:
        super().__init__()
        if not 0 <= percdamp < 1 or blocksize < 1:
            raise ValueError(f"percdamp must be in [0, 1) and blocksize >= 1, got {percdamp}, {blocksize}")
        self.percdamp, self.blocksize = percdamp, blocksize

    @classmethod
    def build(cls, spec: SparsitySpec) -> SparseGPT:
        return cls(percdamp=spec.sparsegpt_percdamp)

    def calibrate(self, model: nn.Module, weights: dict[str, torch.Tensor],
                  batches: Iterable[Any], loss_fn: LossFn) -> int:
        kept = list(batches)
        if not kept:
            raise ValueError("SparseGPT calibration got no batches")
        for name, weight in weights.items():  # model order: earlier layers are pruned first
            hessian: list[torch.Tensor] = []

            def sink(_: str, cols: torch.Tensor) -> None:
                gram = cols.t() @ cols
                if hessian:
                    hessian[0] += gram
                else:
                    hessian.append(gram)

            hooks = _Inputs({name: self.modules[name]}, sink)
            try:
                _run(model, kept, loss_fn)
            finally:
                hooks.close()
            all_reduce_sum(hessian)
            plan = self.plans[name]
            matrix = _as_matrix(weight, plan.axis)
            pruned, keep = prune_layer(matrix, hessian[0].to(matrix.device), plan, self.percdamp, self.blocksize)
            with torch.no_grad():
                weight.copy_(_from_matrix(pruned, weight, plan.axis))
            self.tensors[name] = _from_matrix(keep.float(), weight, plan.axis).float()
            hessian.clear()  # one layer's Hessian at a time
        return len(kept)


def prune_layer(weight: torch.Tensor, hessian: torch.Tensor, plan: LayerPlan, percdamp: float,
                blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one [out, columns] matrix: (updated weights with exact zeros, keep mask)."""
    w = weight.clone()
    h = hessian.clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    nm = plan.kind == "nm"
    n_prune, m = (plan.m - plan.n, plan.m) if nm else (0, 0)
    sparsity = plan.target if not nm else 0.0
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm and i2 < cols:
            i2 = i1 + max(m, (i2 - i1) // m * m)  # blocks hold whole groups of M
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        if nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            saliency = w1.square() / diag.square()
            k = int(saliency.numel() * sparsity)
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
            if k:
                mask1.view(-1)[saliency.view(-1).topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            if nm and i % m == 0:
                saliency = w1[:, i:i + m].square() / diag[i:i + m].square()
                mask1.scatter_(1, i + saliency.topk(n_prune, dim=1, largest=False).indices, True)
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[pruned] = 0.0
    return w, ~pruned
