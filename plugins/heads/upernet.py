"""``upernet``: UperNet segmentation (transformers' ``UperNetHead``) on any backbone's multi-scale maps.

transformers' head takes a list of NCHW maps with given channels — exactly ``BackboneOutput.features`` —
so it sits on ResNet, Swin and the RAD-DINO feature pyramid alike. Classes are independent masks (the
synthetic lesion mask overlaps the lungs), so the loss is per-class sigmoid BCE + soft Dice, as in SPFT's
segmentation recipe; logits are scored at the mask's resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead

from cxr_automl.plugin.interfaces import BackboneOutput, Head, HeadParts, HeadSpec, SplittableHead, declare_head
from cxr_automl.plugin.targets import check_masks, soft_dice_loss


def mask_loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor], num_classes: int, bce_weight: float,
              dice_weight: float, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """bce_weight·BCE + dice_weight·soft Dice per class, logits upsampled to the masks, mean over classes
    (also the loss of lock_release's per-dataset segmentation heads)."""
    masks = check_masks(batch, num_classes).to(outputs.device, torch.float32)
    logits = F.interpolate(outputs.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean(dim=(0, 2, 3))
    dice = soft_dice_loss(logits.sigmoid(), masks, dims=(0, 2, 3))  # per class, the batch's pixels pooled
    per_class = bce_weight * bce + dice_weight * dice
    if class_weights is not None:
        per_class = per_class * class_weights.to(per_class)
    return per_class.mean()


class MaskLogits:
    """``loss`` and ``predict`` of a module whose outputs are per-class mask logits (``num_classes``,
    ``bce_weight`` and ``dice_weight`` set by its ``__init__``): the segmentation heads and their parts."""

    num_classes: int
    bce_weight: float
    dice_weight: float

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor],
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        return mask_loss(outputs, batch, self.num_classes, self.bce_weight, self.dice_weight, class_weights)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(outputs.float())


class UperNetClassifier(MaskLogits, nn.Module):
    """The per-dataset part: UperNet's final 1×1 classifier over the fused map, with the head's loss."""

    def __init__(self, classifier: nn.Module, num_classes: int, bce_weight: float, dice_weight: float):
        super().__init__()
        self.classifier = classifier
        self.num_classes, self.bce_weight, self.dice_weight = num_classes, bce_weight, dice_weight

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.classifier(fused)


class UperNetSegHead(MaskLogits, Head, SplittableHead):
    """Multi-scale NCHW maps → (N, C, h, w) mask logits at the highest feature resolution."""

    spec = HeadSpec(task="segmentation", feature_maps=2)

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, hidden: int, pool_scales: tuple[int, ...],
                 dice_weight: float, bce_weight: float):
        super().__init__()
        cfg = UperNetConfig(hidden_size=hidden, pool_scales=list(pool_scales), num_labels=num_classes)
        self.net = UperNetHead(cfg, in_channels=list(in_channels))
        self.num_classes = num_classes
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        # timm Swin's NCHW maps are permuted views; the convolutions want contiguous input
        return self.net([f.contiguous() for f in feats.features])

    def split(self) -> HeadParts:
        """PSP + FPN fusion to ``hidden`` channels (shared) and the last 1×1 classifier with the loss (per
        dataset); the head gives its classifier away."""
        own = UperNetClassifier(self.net.classifier, self.num_classes, self.bce_weight, self.dice_weight)
        self.net.classifier = nn.Identity()  # the shared part ends at the fused map
        return HeadParts(shared=self.net, own=own)


@declare_head(UperNetSegHead.spec)
def upernet(in_channels: tuple[int, ...], num_classes: int, hidden: int = 128,
            pool_scales: tuple[int, ...] = (1, 2, 3, 6), dice_weight: float = 1.0,
            bce_weight: float = 1.0) -> UperNetSegHead:
    """UperNet (PSP on the coarsest map + FPN over all maps). ``hidden``: channels of the fused maps
    (512 in the paper's Swin-B setup; smaller is plenty on CPU); loss = bce_weight·BCE + dice_weight·Dice."""
    if len(in_channels) < 2:
        raise ValueError(f"upernet needs a backbone with at least 2 feature maps; got {len(in_channels)}")
    return UperNetSegHead(tuple(in_channels), num_classes, hidden, tuple(pool_scales), dice_weight, bce_weight)
