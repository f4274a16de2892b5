"""Task metrics (scikit-learn and pycocotools implementations)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

log = logging.getLogger(__name__)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                           prefix: str) -> tuple[dict[str, float], list[str]]:
    """Per-class and macro ROC AUC.

    A class whose split has no positives (or no negatives) has no AUC: it is left out of the metrics
    and of the macro mean and returned in the second value, never reported as 0.5. Unknown labels
    (NaN) are ignored per class.
    """
    out: dict[str, float] = {}
    missing: list[str] = []
    for c, name in enumerate(class_names):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c]
        if y.size == 0 or y.min() == y.max():
            missing.append(name)
            continue
        out[f"{prefix}/auc/{name}"] = float(roc_auc_score(y, probs[known, c]))
    aucs = [v for k, v in out.items() if k.startswith(f"{prefix}/auc/")]
    if aucs:
        out[f"{prefix}/macro_auc"] = float(np.mean(aucs))
    if missing:
        log.warning("%s: no AUC for %s (no positives or no negatives in this split)", prefix, ", ".join(missing))
    return out, missing


def detection_precision_recall(gt: dict[str, Any], results: list[dict[str, Any]], iou: float = 0.5,
                               score: float = 0.5) -> tuple[float, float | None]:
    """Precision and recall of the detections scoring at least ``score``, at IoU ``iou``.

    Detections are matched to ground-truth boxes one-to-one by pycocotools' COCOeval (greedy by score,
    same class, each box matched at most once), so duplicates of one box count once as true positives
    and the rest as false positives. ``gt`` is a COCO ground-truth dict and ``results`` COCO results
    (xywh). Precision is 0 without detections; recall is None without ground-truth boxes.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    kept = [r for r in results if r["score"] >= score]
    n_gt = len(gt["annotations"])
    if not kept:
        return 0.0, (0.0 if n_gt else None)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": gt["images"], "annotations": gt["annotations"],
                           "categories": gt["categories"]}
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(kept), "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.areaRng, ev.params.areaRngLbl = [[0, float("inf")]], ["all"]
        ev.params.maxDets = [len(kept)]  # score threshold, not a per-image cap, decides what counts
        ev.evaluate()
    tp = matched = 0
    for e in ev.evalImgs:
        if e is not None:
            tp += int((e["dtMatches"][0] > 0).sum())
            matched += int((e["gtMatches"][0] > 0).sum())
    return tp / len(kept), (matched / n_gt if n_gt else None)
