"""The bodies of ``cxr-automl search --workers N`` and ``cxr-automl status`` (kept out of cli.py)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cxr_automl.hpo import failures, launch, lifecycle, objectives, optuna_private, workers
from cxr_automl.hpo import search as search_mod
from cxr_automl.hpo import storage as storage_mod
from cxr_automl.hpo.summary import epochs_run, print_summary


def create_and_launch(opts: search_mod.SearchOptions, launcher: str, workers: int, heartbeat_interval: int,
                      grace_period: int, slurm: launch.SlurmOptions, wait: bool = True,
                      gpus: str = "auto") -> optuna.Study | None:
    """Create the study and enqueue its baselines first (no worker races the schema or the queue),
    then start the workers and wait for them (``wait=False``: submit the SLURM array and return None).
    ``launcher='none'`` only creates the study."""
    storage = storage_mod.open_storage(opts.storage, workers=workers, heartbeat_interval=heartbeat_interval,
                                       grace_period=grace_period)
    study = search_mod.create_study(opts, storage)
    spec = launch.WorkerSpec(study=opts.study_name, storage=opts.storage, heartbeat_interval=heartbeat_interval,
                             grace_period=grace_period)
    root = Path(opts.runs_root) / opts.study_name
    if launcher == "none":
        Console(stderr=True).print(
            f"study {opts.study_name} ready in {opts.storage} (target {opts.n_trials} finished trials); start workers "
            f"with: sbatch --array=0-{workers - 1} slurm/worker.sbatch {opts.study_name} {opts.storage}")
        return None
    if launcher == "local":
        try:
            launch.launch_local(spec, workers, root / "workers", opts.n_trials, gpus=gpus)
        except RuntimeError:  # the workers stopped on --max-failures: say why in one line, not "exited 2"
            stop = failures.verdict(optuna.load_study(study_name=opts.study_name, storage=storage))
            if stop:
                raise failures.TooManyFailuresError(stop) from None
            raise
    else:
        jobs = launch.submit_slurm(spec, workers, slurm, root / "slurm")
        # status lists the array's tasks while they wait in the queue
        storage_mod.retry(lambda: study.set_user_attr(
            "slurm_jobs", [*study.user_attrs.get("slurm_jobs", []), launch.array_id(jobs)]), opts.storage)
        if wait:
            launch.wait_slurm(jobs, spec, opts.n_trials)
        else:
            Console(stderr=True).print(f"detached: the array job runs on; when it ends, see the result with: "
                                       f"cxr-automl summary --storage {opts.storage} --study {opts.study_name}",
                                       markup=False)
            return None
    return optuna.load_study(study_name=opts.study_name, storage=storage)


def study_status(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    stale = optuna_private.stale_trial_ids(storage, optuna_private.study_id(study))
    live = workers.live_workers(storage, study, stale)
    out: dict[str, Any] = {"study": name, "target": study.user_attrs.get("n_trials"), "states": counts,
                           "finished": counts["complete"] + counts["pruned"], "live_workers": sorted(live),
                           "workers": live,
                           "stale_running": len(stale), "metric": study.user_attrs.get("metric"),
                           "epochs": dict(zip(("run", "all_to_end"), epochs_run(trials)))}
    root = Path(study.user_attrs.get("runs_root", "runs")) / name
    out["disk"] = {"path": str(root), **lifecycle.disk_usage(root)}
    if study.user_attrs.get("slurm_jobs"):
        jobs = study.user_attrs["slurm_jobs"]
        out["slurm"] = {"jobs": jobs, "squeue": launch.queued_tasks(jobs)}  # array jobs search submitted
    best = objectives.best_trial(study)  # by the primary objective
    out["best"] = None
    if best is not None:
        model = lifecycle.best_model_path(best)
        out["best"] = {"number": best.number, "value": best.values[0], "params": best.params,
                       "run_dir": best.user_attrs.get("run_dir"), "best_model": str(model) if model else None}
    if objectives.is_multi(study):
        out["objectives"] = objectives.names(study)
        out["pareto_front"] = [{"number": t.number, "values": t.values} for t in objectives.pareto_front(study)]
    return out


def _queue_line(row: dict[str, Any]) -> list[str]:
    queued = (row.get("slurm") or {}).get("squeue")
    if not queued:
        return []
    return [f"slurm {','.join(row['slurm']['jobs'])}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(queued.items()))]


def _open_existing(spec: str) -> tuple[optuna.storages.BaseStorage, list[str]]:
    """A storage the read commands need to be there, and its study names."""
    storage = storage_mod.open_storage(spec, must_exist=True)
    return storage, storage_mod.retry(lambda: optuna.get_all_study_names(storage), spec)


def _status_table(spec: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"studies in {spec}")
    for col in ("study", "finished/target", "running", "waiting", "failed", "pruned", "epochs (to end)", "live workers",
                "best", "disk (weights)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        s = r["states"]
        best = "-" if r["best"] is None else f"{r['best']['value']:.4f} (trial {r['best']['number']})"
        if r.get("pareto_front"):
            best += "\npareto: " + ", ".join(f"#{p['number']} (" + ", ".join(f"{v:.4g}" for v in p["values"]) + ")"
                                            for p in r["pareto_front"])
        table.add_row(r["study"], f"{r['finished']}/{r['target']}", str(s["running"]), str(s["waiting"]),
                      str(s["fail"]), str(s["pruned"]), f"{r['epochs']['run']} ({r['epochs']['all_to_end']})",
                      "\n".join([*(f"{w} ({what})" for w, what in r["workers"].items()), *_queue_line(r)]) or "-", best,
                      _disk_cell(r["disk"]))
    return table


def _disk_cell(disk: dict[str, Any]) -> str:
    return (f"{lifecycle.human(disk['bytes'])} ({lifecycle.human(disk['weight_bytes'])} in {disk['weight_files']} "
            f"files)")


def _done(rows: list[dict[str, Any]]) -> bool:
    """Every study that has a target holds it, and nothing is running."""
    return all(r["target"] is None or (r["finished"] >= int(r["target"]) and not r["states"]["running"])
               for r in rows)


def _watch_caption(rows: list[dict[str, Any]], watch: float) -> str:
    if _done(rows):
        return time.strftime("%H:%M:%S; done")
    idle = not any(r["workers"] or (r.get("slurm") or {}).get("squeue") for r in rows)
    return time.strftime("%H:%M:%S") + f"; refreshing every {watch:g}s until done (Ctrl-C stops)" + (
        "; no live worker and no queued task: start workers (cxr-automl worker, or search again)" if idle else "")


def print_status(spec: str, names: list[str] | None, as_json: bool, watch: float = 0) -> None:
    """``watch`` > 0: refresh every ``watch`` seconds (in place; with ``as_json`` one JSON line each)
    until every study holds its target number of finished trials."""
    storage, all_names = _open_existing(spec)
    for name in names or []:
        if name not in all_names:
            raise ValueError(f"no study {name!r} in {spec}; it has: {', '.join(all_names) or 'none'}")

    def rows() -> list[dict[str, Any]]:
        return storage_mod.retry(lambda: [study_status(storage, n) for n in (names or all_names)], spec)
    if not watch:
        now = rows()
        print(json.dumps(now, indent=2, default=str)) if as_json else Console().print(_status_table(spec, now))
        return
    with Live(console=Console(), auto_refresh=False) if not as_json else contextlib.nullcontext() as live:
        while True:
            now = rows()
            if as_json:
                print(json.dumps(now, default=str), flush=True)
            else:
                table = _status_table(spec, now)
                table.caption = _watch_caption(now, watch)
                live.update(table, refresh=True)
            if _done(now):
                break
            time.sleep(watch)
    if not as_json:
        live.console.line()  # Live leaves the cursor at the end of its last line


def print_study_summary(spec: str, name: str | None, search_space: str | None = None) -> None:
    """``cxr-automl summary``: the end-of-search table from the storage alone (``name``: default the
    storage's only study; ``search_space``: default the path recorded in the study)."""
    from cxr_automl.hpo.searchspace import SearchSpaceError
    storage, names = _open_existing(spec)
    if name is None and len(names) != 1:
        raise ValueError(f"{spec} holds {len(names)} studies ({', '.join(names) or 'none'}); pick one with --study")
    try:
        opts = search_mod.options_from_study(name or names[0], storage, spec, search_space)
    except SearchSpaceError as exc:
        raise ValueError(f"{exc}; pass --search-space PATH (the space the search used)") from None
    print_summary(storage_mod.retry(lambda: optuna.load_study(study_name=opts.study_name, storage=storage), spec), opts)
