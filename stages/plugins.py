"""User plugins named "package.module:callable": resolve them and check their options.

Shared by the model and data stages for user-supplied factories.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping, Sequence

from stages.base import StageError


def import_callable(spec: str, kind: str) -> Callable[..., Any]:
    """Resolve "package.module:attr[.attr]" to a callable; StageError says exactly what failed.

    Shared by the model and data stages for user-supplied factories.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise StageError(f"{kind} {spec!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StageError(f"{kind} {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise StageError(
                f"{kind} {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise StageError(
            f"{kind} {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable"
        )
    return obj


def check_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    what: str,
    skip: int = 0,
    reserved: Sequence[str] = (),
) -> None:
    """Reject option names the factory does not accept, listing the ones it does.

    `skip` is how many leading positional parameters the caller fills itself; `reserved`
    names keyword arguments the caller passes (e.g. `seed`), which options may not set.
    Factories that take **kwargs accept any other name, so only `reserved` is checked for them.
    """
    clash = sorted(set(options) & set(reserved))
    if clash:
        raise StageError(
            f"{what}: option(s) {', '.join(clash)} are set by the pipeline, not options"
        )
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # builtins/C callables without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [
        p.name
        for p in params[skip:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in reserved
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise StageError(
            f"{what}: unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(valid) if valid else '(none)'}"
        )
