"""The samplers and pruners a study is created with, and how ``auto`` warm-up and look-ahead resolve."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import optuna

from cxr_automl import config as config_mod
from cxr_automl.errors import UserError
from cxr_automl.plugin import registry
from cxr_automl.hpo.searchspace import SearchSpace

#: samplers that take Optuna's ``constraints_func`` (``--max-cost``)
CONSTRAINED = ("tpe", "gp", "nsga2")


def make_sampler(name: str, seed: int, constraints_func: Callable[..., Any] | None = None
                 ) -> optuna.samplers.BaseSampler:
    c = {"constraints_func": constraints_func} if constraints_func is not None else {}
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, **c),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
                "gp": lambda: optuna.samplers.GPSampler(seed=seed, **c),
                "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
                "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, **c)}
    if name not in samplers:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(samplers)}")
    if c and name not in CONSTRAINED:
        raise ValueError(f"--max-cost needs a sampler that takes constraints: --sampler {' | '.join(CONSTRAINED)} "
                         f"(not {name})")
    return samplers[name]()


def resolve_prune_warmup(value: str, space: SearchSpace, overrides: tuple[str, ...] = ()) -> int:
    """``auto``: a quarter of the epochs the trial's strategy states (``Strategy.epochs``), at least 2
    (2 when its configuration does not build). Judging earlier stops the recipes that dip before they climb — SPFT with deep
    unfreezing and a high backbone LR was the best recipe and among the worst at epoch 3 (bench/scale.py)."""
    if value != "auto":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--prune-warmup {value!r}: use auto or an epoch index >= 0") from None
    epochs = strategy_epochs(config_mod.compose([*space.overrides, *overrides]))
    return max(2, round(epochs / 4)) if epochs is not None else 2


def strategy_epochs(cfg: dict) -> int | None:
    """The epoch count of the configured strategy, built from its configuration alone (no model, no
    data): ``strategy.epochs`` for most, the schedule's length for one that follows a schedule."""
    s_cfg = dict(cfg.get("strategy") or {})
    try:
        return int(registry.build("strategy", s_cfg.pop("name"), **s_cfg).epochs)
    except (UserError, ValueError, TypeError, KeyError):  # a configuration the trial itself will report
        return None


LOOKAHEAD_PRUNERS = ("successive_halving",)


def resolve_prune_lookahead(value: str, pruner: str) -> float:
    """``auto``: 1/8 for successive halving, 0 (off) for the others. Replayed in bench/scale.py over
    five measured 20-trial searches of 24 epochs, it raised successive halving's saving to the same best
    from 1.67-1.91x to 1.86-2.05x and stopped the best recipe in 46 instead of 117 of 1000 shuffled
    orders (48 epochs: 1.77x to 2.06x). With the median pruner it prunes less, so it is not offered
    there; hyperband is not wrapped because Optuna's samplers recognise it by its type."""
    if value == "auto":
        return 0.125 if pruner in LOOKAHEAD_PRUNERS else 0.0
    try:
        fraction = float(value)
        if not math.isfinite(fraction) or fraction < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--prune-lookahead {value!r}: use auto or a fraction >= 0 (e.g. 0.125)") from None
    if fraction and pruner not in LOOKAHEAD_PRUNERS:
        raise ValueError(f"--prune-lookahead {value}: only --pruner successive_halving judges by look-ahead; "
                         "drop the option or use that pruner")
    return fraction


class LookAheadPruner(optuna.pruners.BasePruner):
    """Judges a trial at each rung by where its curve is heading, not only where it is: the rung's
    value plus ``fraction`` of what the trial would still gain by its last epoch if its slope over the
    last ``window`` epochs held (damped learning-curve extrapolation). A slow starter that climbs fast
    (SPFT unfreezing deep with a high backbone LR) is stopped less often; a flat curve is judged as
    before. Only the comparison sees the projection: the stored curves stay the measured values.
    The trial's epoch count comes from its ``epochs`` user attr (set by ``run_trial``)."""

    def __init__(self, inner: optuna.pruners.BasePruner, fraction: float, window: int = 3):
        self.inner, self.fraction, self.window = inner, fraction, window

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        values, step, epochs = trial.intermediate_values, trial.last_step, trial.user_attrs.get("epochs")
        if step is None or not epochs:
            return self.inner.prune(study, trial)
        start = max((s for s in values if s <= step - self.window), default=min(values))
        slope = (values[step] - values[start]) / (step - start) if step > start else 0.0
        view = copy.copy(trial)
        ahead = self.fraction * slope * max(0, int(epochs) - 1 - step)
        view.intermediate_values = {**values, step: values[step] + ahead}
        return self.inner.prune(study, view)


def make_pruner(name: str, warmup: int = 2, lookahead: float = 0.0) -> optuna.pruners.BasePruner:
    """``warmup``: the first epoch (0-based) at which a trial may be stopped; the median pruner's
    warm-up steps, the first rung of successive halving and hyperband. ``lookahead``: see
    ``LookAheadPruner`` (successive halving only)."""
    if warmup < 0:
        raise ValueError(f"--prune-warmup {warmup}: use an epoch index >= 0")
    rung = max(1, warmup)
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=rung),
               "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=rung),
               "none": optuna.pruners.NopPruner}
    if name not in pruners:
        raise ValueError(f"unknown pruner {name!r}; use one of {', '.join(pruners)}")
    if lookahead and name in LOOKAHEAD_PRUNERS:
        return LookAheadPruner(pruners[name](), lookahead)
    return pruners[name]()
