"""Config values checked against the types their consumers declare, at compose time.

The expected type of ``strategy.epochs`` is read from the selected factory's signature (its
annotation, else the type of its default), and that of ``trainer.*`` from ``TrainerConfig``'s
fields — never from a hand-kept list — so ``strategy.epochs=abc`` is a one-line error before
anything is built or trained. Annotations the checker does not understand (``Any``, lists, plugin
classes) are left to the consumer.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable

#: the scalar kinds a config value can have after Hydra parses it
_SCALARS = (bool, int, float, str, type(None))
_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _kinds(annotation: Any) -> set[Any] | None:
    """The scalar types (and Literal values, as tuples) an annotation admits; None = not checked."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: set[Any] = set()
        for arg in typing.get_args(annotation):
            kinds = _kinds(arg)
            if kinds is None:
                return None
            out |= kinds
        return out
    if origin is typing.Literal:
        return {("literal", v) for v in typing.get_args(annotation)}
    if annotation in _SCALARS:
        return {annotation}
    if annotation is None:
        return {type(None)}
    return None


def expected_kinds(annotation: Any, default: Any) -> set[Any] | None:
    """From the annotation when there is a usable one, else from a scalar default."""
    if annotation is not inspect.Parameter.empty:
        kinds = _kinds(annotation)
        if kinds is not None and default is None:
            kinds.add(type(None))
        return kinds
    if default is inspect.Parameter.empty or default is None or not isinstance(default, _SCALARS):
        return None
    return {type(default)}


def _accepts(kinds: set[Any], value: Any) -> bool:
    for kind in kinds:
        if isinstance(kind, tuple):
            if value == kind[1] and type(value) is type(kind[1]):
                return True
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return True  # 16 for a string option that means "16": its consumer reads it as str()
        elif kind in (bool, type(None)) and type(value) is kind:
            return True
    return False


def describe(kinds: set[Any]) -> str:
    literals = [repr(k[1]) for k in kinds if isinstance(k, tuple)]
    plain = [_NAMES[k] for k in (int, float, bool, str, type(None)) if k in kinds]
    if float in kinds and int in kinds:
        plain.remove(_NAMES[int])
    return " or ".join([*plain, *(["one of " + ", ".join(literals)] if literals else [])])


def _hints(obj: Any) -> dict[str, Any]:
    try:  # resolves `from __future__ import annotations` strings in the object's own module
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve here is simply not checked
        return {}


def factory_kinds(factory: Callable[..., Any], params: dict[str, inspect.Parameter]) -> dict[str, set[Any]]:
    hints = _hints(factory)
    out = {}
    for name, p in params.items():
        kinds = expected_kinds(hints.get(name, p.annotation if not isinstance(p.annotation, str) else
                                         inspect.Parameter.empty), p.default)
        if kinds is not None:
            out[name] = kinds
    return out


def dataclass_kinds(cls: type) -> dict[str, set[Any]]:
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
        kinds = expected_kinds(hints.get(f.name, inspect.Parameter.empty), default)
        if kinds is not None:
            out[f.name] = kinds
    return out


def mismatches(prefix: str, node: dict[str, Any], kinds: dict[str, set[Any]]) -> list[str]:
    """``prefix.key='value' (needs ...)`` for every value of ``node`` its declared type rejects."""
    return [f"{prefix}.{key}={value!r} (needs {describe(kinds[key])})"
            for key, value in node.items() if key in kinds and not _accepts(kinds[key], value)]
