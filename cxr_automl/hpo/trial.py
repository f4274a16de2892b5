"""One trial: compose its config, train it as a run, report each epoch for pruning, and tell the study
how it ended (complete, pruned, or failed with its one-line reason — never the whole search)."""

from __future__ import annotations

import logging
import math
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState
from rich.progress import Progress
from submitit.core.utils import UncompletedJobError

from cxr_automl import config as config_mod
from cxr_automl.errors import TrainingError, UserError
from cxr_automl.hpo import cost as cost_mod
from cxr_automl.hpo import objectives
from cxr_automl.hpo.searchspace import format_value
from cxr_automl.train import run as run_mod
from cxr_automl.train.loop import Callback, Trainer

if TYPE_CHECKING:
    from cxr_automl.hpo.search import SearchOptions

log = logging.getLogger(__name__)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class OptunaReporter(Callback):
    """Reports the monitored validation metric each epoch and prunes when the pruner says so.

    In a multi-objective study (where Optuna refuses ``report``) the curve goes to the ``curve`` user
    attr and, with the median pruner, the median rule is applied to the primary metric
    (``objectives.median_prune``)."""

    def __init__(self, trial: optuna.Trial, metric: str, study: optuna.Study | None = None,
                 multi_prune: tuple[int, bool] | None = None):
        self.trial, self.metric, self.study, self.multi_prune = trial, metric, study, multi_prune
        self.curve: dict[int, float] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        # the look-ahead pruner projects to the last epoch: the count the built strategy states
        self.trial.set_user_attr("epochs", int(trainer.strategy.epochs))

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        epoch = int(metrics["epoch"])
        if self.study is not None and objectives.is_multi(self.study):
            self.curve = {**(self.trial.user_attrs.get("curve") or {}), str(epoch): value}
            self.trial.set_user_attr("curve", self.curve)
            prune = self.multi_prune is not None and objectives.median_prune(
                self.study, {int(k): v for k, v in self.curve.items()}, *self.multi_prune)
        else:
            self.trial.report(value, step=epoch)
            prune = self.trial.should_prune()
        if prune:
            raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']} ({self.metric}={value:.4f})")


def trial_overrides(opts: SearchOptions, params: dict[str, Any]) -> list[str]:
    return [*opts.space.overrides, *opts.overrides, *(f"{k}={format_value(v)}" for k, v in params.items())]


def fresh_run_dir(run_dir: Path) -> Path:
    """A new trial's run dir must not hold a run already: that is another study's trial of the same name
    and number (its storage deleted or replaced), and resuming its checkpoint would train — or simply
    report — a different recipe. Move it aside (never delete); every real resume passes
    ``resume_run_dir`` instead."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        n = 1
        while run_dir.with_name(f"{run_dir.name}.stale{n}").exists():
            n += 1
        aside = run_dir.rename(run_dir.with_name(f"{run_dir.name}.stale{n}"))
        log.warning("%s held a run this study did not start (same study name in another storage?); "
                    "moved it to %s and starting fresh", run_dir, aside.name)
    return run_dir


def run_trial(study: optuna.Study, trial: optuna.Trial, opts: SearchOptions, progress: Progress) -> None:
    params = {k: trial.params[k] for k in opts.space.params}
    resume_dir = trial.user_attrs.get("resume_run_dir")
    run_dir = Path(resume_dir) if resume_dir else \
        fresh_run_dir(opts.runs_root / opts.study_name / f"trial_{trial.number:04d}")
    trial.set_user_attr("run_dir", str(run_dir))
    meter = cost_mod.CostMeter()
    try:
        cfg = config_mod.compose(trial_overrides(opts, params))
        for kind in config_mod.GROUPS:
            trial.set_user_attr(kind, cfg[kind]["name"])
        maximize = opts.space.direction == "maximize"
        multi_prune = (opts.prune_warmup, maximize) if opts.pruner == "median" else None
        metrics = run_mod.train(cfg, run_dir, [meter, OptunaReporter(trial, opts.space.metric, study, multi_prune)],
                                progress, label=f"trial {trial.number} ")
    except optuna.TrialPruned as exc:
        _record_costs(trial, meter)
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
    except UncompletedJobError:
        # submitit's signal handler ends a SLURM task that may not requeue again (--slurm.max-requeues
        # used up): the task must stop, its trial stays RUNNING and is requeued once its heartbeat goes stale
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a trial raises fails that trial, never the search
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if not isinstance(exc, (UserError, TrainingError)):  # a bug, not bad input: keep its traceback
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "traceback.txt").write_text(traceback.format_exc())
            reason += f" (traceback in {run_dir / 'traceback.txt'})"
        _record_costs(trial, meter)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        progress.console.print(f"[red]trial {trial.number} failed[/red]: {reason}")
        return
    _record_costs(trial, meter)
    trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if "/" in k})
    names = list(study.user_attrs.get("objectives") or [opts.space.metric])
    values = [objectives.value_of(n, metrics, meter.costs, opts.space.metric) for n in names]
    if None in values:
        missing = names[values.index(None)]
        trial.set_user_attr("fail_reason", f"objective {missing} was never computed")
        study.tell(trial, state=TrialState.FAIL)
        return
    if n_finished(study) >= opts.n_trials:  # other workers reached the target meanwhile: do not overshoot
        trial.set_user_attr("fail_reason", "surplus: the study reached its target while this trial ran")
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, values if len(values) > 1 else values[0])


def _record_costs(trial: optuna.Trial, meter: cost_mod.CostMeter) -> None:
    for key, value in meter.costs.items():  # before tell: --max-cost's constraints_func reads them
        trial.set_user_attr(key, value)


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
