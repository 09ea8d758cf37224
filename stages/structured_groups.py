"""Channel groups through Torch-Pruning's dependency graph: which layers are left alone (the
`ignore` patterns, `@stem`, `@classifier`), which channels a ratio removes (`select_channels`),
one pruning pass (`prune_once`), and the trial the model stage runs before training
(`trial_problems`). stages/structured.py drives them step by step."""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp  # type: ignore[import-untyped]
from torch import nn

from stages.base import eval_mode
from stages.counting import count_macs_and_params
from stages.structured_importance import IMPORTANCES, MaskTarget, PrecomputedImportance, ScoreContext, default_loss
from stages.structured_plan import WEIGHTED

if TYPE_CHECKING:
    from stages.structured import StructuredConfig

STEM, CLASSIFIER = "@stem", "@classifier"
ROOT_TYPES = [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR]


# --------------------------------------------------------------------------- ignored layers

def detect_stem_and_classifier(model: nn.Module, example_input: torch.Tensor) -> tuple[str | None, str | None]:
    """Names of the first Conv and the last Conv/Linear executed on `example_input`."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
               for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    stem = next((n for n in order if not isinstance(modules[n], nn.Linear)), None)
    return stem, (order[-1] if order else None)


def resolve_ignored(model: nn.Module, patterns: list[str], stem: str | None,
                    classifier: str | None) -> list[str]:
    """Module names matched by `patterns` (regex re.search, or the @stem/@classifier tokens)."""
    names = set()
    for rx in patterns:
        if rx == STEM:
            names.update([stem] if stem else [])
        elif rx == CLASSIFIER:
            names.update([classifier] if classifier else [])
        else:
            names.update(n for n, _ in model.named_modules() if n and re.search(rx, n))
    return sorted(names)


def ignored_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The named modules and everything inside them (Torch-Pruning's ignored_layers)."""
    modules = dict(model.named_modules())
    out: list[nn.Module] = []
    for n in names:
        out.extend(modules[n].modules())
    return out


# --------------------------------------------------------------------------- pruning primitives

def dependency_groups(model: nn.Module, example_input: torch.Tensor, ignored: list[str]) -> list[tp.Group]:
    """Torch-Pruning's coupled channel groups rooted at convs and linears, `ignored` left out."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    return list(dg.get_all_groups(ignored_layers=ignored_modules(model, ignored),
                                  root_module_types=ROOT_TYPES))


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Each module's qualified name."""
    return {m: n for n, m in model.named_modules()}


def channel_grouping(group: tp.Group) -> int:
    """Channel grouping of a group with grouped (not depthwise) convs: their channels must be
    removed alike in every conv group (Torch-Pruning's convention)."""
    found = [int(dep.target.module.groups) for dep, _ in group
             if isinstance(dep.target.module, nn.modules.conv._ConvNd)
             and 1 < dep.target.module.groups != dep.target.module.out_channels]
    return max(found, default=1)


def select_channels(importance: list[torch.Tensor], ch_groups: list[int], ratio: float,
                    allocation: str, round_to: int | None) -> list[list[int]]:
    """Which root channels each group loses at `ratio`, lowest importance first.

    Torch-Pruning's ranking rule (`BasePruner._prune`): global allocation removes every channel
    at or below the `ratio`-quantile of all groups' scores, layerwise the lowest `ratio` of each
    group; the kept count is then rounded down to a multiple of `round_to`. One change: every
    group keeps at least `round_to` channels (at least 1). `BasePruner` instead skips a group
    outright when rounding would empty it, so a higher ratio could prune less than a lower one
    (at 90% on resnet20 it prunes nothing).
    """
    sizes = [len(imp) // g for imp, g in zip(importance, ch_groups)]
    dims = [imp.view(g, -1).mean(0) if g > 1 else imp for imp, g in zip(importance, ch_groups)]
    thres = None
    if allocation == "global" and dims:
        flat = torch.cat(dims)
        n = len(flat) - int(len(flat) * (1 - ratio))
        if n > 0:
            thres = torch.topk(flat, n, largest=False).values[-1]
    floor = round_to or 1
    plans: list[list[int]] = []
    for imp, size, g in zip(dims, sizes, ch_groups):
        if allocation == "global":
            n = int((imp <= thres).sum()) if thres is not None else 0
        else:
            n = size - int(size * (1 - ratio))
        if n > 0 and round_to:
            kept = size - n
            n = size - (kept - kept % round_to)
        n = max(0, min(n, size - min(floor, size)))
        idxs = torch.argsort(imp)[:n]
        plans.append(sorted(int(i) + k * size for k in range(g) for i in idxs))
    return plans


def prune_once(model: nn.Module, example_input: torch.Tensor, scores: dict[str, torch.Tensor],
               ratio: float, cfg: StructuredConfig, ignored: list[str]) -> None:
    """Remove `ratio` of the current prunable channels, ranked by `scores` (by group root
    name), through Torch-Pruning's dependency graph (`select_channels` decides which)."""
    if ratio <= 0:
        return
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    groups = list(dg.get_all_groups(ignored_layers=ignored_modules(model, ignored),
                                    root_module_types=ROOT_TYPES))
    importance = PrecomputedImportance(scores, module_names(model))
    chosen = select_channels([importance(g) for g in groups], [channel_grouping(g) for g in groups],
                             ratio, cfg.allocation, cfg.round_to)
    for group, idxs in zip(groups, chosen):
        if idxs:
            root, handler = group[0].dep.target.module, group[0].dep.handler
            dg.get_pruning_group(root, handler, idxs).prune()


TRIAL_RATIO = 0.5  # a MACs/params target is searched at run time; the trial only needs every group cut


class _InnermostModule:
    """Forward pre/post hooks that know which module was running when an exception left."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.failed: str | None = None
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave()))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(f"'{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})")
        return hook

    def _leave(self) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack:
                self.stack.pop()
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def trial_problems(model: nn.Module, cfg: StructuredConfig, example_input: torch.Tensor) -> list[str]:
    """Prune a copy of `model` once (magnitude scores, `cfg.ratio` or TRIAL_RATIO), then run it
    forward and backward on `example_input`: what breaks here would break the run after its
    dense phase, so the pipeline refuses the model before training, naming the module that
    failed (an attention block whose head reshape no longer fits, a channel split that does
    not divide). [] when the pruned copy runs."""
    trial = copy.deepcopy(model)
    stem, classifier = detect_stem_and_classifier(trial, example_input)
    ignored = resolve_ignored(trial, cfg.ignore, stem, classifier)
    try:
        groups = dependency_groups(trial, example_input, ignored)
        if prunable_channels(groups) == 0:
            return []  # "nothing to prune": the stage itself names the ignore patterns
        ctx = ScoreContext(model=trial, groups=groups, names=module_names(trial), batches=None, loss_fn=default_loss,
                           mask=MaskTarget(total=None, fraction=None, min_keep=cfg.round_to or 1), optg_steps=0,
                           optg_lr=0.0, optg_train_weights=False, taylor_batches=0)
        scores = IMPORTANCES.get("magnitude")(ctx)
        prune_once(trial, example_input, scores, cfg.ratio or TRIAL_RATIO, cfg, ignored)
    except Exception as exc:  # noqa: BLE001 - any failure inside Torch-Pruning refuses the model
        return [f"Torch-Pruning cannot remove channels from this model ({type(exc).__name__}: "
                f"{str(exc).strip()[:300]}); leave the modules involved out with structured.ignore"]
    tracker = _InnermostModule(trial)
    try:
        with torch.enable_grad():
            out = trial.train()(example_input)
            logits = out if isinstance(out, torch.Tensor) else out[0]
            logits.float().sum().backward()
    except Exception as exc:  # noqa: BLE001
        where = tracker.stack[-1] if tracker.stack else "the model"
        return [f"after removing channels the model fails in module {where}: {type(exc).__name__}: "
                f"{str(exc).strip()[:300]} (attention heads and channel splits are not pruned consistently); "
                "leave that module out with structured.ignore, or drop `structured`"]
    finally:
        tracker.close()
    return []


def measure(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) for one sample."""
    return count_macs_and_params(model, example_input)


def prunable_channels(groups: list[tp.Group]) -> int:
    """Root channels the groups could lose."""
    return sum(len(g[0].idxs) for g in groups)
