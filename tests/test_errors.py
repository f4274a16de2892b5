"""One error hierarchy: every error the core and the built-in plugins define derives from
``CxrAutomlError``; "fix your input" errors are ``UserError``; a trial that raises fails alone."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import optuna
import pytest
from optuna.trial import TrialState

import cxr_automl
import cxr_automl_plugins
from conftest import TINY, run_cli
from cxr_automl.errors import CxrAutomlError, TrainingError, UserError


def _modules():
    for pkg in (cxr_automl, cxr_automl_plugins):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            yield importlib.import_module(info.name)


def test_every_error_class_derives_from_the_base():
    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    assert len(found) >= 14, sorted(found)
    outside = [n for n, c in found.items() if not issubclass(c, CxrAutomlError)]
    assert not outside, outside
    for name in ("ConfigError", "RegistryError", "DataError", "WeightsError", "CheckpointError", "SearchSpaceError"):
        assert any(n.endswith("." + name) and issubclass(c, UserError) for n, c in found.items()), name
    assert issubclass(found["cxr_automl.train.runtime.NonFiniteLossError"], TrainingError)


@pytest.mark.slow
def test_trials_with_a_bad_weights_path_fail_alone_and_the_search_goes_on(in_tmp):
    # RegistryError/WeightsError derived from bare Exception and aborted the whole search (exit 2), leaving
    # the trial RUNNING; now each trial fails with its reason and the next one runs
    (in_tmp / "space.yaml").write_text(
        "metric: val/macro_auc\noverrides: [strategy=spft]\nparams:\n"
        "  backbone.weights: choice(/nonexistent.pt, /also/missing.pt)\nbaselines:\n  default: {}\n")
    proc = run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "2", "--pruner", "none", *TINY,
                   "strategy.epochs=1", cwd=in_tmp)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/runs/cxr-automl.db")
    trials = study.get_trials()
    assert len(trials) >= 2 and all(t.state == TrialState.FAIL for t in trials)
    for t in trials:
        assert "weights file" in t.user_attrs["fail_reason"] and "does not exist" in t.user_attrs["fail_reason"]
        assert "traceback" not in t.user_attrs["fail_reason"]  # a user error: the one line is enough
    assert "trial 0 failed" in proc.stdout and "trial 1 failed" in proc.stdout
