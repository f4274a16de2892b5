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
def test_a_trial_with_a_bad_plugin_name_fails_alone_and_the_search_goes_on(in_tmp):
    # RegistryError/WeightsError derived from bare Exception and aborted the whole search (exit 2), leaving
    # the trial RUNNING; now each trial fails with its reason and the next one runs
    (in_tmp / "space.yaml").write_text(
        "metric: val/macro_auc\noverrides: [strategy=spft]\nparams:\n"
        "  backbone: choice(no_such_backbone, resnet_tiny)\nbaselines:\n"
        "  bad: {backbone: no_such_backbone}\n  ok: {backbone: resnet_tiny}\n")
    proc = run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "1", "--pruner", "none", *TINY,
                   "strategy.epochs=1", cwd=in_tmp)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/runs/cxr-automl.db")
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    reason = study.trials[0].user_attrs["fail_reason"]
    assert reason.startswith("RegistryError: unknown backbone 'no_such_backbone'")
    assert "traceback" not in reason  # a user error: the one line is enough
    assert "trial 0 failed" in proc.stdout


@pytest.mark.slow
def test_a_search_whose_bad_weights_path_fails_every_trial_stops_at_max_failures_with_the_common_reason(in_tmp):
    (in_tmp / "space.yaml").write_text(
        "metric: val/macro_auc\noverrides: [strategy=spft]\nparams:\n"
        "  backbone.weights: choice(/nonexistent.pt, /also/missing.pt)\n")
    proc = run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "5", "--max-failures", "2", *TINY,
                   cwd=in_tmp, check=False)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "stopping the search: 2 of 2 ended trials failed (--max-failures 2); most common " \
        "reason (" in error[0] and "does not exist" in error[0], proc.stderr
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{in_tmp}/runs/cxr-automl.db").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2  # none left RUNNING, none asked after the stop
    bad = run_cli("search", "-s", "space.yaml", "--study", "t", "--max-failures", "0", cwd=in_tmp, check=False)
    assert bad.returncode == 2 and "--max-failures '0': use a number" in bad.stderr


def test_the_failure_rule_counts_a_trials_own_failures_only():
    from cxr_automl.hpo import failures
    study = optuna.create_study()
    study.set_user_attr("n_trials", 10)
    fail = lambda reason: optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": reason})  # noqa: E731
    for reason in ("surplus: other workers took the study's last slots", "interrupted (Ctrl-C)", "OOM", "OOM"):
        study.add_trial(fail(reason))
    study.add_trial(optuna.trial.create_trial(value=0.7))
    assert failures.verdict(study) is None  # 2 own failures: below the 3 a rate needs
    study.add_trial(fail("DataError: x"))
    assert failures.verdict(study) == ("stopping the search: 3 of 4 ended trials failed (--max-failures 50%); "
                                       "most common reason (2x): OOM")
    assert failures.verdict(study, failures.parse("90%")) is None
    assert failures.verdict(study, failures.parse("3")) is not None
