"""One registry over the ``cxr_automl.*`` entry-point groups.

Finding reads installed package metadata only (no plugin is imported); loading imports exactly the
entry point asked for. Built-in components are declared in the same groups by cxr-automl's own
pyproject, so they are found exactly like third-party ones.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from cxr_automl.errors import UserError

KINDS: dict[str, str] = {
    "backbone": "cxr_automl.backbones",
    "head": "cxr_automl.heads",
    "strategy": "cxr_automl.strategies",
    "dataset": "cxr_automl.datasets",
}


PLURAL = {"backbone": "backbones", "head": "heads", "strategy": "strategies", "dataset": "datasets"}


class RegistryError(UserError):
    """A plugin problem the user can fix (unknown name, clash, broken plugin)."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    value: str  # "module:attr"
    distribution: str
    version: str


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


@lru_cache(maxsize=None)
def _find(kind: str) -> dict[str, PluginInfo]:
    if kind not in KINDS:
        raise RegistryError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=KINDS[kind]):
        name, version = _dist_of(ep)
        info = PluginInfo(kind, ep.name, ep.value, name, version)
        prev = found.get(ep.name)
        if prev is not None and prev.value != info.value:
            # the same distribution seen twice on sys.path (editable + build dir) is not a clash
            if prev.distribution != info.distribution:
                raise RegistryError(
                    f"{kind} {ep.name!r} is declared by two distributions: "
                    f"{prev.distribution}[{prev.value}] and {info.distribution}[{info.value}]; "
                    "uninstall one of them")
        found.setdefault(ep.name, info)
    return dict(sorted(found.items()))


def available(kind: str) -> dict[str, PluginInfo]:
    """Every registered component of a kind, by name, from metadata alone."""
    return _find(kind)


def info(kind: str, name: str) -> PluginInfo:
    known = available(kind)
    if name not in known:
        raise RegistryError(
            f"unknown {kind} {name!r}; known {PLURAL[kind]}: {', '.join(known) or '(none)'}")
    return known[name]


@lru_cache(maxsize=None)
def _load(kind: str, name: str) -> Callable[..., Any]:
    plugin = info(kind, name)
    module, _, attr = plugin.value.partition(":")
    ep = md.EntryPoint(name=name, value=plugin.value, group=KINDS[kind])
    try:
        factory = ep.load()
    except Exception as exc:  # a broken plugin must not take the others down
        raise RegistryError(
            f"{kind} {name!r} from {plugin.distribution}[{plugin.value}] failed to load: "
            f"{type(exc).__name__}: {exc}") from exc
    if not callable(factory):
        raise RegistryError(f"{kind} {name!r} from {plugin.distribution}[{plugin.value}] is not callable")
    return factory


def load(kind: str, name: str) -> Callable[..., Any]:
    """Import exactly one entry point and return its factory."""
    return _load(kind, name)


def factory_params(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """Keyword parameters of a factory (what a config node may set)."""
    return {n: p for n, p in inspect.signature(factory).parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def build(kind: str, name: str, /, supplied: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Call a factory with user keys ``kwargs`` (validated) and core-supplied keys ``supplied``.

    Core-supplied keys (``num_classes``, ``in_dim``...) are passed only if the factory accepts them.
    """
    factory = load(kind, name)
    params = factory_params(factory)
    takes_var = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    unknown = sorted(k for k in kwargs if k not in params and not takes_var)
    if unknown:
        user_keys = [k for k in params if k not in (supplied or {})]
        raise RegistryError(
            f"{kind} {name!r} has no option {', '.join(unknown)}; its options: {', '.join(user_keys)}")
    extra = {k: v for k, v in (supplied or {}).items() if k in params or takes_var}
    try:
        return factory(**kwargs, **extra)
    except RegistryError:  # a nested build (a strategy's own dataset) already named its component
        raise
    except (ValueError, TypeError) as exc:  # a factory rejecting its arguments is a config problem
        raise RegistryError(f"{kind} {name!r}: {exc}") from exc


def inventory() -> list[dict[str, Any]]:
    """Every registered component with its distribution and whether it loads (``cxr-automl plugins``);
    a kind whose listing fails is one row with the error, and the other kinds are still listed."""
    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        try:
            found = available(kind)
        except RegistryError as exc:
            rows.append({"kind": kind, "name": "?", "distribution": "?", "version": "?", "value": "?",
                         "loads": False, "error": str(exc)})
            continue
        for name, found_info in found.items():
            try:
                load(kind, name)
                ok, err = True, ""
            except RegistryError as exc:
                ok, err = False, str(exc)
            rows.append({"kind": kind, "name": name, "distribution": found_info.distribution,
                         "version": found_info.version, "value": found_info.value, "loads": ok, "error": err})
    return rows
