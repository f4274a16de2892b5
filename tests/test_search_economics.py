"""A search a cluster can afford: bounded disk, cost recorded as an objective, warm starts."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from conftest import TINY, run_cli

SPACE = """\
metric: val/macro_auc
overrides: [strategy=spft]
params:
  strategy.unfreeze_k: range(0, 4)
  strategy.lr_backbone: tag(log, interval(1.0e-4, 1.0e-2))
"""
FAST = [*TINY, "strategy.epochs=2", "dataset.n_train=48", "dataset.n_val=32", "dataset.n_test=32"]


def _study(path, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}/runs/cxr-automl.db")


@pytest.mark.slow
def test_disk_after_a_search_holds_only_the_best_k_weight_files(in_tmp):
    (in_tmp / "space.yaml").write_text(SPACE)
    proc = run_cli("search", "-s", "space.yaml", "--study", "s", "-n", "4", "--pruner", "none", "--sampler", "random",
                   "--keep-best", "2", *FAST, cwd=in_tmp)
    study = _study(in_tmp)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    assert len(complete) == 4
    weights = sorted(p.relative_to(in_tmp) for p in (in_tmp / "runs/s").rglob("*")
                     if p.suffix in (".ckpt", ".safetensors", ".pt"))
    best_two = sorted(in_tmp.joinpath(t.user_attrs["run_dir"], "best_model.safetensors").relative_to(in_tmp)
                      for t in complete[:2])
    assert weights == best_two  # no resume checkpoint of a finished trial, no best model beyond the best 2
    for t in complete:  # every finished trial keeps its metrics, predictions and manifest
        run_dir = in_tmp / t.user_attrs["run_dir"]
        assert {"metrics.json", "predictions.csv", "config.yaml", "manifest.json"} <= {p.name for p in run_dir.iterdir()}
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert "search" in manifest["argv"] and manifest["seed"] == 0 and manifest["versions"]["torch"]
        assert manifest["versions"]["plugin:backbone"].startswith("resnet_tiny from cxr-automl")
    # the exported file loads into the model its config builds
    from cxr_automl.train.checkpoint import load_best_model
    state, config_yaml = load_best_model(in_tmp / best_two[0])
    assert "resnet_tiny" in config_yaml and state
    out = " ".join(proc.stdout.split())
    assert f"best model: {complete[0].user_attrs['run_dir']}/best_model.safetensors" in out
    status = json.loads(run_cli("status", "--storage", f"sqlite:///{in_tmp}/runs/cxr-automl.db", "--json", cwd=in_tmp).stdout)
    disk = status[0]["disk"]
    assert disk["weight_files"] == 2 and disk["weight_bytes"] == sum((in_tmp / p).stat().st_size for p in weights)
    assert disk["bytes"] > disk["weight_bytes"]
    assert status[0]["best"]["best_model"].endswith("best_model.safetensors")


@pytest.mark.slow
def test_a_multi_objective_search_on_the_default_space_has_a_pareto_front_and_costs(in_tmp):
    spec = f"sqlite:///{in_tmp}/runs/cxr-automl.db"
    proc = run_cli("search", "-s", "spft", "--study", "mo", "-n", "3", "--objective", "val/macro_auc,cost/device_s",
                   "--max-cost", "cost/peak_mem_mb=1000000", *FAST, cwd=in_tmp)
    study = optuna.load_study(study_name="mo", storage=spec)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    for t in complete:
        costs = {k: t.user_attrs[k] for k in ("cost/wall_s", "cost/device_s", "cost/peak_mem_mb", "cost/params",
                                              "cost/images_per_s")}
        assert all(v > 0 for v in costs.values()), costs
        assert t.values[1] == costs["cost/device_s"] and t.values[0] == t.user_attrs["metrics"]["best/val/macro_auc"]
        assert sorted(t.user_attrs["curve"]) == ["0", "1"]  # per-epoch primary values (Optuna cannot report them)
    front = {t.number for t in study.best_trials}
    assert front
    out = " ".join(proc.stdout.split())
    assert "Pareto front of mo" in out
    status = json.loads(run_cli("status", "--storage", spec, "--json", cwd=in_tmp).stdout)[0]
    assert {p["number"] for p in status["pareto_front"]} == front
    assert status["objectives"] == ["val/macro_auc", "cost/device_s"]
    report = in_tmp / "report.html"
    run_cli("report", "--storage", spec, "--out", str(report), cwd=in_tmp)
    assert "Pareto front: mo" in report.read_text()
    bad = run_cli("search", "-s", "spft", "--study", "x", "--objective", "val/macro_auc,cost/device_s",
                  "--pruner", "hyperband", *FAST, cwd=in_tmp, check=False)
    assert bad.returncode == 2 and "Optuna cannot prune a multi-objective study" in bad.stderr
    bad = run_cli("search", "-s", "spft", "--max-cost", "10", "--sampler", "random", cwd=in_tmp, check=False)
    assert bad.returncode == 2 and "--max-cost needs a sampler that takes constraints" in bad.stderr


def test_multi_objective_pruning_applies_the_median_rule_to_the_primary_metric():
    from cxr_automl.hpo import objectives
    study = optuna.create_study(directions=["maximize", "minimize"])
    for top in (0.6, 0.7, 0.8):
        study.add_trial(optuna.trial.create_trial(values=[top, 10.0], user_attrs={"curve": {"0": 0.5, "1": top}}))
    assert objectives.median_prune(study, {0: 0.5, 1: 0.65}, warmup=1, maximize=True)  # below the median 0.7
    assert not objectives.median_prune(study, {0: 0.5, 1: 0.75}, warmup=1, maximize=True)
    assert not objectives.median_prune(study, {0: 0.1}, warmup=1, maximize=True)  # still warming up
    assert objectives.parse("val/macro_auc,cost/params,test/macro_auc", "val/macro_auc", "maximize") == [
        ("val/macro_auc", "maximize"), ("cost/params", "minimize"), ("test/macro_auc", "maximize")]


@pytest.mark.slow
def test_warm_start_enqueues_the_top_trials_mapped_by_name_and_clipped(in_tmp):
    from optuna.distributions import FloatDistribution, IntDistribution

    from cxr_automl.hpo.storage import open_storage
    src = f"journal:{in_tmp / 'src.log'}"
    old = optuna.create_study(storage=open_storage(src), study_name="nih", direction="maximize")
    dists = {"strategy.unfreeze_k": IntDistribution(0, 12), "strategy.lr_backbone": FloatDistribution(1e-5, 1.0, log=True),
             "strategy.ema_decay": FloatDistribution(0.5, 0.999)}
    for value, k, lr in ((0.9, 9, 0.5), (0.8, 2, 3e-3), (0.7, 1, 1e-3), (0.6, 0, 1e-4)):
        old.add_trial(optuna.trial.create_trial(value=value, params={"strategy.unfreeze_k": k, "strategy.lr_backbone": lr,
                                                                     "strategy.ema_decay": 0.9}, distributions=dists))
    (in_tmp / "space.yaml").write_text(SPACE)
    spec = f"journal:{in_tmp / 'new.log'}"
    run_cli("search", "-s", "space.yaml", "--study", "chexpert", "--storage", spec, "--launcher", "none",
            "--warm-start", f"{src}:nih", "--warm-start-top", "2", cwd=in_tmp)
    new = optuna.load_study(study_name="chexpert", storage=open_storage(spec))
    queued = [t for t in new.trials if t.state == TrialState.WAITING]
    assert [t.system_attrs["fixed_params"] for t in queued] == [  # unfreeze_k 9 clipped to range(0, 4), lr 0.5 to 1e-2; ema_decay dropped
        {"strategy.unfreeze_k": 4, "strategy.lr_backbone": 1e-2}, {"strategy.unfreeze_k": 2, "strategy.lr_backbone": 3e-3}]
    assert queued[0].user_attrs["warm_dropped"] == ["strategy.ema_decay"]
    assert queued[0].user_attrs["warm_clipped"] == ["strategy.unfreeze_k: 9 -> 4", "strategy.lr_backbone: 0.5 -> 0.01"]
    # creating the study again (a second `search`) does not enqueue them twice
    run_cli("search", "-s", "space.yaml", "--study", "chexpert", "--storage", spec, "--launcher", "none",
            "--warm-start", f"{src}:nih", cwd=in_tmp)
    assert len(optuna.load_study(study_name="chexpert", storage=open_storage(spec)).trials) == 2
    out = " ".join(run_cli("summary", "--storage", spec, cwd=in_tmp).stdout.split())
    assert "warm start: 2 trial(s) carried over from study nih" in out
    assert "trial 0 (waiting) <- nih trial 0 (val/macro_auc 0.9000 there); dropped strategy.ema_decay; clipped" in out
    bad = run_cli("search", "-s", "space.yaml", "--study", "z", "--storage", spec, "--launcher", "none",
                  "--warm-start", f"{src}:nope", cwd=in_tmp, check=False)
    assert bad.returncode == 2 and "no study 'nope' there; it has: nih" in bad.stderr


def test_the_manifest_fingerprints_the_dataset_files_and_label_files(tmp_path):
    import hashlib

    from cxr_automl.train import manifest
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x" * 10)
    (tmp_path / "labels.csv").write_text("image,label\na.png,1\n")
    first = manifest.dataset_fingerprint(str(tmp_path))
    assert first["files"] == 2
    assert first["label_files"] == {"labels.csv": hashlib.sha256(b"image,label\na.png,1\n").hexdigest()}
    (tmp_path / "images" / "b.png").write_bytes(b"y")
    assert manifest.dataset_fingerprint(str(tmp_path))["listing_sha256"] != first["listing_sha256"]
    assert manifest.git_commit(tmp_path) is None  # not a git checkout
