"""The ``cxr-automl`` command (typer). Overrides are Hydra's ``key=value`` after the options."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Find the best way to adapt a chest X-ray foundation model to a task.\n\n"
         "Components (backbone, head, strategy, dataset) are plugins; a run is composed from "
         "cxr_automl/config/conf with Hydra overrides such as [bold]backbone=resnet18 strategy.unfreeze_k=2[/bold].\n\n"
         "Start with: [bold]cxr-automl search[/bold] (synthetic data, tiny backbone, local SQLite study).\n\n"
         "Then: [bold]cxr-automl plugins --matrix[/bold], [bold]cxr-automl train --show-config[/bold], "
         "[bold]cxr-automl data check dataset=NAME dataset.root=DIR[/bold], "
         "[bold]cxr-automl search --workers 4 --launcher slurm[/bold], [bold]cxr-automl report[/bold].")
console = Console(stderr=True)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    logging.getLogger("cxr_automl").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("cxr_automl_plugins").setLevel(logging.DEBUG if verbose else logging.INFO)


def _fail(msg: str, code: int = 2) -> "typer.Exit":
    console.print(f"[bold red]error:[/bold red] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI prints as one line (exit 2): every "fix your input" error, and a run that cannot go
    on (a non-finite loss)."""
    from cxr_automl.errors import TrainingError, UserError
    return (UserError, TrainingError)


@app.command(context_settings=EXTRA)
def train(ctx: typer.Context,
          show_config: bool = typer.Option(False, "--show-config", help="Print the resolved config and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Train one run into a run directory (re-running the same run_dir resumes it).

    Writes config.yaml, manifest.json, last.ckpt, best_model.safetensors, metrics.json, metrics.jsonl and
    predictions.csv (or predictions.json).

    Example: [bold]cxr-automl train strategy=finetune strategy.unfreeze_k=0 run_dir=runs/probe[/bold]
    (re-running with the same run_dir resumes from its last checkpoint).

    A paper's own setting: [bold]cxr-automl train experiment=spft_nih dataset.root=DIR backbone.weights=W[/bold]
    ([bold]cxr-automl plan --presets[/bold] lists the presets; add [bold]--show-config[/bold] to see every value).
    """
    _setup_logging(verbose)
    from cxr_automl import config
    from cxr_automl.train import run
    from cxr_automl.train.callbacks import make_progress
    try:
        cfg = config.compose(ctx.args)
        if show_config:
            print(config.to_yaml(cfg))
            return
        run_dir = Path(cfg["run_dir"]) if cfg.get("run_dir") else run.default_run_dir()
        cfg["run_dir"] = str(run_dir)
        with make_progress() as progress:
            metrics = run.train(cfg, run_dir, progress=progress)
    except _user_errors() as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        raise _fail("interrupted; re-run with the same run_dir to resume from the last epoch", 130)
    table = Table(title=f"run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(k for k in metrics if k.startswith("test/") or k.startswith("best/")):
        table.add_row(key, f"{metrics[key]:.4f}")
    Console().print(table)
    written = sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.name != "previous.ckpt")
    Console().print(f"wrote {run_dir}/{{{','.join(written)}}}")


@app.command(context_settings=EXTRA)
def search(ctx: typer.Context,
           search_space: str = typer.Option("spft", "--search-space", "-s",
                                            help="NAME in search_spaces/ or PATH to a .yaml in the sweeper grammar."),
           n_trials: Optional[int] = typer.Option(None, "--n-trials", "-n",
                                                  help="Target number of finished trials in the study "
                                                       "(re-running finishes the rest). Default: the space's n_trials."),
           storage: Optional[str] = typer.Option(None, "--storage",
                                                 help="Optuna storage URL; default sqlite:///runs/cxr-automl.db"),
           study: Optional[str] = typer.Option(None, "--study", help="Study name; default: the search space name."),
           sampler: str = typer.Option("tpe", "--sampler", help="tpe | random | qmc | gp | cmaes | nsga2"),
           pruner: str = typer.Option("median", "--pruner", help="median | successive_halving | hyperband | none. On "
                                              "trials of 24+ epochs successive_halving saved the most "
                                              "(README: Benchmarks)."),
           prune_warmup: str = typer.Option("auto", "--prune-warmup",
                                            help="First epoch (0-based) at which a trial may be pruned; auto = a "
                                                 "quarter of strategy.epochs, at least 2. Good SPFT recipes often "
                                                 "dip before they climb (README: Pruning)."),
           prune_lookahead: str = typer.Option("auto", "--prune-lookahead",
                                               help="successive_halving judges a trial by its value plus "
                                                    "this fraction of the rise its recent slope projects to the "
                                                    "last epoch; auto = 0.125 for it, 0 (off) otherwise "
                                                    "(README: Pruning)."),
           seed: int = typer.Option(0, "--seed", help="Sampler seed."),
           max_failures: str = typer.Option("50%", "--max-failures",
                                            help="Stop when N trials failed, or (P%) once 3 have and they are P% of "
                                                 "the ended trials; the stop names the most common reason."),
           keep_best: int = typer.Option(3, "--keep-best", min=0,
                                         help="Complete trials (the best K) that keep best_model.safetensors; "
                                              "finished trials drop their resume checkpoints."),
           objective: Optional[str] = typer.Option(None, "--objective",
                                                   help="Comma-separated objectives, the space's metric first: "
                                                        "val/macro_auc,cost/device_s is a multi-objective study "
                                                        "(Pareto front in summary/status/report; pruned on the "
                                                        "first with --pruner median). NAME:max|min sets a direction."),
           max_cost: list[str] = typer.Option(None, "--max-cost",
                                              help="A constraint: DEVICE_SECONDS, or cost/KEY=VALUE (peak_mem_mb, "
                                                   "params, wall_s...; repeatable); needs --sampler tpe|gp|nsga2."),
           warm_start: Optional[str] = typer.Option(None, "--warm-start", metavar="STORAGE[:STUDY]",
                                                    help="Enqueue the best --warm-start-top trials of another study "
                                                         "first (params mapped by name, clipped to this space)."),
           warm_start_top: int = typer.Option(3, "--warm-start-top", min=1),
           launcher: str = typer.Option("local", "--launcher",
                                        help="local (N processes here) | slurm (one array job of N tasks) | "
                                             "none (create the study only, for slurm/worker.sbatch)"),
           workers: int = typer.Option(1, "--workers", "-w", help="Workers sharing the study."),
           gpus: str = typer.Option("auto", "--gpus",
                                    help="local workers: GPUs to spread them over, worker i on GPU i "
                                         "(auto = every visible GPU | none | ids such as 0,1,2,3). Slurm tasks "
                                         "use the GPUs Slurm gives them (--slurm.gpus-per-task)."),
           detach: bool = typer.Option(False, "--detach",
                                       help="slurm: submit the array job and return at once (log out; follow with "
                                            "cxr-automl status, see the result with cxr-automl summary)."),
           heartbeat_interval: int = typer.Option(30, "--heartbeat-interval", help="Seconds between heartbeats."),
           grace_period: int = typer.Option(120, "--grace-period",
                                            help="A running trial silent this long is failed and re-run."),
           slurm_partition: Optional[str] = typer.Option(None, "--slurm.partition"),
           slurm_gpus_per_task: Optional[int] = typer.Option(None, "--slurm.gpus-per-task"),
           slurm_cpus_per_task: Optional[int] = typer.Option(None, "--slurm.cpus-per-task"),
           slurm_mem: Optional[str] = typer.Option(None, "--slurm.mem", help="e.g. 16G"),
           slurm_time: Optional[str] = typer.Option(
               None, "--slurm.time", help="Time limit per task: minutes or [D-]HH:MM:SS. Default: what the "
                                          "partition gives (DefaultTime, else MaxTime), else 1 day. A task at "
                                          "its limit checkpoints and is requeued."),
           slurm_max_requeues: int = typer.Option(1000, "--slurm.max-requeues",
                                                  help="Times one task may be requeued at its time limit "
                                                       "(preemptions are not counted)."),
           slurm_account: Optional[str] = typer.Option(None, "--slurm.account"),
           slurm_qos: Optional[str] = typer.Option(None, "--slurm.qos"),
           slurm_constraint: Optional[str] = typer.Option(None, "--slurm.constraint"),
           slurm_setup: list[str] = typer.Option(None, "--slurm.setup",
                                                 help="Shell line run in each task before the worker, e.g. "
                                                      "'module load cuda/12.1' (repeatable)."),
           slurm_extra: list[str] = typer.Option(None, "--slurm.extra",
                                                 help="Any other sbatch option as KEY=VALUE, or KEY for a flag: "
                                                      "mail-type=END, exclusive (repeatable)."),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Search training recipes with Optuna; every trial is a full training run.

    Example: [bold]cxr-automl search -s spft -n 12 strategy.epochs=8[/bold]. Per-epoch validation
    metrics feed the pruner; Ctrl-C keeps finished trials and the same command resumes.
    """
    _setup_logging(verbose)
    from cxr_automl.hpo import cost, failures, pruners
    from cxr_automl.hpo import search as search_mod
    from cxr_automl.hpo import searchspace
    try:
        space = searchspace.load(search_space)
        runs_root = Path("runs")
        runs_root.mkdir(exist_ok=True)
        from cxr_automl.hpo import storage as storage_mod
        if gpus not in ("auto", "none"):
            from cxr_automl.hpo.placement import visible_gpus
            visible_gpus(gpus)  # a bad --gpus fails before the study exists
        if launcher not in ("local", "slurm", "none") or workers < 1:
            raise ValueError(f"--launcher {launcher!r} --workers {workers}: use local|slurm|none and workers >= 1")
        if launcher == "slurm" and shutil.which("sbatch") is None:
            raise ValueError("--launcher slurm: sbatch is not on PATH here; run on a node that submits Slurm jobs "
                             "(a login node), or use --launcher local")
        if detach and launcher != "slurm":
            raise ValueError(f"--detach needs --launcher slurm (--launcher {launcher}: the workers are this "
                             "command's children and stop with it)")
        url = storage or storage_mod.default_spec(runs_root, workers)
        warmup = pruners.resolve_prune_warmup(prune_warmup, space, tuple(ctx.args))
        pruners.make_sampler(sampler, seed), pruners.make_pruner(pruner, warmup)  # fail fast on bad names
        opts = search_mod.SearchOptions(space=space, n_trials=n_trials or space.n_trials, storage=url,
                                        study_name=study or space.name, sampler=sampler, pruner=pruner,
                                        prune_warmup=warmup,
                                        prune_lookahead=pruners.resolve_prune_lookahead(prune_lookahead, pruner),
                                        seed=seed, overrides=tuple(ctx.args), runs_root=runs_root,
                                        max_failures=str(failures.parse(max_failures)), keep_best=keep_best,
                                        objective=objective, max_cost=cost.parse_max_cost(max_cost or ()),
                                        warm_start=warm_start, warm_start_top=warm_start_top)
        opts.objectives(), opts.sampler_for()  # a bad --objective / --max-cost fails before the study exists
        from cxr_automl.hpo.launch import SlurmOptions
        slurm = SlurmOptions(partition=slurm_partition, gpus_per_task=slurm_gpus_per_task,
                             cpus_per_task=slurm_cpus_per_task, mem=slurm_mem, time=slurm_time, account=slurm_account,
                             qos=slurm_qos, constraint=slurm_constraint, setup=tuple(slurm_setup or ()),
                             extra=tuple(slurm_extra or ()), max_requeues=slurm_max_requeues)
        slurm.executor_parameters(workers, opts.study_name)  # a bad --slurm.* value fails before the study exists
        if launcher != "slurm" and slurm != SlurmOptions():
            console.print(f"[yellow]warning:[/yellow] --slurm.* options do nothing with --launcher {launcher}")
    except (*_user_errors(), ValueError) as exc:
        raise _fail(str(exc))
    try:
        if launcher == "local" and workers == 1:
            result = search_mod.search(opts)
        else:
            from cxr_automl.cli import study as launch_cli
            result = launch_cli.create_and_launch(opts, launcher, workers, heartbeat_interval, grace_period, slurm,
                                                  wait=not detach, gpus=gpus)
            if result is None:
                return
    except (*_user_errors(), _storage_error(), RuntimeError, ValueError) as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        raise _fail(f"interrupted; finished trials are kept in {url} (study {opts.study_name}); "
                    "run the same command again to finish the rest", 130)
    from cxr_automl.hpo.summary import print_summary
    print_summary(result, opts)


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")


@data_app.command("check", context_settings=EXTRA)
def data_check(ctx: typer.Context,
               as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
               mask_samples: int = typer.Option(200, "--mask-samples", help="Items per split read for mask statistics."),
               verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Validate a dataset: images, labels per class and split, patients, boxes, masks.

    Reports images found / missing / unreadable, labels per class and split,
    patients per split, boxes and masks. Exit code 1 when rows had to be skipped.

    Example: [bold]cxr-automl data check dataset=nih_cxr14 dataset.root=/data/nih[/bold]
    """
    _setup_logging(verbose)
    from cxr_automl.cli import datacheck
    try:
        rep = datacheck.check(ctx.args, mask_samples=mask_samples)
    except _user_errors() as exc:
        raise _fail(str(exc))
    if as_json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        out = Console()
        for r in datacheck.render(rep):
            out.print(r, highlight=False, soft_wrap=True)
    if not rep.ok:
        raise typer.Exit(1)
@app.command(context_settings=EXTRA)
def plan(ctx: typer.Context,
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output (a list of rows)."),
         presets: bool = typer.Option(False, "--presets", help="List the paper presets (experiment=NAME) and exit.")
         ) -> None:
    """Print a strategy's epoch-by-epoch schedule without training anything.

    One row per epoch, laid out by the strategy (which data, which mode, which components train);
    --json prints the rows as data. Works for strategies whose schedule follows from their configuration
    alone (they declare the PlannedSchedule protocol); other overrides as for train.

    Example: [bold]cxr-automl plan strategy=NAME strategy.KEY=VALUE --json[/bold];
    a paper preset: [bold]cxr-automl plan experiment=foundation_x[/bold] ([bold]--presets[/bold] lists them;
    [bold]cxr-automl train --show-config experiment=NAME[/bold] prints any preset's full config).
    """
    from cxr_automl.cli import plan as plan_mod
    if presets:
        from cxr_automl import config
        rows = config.experiments()
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table(title="paper presets: experiment=NAME (README: Paper presets)")
        table.add_column("experiment")
        table.add_column("what it reproduces")
        for name, what in rows.items():
            table.add_row(name, what)
        Console().print(table)
        return
    try:
        _, strategy = plan_mod.build(ctx.args)
        rows = plan_mod.rows_of(strategy)
    except (*_user_errors(), plan_mod.PlanError) as exc:
        raise _fail(str(exc))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    # not a terminal (a pipe, a log): wide enough that the table never wraps
    Console(width=None if sys.stdout.isatty() else 200).print(strategy.render_schedule(rows))


def _storage_error() -> type[BaseException]:
    from cxr_automl.hpo.storage import StorageUnavailableError
    return StorageUnavailableError


@app.command(context_settings=EXTRA)
def worker(ctx: typer.Context,
           study: str = typer.Option(..., "--study", help="Study created by cxr-automl search."),
           storage: str = typer.Option(..., "--storage", help="journal:PATH | PATH.log | postgresql://... | sqlite:///..."),
           search_space: Optional[str] = typer.Option(None, "--search-space", "-s",
                                                      help="Default: the one recorded in the study."),
           worker_index: int = typer.Option(-1, "--worker-index",
                                            help="Offsets the sampler seed; default $SLURM_ARRAY_TASK_ID or 0."),
           workers: int = typer.Option(2, "--workers", help="How many workers share the storage (for warnings)."),
           heartbeat_interval: int = typer.Option(30, "--heartbeat-interval"),
           grace_period: int = typer.Option(120, "--grace-period"),
           poll_seconds: float = typer.Option(5.0, "--poll-seconds", help="Wait between checks when all slots run."),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run one worker: take the study's trials until it holds its target number of finished trials.

    Example (inside sbatch --array): [bold]cxr-automl worker --study spft --storage journal:runs/cxr-automl.log[/bold]
    """
    _setup_logging(verbose)
    from cxr_automl.hpo import launch
    from cxr_automl.hpo import workers as workers_mod
    workers_mod.requeue_on_usr2()
    index = worker_index if worker_index >= 0 else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    spec = launch.WorkerSpec(study=study, storage=storage, search_space=search_space, overrides=tuple(ctx.args),
                             heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                             poll_seconds=poll_seconds)
    try:
        finished = launch.run_worker(spec, index, workers)
    except (*_user_errors(), _storage_error(), ValueError) as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        raise _fail("interrupted; the running trial was re-enqueued and resumes from its checkpoint", 130)
    console.print(f"worker {index}: study {study} holds {finished} finished trials")


@app.command()
def status(study: list[str] = typer.Option(None, "--study", help="Study name (repeatable); default: all."),
           storage: str = typer.Option(..., "--storage"),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable (with --watch: one line each)."),
           watch: float = typer.Option(0, "--watch", metavar="SECONDS",
                                       help="Refresh every SECONDS until every study holds its target.")) -> None:
    """Trials by state, live workers and the best trial so far, per study.

    Example, after search --detach: [bold]cxr-automl status --storage journal:runs/cxr-automl.log --watch 30[/bold]
    (returns once the search is done; then cxr-automl summary)."""
    from cxr_automl.cli import study as launch_cli
    if watch < 0:
        raise _fail(f"--watch {watch:g}: use seconds > 0 (or 0 to print once)")
    try:
        launch_cli.print_status(storage, study or None, as_json, watch)
    except (_storage_error(), ValueError) as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130)


@app.command()
def summary(study: Optional[str] = typer.Option(None, "--study", help="Default: the storage's only study."),
            storage: str = typer.Option(..., "--storage"),
            search_space: Optional[str] = typer.Option(None, "--search-space", "-s",
                                                       help="Default: the one recorded in the study (its path "
                                                            "on the machine that ran the search).")) -> None:
    """The end-of-search table of a study: best trials, baselines, the command that reproduces the best.

    For a search that ran elsewhere (--detach, plain sbatch); also rewrites runs/<study>/summary.json."""
    from cxr_automl.cli import study as launch_cli
    try:
        launch_cli.print_study_summary(storage, study, search_space)
    except (*_user_errors(), _storage_error(), ValueError) as exc:
        raise _fail(str(exc))


@app.command()
def report(storage: str = typer.Option(..., "--storage"),
           study: list[str] = typer.Option(None, "--study", help="Study to compare (repeatable); default: all."),
           out: Path = typer.Option(Path("report.html"), "--out", "-o")) -> None:
    """Write one self-contained HTML page comparing studies side by side.

    Best values, histories, importances, parallel coordinates, learning curves, per-class AUC of each
    study's best trial."""
    from cxr_automl.hpo import report as report_mod
    from cxr_automl.hpo import storage as storage_mod
    try:
        path = report_mod.write_report(storage_mod.open_storage(storage, must_exist=True), storage, study or None, out)
    except (_storage_error(), ValueError) as exc:
        raise _fail(str(exc))
    Console().print(f"wrote {path}")


@app.command()
def dashboard(storage: str = typer.Option(..., "--storage"),
              host: str = typer.Option("127.0.0.1", "--host", help="Loopback by default; 0.0.0.0 exposes it."),
              port: int = typer.Option(8080, "--port")) -> None:
    """Serve optuna-dashboard on a study storage (loopback by default).

    Every trial's user attrs show its components, run dir, metrics and failure reason."""
    from optuna_dashboard import run_server

    from cxr_automl.hpo import storage as storage_mod
    try:
        opened = storage_mod.open_storage(storage, must_exist=True)
    except (_storage_error(), ValueError) as exc:
        raise _fail(str(exc))
    console.print(f"optuna-dashboard on http://{host}:{port} for {storage} (Ctrl-C to stop)")
    run_server(opened, host=host, port=port)


@app.command()
def evaluate(run_dir: Path = typer.Argument(..., help="Run directory of a classification run (cxr-automl train)."),
             split: str = typer.Option("test", "--split", help="train | val | test"),
             cam_threshold: Optional[list[float]] = typer.Option(
                 None, "--cam-threshold",
                 help="Heatmap threshold after min-max; repeat for several. Default: DiRA's 60 and 180 of 255 "
                      "(0.235, 0.706)."),
             overlays: int = typer.Option(4, "--overlays", help="Heatmap overlay PNGs to write."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Weakly-supervised localization of a classifier: Grad-CAM boxes vs ground-truth boxes.

    Accuracy at IoU >= 0.1 ... 0.6 at each heatmap threshold (the DiRA protocol): the headline is the
    mean over the findings with boxes, per finding too; writes RUN_DIR/weakloc/ with weakloc.json and
    heatmap overlays. Example: [bold]cxr-automl evaluate runs/train/20261126-101500[/bold]
    """
    _setup_logging(False)
    from cxr_automl.train import weakloc
    thresholds = cam_threshold or weakloc.DIRA_THRESHOLDS
    try:
        res = weakloc.evaluate(run_dir, split=split, cam_thresholds=thresholds, overlays=overlays)
    except (*_user_errors(), weakloc.WeakLocError) as exc:
        raise _fail(str(exc))
    if as_json:
        print(json.dumps({"n_boxes": res.n_boxes, "metrics": res.metrics, "per_class": res.per_class}, indent=2))
        return
    for t in thresholds:
        prefix = f"t{t:.3f}/"
        keys = [k for k in res.metrics if k.startswith(prefix + "loc_acc@")]
        table = Table(title=f"weak localization, {split} split, {res.n_boxes} boxes, Grad-CAM threshold {t:.3f} "
                            "(all = mean over findings)")
        table.add_column("finding")
        for key in keys:
            table.add_column(key[len(prefix):].replace("loc_acc@", "IoU≥"), justify="right")
        table.add_row("all", *(f"{res.metrics[k]:.3f}" for k in keys))
        for name, m in res.per_class.items():
            table.add_row(f"{name} ({int(m['n_boxes'])})", *(f"{m[k]:.3f}" if k in m else "" for k in keys))
        Console().print(table)
    Console().print(f"wrote {run_dir}/weakloc/weakloc.json and {len(res.overlays)} overlays")


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
            matrix: bool = typer.Option(False, "--matrix", help="Valid backbone × head combinations.")) -> None:
    """List every registered component, the distribution it comes from, and whether it loads."""
    from cxr_automl.plugin import registry
    if matrix:
        from cxr_automl.plugin.compat import print_matrix
        try:
            print_matrix(as_json)
        except registry.RegistryError as exc:
            raise _fail(str(exc))
        return
    rows = registry.inventory()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="cxr-automl plugins")
    for col in ("kind", "name", "from", "entry point", "loads"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["kind"], r["name"], f"{r['distribution']} {r['version']}", r["value"],
                      "[green]yes[/green]" if r["loads"] else f"[red]no[/red] {r['error']}")
    Console().print(table)


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
