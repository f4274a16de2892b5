"""Weakly-supervised localization of a trained classifier (the DiRA appendix's protocol).

For every ground-truth box of a positive finding: a Grad-CAM heatmap of that finding's logit over the
map the backbone pools into its embedding, min-max normalised, thresholded; a box around each
connected region; the best IoU with the ground-truth box. Reported as localization accuracy — the
share of boxes with IoU >= delta — for delta = 0.1 ... 0.6, at each of DiRA's two thresholds, per
finding and as the mean over the findings that have boxes (the headline: DiRA's "mean accuracy over the
8 diseases" of ChestX-ray14, appendix B), plus a few heatmap overlays as PNGs.
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
#: DiRA appendix A (weakly-supervised localization setup): the min-max normalised heatmap is binarised at
#: 60 and at 180 on the 0-255 scale (following ChestX-ray8), i.e. 0.235 and 0.706; both are reported
DIRA_THRESHOLDS = (60 / 255, 180 / 255)


class WeakLocError(UserError):
    """A run or dataset that weak localization cannot evaluate (says what to use instead)."""


def grad_cam(model: torch.nn.Module, image: torch.Tensor, class_index: int) -> torch.Tensor:
    """Grad-CAM (H, W) in [0, 1] at the image's resolution for one class of a classification model.

    A head that reads the pooled embedding: the activations are ``pooled_map`` (the map the backbone
    averages into ``pooled``) and each channel's weight is d logit / d pooled — the mean over the map of
    d logit / d map, i.e. Grad-CAM's weight, up to a constant the min-max normalisation removes. This
    holds for backbones whose pooled embedding is not computed from ``features[-1]`` (RAD-DINO, Swin,
    Hiera). A head that reads ``features[-1]`` instead gets classic Grad-CAM over that map. The input
    itself requires grad so the map has a gradient even when every parameter is frozen.
    """
    x = image.unsqueeze(0).clone().requires_grad_(True)
    out = model.features(x)
    logit = model.head(out)[0, class_index]
    g_pooled, g_last = torch.autograd.grad(logit, [out.pooled, out.features[-1]], allow_unused=True)
    if g_pooled is not None and out.pooled_map is not None:
        acts, weights = out.pooled_map, g_pooled[:, :, None, None]
    elif g_last is not None:
        acts, weights = out.features[-1], g_last.mean(dim=(2, 3), keepdim=True)
    else:
        raise WeakLocError(f"no Grad-CAM for {type(model.backbone).__name__}: its head reads the pooled "
                           "embedding but the backbone gives no pooled_map (the map it averages into it)")
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


def _key(threshold: float) -> str:
    return f"t{threshold:.3f}"


def evaluate(run_dir: str | Path, split: str = "test", cam_thresholds: Sequence[float] = DIRA_THRESHOLDS,
             overlays: int = 4, out_dir: str | Path | None = None) -> WeakLocResult:
    """Localization accuracy of a classification run on a split with boxes; writes overlays + JSON.

    ``metrics``: ``t<threshold>/loc_acc@<delta>`` is the mean over the findings with boxes of each
    finding's accuracy (DiRA's headline); ``t<threshold>/loc_acc_boxes@<delta>`` pools all boxes;
    ``t<threshold>/mean_iou`` is the mean best IoU over boxes. ``per_class`` has each finding's accuracy.
    """
    run_dir = Path(run_dir)
    thresholds = [float(t) for t in cam_thresholds]
    for t in thresholds:
        if not 0 < t < 1:
            raise WeakLocError(f"cam_threshold={t} must be between 0 and 1 (DiRA binarises the min-max "
                               "normalised heatmap at 60/255 = 0.235 and 180/255 = 0.706)")
    if not thresholds:
        raise WeakLocError("give at least one cam_threshold (DiRA: 0.235 and 0.706)")
    model, data = load_trained_model(run_dir)
    ds = getattr(data, split)
    out = Path(out_dir) if out_dir else run_dir / "weakloc"
    out.mkdir(parents=True, exist_ok=True)
    names = data.class_names
    ious = {t: [] for t in thresholds}
    per_class_ious = {t: {c: [] for c in names} for t in thresholds}
    written: list[Path] = []
    for i in range(len(ds)):
        item = ds[i]
        boxes, cls = item.get("boxes"), item.get("box_labels")
        if boxes is None or not len(boxes):
            continue
        cams: dict[int, tuple[torch.Tensor, list[np.ndarray]]] = {}  # one map per finding, not per box
        for box, c in zip(boxes, cls.tolist()):
            if not 0 <= c < len(names):
                raise WeakLocError(f"{item['image_id']}: box class {c} is not one of the {len(names)} classes")
            if c not in cams:
                cam = grad_cam(model, item["image"], int(c))
                cams[c] = (cam, [boxes_from_heatmap(cam.numpy(), t) for t in thresholds])
            cam, preds = cams[c]
            for t, pred in zip(thresholds, preds):
                iou = float(box_iou(torch.from_numpy(pred), box[None].float()).max()) if len(pred) else 0.0
                ious[t].append(iou)
                per_class_ious[t][names[c]].append(iou)
            if len(written) < overlays:
                written.append(_overlay(item["image"], cam, box, preds,
                                        out / f"overlay_{len(written):02d}_{names[c]}.png"))
    if not any(ious.values()):
        raise WeakLocError(f"the {split} split of this dataset has no boxes; use a dataset with boxes "
                           "(synthetic_cxr, nih_cxr14 with BBox_List_2017.csv, vindr_cxr, rsna_pneumonia)")
    metrics: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {}
    for t in thresholds:
        k = _key(t)
        found = {c: accuracy_at(v) for c, v in per_class_ious[t].items() if v}
        for c, acc in found.items():
            per_class.setdefault(c, {"n_boxes": float(len(per_class_ious[t][c]))}).update(
                {f"{k}/{name}": v for name, v in acc.items()})
        for d in DELTAS:  # DiRA appendix B: the mean accuracy over the diseases (8 with boxes in NIH)
            metrics[f"{k}/loc_acc@{d:.1f}"] = float(np.mean([acc[f"loc_acc@{d:.1f}"] for acc in found.values()]))
        metrics.update({f"{k}/{name.replace('loc_acc', 'loc_acc_boxes')}": v
                        for name, v in accuracy_at(ious[t]).items()})
        metrics[f"{k}/mean_iou"] = float(np.mean(ious[t]))
    n_boxes = len(ious[thresholds[0]])
    (out / "weakloc.json").write_text(json.dumps({"split": split, "cam_thresholds": thresholds,
                                                  "n_boxes": n_boxes, "metrics": metrics,
                                                  "per_class": per_class}, indent=2))
    return WeakLocResult(metrics, per_class, written, n_boxes)


def _overlay(image: torch.Tensor, cam: torch.Tensor, gt: torch.Tensor, preds: list[np.ndarray], path: Path) -> Path:
    """Grayscale image with the heatmap in red, the ground-truth box green, predicted boxes yellow (the
    first threshold), cyan (the second), magenta (any further)."""
    gray = (image[0].numpy() * 255).astype(np.uint8)
    heat = (cam.numpy() * 255).astype(np.uint8)
    rgb = np.stack([np.maximum(gray, heat), (gray * 0.7).astype(np.uint8), (gray * 0.7).astype(np.uint8)], -1)
    im = Image.fromarray(rgb).resize((gray.shape[1] * 2, gray.shape[0] * 2), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    draw.rectangle([float(v) * 2 for v in gt], outline=(0, 255, 0), width=2)
    colours = [(255, 255, 0), (0, 255, 255)]
    for i, pred in enumerate(preds):
        for b in pred:
            draw.rectangle([float(v) * 2 for v in b], outline=colours[i] if i < 2 else (255, 0, 255), width=1)
    im.save(path)
    return path
