"""Known answers for the paper-audit fixes (issue 18): Dice conventions, detection P/R with duplicates,
DiRA's two weak-localization thresholds, MLVICX bottlenecks per backbone, SPFT class weights, detectors."""

from __future__ import annotations

import math

import pytest
import torch

from cxr_automl.train.evaluators import DetectionEvaluator, SegmentationEvaluator


# ------------------------------------------------------------------------------------------- Dice (item 5)
def _seg_batch():
    """Four 8x8 images, classes a and b; b is absent from every mask and prediction.
    a: img0 exact (Dice 1), img1 prediction only (0), img2 mask only (0), img3 neither (SIIM: 1)."""
    masks = torch.zeros(4, 2, 8, 8, dtype=torch.long)
    probs = torch.zeros(4, 2, 8, 8)
    masks[0, 0, :2, :2] = 1
    probs[0, 0, :2, :2] = 0.9
    probs[1, 0, 0, :2] = 0.9
    masks[2, 0, 4:6, 4:6] = 1
    return probs, {"masks": masks, "image": torch.zeros(4, 1, 8, 8), "image_id": list("wxyz")}


def test_dice_pooled_and_per_image_known_answers():
    probs, batch = _seg_batch()
    ev = SegmentationEvaluator(["a", "b"])
    ev.update(probs, batch)
    m = ev.compute("val")
    # pooled over the split: TP 4, FP 2, FN 4 -> 2*4 / (2*4 + 2 + 4)
    assert m["val/dice/a"] == pytest.approx(8 / 14)
    # b has no Dice pooled over the split: left out, and the mean is still a number
    assert "val/dice/b" not in m and m["val/mean_dice"] == pytest.approx(8 / 14)
    assert m["val/mean_iou"] == pytest.approx(4 / 10)
    # per image with SIIM's empty-empty = 1: a (1 + 0 + 0 + 1) / 4, b 1 everywhere
    assert m["val/dice_per_image/a"] == pytest.approx(0.5)
    assert m["val/dice_per_image/b"] == pytest.approx(1.0)
    assert m["val/mean_dice_per_image"] == pytest.approx(0.75)
    assert not any(math.isnan(v) for v in m.values())


# ----------------------------------------------------------------------------------- detection P/R (item 5)
def _det_batch():
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 40.0, 60.0, 60.0]])]
    return {"image": torch.zeros(1, 1, 64, 64), "boxes": boxes, "box_labels": [torch.tensor([0, 0])],
            "image_id": ["img0"]}


def test_duplicate_boxes_count_once_in_precision_and_recall():
    batch = _det_batch()
    dup = torch.tensor([[8.0, 8.0, 24.0, 24.0]]).repeat(5, 1) / 64  # five copies of the first box
    pred = {"boxes": dup, "scores": torch.full((5,), 0.9), "labels": torch.zeros(5, dtype=torch.long)}
    ev = DetectionEvaluator(["x"])
    ev.update([pred], batch)
    m = ev.compute("test")
    assert m["test/precision_50"] == pytest.approx(1 / 5)  # one true positive, four duplicates
    assert m["test/recall_50"] == pytest.approx(1 / 2)  # the second box is missed


def test_precision_recall_score_threshold_and_class():
    batch = _det_batch()
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 4.0, 4.0]]) / 64
    # second box right place but below the score threshold; third a confident false positive
    pred = {"boxes": boxes, "scores": torch.tensor([0.9, 0.3, 0.8]), "labels": torch.tensor([0, 0, 0])}
    ev = DetectionEvaluator(["x", "y"])
    ev.update([pred], batch)
    m = ev.compute("test")
    assert m["test/precision_50"] == pytest.approx(1 / 2) and m["test/recall_50"] == pytest.approx(1 / 2)
    wrong_class = {"boxes": boxes[:1], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    ev = DetectionEvaluator(["x", "y"])
    ev.update([wrong_class], batch)
    m = ev.compute("test")
    assert m["test/precision_50"] == 0.0 and m["test/recall_50"] == 0.0
