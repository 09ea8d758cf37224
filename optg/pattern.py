"""`Pattern`: the sparsity pattern of a model or a layer, as one validated value.

Three kinds: `unstructured` with a target (the fraction of zeros), `nm` (N of every M along
the reduction axis; its target is 1 - N/M) and `dense` (a layer left alone). Text enters
through `Pattern.parse` once, where it is validated; code past that point carries the value,
never the string. `str(p)` gives the text back: 'unstructured', '2:4' or 'dense'.

A Pattern is also a pydantic field type: a model field `pattern: Pattern` holds the value,
accepts a Pattern or its text ('2:4', 'dense'; 'unstructured' needs its target, so a model
holding one supplies it, see `Pattern.parse`) and serialises as the text. This is how the
pattern travels through bake, the manifest and verify as one value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

PatternKind = Literal["unstructured", "nm", "dense"]
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A frozen, validated sparsity pattern. Build it with `parse`, `unstructured`, `nm` or
    `dense`; the constructor checks the same rules, so no invalid value exists."""

    kind: PatternKind
    n: int = 0
    m: int = 0
    target: float = 0.0  # fraction of zeros; derived for 'nm' (1 - n/m) and 'dense' (0)

    def __post_init__(self) -> None:
        if self.kind == "nm":
            if not 1 <= self.n < self.m:
                raise ValueError(f"N:M pattern needs 1 <= N < M, got {self.n}:{self.m}")
            object.__setattr__(self, "target", 1.0 - self.n / self.m)
        elif self.kind in ("unstructured", "dense"):
            if self.n or self.m:
                raise ValueError(f"a {self.kind} pattern has no N:M, got n={self.n}, m={self.m}")
            if self.kind == "dense" and self.target != 0.0:
                raise ValueError(f"a dense pattern has target 0, got {self.target}")
            if isinstance(self.target, bool) or not 0.0 <= self.target < 1.0:
                raise ValueError(f"unstructured target (fraction of zeros) must be in [0, 1), "
                                 f"got {self.target!r}")
            object.__setattr__(self, "target", float(self.target))
        else:
            raise ValueError(f"pattern kind must be 'unstructured', 'nm' or 'dense', got {self.kind!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def unstructured(cls, target: float) -> Pattern:
        """Any `target` fraction of zeros in [0, 1), placed freely."""
        return cls("unstructured", target=target)

    @classmethod
    def nm(cls, n: int, m: int) -> Pattern:
        """At most `n` nonzeros in every group of `m` along the reduction axis (1 <= n < m)."""
        return cls("nm", n=n, m=m)

    @classmethod
    def dense(cls) -> Pattern:
        """No sparsity: a layer that is not sparsified."""
        return cls("dense")

    @classmethod
    def parse(cls, text: str | Pattern, target: float | None = None) -> Pattern:
        """'unstructured' (needs `target`), 'N:M' such as '2:4' (no `target`: it is implied) or
        'dense'. A Pattern passes through (checked against `target`). Raises ValueError
        naming the bad text (TypeError for a value that is not text)."""
        if isinstance(text, Pattern):
            if target is not None and (text.kind != "unstructured" or text.target != target):
                raise ValueError(f"target {target} conflicts with pattern {text!r}")
            return text
        if not isinstance(text, str):
            raise TypeError(f"pattern must be text: 'unstructured' or N:M like '2:4', got {text!r}")
        word = text.strip()
        if word == "unstructured":
            if target is None:
                raise ValueError("pattern 'unstructured' needs target (fraction of zeros, e.g. 0.9)")
            return cls.unstructured(target)
        if word == "dense":
            if target is not None:
                raise ValueError(f"pattern 'dense' takes no target, got {target}")
            return cls.dense()
        n, m = parse_nm(word)
        if target is not None:
            raise ValueError(f"target is implied by pattern '{n}:{m}' (1 - N/M); remove target")
        return cls.nm(n, m)

    # ------------------------------------------------------------------ pydantic field
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """Validate with `parse` (a Pattern passes through), serialise as `str(pattern)`."""
        from pydantic_core import core_schema

        def validate(value: Any) -> Pattern:
            try:
                return cls.parse(value)
            except TypeError as exc:  # pydantic reports ValueError only
                raise ValueError(str(exc)) from None

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(
                str, return_schema=core_schema.str_schema()))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "string", "description": "'unstructured', 'N:M' such as '2:4', or 'dense'"}

    # ------------------------------------------------------------------ views
    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"

    @property
    def density(self) -> float:
        """Fraction of weights kept: 1 - target (N/M for N:M)."""
        return 1.0 - self.target if self.kind != "nm" else self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    def __repr__(self) -> str:
        if self.kind == "nm":
            return f"Pattern.nm({self.n}, {self.m})"
        if self.kind == "dense":
            return "Pattern.dense()"
        return f"Pattern.unstructured({self.target})"


def unstructured_from_row(data: Any, target_key: str) -> Any:
    """For a pydantic `mode="before"` validator of a model with a `pattern: Pattern` field whose
    JSON keeps the target beside the text (the manifest's `target`, a layer row's `sparsity`):
    'unstructured' there becomes `Pattern.unstructured(data[target_key])`; anything else passes."""
    if isinstance(data, dict) and isinstance(data.get("pattern"), str) and data["pattern"].strip() == "unstructured":
        target = data.get(target_key)
        if isinstance(target, (int, float)) and not isinstance(target, bool) and 0.0 <= target <= 1.0:
            # a row's achieved sparsity may be 1.0 (every weight zero): the nearest valid target
            return {**data, "pattern": Pattern.unstructured(min(float(target), 1.0 - 1e-9))}
    return data


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4). Raises ValueError naming the problem for anything else."""
    match = _NM_RE.match(str(text))
    if not match:
        raise ValueError(f"N:M pattern must look like '2:4', got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern needs 1 <= N < M, got {n}:{m}")
    return n, m
