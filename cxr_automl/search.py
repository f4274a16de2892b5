"""``cxr-automl search``: an Optuna study whose trials are training runs.

Ask/tell loop until the study holds ``n_trials`` finished (complete or pruned) trials, so re-running
the same command after an interruption finishes the rest and never overshoots. Each epoch's
validation metric is reported to Optuna for pruning.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.progress import Progress

from cxr_automl import config as config_mod
from cxr_automl import run as run_mod
from cxr_automl import storage as storage_mod
from cxr_automl.callbacks import make_progress
from cxr_automl.errors import TrainingError, UserError
from cxr_automl.loop import Callback, Trainer
from cxr_automl.searchspace import SearchSpace, format_value, lookup

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
    prune_warmup: int = 2
    prune_lookahead: float = 0.0
    seed: int = 0
    overrides: tuple[str, ...] = ()
    runs_root: Path = Path("runs")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
                "gp": lambda: optuna.samplers.GPSampler(seed=seed),
                "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed)}
    if name not in samplers:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(samplers)}")
    return samplers[name]()


def resolve_prune_warmup(value: str, space: SearchSpace, overrides: tuple[str, ...] = ()) -> int:
    """``auto``: a quarter of the trial's ``strategy.epochs``, at least 2 (2 when the strategy has no
    fixed epoch count). Judging earlier stops the recipes that dip before they climb — SPFT with deep
    unfreezing and a high backbone LR was the best recipe and among the worst at epoch 3 (bench/scale.py)."""
    if value != "auto":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--prune-warmup {value!r}: use auto or an epoch index >= 0") from None
    epochs = config_mod.compose([*space.overrides, *overrides]).get("strategy", {}).get("epochs")
    return max(2, round(int(epochs) / 4)) if isinstance(epochs, int) else 2


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
    try:
        cfg = config_mod.compose(trial_overrides(opts, params))
        for kind in config_mod.GROUPS:
            trial.set_user_attr(kind, cfg[kind]["name"])
        if isinstance(cfg["strategy"].get("epochs"), int):  # the look-ahead pruner projects to the last epoch
            trial.set_user_attr("epochs", cfg["strategy"]["epochs"])
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
    except Exception as exc:  # noqa: BLE001 - whatever a trial raises fails that trial, never the search
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if not isinstance(exc, (UserError, TrainingError)):  # a bug, not bad input: keep its traceback
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "traceback.txt").write_text(traceback.format_exc())
            reason += f" (traceback in {run_dir / 'traceback.txt'})"
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
    if n_finished(study) >= opts.n_trials:  # other workers reached the target meanwhile: do not overshoot
        trial.set_user_attr("fail_reason", "surplus: the study reached its target while this trial ran")
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, value)


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def create_study(opts: SearchOptions, storage: optuna.storages.BaseStorage | str) -> optuna.Study:
    """Create (or load) the study, record everything a worker needs in its user attrs (so
    ``cxr-automl worker --study S --storage URL`` needs nothing else), enqueue the baselines.
    Runs once, before any worker starts: concurrent first creation of an RDB schema races."""
    config_mod.compose([*opts.space.overrides, *opts.overrides])  # fail fast on a bad override
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bars and table say it better
    study = storage_mod.retry(lambda: optuna.create_study(
        storage=storage, study_name=opts.study_name, load_if_exists=True, direction=opts.space.direction,
        sampler=make_sampler(opts.sampler, opts.seed),
        pruner=make_pruner(opts.pruner, opts.prune_warmup, opts.prune_lookahead)),
        opts.storage)
    for key, value in {"search_space": str(Path(opts.space.path).resolve()) if opts.space.path else None,
                       "metric": opts.space.metric, "n_trials": opts.n_trials, "sampler": opts.sampler,
                       "pruner": opts.pruner, "prune_warmup": opts.prune_warmup,
                       "prune_lookahead": opts.prune_lookahead, "seed": opts.seed, "overrides": list(opts.overrides),
                       "runs_root": str(Path(opts.runs_root).resolve())}.items():
        study.set_user_attr(key, value)
    enqueue_baselines(study, opts)
    return study


def options_from_study(study_name: str, storage: optuna.storages.BaseStorage, spec: str,
                       search_space: str | None = None, overrides: tuple[str, ...] = ()) -> SearchOptions:
    """What ``create_study`` recorded, plus a worker's own extra overrides."""
    from cxr_automl import searchspace
    try:
        attrs = storage_mod.retry(lambda: optuna.load_study(study_name=study_name, storage=storage), spec).user_attrs
    except KeyError:
        raise ValueError(f"no study {study_name!r} in {spec}; create it first with cxr-automl search "
                         "(e.g. --launcher none)") from None
    space_ref = search_space or attrs.get("search_space")
    if not space_ref or "n_trials" not in attrs:
        raise ValueError(f"study {study_name!r} in {spec} was not created by cxr-automl search; pass --search-space")
    return SearchOptions(space=searchspace.load(space_ref), n_trials=int(attrs["n_trials"]), storage=spec,
                         study_name=study_name, sampler=attrs.get("sampler", "tpe"),
                         pruner=attrs.get("pruner", "median"), prune_warmup=int(attrs.get("prune_warmup", 2)),
                         prune_lookahead=float(attrs.get("prune_lookahead", 0.0)), seed=int(attrs.get("seed", 0)),
                         overrides=(*attrs.get("overrides", ()), *overrides),
                         runs_root=Path(attrs.get("runs_root", "runs")))


def search(opts: SearchOptions) -> optuna.Study:
    """One process: create the study and run one worker until it holds ``opts.n_trials`` finished trials."""
    storage = storage_mod.open_storage(opts.storage)
    create_study(opts, storage)
    return worker(opts, storage)


def worker(opts: SearchOptions, storage: optuna.storages.BaseStorage, index: int = 0,
           poll_seconds: float = 5.0) -> optuna.Study:
    """Ask the shared study for trials and run them until it holds its target number of finished
    trials (``n_trials`` in the study's user attrs, re-read every round so several workers agree).

    Exactly-once accounting with many workers: a worker only asks while finished + running trials are
    below the target, and hands a trial back (FAIL "surplus", re-enqueued) when a concurrent ask beat
    it to the last slot. Running trials beat a heartbeat; a dead worker's trial goes stale, is failed
    and re-enqueued with its run dir (storage.requeue_stale_trial). A requeued SLURM task first takes
    back the trial it was running (workers.adopt_own_trial), resuming its checkpoint.
    """
    from cxr_automl import workers
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # we run the heartbeat ourselves (workers.Heartbeat) around ask/tell, which Optuna warns about
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    study = storage_mod.retry(lambda: optuna.load_study(
        study_name=opts.study_name, storage=storage, sampler=make_sampler(opts.sampler, opts.seed + index),
        pruner=make_pruner(opts.pruner, opts.prune_warmup, opts.prune_lookahead)), opts.storage)
    me = workers.identity()
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)() or storage_mod.HEARTBEAT_INTERVAL
    presence = workers.Presence(study, me, interval, getattr(storage, "grace_period", None) or storage_mod.GRACE_PERIOD)
    presence("starting")
    adopted = workers.adopt_own_trial(study, me)
    failures_in_a_row = 0
    with make_progress() as progress:
        bar = progress.add_task(f"trials ({me})", total=opts.n_trials, completed=n_finished(study), info="")
        while True:
            trial = adopted
            adopted = None
            if trial is None:
                opts.n_trials = int(storage_mod.retry(lambda: study.user_attrs, opts.storage).get("n_trials", opts.n_trials))
                status = storage_mod.retry(lambda: workers.slots(study, opts.n_trials), opts.storage)
                if status == "done":
                    presence("exited")
                    break
                if failures_in_a_row >= max(3, opts.n_trials):
                    progress.console.print("[red]too many failed trials in a row; stopping[/red]")
                    presence("exited")
                    break
                if status == "full":  # the rest are running elsewhere; wait in case one dies
                    presence("waiting: the remaining trials run elsewhere")
                    time.sleep(poll_seconds)
                    continue
                trial = storage_mod.retry(lambda: study.ask(fixed_distributions=opts.space.params), opts.storage)
                if not workers.claim(study, trial, opts.n_trials, me):
                    continue
            presence(f"trial {trial.number}")
            with workers.Heartbeat(study, trial):
                try:
                    run_trial(study, trial, opts, progress)
                except optuna.exceptions.UpdateFinishedTrialError:
                    progress.console.print(f"[yellow]trial {trial.number} was declared stale and handed to "
                                           "another worker; moving on[/yellow]")
                    continue
            state = study.get_trials(deepcopy=False)[trial.number].state
            failures_in_a_row = failures_in_a_row + 1 if state == TrialState.FAIL else 0
            best = _best_value(study)
            progress.update(bar, total=opts.n_trials, completed=n_finished(study),
                            info="" if best is None else f"best {opts.space.metric} {best:.4f}")
    return study


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None
