"""A Hydra app whose job is one cxr-automl training run, for users who already sweep with Hydra.

Needs hydra-core 1.4 and Hydra's Optuna sweeper, which the project's pins exclude: run it from an
overlay venv (README: Hydra sweeper)::

    python -m cxr_automl.cli.overlay_venv .hydra-venv
    .hydra-venv/bin/python -m cxr_automl.cli.hydra_app -s spft hydra.sweeper.n_trials=6 \\
        hydra/launcher=submitit_local strategy.epochs=4

``-s/--search-space NAME`` reads ``search_spaces/NAME.yaml`` (already the sweeper's grammar) and adds,
unless given on the command line: ``--multirun``, ``hydra/sweeper=optuna``, its fixed overrides, each
param's sweep expression, its metric (``metric=...``), direction and ``n_trials``. Without ``-s`` it is a
plain Hydra app over the same config groups (``backbone=``, ``head=``, ``strategy=``, ``dataset=``).

Each job composes its overrides with ``cxr_automl.config.compose`` (the same checks as ``cxr-automl
train``), trains in the job's output directory and returns the best epoch's ``metric`` to the sweeper.
The sweeper cannot prune (it never hands the job its trial) and waits for each batch of ``n_jobs``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger(__name__)
# hydra-core 1.4 deprecates version_base, which 1.3 (the project's pin, compose) needs
warnings.filterwarnings("ignore", message="The version_base parameter is deprecated")

#: the app's own key, never passed to compose: the validation metric the job returns
METRIC_KEY = "metric"
# The primary config: cxr-automl's config.yaml (groups and trainer) plus the metric the job returns.
ConfigStore.instance().store(name="hydra_app", node={"defaults": ["config", "_self_"],
                                                     METRIC_KEY: "val/macro_auc"})


def _job_overrides() -> list[str]:
    return [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=", 1)[0] != METRIC_KEY]


@hydra.main(version_base=None, config_path="pkg://cxr_automl.config.conf", config_name="hydra_app")
def run_job(cfg: DictConfig) -> float:
    from cxr_automl.config import compose
    from cxr_automl.train import run as run_mod
    metric = str(cfg[METRIC_KEY])
    plain = compose(_job_overrides())
    run_dir = Path(plain.get("run_dir") or HydraConfig.get().runtime.output_dir)
    plain["run_dir"] = str(run_dir)
    metrics = run_mod.train(plain, run_dir)
    value = metrics.get(f"best/{metric}")
    if value is None:
        known = sorted(k[5:] for k in metrics if k.startswith("best/"))
        raise ValueError(f"metric {metric!r} was never computed; this run has: {', '.join(known) or '(none)'}")
    log.info("%s best %s %.4f", run_dir, metric, value)
    return float(value)


def _given(args: list[str], key: str) -> bool:
    return any(a.lstrip("+~").split("=", 1)[0] == key for a in args)


def sweep_args(space_name: str, args: list[str]) -> list[str]:
    """The Hydra command line that sweeps ``search_spaces/NAME.yaml``: ``args`` plus whatever of the space
    the user did not set there."""
    from cxr_automl.hpo import searchspace
    space = searchspace.load(space_name)
    raw = __import__("yaml").safe_load(space.path.read_text())
    extra: list[str] = []
    if "--multirun" not in args and "-m" not in args:
        extra.append("--multirun")
    if not _given(args, "hydra/sweeper"):
        extra.append("hydra/sweeper=optuna")
    defaults: dict[str, Any] = {"hydra.sweeper.direction": space.direction, "hydra.sweeper.n_trials": space.n_trials,
                                "hydra.sweeper.study_name": space.name, METRIC_KEY: space.metric}
    for text in space.overrides:
        defaults.setdefault(text.split("=", 1)[0], text.split("=", 1)[1])
    for key, expr in raw["params"].items():
        defaults[str(key)] = str(expr)
    extra += [f"{k}={v}" for k, v in defaults.items() if not _given(args, k)]
    return [*extra, *args]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    space = None
    for flag in ("-s", "--search-space"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                sys.exit(f"error: {flag} needs a search space NAME or PATH")
            space = argv[i + 1]
            del argv[i:i + 2]
    if space is not None:
        from cxr_automl.errors import UserError
        try:
            argv = sweep_args(space, argv)
        except UserError as exc:
            sys.exit(f"error: {exc}")
    sys.argv = [sys.argv[0], *argv]
    run_job()


if __name__ == "__main__":
    main()
