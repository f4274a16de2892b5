"""timm ResNets (resnet18/34/50) and a tiny variant of the same class for tests and the default run."""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from cxr_automl.interfaces import Backbone, BackboneOutput, InputSpec
from cxr_automl.weights import load_into

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TimmResNet(Backbone):
    """Wraps a timm ``ResNet``; its blocks are the stem then every residual block, in order."""

    num_feature_maps = 4

    def __init__(self, net: ResNet, image_size: int = 224):
        super().__init__()
        self.net = net
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.feature_channels = tuple(_out_ch(s) for s in self.stages)
        self.embed_dim = self.feature_channels[-1]
        self.input_spec = InputSpec(size=image_size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return BackboneOutput(pooled=x.mean(dim=(2, 3)), features=feats)

    def stage_modules(self) -> Sequence[nn.Module]:
        return list(self.stages)

    def blocks(self) -> Sequence[nn.Module]:
        return [self.stem, *[blk for stage in self.stages for blk in stage]]


def _out_ch(stage: nn.Sequential) -> int:
    last = stage[-1]
    bn = getattr(last, "bn3", None) or last.bn2
    return bn.num_features


def _make(name: str, weights: str | None, pretrained: bool, strict: bool, drop_path_rate: float,
          image_size: int, **timm_kwargs) -> TimmResNet:
    if timm_kwargs:
        net = ResNet(num_classes=0, drop_path_rate=drop_path_rate, **timm_kwargs)
    else:
        # pretrained=True resolves timm's own hub weights (needs a cache or the network)
        net = timm.create_model(name, pretrained=pretrained, num_classes=0, drop_path_rate=drop_path_rate)
    backbone = TimmResNet(net, image_size=image_size)
    if weights:
        load_into(backbone.net, weights, strict=strict)
    return backbone


def resnet18(weights: str | None = None, pretrained: bool = False, strict: bool = False,
             drop_path_rate: float = 0.0, image_size: int = 224) -> TimmResNet:
    """ResNet-18; ``weights`` is a local checkpoint (timm/torchvision/MLVICX keys), ``pretrained`` timm's."""
    return _make("resnet18", weights, pretrained, strict, drop_path_rate, image_size)


def resnet34(weights: str | None = None, pretrained: bool = False, strict: bool = False,
             drop_path_rate: float = 0.0, image_size: int = 224) -> TimmResNet:
    """ResNet-34."""
    return _make("resnet34", weights, pretrained, strict, drop_path_rate, image_size)


def resnet50(weights: str | None = None, pretrained: bool = False, strict: bool = False,
             drop_path_rate: float = 0.0, image_size: int = 224) -> TimmResNet:
    """ResNet-50 (bottleneck blocks)."""
    return _make("resnet50", weights, pretrained, strict, drop_path_rate, image_size)


def resnet_tiny(weights: str | None = None, strict: bool = False, drop_path_rate: float = 0.0,
                image_size: int = 128, width: int = 16) -> TimmResNet:
    """The same timm ResNet class with one basic block per stage and ``width``..8×width channels."""
    chans = (width, 2 * width, 4 * width, 8 * width)
    return _make("resnet_tiny", weights, False, strict, drop_path_rate, image_size,
                 block=BasicBlock, layers=(1, 1, 1, 1), channels=chans, stem_width=width)
