"""Per-task evaluation: what the loop does with predictions, chosen by ``head.task``.

The loop runs the model over a split and calls ``update(predictions, batch)`` per batch, then
``compute(prefix)`` for metrics (named ``<prefix>/...``) and, on the test split, ``write(run_dir)`` for
the per-image predictions file. Metrics come from libraries (scikit-learn, torchmetrics/pycocotools).
"""

from __future__ import annotations

import abc
import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_automl.plugin.interfaces import DatasetBundle
from cxr_automl.plugin.targets import check_boxes, check_masks
from cxr_automl.train.metrics import classification_metrics, detection_precision_recall

log = logging.getLogger(__name__)

#: the validation metric that selects the best epoch (and feeds Optuna) for each task
PRIMARY = {"classification": "macro_auc", "segmentation": "mean_dice", "detection": "map_50"}


def primary_metric(task: str, split: str = "val") -> str:
    if task not in PRIMARY:
        raise ValueError(f"no evaluator for task {task!r}; known tasks: {', '.join(PRIMARY)}")
    return f"{split}/{PRIMARY[task]}"


class Evaluator(abc.ABC):
    """Accumulates one split's predictions; one instance per evaluation."""

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)
        self.ids: list[str] = []

    @abc.abstractmethod
    def update(self, predictions: Any, batch: dict[str, Any]) -> None:
        """Called once per batch with ``head.predict(outputs)`` (on the CPU) and the batch."""

    @abc.abstractmethod
    def compute(self, prefix: str) -> dict[str, float]:
        """Called after the last batch: flat ``<prefix>/name -> value``."""

    @abc.abstractmethod
    def write(self, run_dir: Path) -> None:
        """Called on the test split only: the per-image predictions file of the run directory."""


class ClassificationEvaluator(Evaluator):
    """Per-class and macro ROC AUC; ``predictions.csv`` with labels and probabilities."""

    def __init__(self, class_names: list[str]):
        super().__init__(class_names)
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, predictions: torch.Tensor, batch: dict[str, Any]) -> None:
        self.probs.append(predictions.float().numpy())
        self.labels.append(batch["labels"].numpy())
        self.ids.extend(batch["image_id"])

    def compute(self, prefix: str) -> dict[str, float]:
        return classification_metrics(np.concatenate(self.probs), np.concatenate(self.labels),
                                      self.class_names, prefix)[0]

    def write(self, run_dir: Path) -> None:
        probs, labels, names = np.concatenate(self.probs), np.concatenate(self.labels), self.class_names
        with open(Path(run_dir) / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image_id", *[f"label:{c}" for c in names], *[f"prob:{c}" for c in names]])
            for i, image_id in enumerate(self.ids):
                lab = ["" if np.isnan(v) else int(v) for v in labels[i]]
                w.writerow([image_id, *lab, *[f"{p:.6f}" for p in probs[i]]])


class SegmentationEvaluator(Evaluator):
    """Dice and IoU per class with masks thresholded at 0.5, in two conventions:

    - ``dice/<class>``, ``iou/<class>``, ``mean_dice``, ``mean_iou``: pixels pooled over the split, so an
      image where a class is absent neither helps nor hurts. A class absent from both the masks and the
      predictions of the whole split has no Dice: it is left out of the means (with a warning), never
      NaN, so a best epoch is still kept and early stopping still sees a number.
    - ``dice_per_image/<class>``, ``mean_dice_per_image``: Dice per image averaged over the images, an
      image where the class is absent from both mask and prediction scoring 1 (the SIIM-ACR
      competition's convention: a correct "nothing here" is a perfect answer).

    ``predictions.csv`` holds per-image, per-class Dice; empty where the class is absent from both the
    mask and the prediction (Dice is undefined there; the per-image mean counts it as 1).
    """

    def __init__(self, class_names: list[str], threshold: float = 0.5):
        super().__init__(class_names)
        from torchmetrics.segmentation import DiceScore
        self.threshold = threshold
        self.dice = DiceScore(num_classes=len(class_names), average="none", aggregation_level="global",
                              input_format="one-hot")
        self.per_image: list[torch.Tensor] = []

    def update(self, predictions: torch.Tensor, batch: dict[str, Any]) -> None:
        from torchmetrics.functional.segmentation import dice_score
        masks = check_masks(batch, len(self.class_names))
        probs = predictions.float()
        if probs.shape[-2:] != masks.shape[-2:]:  # heads predict at feature resolution; score at the mask's
            probs = F.interpolate(probs, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        hard = (probs >= self.threshold).long()
        self.dice.update(hard, masks)
        self.per_image.append(dice_score(hard, masks, num_classes=len(self.class_names), average="none",
                                         aggregation_level="samplewise", input_format="one-hot"
                                         ).reshape(len(hard), -1))
        self.ids.extend(batch["image_id"])

    def compute(self, prefix: str) -> dict[str, float]:
        dice = self.dice.compute().reshape(-1)  # (C,); torchmetrics squeezes a single class to 0-d
        # with pixels pooled over the split, IoU = TP/(TP+FP+FN) and Dice = 2TP/(2TP+FP+FN) are tied by
        # IoU = Dice / (2 - Dice) exactly, so one library count serves both
        iou = dice / (2 - dice)
        out: dict[str, float] = {}
        scored = ~torch.isnan(dice)  # NaN: no mask and no prediction of that class in the whole split
        for c, d, v, ok in zip(self.class_names, dice, iou, scored):
            if ok:
                out[f"{prefix}/dice/{c}"], out[f"{prefix}/iou/{c}"] = float(d), float(v)
        if scored.any():
            out[f"{prefix}/mean_dice"] = float(dice[scored].mean())
            out[f"{prefix}/mean_iou"] = float(iou[scored].mean())
        if not scored.all():
            log.warning("%s: no Dice for %s (absent from every mask and prediction of this split); left out "
                        "of mean_dice", prefix, ", ".join(c for c, ok in zip(self.class_names, scored) if not ok))
        if self.per_image:  # SIIM-ACR: empty mask and empty prediction score 1
            per_image = torch.nan_to_num(torch.cat(self.per_image), nan=1.0).mean(0)
            out.update({f"{prefix}/dice_per_image/{c}": float(d) for c, d in zip(self.class_names, per_image)})
            out[f"{prefix}/mean_dice_per_image"] = float(per_image.mean())
        return out

    def write(self, run_dir: Path) -> None:
        per_image = torch.cat(self.per_image).numpy()
        with open(Path(run_dir) / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image_id", *[f"dice:{c}" for c in self.class_names]])
            for image_id, row in zip(self.ids, per_image):
                w.writerow([image_id, *["" if np.isnan(v) else f"{v:.6f}" for v in row]])


class DetectionEvaluator(Evaluator):
    """mAP@0.50 and mAP@0.50:0.95 (COCO protocol, torchmetrics on pycocotools), mAP at any extra IoU
    thresholds asked for (``iou_thresholds``), COCO's mean average recall ``recall_100`` (AR@100 over
    IoU 0.50:0.95), and ``precision_50`` / ``recall_50``: precision and recall of the detections scoring
    at least 0.5, at IoU 0.5, matched one-to-one by pycocotools (a duplicate of a found box is a false positive).

    Predictions are per image ``{"boxes" (K, 4) xyxy in [0, 1], "scores", "labels"}``; they are scaled
    to the image's pixels here. ``predictions.json`` is in COCO results format (xywh pixels, integer
    ``image_id`` = position in the split); ``coco_gt.json`` beside it is the split's ground truth in COCO
    format (``file_name`` = our image id), so pycocotools' COCOeval can re-score a run on its own.
    """

    def __init__(self, class_names: list[str], score_threshold: float = 0.5,
                 iou_thresholds: tuple[float, ...] = ()):
        super().__init__(class_names)
        from torchmetrics.detection import MeanAveragePrecision
        self.coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        #: mAP at each extra IoU threshold t, reported as ``map_<100·t>`` (e.g. 0.4 → ``map_40``)
        self.at = {f"map_{round(float(t) * 100):02d}": MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", iou_thresholds=[float(t)], backend="pycocotools")
            for t in iou_thresholds}
        self.score_threshold = score_threshold
        self.results: list[dict[str, Any]] = []
        self.gt: list[dict[str, Any]] = []

    def update(self, predictions: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        h, w = batch["image"].shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        targets = check_boxes(batch, len(self.class_names))
        preds = [{"boxes": p["boxes"].float() * scale, "scores": p["scores"].float(),
                  "labels": p["labels"].long()} for p in predictions]
        self.coco.update(preds, targets)
        for metric in self.at.values():
            metric.update(preds, targets)
        for image_id, p, t in zip(batch["image_id"], preds, targets):
            index = len(self.ids)
            self.ids.append(image_id)
            first_id = len(self.gt) + 1
            self.gt.extend([{"id": first_id + k, "image_id": index, "category_id": int(c), "iscrowd": 0,
                             "bbox": _xywh(b), "area": (b[2] - b[0]) * (b[3] - b[1])}
                            for k, (b, c) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist()))])
            for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                self.results.append({"image_id": index, "category_id": int(label), "bbox": _xywh(box),
                                     "score": round(score, 5)})
        self._hw = (int(h), int(w))

    def compute(self, prefix: str) -> dict[str, float]:
        coco = self.coco.compute()
        precision, recall = detection_precision_recall(self._coco_gt(), self.results, 0.5, self.score_threshold)
        out = {**{f"{prefix}/{name}": float(m.compute()["map"]) for name, m in self.at.items()},
               f"{prefix}/map_50": float(coco["map_50"]),
               f"{prefix}/map_50_95": float(coco["map"]), f"{prefix}/recall_100": float(coco["mar_100"]),
               f"{prefix}/precision_50": precision, f"{prefix}/recall_50": -1.0 if recall is None else recall}
        # -1 is pycocotools' "no ground truth to score against", not a score
        return {k: v for k, v in out.items() if v >= 0}

    def _coco_gt(self) -> dict[str, Any]:
        h, w = getattr(self, "_hw", (0, 0))
        return {"images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n in enumerate(self.ids)],
                "annotations": self.gt,
                "categories": [{"id": i, "name": c} for i, c in enumerate(self.class_names)]}

    def write(self, run_dir: Path) -> None:
        (Path(run_dir) / "predictions.json").write_text(json.dumps(self.results))
        (Path(run_dir) / "coco_gt.json").write_text(json.dumps(self._coco_gt()))


def _xywh(box: list[float]) -> list[float]:
    """COCO's [x, y, width, height] of an xyxy box (torchvision's ``box_convert``), to 0.01 px."""
    from torchvision.ops import box_convert
    return [round(v, 2) for v in box_convert(torch.tensor(box, dtype=torch.float64), "xyxy", "xywh").tolist()]


EVALUATORS = {"classification": ClassificationEvaluator, "segmentation": SegmentationEvaluator,
              "detection": DetectionEvaluator}


def evaluator_for(task: str, class_names: list[str], **options: Any) -> Evaluator:
    """A fresh evaluator of ``task`` over ``class_names``; ``options`` are its keyword arguments (e.g. a
    detection evaluator's ``iou_thresholds``)."""
    if task not in EVALUATORS:
        raise ValueError(f"no evaluator for task {task!r}; known tasks: {', '.join(EVALUATORS)}")
    return EVALUATORS[task](class_names, **options)


def make_evaluator(task: str, data: DatasetBundle, map_iou_thresholds: tuple[float, ...] = ()) -> Evaluator:
    """The evaluator for a head's task; the loop calls this once per evaluation with the run's
    ``trainer.map_iou_thresholds`` (detection only)."""
    options = {"iou_thresholds": tuple(map_iou_thresholds)} if task == "detection" else {}
    return evaluator_for(task, data.class_names, **options)


class PartsWriter:
    """The evaluators of a strategy's evaluation parts (``Strategy.evaluations``); on the test split
    each writes its per-image file into ``run_dir/<prefix>/``."""

    def __init__(self, parts: list[tuple[str, Evaluator]]):
        self.parts = parts

    def write(self, run_dir: Path) -> None:
        for prefix, evaluator in self.parts:
            out = Path(run_dir) / prefix
            out.mkdir(parents=True, exist_ok=True)
            evaluator.write(out)
