"""``cxr-automl search``: an Optuna study whose trials are training runs.

Ask/tell loop until the study holds ``n_trials`` finished (complete or pruned) trials, so re-running
the same command after an interruption finishes the rest and never overshoots. Each epoch's
validation metric is reported to Optuna for pruning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.progress import Progress

from cxr_automl import config as config_mod
from cxr_automl import run as run_mod
from cxr_automl.callbacks import make_progress
from cxr_automl.loop import Callback, Trainer
from cxr_automl.searchspace import SearchSpace, format_value, lookup
from cxr_automl.trainer_utils import NonFiniteLossError

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class OptunaReporter(Callback):
    """Reports the monitored validation metric each epoch and prunes when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, step=int(metrics["epoch"]))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']} ({self.metric}={value:.4f})")


@dataclass
class SearchOptions:
    space: SearchSpace
    n_trials: int
    storage: str
    study_name: str
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    overrides: tuple[str, ...] = ()
    runs_root: Path = Path("runs")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
                "gp": lambda: optuna.samplers.GPSampler(seed=seed),
                "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
                "grid": None}
    if name not in samplers or name == "grid":
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(k for k in samplers if k != 'grid')}")
    return samplers[name]()


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=2),
               "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=2),
               "none": optuna.pruners.NopPruner}
    if name not in pruners:
        raise ValueError(f"unknown pruner {name!r}; use one of {', '.join(pruners)}")
    return pruners[name]()


def trial_overrides(opts: SearchOptions, params: dict[str, Any]) -> list[str]:
    return [*opts.space.overrides, *opts.overrides, *(f"{k}={format_value(v)}" for k, v in params.items())]


def enqueue_baselines(study: optuna.Study, opts: SearchOptions) -> None:
    """Enqueue the search space's baselines once per study; params left out take the config default."""
    if study.user_attrs.get("baselines_enqueued"):
        return
    base_cfg = config_mod.compose([*opts.space.overrides, *opts.overrides])
    for name, fixed in opts.space.baselines.items():
        params = {}
        for key, dist in opts.space.params.items():
            value = fixed.get(key, lookup(base_cfg, key))
            if value is None or not _contains(dist, value):
                log.warning("baseline %s: %s=%r is outside the search space; sampled instead", name, key, value)
                continue
            params[key] = value
        study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
    study.set_user_attr("baselines_enqueued", True)


def _contains(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def run_trial(study: optuna.Study, trial: optuna.Trial, opts: SearchOptions, progress: Progress) -> None:
    params = {k: trial.params[k] for k in opts.space.params}
    resume_dir = trial.user_attrs.get("resume_run_dir")
    run_dir = Path(resume_dir) if resume_dir else opts.runs_root / opts.study_name / f"trial_{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    try:
        cfg = config_mod.compose(trial_overrides(opts, params))
        for kind in config_mod.GROUPS:
            trial.set_user_attr(kind, cfg[kind]["name"])
        metrics = run_mod.train(cfg, run_dir, [OptunaReporter(trial, opts.space.metric)], progress,
                                label=f"trial {trial.number} ")
    except optuna.TrialPruned as exc:
        trial.set_user_attr("pruned_reason", str(exc))
        study.tell(trial, state=TrialState.PRUNED)
        return
    except KeyboardInterrupt:
        trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); the next run resumes it from its checkpoint")
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(params, user_attrs={"resume_run_dir": str(run_dir),
                                                **({"baseline": trial.user_attrs["baseline"]}
                                                   if "baseline" in trial.user_attrs else {})})
        raise
    except (NonFiniteLossError, ValueError, RuntimeError, MemoryError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        progress.console.print(f"[red]trial {trial.number} failed[/red]: {reason}")
        return
    trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if "/" in k})
    value = metrics.get(f"best/{opts.space.metric}")
    if value is None:
        trial.set_user_attr("fail_reason", f"metric {opts.space.metric} was never computed")
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, value)


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def search(opts: SearchOptions) -> optuna.Study:
    """Run trials until the study holds ``opts.n_trials`` finished trials; return the study."""
    config_mod.compose([*opts.space.overrides, *opts.overrides])  # fail fast on a bad override
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bars and table say it better
    study = optuna.create_study(storage=opts.storage, study_name=opts.study_name, load_if_exists=True,
                                direction=opts.space.direction, sampler=make_sampler(opts.sampler, opts.seed),
                                pruner=make_pruner(opts.pruner))
    study.set_user_attr("search_space", str(opts.space.path))
    study.set_user_attr("metric", opts.space.metric)
    enqueue_baselines(study, opts)
    failures_in_a_row = 0
    with make_progress() as progress:
        bar = progress.add_task("trials", total=opts.n_trials, completed=n_finished(study), info="")
        while n_finished(study) < opts.n_trials:
            if failures_in_a_row >= max(3, opts.n_trials):
                progress.console.print("[red]too many failed trials in a row; stopping[/red]")
                break
            trial = study.ask(fixed_distributions=opts.space.params)
            run_trial(study, trial, opts, progress)
            state = study.get_trials(deepcopy=False)[trial.number].state
            failures_in_a_row = failures_in_a_row + 1 if state == TrialState.FAIL else 0
            best = _best_value(study)
            progress.update(bar, completed=n_finished(study),
                            info="" if best is None else f"best {opts.space.metric} {best:.4f}")
    return study


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None
