"""Which backbone × head × dataset-task combinations make sense, decided before anything is built.

A head factory declares what its heads do and need as data (``HeadSpec``, through ``@declare_head``):
the task, and how many multi-scale maps it needs as a function of its config. A backbone class says
how many maps it gives (``num_feature_maps``), read from the class its factory declares it returns. A
third-party plugin without these declarations is assumed compatible and is checked when the model is built.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from cxr_automl.plugin import registry
from cxr_automl.plugin.interfaces import HeadSpec


@dataclass(frozen=True)
class Combination:
    backbone: str
    head: str
    task: str | None
    ok: bool
    reason: str = ""


def _returned_class(kind: str, name: str) -> type | None:
    factory = registry.load(kind, name)
    try:
        cls = typing.get_type_hints(factory).get("return")
    except Exception:  # annotations that do not resolve: no declaration
        return None
    return cls if isinstance(cls, type) else None


def head_spec(name: str) -> HeadSpec | None:
    """The ``HeadSpec`` head factory ``name`` declares, or None."""
    spec = getattr(registry.load("head", name), "head_spec", None)
    return spec if isinstance(spec, HeadSpec) else None


def head_task(name: str) -> str | None:
    spec = head_spec(name)
    return spec.task if spec is not None else None


def _with_defaults(head: str, head_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The head's config with its factory's defaults filled in (what the factory would be called with)."""
    params = registry.factory_params(registry.load("head", head))
    cfg = {k: p.default for k, p in params.items() if p.default is not p.empty}
    cfg.update({k: v for k, v in (head_cfg or {}).items() if k != "name"})
    return cfg


def check(backbone: str, head: str, head_cfg: dict[str, Any] | None = None) -> Combination:
    """Whether ``head`` can sit on ``backbone``; ``reason`` is a one-line fix when not."""
    spec, b_cls = head_spec(head), _returned_class("backbone", backbone)
    task = spec.task if spec is not None else None
    need = spec.maps_needed(_with_defaults(head, head_cfg)) if spec is not None else 0
    have = getattr(b_cls, "num_feature_maps", None) if b_cls is not None else None
    if have is not None and need > have:
        return Combination(backbone, head, task, False,
                           f"head {head!r} needs {need} multi-scale feature maps but backbone {backbone!r} "
                           f"gives {have}; choose another head or backbone (`cxr-automl plugins --matrix`)")
    return Combination(backbone, head, task, True)


def check_config(cfg: dict[str, Any]) -> str | None:
    """The reason a composed config cannot work (backbone/head/dataset task), or None."""
    combo = check(cfg["backbone"]["name"], cfg["head"]["name"], cfg["head"])
    if not combo.ok:
        return combo.reason
    strategy = _returned_class("strategy", cfg["strategy"]["name"])
    if getattr(strategy, "head_is_template", False):  # it checks each dataset's tasks when it composes them
        return None
    data_task = cfg["dataset"].get("task")
    if data_task is None:  # the loader's natural task (its factory's default), when it declares one
        p = registry.factory_params(registry.load("dataset", cfg["dataset"]["name"])).get("task")
        data_task = None if p is None or p.default is p.empty else p.default
    if combo.task and data_task and combo.task != data_task:
        return (f"head {combo.head!r} does {combo.task} but dataset {cfg['dataset']['name']!r} gives "
                f"task={data_task}: add dataset.task={combo.task} or choose a {data_task} head "
                f"(`cxr-automl plugins --matrix`)")
    return None


def matrix() -> list[Combination]:
    """Every registered backbone × head pair with its verdict."""
    return [check(b, h) for b in registry.available("backbone") for h in registry.available("head")]


def print_matrix(as_json: bool = False) -> None:
    """``cxr-automl plugins --matrix``: backbones as rows, heads as columns, the head's task on top."""
    import json

    from rich.console import Console
    from rich.table import Table
    combos = matrix()
    if as_json:
        print(json.dumps([c.__dict__ for c in combos], indent=2))
        return
    heads = list(registry.available("head"))
    table = Table(title="valid backbone × head combinations (dataset.task must match the head's task)")
    table.add_column("backbone")
    for h in heads:
        table.add_column(f"{h}\n({head_task(h) or '?'})", justify="center")
    for b in registry.available("backbone"):
        row = {c.head: c for c in combos if c.backbone == b}
        table.add_row(b, *("[green]yes[/green]" if row[h].ok else "[red]no[/red]" for h in heads))
    Console().print(table)
    for c in combos:
        if not c.ok:
            Console().print(f"{c.backbone} × {c.head}: {c.reason}")
