"""Classification heads: ``linear`` (linear probe / Foundation X) and ``mlp`` (SPFT's head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxr_automl.plugin.interfaces import BackboneOutput, Head, HeadSpec, declare_head


class ClassificationHead(Head):
    """Pooled embedding → logits, multi-label BCE with optional per-class weights and unknown labels."""

    spec = HeadSpec(task="classification")  # the pooled embedding only

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        return self.net(feats.pooled)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor],
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        labels = batch["labels"].to(outputs.dtype)
        known = ~torch.isnan(labels)  # NaN = unknown label (e.g. CheXpert blank): masked out of the loss
        per_elem = F.binary_cross_entropy_with_logits(
            outputs.float(), torch.nan_to_num(labels.float(), nan=0.0), reduction="none")
        if class_weights is not None:
            per_elem = per_elem * class_weights.to(per_elem)
        per_elem = per_elem * known
        return per_elem.sum() / known.sum().clamp_min(1)


@declare_head(ClassificationHead.spec)
def linear(in_dim: int, num_classes: int, dropout: float = 0.0) -> ClassificationHead:
    """One linear layer on the pooled embedding (a linear probe when the backbone is frozen)."""
    return ClassificationHead(nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes)))


@declare_head(ClassificationHead.spec)
def mlp(in_dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.2) -> ClassificationHead:
    """SPFT's head: LayerNorm → Linear(hidden) → GELU → Dropout → Linear(hidden) → GELU → Linear(C)."""
    return ClassificationHead(nn.Sequential(
        nn.LayerNorm(in_dim),
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.GELU(),
        nn.Linear(hidden, num_classes),
    ))
