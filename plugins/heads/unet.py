"""``unet``: a U-Net decoder (segmentation_models_pytorch's ``UnetDecoderBlock``) on any backbone's maps.

MLVICX evaluates its pretrained encoder for segmentation with a U-Net whose decoder starts from random
weights (papers/mlvicx.txt §IV-B, Table III): fine-tuned, encoder and decoder train; frozen, only the
decoder. The backbone is the U-Net's encoder: from its coarsest map, each block upsamples to the next
finer map and fuses it (the skip connection), then ``full_res_blocks`` blocks without a skip double the
resolution each (2 from a stride-4 map: full resolution, as smp's ``Unet``), and a 3×3 convolution gives
the logits. The loss is upernet's: per-class sigmoid BCE + soft Dice, logits scored at the mask's size.
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
from torch import nn

from cxr_automl.plugin.interfaces import (BackboneOutput, Head, HeadParts, HeadSpec, SplittableHead, declare_head,
                                          last_maps)
from cxr_automl_plugins.heads.upernet import MaskLogits, UperNetClassifier


class UnetDecoder(nn.Module):
    """Maps high → low resolution (the backbone's order) → decoded features, ``out_channels`` wide."""

    def __init__(self, in_channels: tuple[int, ...], decoder_channels: tuple[int, ...], norm: bool):
        """Blocks past the skips (``full_res_blocks`` of them) fuse nothing and double the size."""
        super().__init__()
        skips = list(in_channels[:-1])[::-1]  # finer maps, from the coarsest skip up
        widths = [in_channels[-1], *decoder_channels]
        self.blocks = nn.ModuleList(
            UnetDecoderBlock(widths[i], skips[i] if i < len(skips) else 0, widths[i + 1],
                             use_norm="batchnorm" if norm else False)
            for i in range(len(decoder_channels)))
        self.n_skips = len(skips)
        self.out_channels = widths[-1]

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x, skips = maps[-1], maps[:-1][::-1]
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < self.n_skips else None
            h, w = skip.shape[-2:] if skip is not None else (2 * x.shape[-2], 2 * x.shape[-1])
            x = block(x, int(h), int(w), skip_connection=skip)
        return x


class UnetSegHead(MaskLogits, Head, SplittableHead):
    """Multi-scale NCHW maps → (N, C, H, W) mask logits (the input's size from a stride-4 finest map)."""

    spec = HeadSpec(task="segmentation", feature_maps=1)

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, decoder_channels: tuple[int, ...],
                 norm: bool, dice_weight: float, bce_weight: float):
        super().__init__()
        self.decoder = UnetDecoder(in_channels, decoder_channels, norm)
        self.classifier = nn.Conv2d(self.decoder.out_channels, num_classes, kernel_size=3, padding=1)
        self.num_classes = num_classes
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        return self.classifier(self.decoder(last_maps(feats, None)))  # contiguous: Swin's maps are views

    def split(self) -> HeadParts:
        """The decoder (shared) and the last convolution with the loss (per dataset)."""
        own = UperNetClassifier(self.classifier, self.num_classes, self.bce_weight, self.dice_weight)
        return HeadParts(shared=self.decoder, own=own)


def default_widths(blocks: int, first: int = 256, last: int = 16) -> tuple[int, ...]:
    """smp's ``Unet`` widths (256, 128, 64, 32, 16) for five blocks: halving from ``first``, never below ``last``."""
    return tuple(max(first >> i, last) for i in range(blocks))


@declare_head(UnetSegHead.spec)
def unet(in_channels: tuple[int, ...], num_classes: int, decoder_channels: tuple[int, ...] | None = None,
         width: int = 256, full_res_blocks: int = 2, norm: bool = True, dice_weight: float = 1.0,
         bce_weight: float = 1.0) -> UnetSegHead:
    """U-Net decoder over all the backbone's maps. ``decoder_channels``: each block's width from the coarsest
    (one per map after the first, plus ``full_res_blocks``); null: ``width`` halving per block, never below
    16 (256: smp's widths 256, 128, 64, 32, 16);
    ``full_res_blocks``: blocks without a skip after the finest map, each doubling the size (2 from
    stride 4 = full resolution; 0 = predict at the finest map); ``norm``: BatchNorm in the blocks;
    loss = bce_weight·BCE + dice_weight·Dice."""
    if full_res_blocks < 0:
        raise ValueError(f"head.full_res_blocks must be >= 0; got {full_res_blocks}")
    blocks = len(in_channels) - 1 + full_res_blocks
    if blocks < 1:
        raise ValueError("unet on a backbone with one feature map needs head.full_res_blocks >= 1")
    if decoder_channels is None:
        if width < 1:
            raise ValueError(f"head.width must be >= 1; got {width}")
        widths = default_widths(blocks, width, min(16, width))
    else:
        widths = tuple(int(c) for c in decoder_channels)
    if len(widths) != blocks:
        raise ValueError(
            f"head.decoder_channels has {len(widths)} widths but this backbone's {len(in_channels)} maps and "
            f"full_res_blocks={full_res_blocks} make {blocks} decoder blocks; give {blocks} widths, e.g. "
            f"head.decoder_channels=[{','.join(map(str, default_widths(blocks)))}], or leave it null (head.width)")
    return UnetSegHead(tuple(in_channels), num_classes, widths, norm, dice_weight, bce_weight)
