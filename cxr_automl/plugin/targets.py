"""Checks of dense targets (masks, boxes) before a loss or a metric sees them.

A wrong target must stop the run with a message naming the image, never turn into a silently wrong
metric. Documented handling: an image without boxes is valid (every detection on it is a false
positive); unknown masks are not supported (a dataset must give every class's mask for every image).
"""

from __future__ import annotations

from typing import Any

import torch

from cxr_automl.errors import UserError


class TargetError(UserError):
    """A dataset item whose boxes or masks cannot be right for this image/head."""


def check_masks(batch: dict[str, Any], num_classes: int) -> torch.Tensor:
    """The batch's masks as a (N, C, H, W) long tensor of 0/1, the same size as the images."""
    masks, ids = batch.get("masks"), batch.get("image_id", [])
    if masks is None:
        raise TargetError("a segmentation head needs 'masks' (C, H, W) in every dataset item; "
                          "set dataset.task=segmentation")
    h, w = batch["image"].shape[-2:]
    items = masks if isinstance(masks, list) else list(masks)
    for i, m in enumerate(items):
        if tuple(m.shape) != (num_classes, h, w):
            raise TargetError(f"mask of image {ids[i] if i < len(ids) else i} has shape {tuple(m.shape)}; "
                              f"expected ({num_classes}, {h}, {w}) = (classes, image height, image width)")
    masks = torch.stack(items) if isinstance(masks, list) else masks
    if masks.dtype.is_floating_point and not torch.isin(masks.unique(),
                                                        torch.tensor([0.0, 1.0], device=masks.device)).all():
        raise TargetError("masks must hold 0/1 values (got other values); threshold soft masks in the dataset")
    return masks.long()


def check_boxes(batch: dict[str, Any], num_classes: int) -> list[dict[str, torch.Tensor]]:
    """Per image ``{"boxes": (K, 4) xyxy pixels, "labels": (K,)}``, after checking each box lies inside
    its image, is not empty, and has a class id in ``0..num_classes-1``."""
    if "boxes" not in batch or "box_labels" not in batch:
        raise TargetError("a detection head needs 'boxes' (K, 4) xyxy pixels and 'box_labels' (K,) in every "
                          "dataset item; set dataset.task=detection")
    h, w = batch["image"].shape[-2:]
    ids = batch.get("image_id", [])
    out = []
    for i, (boxes, labels) in enumerate(zip(batch["boxes"], batch["box_labels"])):
        name = ids[i] if i < len(ids) else str(i)
        # on the CPU: a few boxes per image; losses move what they need to their device
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device="cpu").reshape(-1, 4)
        labels = torch.as_tensor(labels, device="cpu").long()
        if len(boxes) != len(labels):
            raise TargetError(f"image {name}: {len(boxes)} boxes but {len(labels)} box labels")
        if len(boxes):
            bad = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
            if bad.any():
                raise TargetError(f"image {name}: box {boxes[bad][0].tolist()} lies outside the {w}x{h} image "
                                  "(boxes are xyxy pixels)")
            empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if empty.any():
                raise TargetError(f"image {name}: box {boxes[empty][0].tolist()} has no area (need x1>x0, y1>y0)")
            out_of_range = (labels < 0) | (labels >= num_classes)
            if out_of_range.any():
                raise TargetError(f"image {name}: box class id {int(labels[out_of_range][0])} is out of range "
                                  f"0..{num_classes - 1}")
        out.append({"boxes": boxes, "labels": labels})
    return out


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight pixel boxes of (..., H, W) 0/1 masks (torchvision's ``masks_to_boxes``), xyxy with x2, y2 one
    past the last pixel (the datasets' box convention), and whether each mask is non-empty (an empty
    mask's box is all zeros). Shapes: (..., 4) and (...)."""
    from torchvision.ops import masks_to_boxes
    flat = masks.reshape(-1, *masks.shape[-2:]).bool()
    present = flat.flatten(1).any(1)
    boxes = masks_to_boxes(flat) + present[:, None] * torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
    return boxes.reshape(*masks.shape[:-2], 4), present.reshape(masks.shape[:-2])


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...], eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice of probabilities against 0/1 targets, their products summed over ``dims`` (e.g.
    (0, 2, 3): per class over the batch's pixels; (2, 3): per image and class); ``eps`` smooths empty masks."""
    inter = (probs * target).sum(dims)
    return 1 - (2 * inter + eps) / (probs.sum(dims) + target.sum(dims) + eps)
