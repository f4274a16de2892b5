"""``--warm-start STORAGE[:STUDY]``: begin a study with the best trials of another one.

Moving from one dataset or backbone to the next, the recipes that won before are the best first
guesses. The top K complete trials of the source study (by its first objective) are enqueued once,
mapped by parameter name: parameters this space lacks are dropped, numbers outside its ranges are
clipped (and snapped to its step), categorical values it does not offer are dropped (sampled
instead). Each enqueued trial records where it came from (``warm_start`` user attr) and what was
dropped or clipped, which the summary prints.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from cxr_automl.errors import UserError
from cxr_automl.hpo import objectives
from cxr_automl.hpo import storage as storage_mod

DEFAULT_TOP = 3
_SCHEMES = ("journal", "sqlite", "postgresql", "mysql")


def split(spec: str) -> tuple[str, str | None]:
    """``journal:runs/a.log:spft`` -> (``journal:runs/a.log``, ``spft``); a study part has no ``/``."""
    left, sep, right = spec.rpartition(":")
    if not sep or "/" in right or not left or left.split("+")[0] in _SCHEMES:
        return spec, None
    return left, right


def clip(dist: BaseDistribution, value: Any) -> tuple[Any, bool] | None:
    """(value inside ``dist``, whether it changed), or None when it cannot be mapped."""
    if isinstance(dist, CategoricalDistribution):
        return (value, False) if value in dist.choices else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    inside = min(max(value, dist.low), dist.high)
    step = getattr(dist, "step", None)
    if step:
        inside = min(dist.low + round((inside - dist.low) / step) * step, dist.high)
    if isinstance(dist, IntDistribution):
        inside = int(round(inside))
    elif isinstance(dist, FloatDistribution):
        inside = float(inside)
    return inside, inside != value


def source_trials(spec: str, top: int) -> tuple[str, list[optuna.trial.FrozenTrial]]:
    storage_spec, name = split(spec)
    storage = storage_mod.open_storage(storage_spec, must_exist=True)
    names = storage_mod.retry(lambda: optuna.get_all_study_names(storage), storage_spec)
    if name is None:
        if len(names) != 1:
            raise UserError(f"--warm-start {spec}: the storage holds {len(names)} studies ({', '.join(names) or 'none'}); "
                            f"write --warm-start {storage_spec}:STUDY")
        name = names[0]
    elif name not in names:
        raise UserError(f"--warm-start {spec}: no study {name!r} there; it has: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.values]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return name, sorted(done, key=lambda t: t.values[0], reverse=maximize)[:top]


def enqueue(study: optuna.Study, spec: str, params: dict[str, BaseDistribution], top: int = DEFAULT_TOP) -> list[int]:
    """Enqueue the source's top trials once per study; returns the source trial numbers carried over."""
    if study.user_attrs.get("warm_started"):
        return []
    name, trials = source_trials(spec, top)
    carried = []
    for t in trials:
        mapped, clipped = {}, []
        for key, value in t.params.items():
            if key not in params:
                continue
            hit = clip(params[key], value)
            if hit is None:
                continue
            mapped[key] = hit[0]
            if hit[1]:
                clipped.append(f"{key}: {value!r} -> {hit[0]!r}")
        dropped = sorted(set(t.params) - set(mapped))
        study.enqueue_trial(mapped, skip_if_exists=True, user_attrs={
            "warm_start": f"{name} trial {t.number} ({objectives.names(study)[0]} {t.values[0]:.4f} there)",
            "warm_dropped": dropped, "warm_clipped": clipped})
        carried.append(t.number)
    study.set_user_attr("warm_started", {"from": spec, "study": name, "trials": carried})
    return carried


def describe(study: optuna.Study) -> list[str]:
    """Lines for the summary: which trials were carried over, and what was dropped or clipped."""
    src = study.user_attrs.get("warm_started")
    if not src:
        return []
    lines = [f"warm start: {len(src['trials'])} trial(s) carried over from study {src['study']} ({src['from']})"]
    for t in study.get_trials(deepcopy=False):
        if "warm_start" in t.user_attrs:
            extra = [f"dropped {', '.join(t.user_attrs['warm_dropped'])}" if t.user_attrs.get("warm_dropped") else "",
                     f"clipped {'; '.join(t.user_attrs['warm_clipped'])}" if t.user_attrs.get("warm_clipped") else ""]
            lines.append(f"  trial {t.number} ({t.state.name.lower()}) <- {t.user_attrs['warm_start']}"
                         + "".join(f"; {e}" for e in extra if e))
    return lines
