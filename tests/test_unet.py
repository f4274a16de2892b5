"""The ``unet`` head: smp's U-Net decoder blocks on our backbones' maps, at full resolution, with clear
errors for widths that do not fit the backbone (every tiny backbone × unet trains in test_matrix.py,
every real layout with masks × unet in test_realdata.py)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from cxr_automl import config
from cxr_automl.plugin import registry


def _blocks(decoder) -> list[tuple[int, int]]:
    return [(b.conv1[0].in_channels, b.conv2[0].out_channels) for b in decoder.blocks]


def test_default_decoder_has_smps_unet_widths_and_predicts_at_full_resolution():
    """On resnet18 the blocks are smp's Unet("resnet18") blocks, except that our backbone has no stride-2
    stem map to fuse (its 4th block takes no skip); the logits come out at the input's size."""
    backbone = registry.build("backbone", "resnet18", weights=None)
    head = registry.build("head", "unet", supplied={"in_channels": backbone.feature_channels, "in_dim": 512,
                                                     "num_classes": 3})
    ref = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=3).decoder
    ours, theirs = _blocks(head.decoder), _blocks(ref)
    assert [o for _, o in ours] == [o for _, o in theirs] == [256, 128, 64, 32, 16]
    assert ours[:3] == theirs[:3] and ours[3] == (64, 32) and theirs[3] == (64 + 64, 32)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        logits = head(backbone(x))
    assert logits.shape == (2, 3, 96, 96)


def test_widths_follow_head_width_and_a_wrong_length_is_one_line():
    cfg = config.compose(["head=unet", "head.width=32", "dataset.task=segmentation", "backbone=resnet_tiny"])
    assert cfg["head"]["width"] == 32
    head = registry.build("head", "unet", supplied={"in_channels": (8, 16, 32, 64), "num_classes": 2}, width=32)
    assert [o for _, o in _blocks(head.decoder)] == [32, 16, 16, 16, 16]
    with pytest.raises(registry.RegistryError, match=r"decoder_channels has 2 widths .* make 5 decoder blocks; "
                                                     r"give 5 widths, e\.g\. head\.decoder_channels=\[256,128,64,32,16\]"):
        registry.build("head", "unet", supplied={"in_channels": (8, 16, 32, 64), "num_classes": 2},
                       decoder_channels=[64, 32])
    with pytest.raises(registry.RegistryError, match="full_res_blocks must be >= 0"):
        registry.build("head", "unet", supplied={"in_channels": (8, 16), "num_classes": 2}, full_res_blocks=-1)

