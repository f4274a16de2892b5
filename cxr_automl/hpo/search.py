"""``cxr-automl search``: an Optuna study whose trials are training runs.

Ask/tell loop until the study holds ``n_trials`` finished (complete or pruned) trials, so re-running
the same command after an interruption finishes the rest and never overshoots. Each epoch's
validation metric is reported to Optuna for pruning. What one trial does is in ``hpo.trial``; the
samplers and pruners a study is created with are in ``hpo.pruners``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from cxr_automl import config as config_mod
from cxr_automl.hpo import cost as cost_mod
from cxr_automl.hpo import failures, lifecycle
from cxr_automl.hpo import objectives as objectives_mod
from cxr_automl.hpo import storage as storage_mod
from cxr_automl.hpo.pruners import make_pruner, make_sampler
from cxr_automl.hpo.searchspace import SearchSpace, lookup
from cxr_automl.hpo.trial import n_finished, run_trial
from cxr_automl.train.callbacks import make_progress

log = logging.getLogger(__name__)


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
    max_failures: str = failures.DEFAULT
    keep_best: int = lifecycle.DEFAULT_KEEP_BEST
    objective: str | None = None  # "val/macro_auc,cost/device_s": a multi-objective study
    max_cost: dict[str, float] = field(default_factory=dict)  # cost/KEY -> limit (constraints_func)
    warm_start: str | None = None  # STORAGE[:STUDY] whose top trials are enqueued first
    warm_start_top: int = 3

    def objectives(self) -> list[tuple[str, str]]:
        return objectives_mod.parse(self.objective, self.space.metric, self.space.direction)

    def sampler_for(self, index: int = 0) -> optuna.samplers.BaseSampler:
        constraints = cost_mod.constraint(self.max_cost) if self.max_cost else None
        return make_sampler(self.sampler, self.seed + index, constraints)


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


def create_study(opts: SearchOptions, storage: optuna.storages.BaseStorage | str) -> optuna.Study:
    """Create (or load) the study, record everything a worker needs in its user attrs (so
    ``cxr-automl worker --study S --storage URL`` needs nothing else), enqueue the baselines.
    Runs once, before any worker starts: concurrent first creation of an RDB schema races."""
    config_mod.compose([*opts.space.overrides, *opts.overrides])  # fail fast on a bad override
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bars and table say it better
    objectives = opts.objectives()
    if len(objectives) > 1 and opts.pruner not in ("median", "none"):
        raise ValueError(f"--pruner {opts.pruner}: Optuna cannot prune a multi-objective study; cxr-automl "
                         "prunes one on its primary metric with --pruner median (or use none)")
    study = storage_mod.retry(lambda: optuna.create_study(
        storage=storage, study_name=opts.study_name, load_if_exists=True, directions=[d for _, d in objectives],
        sampler=opts.sampler_for(), pruner=make_pruner(opts.pruner, opts.prune_warmup, opts.prune_lookahead)),
        opts.storage)
    if [d.name.lower() for d in study.directions] != [d for _, d in objectives]:
        raise ValueError(f"study {opts.study_name!r} in {opts.storage} optimises {len(study.directions)} "
                         f"objective(s) in other directions; use a new --study for --objective {opts.objective}")
    for key, value in {"search_space": str(Path(opts.space.path).resolve()) if opts.space.path else None,
                       "metric": opts.space.metric, "n_trials": opts.n_trials, "sampler": opts.sampler,
                       "pruner": opts.pruner, "prune_warmup": opts.prune_warmup,
                       "prune_lookahead": opts.prune_lookahead, "seed": opts.seed, "overrides": list(opts.overrides),
                       "runs_root": str(Path(opts.runs_root).resolve()), "max_failures": opts.max_failures,
                       "keep_best": opts.keep_best, "objectives": [n for n, _ in objectives],
                       "objective_spec": ",".join(f"{n}:{d[:3]}" for n, d in objectives),
                       "max_cost": opts.max_cost, "warm_start": opts.warm_start}.items():
        study.set_user_attr(key, value)
    enqueue_baselines(study, opts)
    if opts.warm_start:
        from cxr_automl.hpo import warmstart
        warmstart.enqueue(study, opts.warm_start, opts.space.params, opts.warm_start_top)
    return study


def options_from_study(study_name: str, storage: optuna.storages.BaseStorage, spec: str,
                       search_space: str | None = None, overrides: tuple[str, ...] = ()) -> SearchOptions:
    """What ``create_study`` recorded, plus a worker's own extra overrides."""
    from cxr_automl.hpo import searchspace
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
                         runs_root=Path(attrs.get("runs_root", "runs")),
                         max_failures=str(attrs.get("max_failures", failures.DEFAULT)),
                         keep_best=int(attrs.get("keep_best", lifecycle.DEFAULT_KEEP_BEST)),
                         objective=attrs.get("objective_spec"),
                         max_cost=dict(attrs.get("max_cost") or {}), warm_start=attrs.get("warm_start"))


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
    from cxr_automl.hpo import workers
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # we run the heartbeat ourselves (workers.Heartbeat) around ask/tell, which Optuna warns about
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    study = storage_mod.retry(lambda: optuna.load_study(
        study_name=opts.study_name, storage=storage, sampler=opts.sampler_for(index),
        pruner=make_pruner(opts.pruner, opts.prune_warmup, opts.prune_lookahead)), opts.storage)
    me = workers.identity()
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)() or storage_mod.HEARTBEAT_INTERVAL
    presence = workers.Presence(study, me, interval, getattr(storage, "grace_period", None) or storage_mod.GRACE_PERIOD)
    presence("starting")
    adopted = workers.adopt_own_trial(study, me)
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
                stop = storage_mod.retry(lambda: failures.verdict(study), opts.storage)
                if stop:  # every worker reads the same rule from the study, so all of them stop
                    presence("exited")
                    raise failures.TooManyFailuresError(stop)
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
            try:  # bounded disk: resume files of an ended trial, best models beyond the best K
                freed = storage_mod.retry(lambda: lifecycle.tidy(study, trial.number), opts.storage)
                if freed:
                    log.info("trial %d ended: removed %s of checkpoints it no longer needs", trial.number,
                             lifecycle.human(freed))
            except OSError as exc:
                log.warning("could not tidy trial %d's run dir: %s", trial.number, exc)
            best = _best_value(study)
            progress.update(bar, total=opts.n_trials, completed=n_finished(study),
                            info="" if best is None else f"best {opts.space.metric} {best:.4f}")
    return study


def _best_value(study: optuna.Study) -> float | None:
    best = objectives_mod.best_trial(study)
    return None if best is None else best.values[0]
