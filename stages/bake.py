"""The bake stage: masks into plain weights (exact zeros), saved as safetensors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

import optg
from stages.io import atomic_write


@dataclass
class BakeResult:
    layers: list[optg.LayerReport]
    targeted_sparsity: float   # zeros / weights over the sparsified layers
    model_sparsity: float      # zeros / weights over every Linear/Conv weight

    def to_dict(self) -> dict:
        return {"targeted_sparsity": self.targeted_sparsity, "model_sparsity": self.model_sparsity,
                "layers": [r.to_dict() for r in self.layers]}


def bake(sparsifier: optg.Sparsifier) -> BakeResult:
    """Bake in place; the model is plain afterwards (no overrides, no extra tensors)."""
    sparsifier.bake()
    return summarize(sparsifier.report())


def summarize(rows: list[optg.LayerReport]) -> BakeResult:
    return BakeResult(rows, optg.weighted_sparsity([r for r in rows if r.targeted]), optg.weighted_sparsity(rows))


def save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    """Atomically write the baked state dict (contiguous CPU tensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata))
