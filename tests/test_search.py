"""`cxr-automl search` end to end on a real SQLite study."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import CLI, TINY, run_cli
from cxr_automl.hpo import searchspace

SPACE = """\
metric: val/macro_auc
n_trials: 3
overrides: [strategy=spft]
params:
  strategy.unfreeze_k: range(0, 5)
  strategy.lr_backbone: tag(log, interval(1.0e-4, 1.0e-2))
  strategy.ema_decay: interval(0.5, 0.99)
baselines:
  default: {}
  linear_probe: {strategy.unfreeze_k: 0}
"""


def _study(path, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}/runs/cxr-automl.db")


def _states(study):
    return [t.state for t in study.get_trials()]


def test_search_reaches_target_then_resumes_without_overshoot(in_tmp):
    (in_tmp / "space.yaml").write_text(SPACE)
    proc = run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "3", "--pruner", "none", *TINY, cwd=in_tmp)
    study = _study(in_tmp)
    assert _states(study) == [TrialState.COMPLETE] * 3
    assert study.trials[0].user_attrs["baseline"] == "default"
    assert study.trials[0].params["strategy.unfreeze_k"] == 4  # the config default
    assert study.trials[1].params["strategy.unfreeze_k"] == 0  # the linear probe baseline
    t = study.best_trial
    for key in ("backbone", "head", "strategy", "dataset", "run_dir", "metrics"):
        assert key in t.user_attrs
    assert t.user_attrs["epochs"] == 3  # what the look-ahead pruner projects to
    assert (in_tmp / t.user_attrs["run_dir"] / "metrics.json").is_file()
    assert "best" in proc.stdout and "linear_probe" in proc.stdout and "reproduce: cxr-automl train" in proc.stdout
    # the same table again from the storage alone (a search that ran elsewhere: --detach, sbatch)
    again = run_cli("summary", "--storage", f"sqlite:///{in_tmp}/runs/cxr-automl.db", cwd=in_tmp)
    tail = lambda out: out[out.index("reproduce:"):].split()  # noqa: E731 - rich may wrap lines differently
    assert tail(again.stdout) == tail(proc.stdout)
    (in_tmp / "space.yaml").rename(in_tmp / "moved.yaml")  # the recorded space path is gone
    gone = run_cli("summary", "--storage", f"sqlite:///{in_tmp}/runs/cxr-automl.db", cwd=in_tmp, check=False)
    assert gone.returncode == 2 and "pass --search-space PATH" in gone.stderr
    moved = run_cli("summary", "--storage", f"sqlite:///{in_tmp}/runs/cxr-automl.db", "-s", "moved.yaml", cwd=in_tmp)
    assert tail(moved.stdout) == tail(proc.stdout)
    (in_tmp / "moved.yaml").rename(in_tmp / "space.yaml")
    # the same command again: nothing to do
    run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "3", *TINY, cwd=in_tmp)
    assert len(_study(in_tmp).trials) == 3
    # a larger target adds exactly the difference
    run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "4", *TINY, cwd=in_tmp)
    assert _states(_study(in_tmp)) == [TrialState.COMPLETE] * 4


def test_nan_trial_fails_with_reason_and_study_goes_on(in_tmp):
    (in_tmp / "space.yaml").write_text(
        "params:\n  strategy.lr_head: choice(1.0e+30, 0.001)\n  strategy.lr_backbone: choice(1.0e+30)\n"
        "baselines:\n  blowup: {strategy.lr_head: 1.0e+30}\n  ok: {strategy.lr_head: 0.001}\n")
    run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "1", "--sampler", "random", *TINY,
            "strategy=finetune", "strategy.lr_backbone=0.001", "strategy.unfreeze_k=0", cwd=in_tmp)
    trials = _study(in_tmp).trials
    assert trials[0].state == TrialState.FAIL
    assert "NonFiniteLossError: loss is" in trials[0].user_attrs["fail_reason"]
    assert trials[1].state == TrialState.COMPLETE


def test_ctrl_c_marks_trial_failed_and_rerun_resumes_it(in_tmp):
    (in_tmp / "space.yaml").write_text(SPACE)
    # 30 short epochs per trial, so Ctrl-C lands mid-search even on a busy machine
    args = ["search", "-s", "space.yaml", "--study", "s", "-n", "2", "--pruner", "none", *TINY,
            "strategy.epochs=30", "strategy.patience=1000", "trainer.progress=false"]
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive
    # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([*CLI, *args], cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = in_tmp / "runs/s/trial_0000/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.exists() and len(ckpt.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again" in err
    trials = _study(in_tmp).trials
    assert trials[0].state == TrialState.FAIL and "interrupted" in trials[0].user_attrs["fail_reason"]
    run_cli(*args, cwd=in_tmp)
    study = _study(in_tmp)
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 2
    resumed = [t for t in finished if t.user_attrs["run_dir"].endswith("trial_0000")]
    assert len(resumed) == 1  # same run dir: resumed, not restarted
    resumed = resumed[0]
    assert resumed.params == trials[0].params
    epochs = [line for line in open(in_tmp / "runs/s/trial_0000/metrics.jsonl")]
    assert len(epochs) == 30  # no epoch ran twice


@pytest.mark.parametrize("line, expected", [
    ("  x: interval(0.1,)", "space.yaml:3: bad sweep for 'x'"),
    ("  x: 5", "space.yaml:3: bad sweep for 'x'"),
    ("  x: choice()", "space.yaml:3: bad sweep for 'x'"),
])
def test_bad_search_space_line_names_file_and_line(in_tmp, line, expected):
    (in_tmp / "space.yaml").write_text(f"metric: val/macro_auc\nparams:\n{line}\n")
    with pytest.raises(searchspace.SearchSpaceError, match=expected):
        searchspace.load(str(in_tmp / "space.yaml"))
    proc = run_cli("search", "-s", "space.yaml", cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "space.yaml:3" in proc.stderr


def test_grammar_maps_to_optuna_distributions():
    d = optuna.distributions
    assert searchspace.to_distribution("k", "range(0, 4)") == d.IntDistribution(0, 4)
    assert searchspace.to_distribution("k", "range(0.1, 0.5, step=0.1)") == d.FloatDistribution(0.1, 0.5, step=0.1)
    assert searchspace.to_distribution("k", "tag(log, interval(1e-5, 1e-1))") == d.FloatDistribution(1e-5, 1e-1, log=True)
    assert searchspace.to_distribution("k", "choice(mlp, linear)") == d.CategoricalDistribution(["mlp", "linear"])
    assert searchspace.to_distribution("k", "tag(int, interval(1, 8))") == d.IntDistribution(1, 8)


def test_shipped_spft_space_loads():
    space = searchspace.load("spft")
    assert {"strategy.unfreeze_fraction", "strategy.ema_decay", "strategy.weight_refine_rate",
            "strategy.lr_backbone", "strategy.lr_head"} <= set(space.params)


@pytest.mark.parametrize("name", ["median", "successive_halving", "hyperband"])
def test_prune_warmup_is_the_first_epoch_a_trial_can_be_stopped(name):
    """A trial far below finished ones is kept before epoch ``warmup`` and stopped at it (hyperband:
    at its bracket's first rung, ``warmup`` or later)."""
    from cxr_automl.hpo.pruners import make_pruner
    warmup = 4
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(name, warmup), study_name="warmup",
                                sampler=optuna.samplers.RandomSampler(0))
    for _ in range(3 if name != "hyperband" else 30):
        t = study.ask()
        for step in range(12):
            t.report(0.9, step)
            t.should_prune()  # successive halving records its rungs here
        study.tell(t, 0.9)
    bad = study.ask()
    stopped_at = None
    for step in range(12):
        bad.report(0.1, step)
        if bad.should_prune():
            stopped_at = step
            break
    assert stopped_at == warmup if name != "hyperband" else stopped_at is not None and stopped_at >= warmup


def test_prune_warmup_reaches_workers_and_bad_values_are_one_line_errors(in_tmp):
    from cxr_automl.hpo import pruners, search, storage
    (in_tmp / "space.yaml").write_text(SPACE)
    url = f"journal:{in_tmp / 'study.log'}"
    run_cli("search", "-s", "space.yaml", "--study", "w", "-n", "2", "--prune-warmup", "6", "--launcher", "none",
            "--storage", url, *TINY, cwd=in_tmp)
    opts = search.options_from_study("w", storage.open_storage(url), url)
    assert (opts.pruner, opts.prune_warmup) == ("median", 6)
    space = searchspace.load(str(in_tmp / "space.yaml"))
    assert pruners.resolve_prune_warmup("auto", space, ("strategy.epochs=24",)) == 6  # a quarter of the epochs
    assert pruners.resolve_prune_warmup("auto", space, ("strategy.epochs=4",)) == 2   # at least 2
    proc = run_cli("search", "-s", "space.yaml", "--prune-warmup", "-1", *TINY, cwd=in_tmp, check=False)
    assert proc.returncode != 0 and "--prune-warmup -1: use an epoch index >= 0" in proc.stderr + proc.stdout
    assert opts.prune_lookahead == 0.0  # auto: off for the median pruner
    run_cli("search", "-s", "space.yaml", "--study", "sh", "-n", "2", "--pruner", "successive_halving",
            "--prune-lookahead", "0.25", "--launcher", "none", "--storage", url, *TINY, cwd=in_tmp)
    opts = search.options_from_study("sh", storage.open_storage(url), url)
    assert (opts.pruner, opts.prune_lookahead) == ("successive_halving", 0.25)
    assert isinstance(pruners.make_pruner(opts.pruner, opts.prune_warmup, opts.prune_lookahead), pruners.LookAheadPruner)
    assert pruners.resolve_prune_lookahead("auto", "successive_halving") == 0.125
    proc = run_cli("search", "-s", "space.yaml", "--prune-lookahead", "0.2", *TINY, cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "--prune-lookahead 0.2: only --pruner successive_halving" in proc.stderr
    proc = run_cli("search", "-s", "space.yaml", "--pruner", "hyperband", "--prune-lookahead", "-1", *TINY,
                   cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "--prune-lookahead '-1': use auto or a fraction >= 0" in proc.stderr


def _climb(study, values, epochs=None):
    """One trial reporting ``values`` epoch by epoch; the epoch at which it was stopped, or None."""
    trial = study.ask()
    if epochs:
        trial.set_user_attr("epochs", epochs)
    for step, value in enumerate(values):
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return step
    study.tell(trial, values[-1])
    return None


@pytest.mark.parametrize("lookahead", [0.0, 0.125])
def test_lookahead_keeps_a_fast_climber_that_plain_successive_halving_stops(lookahead):
    """At the first rung (epoch 4 of 40) a trial climbing 0.06 per epoch sits at 0.64, below a flat
    0.80; projected 1/8 of the way to its last epoch (0.64 + 0.06 * 35 / 8 = 0.90) it is ahead, so
    only the look-ahead pruner lets it go on (it ends at 0.88). A flat trial below both is stopped
    either way, and the stored curve stays the measured one."""
    from cxr_automl.hpo.pruners import make_pruner
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner("successive_halving", 4, lookahead))
    assert _climb(study, [0.80] * 40, epochs=40) is None  # the first trial has nobody to lose to
    climber = [min(0.88, 0.40 + 0.06 * e) for e in range(40)]
    assert _climb(study, climber, epochs=40) == (None if lookahead else 4)
    assert _climb(study, [0.50] * 40, epochs=40) == 4
    assert study.trials[1].intermediate_values[4] == pytest.approx(0.64)


def test_a_new_study_never_resumes_another_studys_run_dir(in_tmp):
    """Same study name, storage deleted: trial 0 trains from scratch and the old run is moved aside whole."""
    (in_tmp / "space.yaml").write_text(SPACE)
    args = ["search", "-s", "space.yaml", "--study", "s", "-n", "1", "--pruner", "none", *TINY]
    run_cli(*args, cwd=in_tmp)
    old = (in_tmp / "runs/s/trial_0000/metrics.jsonl").read_text()
    (in_tmp / "runs/cxr-automl.db").unlink()
    proc = run_cli(*args, cwd=in_tmp)
    assert "moved it to trial_0000.stale1" in proc.stdout + proc.stderr
    assert (in_tmp / "runs/s/trial_0000.stale1/metrics.jsonl").read_text() == old
    trial = _study(in_tmp).trials[0]
    assert trial.state == TrialState.COMPLETE and len(trial.intermediate_values) == 3  # all of TINY's epochs
