"""Composes backbone + head into one model; the single place where input is adapted to a backbone."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxr_automl.plugin import registry
from cxr_automl.plugin.interfaces import Backbone, BackboneOutput, DatasetBundle, Head

log = logging.getLogger(__name__)


class InputAdapter(nn.Module):
    """Grayscale→backbone channels, resize where the backbone needs a fixed size, and normalise.

    Every backbone gets its input through this module, so no plugin handles grayscale itself.
    """

    def __init__(self, backbone: Backbone, in_channels: int):
        super().__init__()
        spec = backbone.input_spec
        if in_channels not in (1, spec.channels):
            raise ValueError(f"data has {in_channels} channels but backbone expects {spec.channels}; "
                             "only 1-channel (grayscale) data is converted automatically")
        self.repeat = spec.channels if in_channels == 1 and spec.channels != 1 else 1
        self.size = spec.size if spec.fixed_size else None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat > 1:
            x = x.expand(-1, self.repeat, -1, -1)
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class CXRModel(nn.Module):
    """``head(features(images))`` — what every strategy trains."""

    def __init__(self, backbone: Backbone, head: Head, in_channels: int):
        super().__init__()
        self.adapter = InputAdapter(backbone, in_channels)
        self.backbone = backbone
        self.head = head

    def features(self, images: torch.Tensor) -> BackboneOutput:
        """The backbone's output for raw images: adapted (channels, size, normalisation), encoded, and
        with ``input_size`` filled in. The one place a forward reaches the backbone, for code that
        needs more than the head's outputs (multi-task heads, embeddings, Grad-CAM, downstream probes)."""
        x = self.adapter(images)
        feats = self.backbone(x)
        feats.input_size = (int(x.shape[-2]), int(x.shape[-1]))
        return feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_model(backbone_cfg: dict[str, Any], head_cfg: dict[str, Any], data: DatasetBundle) -> CXRModel:
    """Build the backbone, then the head sized from the backbone and the dataset."""
    b_cfg, h_cfg = dict(backbone_cfg), dict(head_cfg)
    backbone = registry.build("backbone", b_cfg.pop("name"), **b_cfg)
    head = registry.build("head", h_cfg.pop("name"), supplied={
        "in_dim": backbone.embed_dim, "in_channels": backbone.feature_channels,
        "num_classes": len(data.class_names)}, **h_cfg)
    if getattr(head, "task", None) != data.task:
        raise registry.RegistryError(
            f"head {head_cfg['name']!r} does a {head.task} task but dataset gives {data.task} labels; "
            "choose a head for that task")
    _warn_if_resized(backbone, data, backbone_cfg["name"])
    return CXRModel(backbone, head, data.channels)


def _warn_if_resized(backbone: Backbone, data: DatasetBundle, name: str) -> None:
    """Images decoded at one size and resized to the backbone's fixed input at every step lose (or
    invent) detail silently; say so once, naming both sizes."""
    spec = backbone.input_spec
    if not spec.fixed_size or len(data.train) == 0:
        return
    size = tuple(int(s) for s in data.train[0]["image"].shape[-2:])
    if size != (spec.size, spec.size):
        log.warning("dataset images are %s px but backbone %r takes %d px: every batch is resized to %d; "
                    "set dataset.image_size=%d (or leave dataset.image_size unset to follow the backbone)",
                    "x".join(map(str, size)), name, spec.size, spec.size, spec.size)
