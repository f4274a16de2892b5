"""``cxr-automl plan``: a strategy's epoch-by-epoch schedule, computed from the configuration alone.

A strategy exposes its schedule through the optional ``Strategy.schedule()`` hook (rows with at least
epoch, dataset, task, fraction, mode and trainable components); nothing is trained and no model or
dataset is built, so the plan of a long multi-dataset run can be checked before it is launched.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table

from cxr_automl import config
from cxr_automl.errors import UserError
from cxr_automl.plugin import registry


class PlanError(UserError):
    pass


def schedule_rows(overrides: Sequence[str] = ()) -> tuple[str, list[dict[str, Any]]]:
    """(strategy name, rows as plain dicts) of the configuration composed from ``overrides``."""
    cfg = config.compose(list(overrides))
    s_cfg = dict(cfg["strategy"])
    name = s_cfg.pop("name")
    strategy = registry.build("strategy", name, **s_cfg)
    rows = strategy.schedule()
    if rows is None:
        raise PlanError(f"strategy {name!r} has no schedule that follows from its configuration alone; "
                        "`cxr-automl plan` works for strategies that define Strategy.schedule() "
                        "(e.g. strategy=lock_release); `cxr-automl train --show-config` prints its whole "
                        "configuration")
    return name, [r.as_dict() if hasattr(r, "as_dict") else dict(r) for r in rows]


def _fraction(value: float) -> str:
    return "full" if value == 1 else ("half" if value == 0.5 else f"{value:g}")


def render(name: str, rows: list[dict[str, Any]]) -> Table:
    """Table 8's layout: one column per component kind, T (trains), F (frozen) or - (off the path);
    per-dataset components (``loc_decoder/heart``) show under their kind for the row's dataset."""
    kinds: list[str] = []
    for r in rows:
        for comp in r["components"]:
            kind = comp.split("/")[0]
            if kind not in kinds:
                kinds.append(kind)
    table = Table(title=f"{name}: {len(rows)} epochs (T trains, F frozen, - not on the task's path)")
    for col in ("epoch", "cycle", "dataset", "task", "data", "mode", *kinds, "eval", "teacher"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        state = {comp.split("/")[0]: ("T" if on else "F") for comp, on in r["components"].items()}
        table.add_row(str(r["epoch"]), str(r.get("cycle", "")), str(r["dataset"]), str(r["task"]),
                      _fraction(float(r["fraction"])), str(r["mode"]), *(state.get(k, "-") for k in kinds),
                      "yes" if r.get("evaluate") else "", "ema" if r.get("teacher_update") else "")
    return table
