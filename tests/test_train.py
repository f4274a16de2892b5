"""`cxr-automl train` end to end, and the loop's guarantees (exact resume, determinism, NaN)."""

import csv
import json

import pytest
import torch
import yaml

from conftest import TINY, run_cli
from cxr_automl import config
from cxr_automl.train import run
from cxr_automl.train.checkpoint import CheckpointError
from cxr_automl.train.loop import Callback
from cxr_automl.train.runtime import NonFiniteLossError


def test_train_cli_writes_run_directory(in_tmp):
    proc = run_cli("train", *TINY, "run_dir=runs/a", cwd=in_tmp)
    run_dir = in_tmp / "runs/a"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["strategy"]["name"] == "spft" and cfg["dataset"]["n_train"] == 96
    assert (run_dir / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert 0 <= metrics["test/macro_auc"] <= 1
    class_keys = [k for k in metrics if k.startswith("test/auc/")]
    assert class_keys, metrics
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    assert len(rows) == 48
    header = list(rows[0])
    names = [k.split(":", 1)[1] for k in header if k.startswith("label:")]
    assert header == ["image_id", *[f"label:{n}" for n in names], *[f"prob:{n}" for n in names]]
    assert all(r[f"label:{n}"] in ("0", "1", "") for r in rows for n in names)
    assert "test/macro_auc" in proc.stdout


TIMING = ("train/images_per_s", "train/data_wait_share")


def _results(metrics):
    """Metrics without wall-clock figures, which differ run to run by nature."""
    return {k: v for k, v in metrics.items() if k not in TIMING}


def _cfg(*extra):
    return config.compose([*TINY, *extra])


class StopAfter(Callback):
    """Simulates a crash: raises after the given epoch's checkpoint was written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, metrics):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    overrides = ["strategy.epochs=4", "strategy.head_epochs=1", "head.dropout=0.2"]
    full = run.train(_cfg(*overrides), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        # Checkpointer runs before StopAfter, so epoch 2's checkpoint is on disk when it "dies"
        run.train(_cfg(*overrides), tmp_path / "resumed", [StopAfter(2)])
    assert len((tmp_path / "resumed/metrics.jsonl").read_text().splitlines()) == 2
    resumed = run.train(_cfg(*overrides), tmp_path / "resumed")
    assert resumed.keys() == full.keys()
    for key in _results(full):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    a = torch.load(tmp_path / "full/last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/last.ckpt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    cfg = _cfg("strategy.epochs=2")
    run.train(cfg, tmp_path / "r", [StopAfter(99)])
    last = tmp_path / "r/last.ckpt"
    assert (tmp_path / "r/previous.ckpt").is_file()
    last.write_bytes(last.read_bytes()[:1000])
    cfg3 = _cfg("strategy.epochs=2")
    metrics = run.train(cfg3, tmp_path / "r")  # resumes from previous.ckpt (after epoch 0)
    assert metrics["epochs_run"] == 2


def test_checkpoint_from_other_config_names_the_keys(tmp_path):
    run.train(_cfg("strategy.epochs=1"), tmp_path / "r")
    with pytest.raises(CheckpointError, match="strategy.lr_head"):
        run.train(_cfg("strategy.epochs=1", "strategy.lr_head=0.5"), tmp_path / "r")


def test_same_seed_same_metrics(tmp_path):
    a = run.train(_cfg("strategy.epochs=2"), tmp_path / "a")
    b = run.train(_cfg("strategy.epochs=2"), tmp_path / "b")
    assert _results(a) == _results(b)
    c = run.train(_cfg("strategy.epochs=2", "trainer.seed=1"), tmp_path / "c")
    assert c["test/macro_auc"] != a["test/macro_auc"]


def test_nan_loss_is_a_clear_error(tmp_path, in_tmp):
    with pytest.raises(NonFiniteLossError, match="loss is (nan|inf).*lower the learning rates"):
        run.train(_cfg("strategy=finetune", "strategy.epochs=2", "strategy.lr_head=1e30",
                       "strategy.lr_backbone=1e30", "head.dropout=0.0"), tmp_path / "nan")
    proc = run_cli("train", *TINY, "strategy=finetune", "strategy.lr_head=1e30", "strategy.lr_backbone=1e30",
                   cwd=in_tmp, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") <= 2 and "loss is" in proc.stderr


def test_bf16_runs_on_cpu_and_fp16_on_cpu_is_refused(tmp_path, in_tmp):
    metrics = run.train(_cfg("strategy.epochs=1", "trainer.precision=bf16"), tmp_path / "bf16")
    assert 0 <= metrics["test/macro_auc"] <= 1
    proc = run_cli("train", *TINY, "trainer.precision=16", "trainer.device=cpu", cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "use trainer.precision=bf16" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_cli("train", *TINY, "trainer.device=cuda", cwd=in_tmp, check=False)
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr
