"""``cxr-automl plan``: a strategy's epoch-by-epoch schedule, computed from the configuration alone.

A strategy shows its schedule by declaring the ``PlannedSchedule`` protocol: ``schedule()`` gives the
rows (``--json`` prints them) and ``render_schedule(rows)`` lays them out as a table. Nothing is trained
and no model or dataset is built, so the plan of a long run can be checked before it is launched.
"""

from __future__ import annotations

from typing import Any, Sequence

from cxr_automl import config
from cxr_automl.errors import UserError
from cxr_automl.plugin import registry
from cxr_automl.plugin.strategy import PlannedSchedule


class PlanError(UserError):
    pass


def build(overrides: Sequence[str] = ()) -> tuple[str, PlannedSchedule]:
    """(strategy name, the strategy) of the configuration composed from ``overrides``."""
    cfg = config.compose(list(overrides))
    s_cfg = dict(cfg["strategy"])
    name = s_cfg.pop("name")
    strategy = registry.build("strategy", name, **s_cfg)
    if not isinstance(strategy, PlannedSchedule):
        raise PlanError(f"strategy {name!r} has no schedule that follows from its configuration alone; "
                        "`cxr-automl plan` works for strategies that declare the PlannedSchedule protocol "
                        "(Strategy.schedule() and render_schedule(); `cxr-automl plugins` lists the strategies); "
                        "`cxr-automl train --show-config` prints a strategy's whole configuration")
    return name, strategy


def rows_of(strategy: PlannedSchedule) -> list[dict[str, Any]]:
    """The strategy's schedule as plain dicts."""
    return [r.as_dict() if hasattr(r, "as_dict") else dict(r) for r in strategy.schedule()]

