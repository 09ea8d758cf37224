"""Every key of the `sparsity:` section is documented and does something: for each leaf key of the
generated reference a config that sets it (through `--set`, as a user would) changes what the
library is given (the `optg.SparsitySpec`) or what the sparse phase trains with. A key added to
the section without an entry here fails `test_the_table_covers_every_sparsity_key`."""
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.config_docs import config_sections


def spec(field: str) -> Callable[[PipelineConfig], Any]:
    return lambda cfg: getattr(cfg.sparsity.to_spec(), field)


def sparse_train(*path: str) -> Callable[[PipelineConfig], Any]:
    def read(cfg: PipelineConfig) -> Any:
        node: Any = cfg.sparsity.train
        for part in path:
            node = getattr(node, part)
        return node
    return read


UNSTRUCTURED = ["sparsity.pattern=unstructured", "sparsity.target=0.5"]
# key -> (the base config's --set, the key's --set, what it changes)
KEYS: dict[str, tuple[list[str], list[str], Callable[[PipelineConfig], Any]]] = {
    "method": ([], ["sparsity.method=gmp"], spec("method")),
    "pattern": ([], ["sparsity.pattern=1:4"], spec("pattern")),
    "target": (UNSTRUCTURED, ["sparsity.target=0.7"], spec("target")),
    "allocation": (UNSTRUCTURED, ["sparsity.allocation=layerwise"], spec("allocation")),
    "start": ([], ["sparsity.start=scratch"], lambda cfg: cfg.sparsity.resolved_start(cfg.has_reference)),
    "schedule.name": ([], ["sparsity.schedule.name=cubic"], lambda cfg: cfg.sparsity.to_spec().schedule.name),
    "types": ([], ["sparsity.types=[Linear]"], spec("types")),
    "include": ([], ["sparsity.include=['^features']"], spec("include")),
    "exclude": ([], ["sparsity.exclude=['^classifier']"], spec("exclude")),
    "overrides": ([], ["sparsity.overrides={'^classifier': dense}"], spec("overrides")),
    "guard.batches": ([], ["sparsity.guard.batches=3"], lambda cfg: cfg.sparsity.to_spec().guard),
    "guard.threshold": ([], ["sparsity.guard.threshold=0.1"], lambda cfg: cfg.sparsity.to_spec().guard),
    "train.epochs": ([], ["sparsity.train.epochs=5"], spec("epochs")),
    "train.warmup_epochs": ([], ["sparsity.train.warmup_epochs=1"], sparse_train("warmup_epochs")),
    "train.label_smoothing": ([], ["sparsity.train.label_smoothing=0.1"], sparse_train("label_smoothing")),
    "train.amp": ([], ["sparsity.train.amp=false"], sparse_train("amp")),
    "train.grad_clip": ([], ["sparsity.train.grad_clip=1.0"], sparse_train("grad_clip")),
    "train.compile": ([], ["sparsity.train.compile=true"], sparse_train("compile")),
    "train.optimizer.name": ([], ["sparsity.train.optimizer.name=adamw"], sparse_train("optimizer", "name")),
    "train.optimizer.lr": ([], ["sparsity.train.optimizer.lr=0.01"], sparse_train("optimizer", "lr")),
    "train.optimizer.momentum": ([], ["sparsity.train.optimizer.momentum=0.5"], sparse_train("optimizer", "momentum")),
    "train.optimizer.nesterov": ([], ["sparsity.train.optimizer.nesterov=true"],
                                 sparse_train("optimizer", "nesterov")),
    "train.optimizer.weight_decay": ([], ["sparsity.train.optimizer.weight_decay=0.0"],
                                     sparse_train("optimizer", "weight_decay")),
    "train.optimizer.betas": ([], ["sparsity.train.optimizer.betas=[0.8, 0.9]"], sparse_train("optimizer", "betas")),
    "optg.score_init": ([], ["sparsity.optg.score_init=magnitude"], spec("score_init")),
    "optg.score_dtype": ([], ["sparsity.optg.score_dtype=bfloat16"], spec("score_dtype")),
    "optg.calibration_batches": (["sparsity.optg.score_init=wanda"], ["sparsity.optg.calibration_batches=3"],
                                 lambda cfg: cfg.sparsity.to_spec().calibration_batches_in_force),
    "snip.calibration_batches": (["sparsity.method=snip"], ["sparsity.snip.calibration_batches=3"],
                                 lambda cfg: cfg.sparsity.to_spec().calibration_batches_in_force),
    "wanda.calibration_batches": (["sparsity.method=wanda"], ["sparsity.wanda.calibration_batches=3"],
                                  lambda cfg: cfg.sparsity.to_spec().calibration_batches_in_force),
    "sparsegpt.calibration_batches": (["sparsity.method=sparsegpt"], ["sparsity.sparsegpt.calibration_batches=3"],
                                      lambda cfg: cfg.sparsity.to_spec().calibration_batches_in_force),
    "sparsegpt.dampening": (["sparsity.method=sparsegpt"], ["sparsity.sparsegpt.dampening=0.05"],
                            spec("sparsegpt_percdamp")),
    "srste.decay": (["sparsity.method=srste"], ["sparsity.srste.decay=0.001"], spec("srste_decay")),
}


def sparsity_rows() -> dict[str, Any]:
    return {row.key.removeprefix("sparsity."): row for section in config_sections() for row in section.rows
            if row.key.startswith("sparsity.")}


def test_the_table_covers_every_sparsity_key():
    leaves = {key for key, row in sparsity_rows().items() if not row.type.startswith("section")}
    assert leaves == set(KEYS)


def test_every_sparsity_key_and_section_is_documented():
    rows = sparsity_rows()
    assert {key for key, row in rows.items() if not row.description.strip()} == set()
    assert {"train", "optg", "snip", "wanda", "sparsegpt", "srste", "schedule", "guard"} <= set(rows)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_setting_the_key_changes_what_the_library_or_the_sparse_phase_gets(tiny_config, key):
    base_sets, sets, effect = KEYS[key]
    base = load_config(tiny_config(), base_sets)
    changed = load_config(tiny_config(), base_sets + sets)
    assert effect(changed) != effect(base)
