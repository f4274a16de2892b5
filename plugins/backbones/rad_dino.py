"""RAD-DINO: transformers' ``Dinov2Model`` (what ``microsoft/rad-dino`` loads as) and ``rad_dino_tiny``.

A ViT has one resolution; dense heads want several. As in ViTDet's *simple feature pyramid*, four
intermediate layers (evenly spaced, the last one included) are turned into maps at 4×, 2×, 1× and ½× the
patch grid. The resampling is parameter-free (bilinear up, max-pool down) so every learnable parameter
stays inside the encoder's own blocks and "unfreeze the top k blocks" keeps its meaning; the dense head's
lateral convolutions do the learning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from cxr_automl.plugin.interfaces import Backbone, BackboneOutput, InputSpec
from cxr_automl.plugin.weights import WeightsError, load_into

log = logging.getLogger(__name__)

RAD_DINO_ID = "microsoft/rad-dino"
RAD_DINO_MEAN = (0.5307, 0.5307, 0.5307)
RAD_DINO_STD = (0.2583, 0.2583, 0.2583)


class Dinov2Backbone(Backbone):
    """Wraps a transformers ``Dinov2Model``. ``blocks()``: embeddings, then each transformer layer
    (the last grouped with the final LayerNorm). ``pooled``: mean of the patch tokens (CLS left out)."""

    num_feature_maps = 4

    def __init__(self, net: Dinov2Model, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        cfg = net.config
        n = cfg.num_hidden_layers
        # 4 evenly spaced layers, 1-based indices into hidden_states (0 = embeddings), the last included
        # (a shallow test model may tap a layer twice: there are always 4 maps)
        self.taps = [max(1, round(n * k / 4)) for k in range(1, 5)]
        self.scales = (4.0, 2.0, 1.0, 0.5)
        self.feature_channels = tuple(cfg.hidden_size for _ in self.taps)
        self.embed_dim = cfg.hidden_size
        self.patch = cfg.patch_size
        # the released model's resolution; DINOv2 can interpolate positions, but the papers fix the size
        self.input_spec = InputSpec(size=image_size, channels=3, mean=tuple(mean), std=tuple(std),
                                    fixed_size=True)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        out = self.net(pixel_values=x, output_hidden_states=True)
        last = out.last_hidden_state  # after the final LayerNorm
        feats = []
        for tap, scale in zip(self.taps, self.scales):
            tokens = last if tap == len(out.hidden_states) - 1 else out.hidden_states[tap]
            fmap = tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
            if scale > 1:
                fmap = F.interpolate(fmap, scale_factor=scale, mode="bilinear", align_corners=False)
            elif scale < 1:
                fmap = F.max_pool2d(fmap, kernel_size=2, stride=2, ceil_mode=True)
            feats.append(fmap)
        return BackboneOutput(pooled=last[:, 1:].mean(dim=1), features=feats,
                              pooled_map=last[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w))

    def blocks(self) -> Sequence[nn.Module]:
        layers = list(self.net.encoder.layer)
        return [self.net.embeddings, *layers[:-1], nn.ModuleList([layers[-1], self.net.layernorm])]


def _rad_dino_config(image_size: int) -> Dinov2Config:
    """The architecture of microsoft/rad-dino (ViT-B/14), for weights given as a bare state-dict file."""
    return Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        patch_size=14, image_size=image_size, layerscale_value=1.0)


def _from_pretrained(source: str) -> Dinov2Model:
    try:
        return Dinov2Model.from_pretrained(source)
    except OSError as exc:
        raise WeightsError(
            f"cannot load RAD-DINO weights {source!r} ({str(exc).strip().splitlines()[0]}); offline and not in "
            "the Hugging Face cache: download it once (`huggingface-cli download microsoft/rad-dino`) or set "
            "backbone.weights=PATH to a local copy (a save_pretrained directory or a .safetensors/.pt file)"
        ) from exc


def rad_dino(weights: str | None = RAD_DINO_ID, strict: bool = False, image_size: int = 518,
             drop_path_rate: float = 0.0) -> Dinov2Backbone:
    """RAD-DINO (ViT-B/14, 518 px, mean 0.5307 / std 0.2583). ``weights``: a Hugging Face id (from the
    local cache when offline), a ``save_pretrained`` directory, a state-dict file, or null for random init."""
    if weights is None:
        net = Dinov2Model(_rad_dino_config(image_size))
    elif Path(weights).expanduser().is_file():
        net = Dinov2Model(_rad_dino_config(image_size))
        load_into(net, weights, strict=strict)
    else:
        net = _from_pretrained(str(Path(weights).expanduser()) if Path(weights).expanduser().is_dir() else weights)
    if drop_path_rate:
        net.config.drop_path_rate = drop_path_rate
        for layer in net.encoder.layer:  # transformers reads drop_path_rate at construction only
            layer.drop_path = _drop_path(drop_path_rate)
    return Dinov2Backbone(net, image_size, RAD_DINO_MEAN, RAD_DINO_STD)


def _drop_path(rate: float) -> nn.Module:
    from transformers.models.dinov2.modeling_dinov2 import Dinov2DropPath
    return Dinov2DropPath(rate)


def rad_dino_tiny(weights: str | None = None, strict: bool = False, image_size: int = 64,
                  hidden_size: int = 32, layers: int = 4, patch_size: int = 8) -> Dinov2Backbone:
    """The same ``Dinov2Model`` class at toy size (random init unless ``weights``): tests and CPU runs."""
    cfg = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=2 * hidden_size, patch_size=patch_size, image_size=image_size)
    if weights and Path(weights).expanduser().is_dir():
        net = _from_pretrained(str(Path(weights).expanduser()))
    else:
        net = Dinov2Model(cfg)
        if weights:
            load_into(net, weights, strict=strict)
    return Dinov2Backbone(net, image_size, RAD_DINO_MEAN, RAD_DINO_STD)
