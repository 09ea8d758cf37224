"""Which ONNX initializer holds which PyTorch weight: by name, then by the dynamo exporter's
node metadata, then by the consuming node's module scope, then by order among weights of the
right (PyTorch-layout) shape. Verify's read-back and the export's dense-weight record share it,
so both name the same initializer for a PyTorch weight."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from stages.onnx_sparsity import OnnxWeight


def torch_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def match_weights(names: Sequence[str], weights: list[OnnxWeight],
                  model: nn.Module, also: Sequence[str] = ()) -> dict[str, tuple[OnnxWeight, str]]:
    """torch_name -> (ONNX weight, how it was found: name | metadata | scope | order).

    `also` names more PyTorch weights to locate for the report; they take part in the order
    fallback only after every name in `names` has had its turn.
    """
    shapes = torch_shapes(model)
    order = {n: i for i, n in enumerate(shapes)}
    claimed: set[int] = set()
    found: dict[str, tuple[OnnxWeight, str]] = {}

    def fits(w: OnnxWeight, name: str, transposed_ok: bool = True) -> bool:
        want = shapes.get(name)
        got = tuple(w.torch_layout().shape)
        # a weight stored [in, out] (transformers' Conv1D) reads back transposed from the
        # [out, in] layout of Linear: named matches may be either, an order match is exact
        return want is None or got == tuple(want) or (transposed_ok and len(want) == 2 and got == tuple(want)[::-1])

    def take(name: str, how: str, pred) -> bool:
        for i, w in enumerate(weights):
            if i not in claimed and pred(w) and fits(w, name, how != "order"):
                claimed.add(i)
                found[name] = (w, how)
                return True
        return False

    primary = sorted(set(names), key=lambda n: order.get(n, len(order)))
    secondary = [n for n in also if n not in set(primary)]
    every = primary + secondary
    for name in every:
        take(name, "name", lambda w, n=name: w.name == n)
    for name in every:
        if name in found:
            continue
        flat = name.replace(".", "_")
        module = name.rsplit(".", 1)[0] if name.endswith(".weight") else None
        if not take(name, "metadata", lambda w: flat in w.fx_params) and module is not None:
            take(name, "scope", lambda w: w.scope == module)
    for name in every:
        if name not in found and name in shapes:
            take(name, "order", lambda w: True)
    return found
