"""The ``cxr-automl`` command (typer). Overrides are Hydra's ``key=value`` after the options."""

from __future__ import annotations

import json
import logging
import os
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
         "Components (backbone, head, strategy, dataset) are plugins; a run is composed from\n"
         "cxr_automl/conf with Hydra overrides such as [bold]backbone=resnet18 strategy.unfreeze_k=2[/bold].\n\n"
         "Start with: [bold]cxr-automl search[/bold] (synthetic data, tiny backbone, local SQLite study).")
console = Console(stderr=True)
OVERRIDES_HELP = ("Hydra overrides key=value, e.g. backbone=resnet18 head=linear strategy.epochs=5 "
                  "trainer.batch_size=16 dataset.n_train=500")
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
    from cxr_automl.checkpoint import CheckpointError
    from cxr_automl.config import ConfigError
    from cxr_automl.registry import RegistryError
    from cxr_automl.searchspace import SearchSpaceError
    from cxr_automl.trainer_utils import NonFiniteLossError, TrainerConfigError
    from cxr_automl.weights import WeightsError
    from cxr_automl.data import DataError  # e.g. an image that breaks mid-run with dataset.cache=false
    return (ConfigError, RegistryError, SearchSpaceError, TrainerConfigError, CheckpointError,
            NonFiniteLossError, WeightsError, DataError)


@app.command(context_settings=EXTRA)
def train(ctx: typer.Context,
          show_config: bool = typer.Option(False, "--show-config", help="Print the resolved config and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Train one run: writes config.yaml, last.ckpt, metrics.json, metrics.jsonl and predictions.csv.

    Example: [bold]cxr-automl train strategy=finetune strategy.unfreeze_k=0 run_dir=runs/probe[/bold]
    (re-running with the same run_dir resumes from its last checkpoint).
    """
    _setup_logging(verbose)
    from cxr_automl import config, run
    from cxr_automl.callbacks import make_progress
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
    Console().print(f"wrote {run_dir}/{{config.yaml,last.ckpt,metrics.json,metrics.jsonl,predictions.csv}}")


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
           sampler: str = typer.Option("tpe", "--sampler", help="tpe | random | qmc | gp | cmaes"),
           pruner: str = typer.Option("median", "--pruner", help="median | hyperband | successive_halving | none"),
           seed: int = typer.Option(0, "--seed", help="Sampler seed."),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Search training recipes with Optuna; every trial is a full training run.

    Example: [bold]cxr-automl search -s spft -n 12 strategy.epochs=8[/bold]. Per-epoch validation
    metrics feed the pruner; Ctrl-C keeps finished trials and the same command resumes.
    """
    _setup_logging(verbose)
    from cxr_automl import searchspace
    from cxr_automl import search as search_mod
    try:
        space = searchspace.load(search_space)
        runs_root = Path("runs")
        runs_root.mkdir(exist_ok=True)
        url = storage or f"sqlite:///{runs_root / 'cxr-automl.db'}"
        opts = search_mod.SearchOptions(space=space, n_trials=n_trials or space.n_trials, storage=url,
                                        study_name=study or space.name, sampler=sampler, pruner=pruner,
                                        seed=seed, overrides=tuple(ctx.args), runs_root=runs_root)
        search_mod.make_sampler(sampler, seed), search_mod.make_pruner(pruner)
    except (*_user_errors(), ValueError) as exc:
        raise _fail(str(exc))
    try:
        result = search_mod.search(opts)
    except _user_errors() as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        raise _fail(f"interrupted; finished trials are kept in {url} (study {opts.study_name}); "
                    "run the same command again to finish the rest", 130)
    from cxr_automl.summary import print_summary
    print_summary(result, opts)


data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")


@data_app.command("check", context_settings=EXTRA)
def data_check(ctx: typer.Context,
               as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
               mask_samples: int = typer.Option(200, "--mask-samples", help="Items per split read for mask statistics."),
               verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Validate a dataset configuration: images found / missing / unreadable, labels per class and split,
    patients per split, boxes and masks. Exit code 1 when rows had to be skipped.

    Example: [bold]cxr-automl data check dataset=nih_cxr14 dataset.root=/data/nih[/bold]
    """
    _setup_logging(verbose)
    from cxr_automl import datacheck
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


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List every registered component, the distribution it comes from, and whether it loads."""
    from cxr_automl import registry
    rows = []
    for kind in registry.KINDS:
        try:
            found = registry.available(kind)
        except registry.RegistryError as exc:
            rows.append({"kind": kind, "name": "?", "distribution": "?", "version": "?", "value": "?",
                         "loads": False, "error": str(exc)})
            continue
        for name, info in found.items():
            try:
                registry.load(kind, name)
                ok, err = True, ""
            except registry.RegistryError as exc:
                ok, err = False, str(exc)
            rows.append({"kind": kind, "name": name, "distribution": info.distribution,
                         "version": info.version, "value": info.value, "loads": ok, "error": err})
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
