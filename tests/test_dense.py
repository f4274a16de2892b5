"""Segmentation and detection: target checks, evaluators against known answers, CLI runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import run_cli
from cxr_automl import config
from cxr_automl.config import ConfigError
from cxr_automl.plugin.targets import TargetError, check_boxes, check_masks
from cxr_automl.plugin.testing.contracts import example_batch
from cxr_automl.train.evaluators import DetectionEvaluator, SegmentationEvaluator


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("box,label,match", [
    ([10.0, 10.0, 70.0, 20.0], 0, "outside the 64x64 image"),
    ([-1.0, 10.0, 20.0, 20.0], 0, "outside"),
    ([10.0, 10.0, 10.0, 20.0], 0, "no area"),
    ([10.0, 10.0, 20.0, 20.0], 3, "class id 3 is out of range 0..2"),
])
def test_bad_boxes_name_the_image(box, label, match):
    batch = example_batch("detection")
    batch["boxes"][1] = torch.tensor([box])
    batch["box_labels"][1] = torch.tensor([label])
    with pytest.raises(TargetError, match=match) as err:
        check_boxes(batch, num_classes=3)
    assert "img1" in str(err.value)


def test_image_without_boxes_is_valid():
    targets = check_boxes(example_batch("detection"), num_classes=3)
    assert targets[-1]["boxes"].shape == (0, 4) and targets[0]["boxes"].shape == (2, 4)


def test_mask_of_wrong_size_is_rejected():
    batch = example_batch("segmentation")
    batch["masks"] = list(batch["masks"])
    batch["masks"][2] = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(TargetError, match=r"mask of image img2 has shape \(3, 32, 32\); expected \(3, 64, 64\)"):
        check_masks(batch, num_classes=3)
    with pytest.raises(TargetError, match="expected \\(4, 64, 64\\)"):
        check_masks(example_batch("segmentation"), num_classes=4)


def test_head_and_dataset_task_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="add dataset.task=segmentation"):
        config.compose(["head=upernet"])
    with pytest.raises(ConfigError, match="needs 5 multi-scale feature maps"):
        config.compose(["head=yolov8", "dataset.task=detection", "head.levels=5"])


# ------------------------------------------------------------------------------------------------ evaluators
def test_segmentation_metrics_known_answer(tmp_path):
    batch = example_batch("segmentation", num_classes=3, n=2, size=16)
    masks = batch["masks"].clone()
    masks[:, 2] = 0  # class 2 absent everywhere
    batch["masks"] = masks
    probs = masks.float().clone()
    probs[:, 1] = 1 - probs[:, 1]  # class 1 exactly wrong
    ev = SegmentationEvaluator(["a", "b", "c"])
    ev.update(probs, batch)
    m = ev.compute("val")
    assert m["val/dice/a"] == pytest.approx(1.0) and m["val/iou/a"] == pytest.approx(1.0)
    assert m["val/dice/b"] == pytest.approx(0.0) and m["val/iou/b"] == pytest.approx(0.0)
    ev.write(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [r["image_id"] for r in rows] == ["img0", "img1"]
    assert rows[0]["dice:a"] == "1.000000" and rows[0]["dice:b"] == "0.000000"
    assert rows[0]["dice:c"] == ""  # absent from mask and prediction: undefined, not 0 or 1


def test_segmentation_scores_low_resolution_predictions_at_mask_size():
    batch = example_batch("segmentation", num_classes=1, n=1, size=16)
    batch["masks"] = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    batch["masks"][..., :8, :] = 1
    probs = torch.zeros(1, 1, 4, 4)
    probs[..., :2, :] = 1  # the same top half, predicted at a quarter of the resolution
    ev = SegmentationEvaluator(["top"])
    ev.update(probs, batch)
    assert ev.compute("val")["val/dice/top"] > 0.85


def test_detection_metrics_and_coco_files_agree_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    batch = example_batch("detection", num_classes=3, n=3, size=64)
    targets = check_boxes(batch, 3)
    preds = []
    for i, t in enumerate(targets):
        boxes = t["boxes"] / 64
        if i == 0:  # one box shifted: IoU between 0.4 and 0.5 → counts at 0.40, not at 0.50
            boxes = boxes.clone()
            boxes[0] = torch.tensor([4.0, 6.0, 30.0, 40.0]) / 64 + torch.tensor([11, 0, 11, 0]) / 64
        preds.append({"boxes": boxes, "scores": torch.full((len(boxes),), 0.9), "labels": t["labels"]})
    preds[-1] = {"boxes": torch.tensor([[0.1, 0.1, 0.3, 0.3]]), "scores": torch.tensor([0.8]),
                 "labels": torch.tensor([1])}  # a false positive on the image without boxes
    ev = DetectionEvaluator(["x", "y", "z"], iou_thresholds=(0.4,))
    ev.update(preds, batch)
    m = ev.compute("test")
    assert m["test/map_40"] > m["test/map_50"] > 0
    # at IoU 0.5: img0 1 of 2 (the shifted box has IoU 0.405), img1 2 of 2, img2's box is a false positive
    assert m["test/precision_50"] == pytest.approx(3 / 5)
    ev.write(tmp_path)
    gt = COCO(str(tmp_path / "coco_gt.json"))
    coco_eval = COCOeval(gt, gt.loadRes(str(tmp_path / "predictions.json")), "bbox")
    coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
    assert coco_eval.stats[0] == pytest.approx(m["test/map_50_95"], abs=1e-6)
    assert coco_eval.stats[1] == pytest.approx(m["test/map_50"], abs=1e-6)


# ------------------------------------------------------------------------------------------------ CLI
DENSE_SMALL = ["dataset.n_train=48", "dataset.n_val=16", "dataset.n_test=16", "dataset.image_size=64",
               "backbone.width=8", "backbone.image_size=64", "strategy=finetune", "strategy.epochs=2",
               "trainer.batch_size=8", "trainer.progress=false"]


@pytest.mark.slow
def test_cli_trains_upernet_segmentation(in_tmp):
    proc = run_cli("train", "head=upernet", "head.hidden=16", "dataset.task=segmentation", *DENSE_SMALL,
                   "run_dir=runs/seg", cwd=in_tmp)
    assert "test/mean_dice" in proc.stdout
    metrics = json.loads((in_tmp / "runs/seg/metrics.json").read_text())
    assert {"test/dice/heart", "test/iou/lesions", "test/mean_iou", "best/val/mean_dice"} <= set(metrics)
    header = next(csv.reader(open(in_tmp / "runs/seg/predictions.csv")))
    assert header == ["image_id", "dice:heart", "dice:left_lung", "dice:right_lung", "dice:lesions"]


@pytest.mark.slow
def test_cli_yolov8_run_reloads_in_a_fresh_process(in_tmp):
    args = ["train", "head=yolov8", "head.width=16", "dataset.task=detection", *DENSE_SMALL, "run_dir=runs/det"]
    run_cli(*args, cwd=in_tmp)
    first = json.loads((in_tmp / "runs/det/metrics.json").read_text())
    assert {"test/map_40", "test/map_50", "test/map_50_95"} <= set(first)
    # the same command in a new process restores last.ckpt (nothing left to train) and re-tests
    run_cli(*args, cwd=in_tmp)
    second = json.loads((in_tmp / "runs/det/metrics.json").read_text())
    assert second["epochs_run"] == 2
    assert {k: v for k, v in second.items() if k.startswith("test/")} == \
        {k: v for k, v in first.items() if k.startswith("test/")}
    assert isinstance(json.loads((in_tmp / "runs/det/predictions.json").read_text()), list)


def test_dino_head_takes_maps_that_do_not_halve_exactly():
    """RAD-DINO at 518 px gives 74, 37, 19: RT-DETR's fusion needs exact halving, the head resamples."""
    from cxr_automl.plugin.interfaces import BackboneOutput
    from cxr_automl_plugins.heads.dino import dino
    head = dino(in_channels=(8, 8, 8), num_classes=3, hidden=16, heads=2, num_queries=10, num_denoising=4,
                decoder_layers=1, encoder_ffn=32, decoder_ffn=32)
    feats = BackboneOutput(pooled=torch.zeros(4, 8), input_size=(72, 72),
                           features=[torch.randn(4, 8, 18, 18), torch.randn(4, 8, 9, 9), torch.randn(4, 8, 5, 5)])
    loss = head.loss(head(feats), example_batch("detection", size=72))
    assert torch.isfinite(loss)
