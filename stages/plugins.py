"""User plugins named "package.module:callable": resolve them and check their options.

Shared by the model and data stages for user-supplied factories. Modules are looked up on
`sys.path` and, before it, in the plugin directories (`set_plugin_dirs`: the pipeline sets
the config file's directory and the working directory), so a plugin next to the config
imports without setting PYTHONPATH.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Mapping, Sequence, get_type_hints

from pydantic import BaseModel, ValidationError, create_model

from stages.base import StageError, StrictModel

_plugin_dirs: list[Path] = []


def set_plugin_dirs(dirs: Sequence[str | Path]) -> None:
    """Where `import_callable` looks for plugin modules before `sys.path`, first one first."""
    _plugin_dirs[:] = [Path(d).resolve() for d in dirs]


def plugin_dirs() -> list[Path]:
    return list(_plugin_dirs)


@contextlib.contextmanager
def _plugin_path() -> Iterator[None]:
    """The plugin directories at the front of sys.path for one import, removed afterwards."""
    added = [str(d) for d in _plugin_dirs if str(d) not in sys.path]
    sys.path[:0] = added
    importlib.invalidate_caches()  # a plugin file written after the last import is seen
    try:
        yield
    finally:
        for entry in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def import_callable(spec: str, kind: str) -> Callable[..., Any]:
    """Resolve "package.module:attr[.attr]" to a callable; StageError says exactly what failed.

    Shared by the model and data stages for user-supplied factories.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise StageError(f"{kind} {spec!r}: expected 'package.module:callable'")
    try:
        with _plugin_path():
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - an ImportError, or whatever the module raised
        searched = ", ".join(str(d) for d in _plugin_dirs) or "sys.path only"
        raise StageError(f"{kind} {spec!r}: cannot import module {module_name!r}: "
                         f"{type(exc).__name__}: {exc} (searched {searched}, then sys.path)") from exc
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


def signature_schema(factory: Callable[..., Any], name: str, skip: int,
                     bounds: Mapping[str, Any]) -> type[BaseModel]:
    """A strict pydantic model of a factory's keyword options, derived from its signature.

    Each parameter after the first `skip` becomes a field with the parameter's annotation and
    default; `bounds` maps a parameter name to a `Field(...)` with its allowed range (so a
    width of 1e9 is refused before anything is built). Unknown names are refused by the model.
    """
    hints = get_type_hints(factory)
    fields: dict[str, Any] = {}
    for param in list(inspect.signature(factory).parameters.values())[skip:]:
        if param.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            continue
        annotation = hints.get(param.name, Any)
        if param.name in bounds:
            annotation = Annotated[annotation, bounds[param.name]]
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    return create_model(f"{name}_options", __base__=StrictModel, **fields)


def schema_problems(schema: type[BaseModel], options: Mapping[str, Any], what: str) -> list[tuple[str, str]]:
    """Validate `options` against `schema`: (key under `options`, message) per problem."""
    try:
        schema.model_validate(dict(options))
    except ValidationError as exc:
        valid = ", ".join(schema.model_fields) or "(none)"
        problems = []
        for err in exc.errors():
            where = ".".join(["options", *(str(p) for p in err["loc"])])
            if err["type"] == "extra_forbidden":
                problems.append((where, f"{what}: unknown option; valid: {valid}"))
            else:
                problems.append((where, f"{what}: {err['msg'].removeprefix('Value error, ')} "
                                        f"(got {err.get('input')!r})"))
        return problems
    return []
