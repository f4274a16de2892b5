"""Which backbone × head × dataset-task combinations make sense, decided before anything is built.

Read from the classes the factories declare they return (their return annotation): a head class says
its ``task`` and how many multi-scale maps it needs (``min_feature_maps``, or a static
``feature_maps_needed(head_cfg)`` when that depends on its config); a backbone class says how many
maps it gives (``num_feature_maps``). A third-party plugin without these declarations is assumed compatible
and is checked when the model is built.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from cxr_automl.plugin import registry


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


def head_task(name: str) -> str | None:
    cls = _returned_class("head", name)
    return getattr(cls, "task", None) if cls is not None else None


def check(backbone: str, head: str, head_cfg: dict[str, Any] | None = None) -> Combination:
    """Whether ``head`` can sit on ``backbone``; ``reason`` is a one-line fix when not."""
    h_cls, b_cls = _returned_class("head", head), _returned_class("backbone", backbone)
    task = getattr(h_cls, "task", None) if h_cls is not None else None
    need = int(getattr(h_cls, "min_feature_maps", 0) or 0)
    levels = (head_cfg or {}).get("levels", _default(head, "levels"))
    if isinstance(levels, int):
        need = max(need, levels)  # a detection head on the backbone's last `levels` maps
    needed = getattr(h_cls, "feature_maps_needed", None)
    if callable(needed):  # a head whose need depends on its config (e.g. which level it embeds)
        need = max(need, int(needed(head_cfg or {})))
    have = getattr(b_cls, "num_feature_maps", None) if b_cls is not None else None
    if have is not None and need > have:
        return Combination(backbone, head, task, False,
                           f"head {head!r} needs {need} multi-scale feature maps but backbone {backbone!r} "
                           f"gives {have}; choose another head or backbone (`cxr-automl plugins --matrix`)")
    return Combination(backbone, head, task, True)


def _default(head: str, key: str) -> Any:
    p = registry.factory_params(registry.load("head", head)).get(key)
    return None if p is None or p.default is p.empty else p.default


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
