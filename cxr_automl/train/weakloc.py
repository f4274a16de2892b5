"""Weakly-supervised localization of a trained classifier (the DiRA appendix's protocol).

For every ground-truth box of a positive finding: a Grad-CAM heatmap of that finding's logit over the
backbone's last feature map, min-max normalised, thresholded; a box around each connected region; the
best IoU with the ground-truth box. Reported as localization accuracy — the share of boxes with
IoU >= delta — for delta = 0.1 ... 0.6, plus a few heatmap overlays as PNGs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw
from scipy import ndimage
from torchvision.ops import box_iou

from cxr_automl.errors import UserError

DELTAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


class WeakLocError(UserError):
    """A run or dataset that weak localization cannot evaluate (says what to use instead)."""


def grad_cam(model: torch.nn.Module, image: torch.Tensor, class_index: int) -> torch.Tensor:
    """Grad-CAM (H, W) in [0, 1] at the image's resolution for one class of a classification model.

    The input itself requires grad so the map has a gradient even when every parameter is frozen.
    """
    x = image.unsqueeze(0).clone().requires_grad_(True)
    out = model.features(x)
    acts = out.features[-1]
    logit = model.head(out)[0, class_index]
    (grads,) = torch.autograd.grad(logit, acts)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0].detach()
    lo, hi = cam.min(), cam.max()
    return (cam - lo) / (hi - lo) if hi > lo else torch.zeros_like(cam)


def boxes_from_heatmap(cam: np.ndarray, threshold: float) -> np.ndarray:
    """(K, 4) xyxy boxes (pixel edges) around the connected regions of ``cam >= threshold``."""
    labelled, n = ndimage.label(cam >= threshold)
    boxes = [(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for sl in ndimage.find_objects(labelled) if sl]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def accuracy_at(ious: Sequence[float], deltas: Sequence[float] = DELTAS) -> dict[str, float]:
    """Share of ground-truth boxes whose best IoU reaches each delta."""
    arr = np.asarray(ious, np.float64)
    return {f"loc_acc@{d:.1f}": float((arr >= d).mean()) if len(arr) else float("nan") for d in deltas}


@dataclass
class WeakLocResult:
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    overlays: list[Path]
    n_boxes: int


def load_trained_model(run_dir: Path) -> tuple[torch.nn.Module, Any]:
    """Rebuild a run from its config.yaml and load the best epoch's evaluated weights."""
    from cxr_automl.train.checkpoint import BEST_MODEL, load_best_model, load_latest
    from cxr_automl.train.loop import Trainer
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise WeakLocError(f"{run_dir} has no config.yaml; pass the run directory of a `cxr-automl train` run")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.setdefault("trainer", {})["progress"] = False
    state = load_latest(run_dir)
    if state is None and not (run_dir / BEST_MODEL).is_file():
        raise WeakLocError(f"{run_dir} has no checkpoint (last.ckpt or {BEST_MODEL}); train it first")
    trainer = Trainer(cfg, run_dir)
    if state is not None:
        trainer.load_state_dict(state)
    else:  # a search trial keeps only its exported best model once it finished
        trainer.best_state = load_best_model(run_dir / BEST_MODEL)[0]
    model = trainer.best_model()
    if getattr(getattr(model, "head", None), "task", None) != "classification" or not hasattr(model, "adapter"):
        raise WeakLocError(f"{run_dir} is not a single-head classification run; weak localization needs one")
    return model.eval(), trainer.data


def evaluate(run_dir: str | Path, split: str = "test", cam_threshold: float = 0.5,
             overlays: int = 4, out_dir: str | Path | None = None) -> WeakLocResult:
    """Localization accuracy of a classification run on a split with boxes; writes overlays + JSON."""
    run_dir = Path(run_dir)
    if not 0 < cam_threshold < 1:
        raise WeakLocError(f"cam_threshold={cam_threshold} must be between 0 and 1 (the DiRA protocol uses 0.5)")
    model, data = load_trained_model(run_dir)
    ds = getattr(data, split)
    out = Path(out_dir) if out_dir else run_dir / "weakloc"
    out.mkdir(parents=True, exist_ok=True)
    names = data.class_names
    ious, per_class_ious = [], {c: [] for c in names}
    written: list[Path] = []
    for i in range(len(ds)):
        item = ds[i]
        boxes, cls = item.get("boxes"), item.get("box_labels")
        if boxes is None or not len(boxes):
            continue
        cams: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # one map per finding, not per box
        for box, c in zip(boxes, cls.tolist()):
            if not 0 <= c < len(names):
                raise WeakLocError(f"{item['image_id']}: box class {c} is not one of the {len(names)} classes")
            if c not in cams:
                cam = grad_cam(model, item["image"], int(c))
                cams[c] = (cam, boxes_from_heatmap(cam.numpy(), cam_threshold))
            cam, pred = cams[c]
            iou = float(box_iou(torch.from_numpy(pred), box[None].float()).max()) if len(pred) else 0.0
            ious.append(iou)
            per_class_ious[names[c]].append(iou)
            if len(written) < overlays:
                written.append(_overlay(item["image"], cam, box, pred, out / f"overlay_{len(written):02d}_{names[c]}.png"))
    if not ious:
        raise WeakLocError(f"the {split} split of this dataset has no boxes; use a dataset with boxes "
                           "(synthetic_cxr, nih_cxr14 with BBox_List_2017.csv, vindr_cxr, rsna_pneumonia)")
    metrics = {**accuracy_at(ious), "mean_iou": float(np.mean(ious))}
    per_class = {c: {**accuracy_at(v), "n_boxes": float(len(v))} for c, v in per_class_ious.items() if v}
    (out / "weakloc.json").write_text(json.dumps({"split": split, "cam_threshold": cam_threshold,
                                                  "n_boxes": len(ious), "metrics": metrics,
                                                  "per_class": per_class}, indent=2))
    return WeakLocResult(metrics, per_class, written, len(ious))


def _overlay(image: torch.Tensor, cam: torch.Tensor, gt: torch.Tensor, pred: np.ndarray, path: Path) -> Path:
    """Grayscale image with the heatmap in red, the ground-truth box green, predicted boxes yellow."""
    gray = (image[0].numpy() * 255).astype(np.uint8)
    heat = (cam.numpy() * 255).astype(np.uint8)
    rgb = np.stack([np.maximum(gray, heat), (gray * 0.7).astype(np.uint8), (gray * 0.7).astype(np.uint8)], -1)
    im = Image.fromarray(rgb).resize((gray.shape[1] * 2, gray.shape[0] * 2), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    draw.rectangle([float(v) * 2 for v in gt], outline=(0, 255, 0), width=2)
    for b in pred:
        draw.rectangle([float(v) * 2 for v in b], outline=(255, 255, 0), width=1)
    im.save(path)
    return path
