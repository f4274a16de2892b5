"""The Hydra entry (cxr_automl.cli.hydra_app) runs a real 2-trial sweep through Hydra's Optuna sweeper and
the submitit local launcher, from an overlay venv with hydra-core 1.4.0rc3 (the project pins <1.4).
The overlay is built once (seconds: it reuses this environment's torch) and cached in pytest's cache."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import optuna
import pytest

from cxr_automl.cli import overlay_venv

TINY = ["strategy.epochs=2", "strategy.head_epochs=1", "dataset.n_train=64", "dataset.n_val=32",
        "dataset.n_test=16", "dataset.image_size=64", "trainer.progress=false"]


@pytest.fixture(scope="module")
def sweeper_python(request) -> Path:
    return overlay_venv.build(request.config.cache.mkdir("hydra-sweeper-overlay"))


def test_overlay_shadows_hydra_but_keeps_the_project_env(sweeper_python):
    out = subprocess.run([str(sweeper_python), "-c", "import hydra, omegaconf, torch, cxr_automl, optuna;"
                          "print(hydra.__version__, omegaconf.__version__, optuna.__version__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["1.4.0rc3", "2.4.1rc1"] and out[2] == optuna.__version__
    import hydra
    assert hydra.__version__.startswith("1.3")  # this environment is untouched


@pytest.mark.slow
def test_hydra_entry_runs_a_two_trial_optuna_sweep(sweeper_python, tmp_path):
    db = tmp_path / "sweep.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(sweeper_python), "-m", "cxr_automl.cli.hydra_app", "-s", "spft",
                           "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                           f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.sampler.seed=0",
                           f"hydra.sweep.dir={tmp_path / 'multirun'}", *TINY],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="spft", storage=f"sqlite:///{db}")
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 2
    assert set(trials[0].params) == {"strategy.unfreeze_fraction", "strategy.unfreeze_ramp", "strategy.ema_decay",
                                     "strategy.weight_refine_rate", "strategy.lr_head", "strategy.lr_backbone"}
    for job in ("0", "1"):  # each job trained in its own output dir; the sweeper got its best epoch
        run = tmp_path / "multirun" / job
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(epochs) == 2
        assert "config.yaml" in os.listdir(run)
    bests = sorted(max(json.loads(line)["val/macro_auc"] for line in (tmp_path / "multirun" / j / "metrics.jsonl")
                       .read_text().splitlines()) for j in ("0", "1"))
    assert sorted(t.value for t in trials) == pytest.approx(bests)


def test_search_space_becomes_sweeper_arguments():
    pytest.importorskip("hydra")
    from cxr_automl.cli.hydra_app import sweep_args
    args = sweep_args("spft", ["strategy.ema_decay=0.95", "hydra.sweeper.n_trials=3"])
    assert args[:2] == ["--multirun", "hydra/sweeper=optuna"]
    assert "strategy.unfreeze_fraction=interval(0.0, 1.0)" in args and "metric=val/macro_auc" in args
    assert "hydra.sweeper.direction=maximize" in args and "strategy=spft" in args
    assert args.count("hydra.sweeper.n_trials=3") == 1 and not any(a.startswith("hydra.sweeper.n_trials=12") for a in args)
    assert [a for a in args if a.startswith("strategy.ema_decay=")] == ["strategy.ema_decay=0.95"]
