"""How ``cxr-automl plan`` shows a Lock-Release schedule: the layout of Foundation X's Table 8."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _fraction(value: float) -> str:
    return "full" if value == 1 else ("half" if value == 0.5 else f"{value:g}")


def render(rows: list[dict[str, Any]]) -> Table:
    """One column per component kind, T (trains), F (frozen) or - (off the task's path); per-dataset
    components (``loc_decoder/heart``) show under their kind for the row's dataset."""
    kinds: list[str] = []
    for r in rows:
        for comp in r["components"]:
            kind = comp.split("/")[0]
            if kind not in kinds:
                kinds.append(kind)
    table = Table(title=f"lock_release: {len(rows)} epochs (T trains, F frozen, - not on the task's path)")
    for col in ("epoch", "cycle", "dataset", "task", "data", "mode", *kinds, "eval", "teacher"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        state = {comp.split("/")[0]: ("T" if on else "F") for comp, on in r["components"].items()}
        table.add_row(str(r["epoch"]), str(r.get("cycle", "")), str(r["dataset"]), str(r["task"]),
                      _fraction(float(r["fraction"])), str(r["mode"]), *(state.get(k, "-") for k in kinds),
                      "yes" if r.get("evaluate") else "", "ema" if r.get("teacher_update") else "")
    return table
