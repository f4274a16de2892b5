"""``--objective val/macro_auc,cost/device_s``: what a study optimises, and its Pareto front.

The first objective is the searched metric (the best epoch's validation value); the others may be
any ``cost/*`` attr (minimised) or another metric of the trial's ``best/``/``test/`` results
(``NAME:max`` / ``NAME:min`` to say which way). Optuna cannot prune a multi-objective trial
(``Trial.report`` refuses), so a multi-objective search prunes on the primary metric alone:
each epoch's value is kept in the trial's ``curve`` user attr and the median rule — stop a trial whose
best value so far is worse than the median of the complete trials at the same epoch — is applied to it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from cxr_automl.errors import UserError


def parse(text: str | None, metric: str, direction: str) -> list[tuple[str, str]]:
    """``[(name, direction), ...]``; the first is always the search space's metric."""
    items = [s.strip() for s in (text or metric).split(",") if s.strip()]
    out = []
    for i, item in enumerate(items):
        name, _, way = item.partition(":")
        if way and way not in ("max", "min"):
            raise UserError(f"--objective {item!r}: write NAME, NAME:max or NAME:min")
        if i == 0 and name != metric:
            raise UserError(f"--objective {text!r}: the first objective is the search space's metric ({metric}); "
                            f"write --objective {metric},{','.join(items[1:] or ['cost/device_s'])}")
        default = direction if i == 0 else ("minimize" if name.startswith("cost/") else "maximize")
        out.append((name, {"max": "maximize", "min": "minimize"}.get(way, default)))
    if len({n for n, _ in out}) != len(out):
        raise UserError(f"--objective {text!r} names an objective twice")
    return out


def value_of(name: str, metrics: dict[str, float], attrs: dict[str, Any], metric: str) -> float | None:
    """An objective's value for a finished run: the best epoch's metric, a cost, or a final metric."""
    if name == metric:
        return metrics.get(f"best/{metric}")
    value = attrs.get(name, metrics.get(name))
    return None if value is None or not math.isfinite(float(value)) else float(value)


def is_multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def primary(t: FrozenTrial) -> float | None:
    return t.values[0] if t.values else None


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best trial by the primary objective (what a single-objective study calls best)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if not done:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return (max if maximize else min)(done, key=lambda t: t.values[0])


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Optuna's non-dominated complete trials (feasible ones where ``--max-cost`` set constraints)."""
    if not is_multi(study):
        best = best_trial(study)
        return [best] if best else []
    return sorted(study.best_trials, key=lambda t: t.number)


def names(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get("objectives") or [study.user_attrs.get("metric") or "objective"])


def curve(t: FrozenTrial) -> dict[int, float]:
    """Per-epoch primary values: Optuna's intermediate values, or (multi-objective) the ``curve`` attr."""
    if t.intermediate_values:
        return dict(t.intermediate_values)
    return {int(k): float(v) for k, v in (t.user_attrs.get("curve") or {}).items()}


def median_prune(study: optuna.Study, curve_now: dict[int, float], warmup: int, maximize: bool,
                 n_startup: int = 3) -> bool:
    """The median rule on the primary metric for a multi-objective study (Optuna's MedianPruner
    semantics: after ``n_startup`` complete trials and from epoch ``warmup`` on)."""
    if not curve_now:
        return False
    step = max(curve_now)
    if step < warmup:
        return False
    others = [curve(t).get(step) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    others = [v for v in others if v is not None]
    if len(others) < n_startup:
        return False
    best = (max if maximize else min)(curve_now.values())
    median = float(np.median(others))
    return best < median if maximize else best > median
