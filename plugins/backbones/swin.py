"""timm Swin Transformers: ``swin_b`` (Ark-6's encoder) and ``swin_tiny``, a tiny variant of the same class.

timm's Swin stages return channels-last maps (N, H, W, C); this wrapper hands out NCHW (timm's
``forward_intermediates`` converts them), as the ``Backbone`` interface promises, so dense heads never
need to know which backbone they sit on.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from torch import nn

from cxr_automl.plugin.interfaces import Backbone, BackboneOutput, InputSpec
from cxr_automl.plugin.weights import DROP_PREFIXES, load_into
from cxr_automl_plugins.backbones.timm_groups import grouped_blocks


class TimmSwin(Backbone):
    """Wraps a timm ``SwinTransformer``.

    ``blocks()``: the patch embedding, then every Swin block in order (timm's ``group_matcher``). A
    stage's patch-merging layer runs just before the stage's first block, so it is grouped with that
    block; the final LayerNorm is grouped with the last block (unfreezing "the top 1" then trains what
    produces the pooled embedding).
    """

    num_feature_maps = 4

    def __init__(self, net: SwinTransformer, image_size: int):
        super().__init__()
        self.net = net
        self.feature_channels = tuple(int(f["num_chs"]) for f in net.feature_info)
        self.embed_dim = self.feature_channels[-1]
        # Swin's windows and relative-position tables are built for one input size: it is required
        self.input_spec = InputSpec(size=image_size, channels=3, mean=IMAGENET_DEFAULT_MEAN,
                                    std=IMAGENET_DEFAULT_STD, fixed_size=True)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        # norm=True: the last map is the final LayerNorm's output, as the pooled embedding is
        x, feats = self.net.forward_intermediates(x, norm=True, output_fmt="NCHW")
        return BackboneOutput(pooled=x.mean(dim=(1, 2)), features=feats,  # x is NHWC
                              pooled_map=x.permute(0, 3, 1, 2))

    def blocks(self) -> Sequence[nn.Module]:
        return grouped_blocks(self.net)


def _build(net: SwinTransformer, image_size: int, weights: str | None, strict: bool) -> TimmSwin:
    backbone = TimmSwin(net, image_size)
    if weights:
        # Ark/Microsoft checkpoints use the original layout (downsample at the end of a stage,
        # relative_position_index saved); timm's own converter maps them to its layout
        load_into(backbone.net, weights, strict=strict, transform=partial(checkpoint_filter_fn, model=net),
                  drop=(*DROP_PREFIXES, "omni_heads."))  # Ark's per-dataset classification heads
    return backbone


def swin_b(weights: str | None = None, pretrained: bool = False, strict: bool = False,
           drop_path_rate: float = 0.1, image_size: int = 224) -> TimmSwin:
    """Swin-B (``swin_base_patch4_window7_224``). ``weights``: a local checkpoint such as Ark-6's
    (nested ``state_dict``/``model``/``teacher``, ``module.`` prefixes and classifier keys handled);
    ``pretrained``: timm's ImageNet weights (needs a cache or the network)."""
    net = timm.create_model("swin_base_patch4_window7_224", pretrained=pretrained, num_classes=0,
                            drop_path_rate=drop_path_rate, img_size=image_size)
    return _build(net, image_size, weights, strict)


def swin_tiny(weights: str | None = None, strict: bool = False, drop_path_rate: float = 0.0,
              image_size: int = 64, embed_dim: int = 16, window_size: int = 4) -> TimmSwin:
    """The same timm ``SwinTransformer`` class with one block per stage and ``embed_dim``..8×embed_dim
    channels: for tests and CPU runs."""
    net = SwinTransformer(img_size=image_size, patch_size=4, embed_dim=embed_dim, depths=(1, 1, 1, 1),
                          num_heads=(1, 2, 2, 4), window_size=window_size, num_classes=0,
                          drop_path_rate=drop_path_rate)
    return _build(net, image_size, weights, strict)
