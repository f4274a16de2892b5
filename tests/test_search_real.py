"""The shipped dense search spaces run end to end on real layouts (written from covid-seg-100's real
images, boxes and masks), with the layout chosen on the command line and the task set by the space."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from test_matrix import SMALL

from conftest import run_cli
from cxr_automl import config
from cxr_automl.hpo import searchspace
from cxr_automl.plugin.testing.layouts import read_covid, write_coco, write_mask_folder, write_siim, write_yolo
from cxr_files import SHARED

COVID = SHARED / "covid-seg-100"
#: space → (layout, task its overrides set, the head's tiny overrides)
SPACES = {"yolov8_spft": ("yolo", "detection", SMALL["yolov8"]),
          "upernet_spft": ("mask_folder", "segmentation", SMALL["upernet"]),
          "sam2_spft": ("siim_acr", "segmentation", SMALL["sam2"]),
          "dino_spft": ("coco", "detection", SMALL["dino"])}
WRITERS = {"yolo": write_yolo, "mask_folder": write_mask_folder, "siim_acr": write_siim, "coco": write_coco}
TINY = ["backbone=resnet_tiny", "backbone.width=8", "backbone.image_size=64", "dataset.image_size=64",
        "strategy.epochs=1", "trainer.batch_size=8", "trainer.eval_batch_size=8", "trainer.num_workers=0",
        "trainer.progress=false"]


@pytest.mark.parametrize("order", ["space first", "layout first"])
def test_a_layout_switch_and_the_spaces_task_compose_in_any_order_and_a_repeat_wins(order):
    """``dataset=yolo`` selects the loader before ``dataset.task`` (a key yolo's YAML does not list) is
    added; the user's own ``dataset.task`` after the space's overrides it instead of failing."""
    space, layout = searchspace.load("yolov8_spft").overrides, ["dataset=yolo", "dataset.data=data.yaml"]
    cfg = config.compose([*space, *layout] if order == "space first" else [*layout, *space])
    assert (cfg["dataset"]["name"], cfg["dataset"]["task"]) == ("yolo", "detection")
    seg = searchspace.load("upernet_spft").overrides
    cfg = config.compose([*seg, "dataset=coco", "dataset.task=segmentation", "dataset.task=segmentation"])
    assert (cfg["dataset"]["name"], cfg["dataset"]["task"]) == ("coco", "segmentation")


@pytest.mark.slow
@pytest.mark.parametrize("space", list(SPACES))
def test_dense_space_runs_two_trials_on_a_real_layout(space, in_tmp):
    layout, task, head = SPACES[space]
    overrides = WRITERS[layout](read_covid(COVID, 24), in_tmp / layout)
    proc = run_cli("search", "-s", space, "-n", "2", "--pruner", "none", *overrides, *TINY, *head,
                   f"dataset.cache_dir={in_tmp / 'cache'}", cwd=in_tmp)
    assert "2 complete" in proc.stdout, proc.stdout
    study = optuna.load_study(study_name=space, storage=f"sqlite:///{in_tmp / 'runs' / 'cxr-automl.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(math.isfinite(t.value) and 0 <= t.value <= 1 for t in done)
    cfg = yaml.safe_load((in_tmp / "runs" / space / "trial_0000" / "config.yaml").read_text())
    assert (cfg["dataset"]["name"], cfg["dataset"]["task"], cfg["backbone"]["name"]) == (layout, task, "resnet_tiny")
