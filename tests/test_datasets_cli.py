"""End to end: `cxr-automl train` and `cxr-automl data check` on a real-format dataset."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import run_cli
from cxr_files import make_nih

SMALL = ["dataset.image_size=32", "backbone.width=8", "backbone.image_size=32", "head.hidden=32",
         "trainer.batch_size=16", "trainer.progress=false"]


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    return make_nih(tmp_path_factory.mktemp("nih"), 200)


@pytest.mark.slow
def test_train_on_nih_layout(nih, in_tmp):
    run_cli("train", "dataset=nih_cxr14", f"dataset.root={nih}", *SMALL, "strategy.epochs=2",
            "run_dir=runs/nih", cwd=in_tmp)
    metrics = json.loads((in_tmp / "runs/nih/metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and 0 <= metrics["test/macro_auc"] <= 1
    with open(in_tmp / "runs/nih/predictions.csv") as fh:
        ids = {row["image_id"] for row in csv.DictReader(fh)}
    assert ids == set((nih / "test_list.txt").read_text().split())  # the official test list, exactly
    # a second run (another trial) reuses the cache instead of decoding again
    out = run_cli("train", "dataset=nih_cxr14", f"dataset.root={nih}", *SMALL, "strategy.epochs=1",
                  "dataset.label_fraction=0.3", "run_dir=runs/nih30", "-v", cwd=in_tmp)
    assert "building the image cache" not in out.stderr


def test_data_check_summarises_and_flags(nih, in_tmp):
    out = run_cli("data", "check", "dataset=nih_cxr14", f"dataset.root={nih}", "dataset.image_size=32",
                  "--json", cwd=in_tmp)
    rep = json.loads(out.stdout)
    assert rep["ok"] and sum(rep["images"].values()) == 203 and rep["skipped"] == {}
    assert rep["labels"]["test"]["Cardiomegaly"]["pos"] + rep["labels"]["test"]["Cardiomegaly"]["neg"] == rep["images"]["test"]
    names = {ln.split(",")[0] for ln in (nih / "Data_Entry_2017_v2020.csv").read_text().splitlines()}
    n_boxes = sum(r[0] in names for r in list(csv.reader(open(nih / "BBox_List_2017.csv")))[1:])
    assert n_boxes >= 4  # three joined + one real boxed image among the first 200 rows
    assert sum(sum(v.values()) for v in rep["boxes"].values()) == n_boxes and rep["patients"]["train"] > 0
    assert any(w.startswith("train: no positive") or w.startswith("val: no positive") or w.startswith("test: no positive")
               for w in rep["warnings"])
    name = (nih / "Data_Entry_2017_v2020.csv").read_text().splitlines()[7].split(",")[0]
    img = next(nih.rglob(name))
    data = img.read_bytes()
    img.unlink()
    try:
        out = run_cli("data", "check", "dataset=nih_cxr14", f"dataset.root={nih}", "dataset.image_size=32",
                      cwd=in_tmp, check=False)
        assert out.returncode == 1
        assert "missing: 1" in out.stdout and f"Data_Entry_2017_v2020.csv:8: image '{name}' not found" in out.stdout
        out = run_cli("train", "dataset=nih_cxr14", f"dataset.root={nih}", *SMALL, cwd=in_tmp, check=False)
        assert out.returncode == 2 and f"Data_Entry_2017_v2020.csv:8: image '{name}' not found" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        img.write_bytes(data)


@pytest.mark.slow
def test_search_on_a_real_dataset_reuses_one_cache(in_tmp, dataset_cache):
    """Two trials of a search on PneumoniaMNIST (real images, official splits) at a 10 % label fraction."""
    import optuna
    from cxr_files import SHARED
    (in_tmp / "space.yaml").write_text("metric: val/macro_auc\nn_trials: 2\noverrides: [strategy=finetune]\n"
                                       "params:\n  strategy.lr_head: tag(log, interval(1.0e-4, 1.0e-2))\n")
    run_cli("search", "-s", "space.yaml", "--study", "mm", "-n", "2", "--pruner", "none",
            "dataset=medmnist", f"dataset.path={SHARED / 'pneumoniamnist' / 'pneumoniamnist.npz'}",
            "dataset.label_fraction=0.1", "strategy.epochs=1", *SMALL, cwd=in_tmp)
    study = optuna.load_study(study_name="mm", storage=f"sqlite:///{in_tmp}/runs/cxr-automl.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert len(list((dataset_cache / "medmnist").glob("*.npy"))) == 1  # both trials read the same cache
