"""timm ResNets (resnet18/34/50) and a tiny variant of the same class for tests and the default run."""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from cxr_automl.plugin.interfaces import Backbone, BackboneOutput, InputSpec
from cxr_automl.plugin.weights import load_into
from cxr_automl_plugins.backbones.timm_groups import grouped_blocks

#: checkpoints written before each tensor was registered once also hold these aliases of ``net.*``
_OLD_ALIASES = ("stem.", "stages.")


class TimmResNet(Backbone):
    """Wraps a timm ``ResNet``; its blocks are the stem then every residual block, in order (timm's
    ``group_matcher``). Its state dict is the ``net.*`` keys only."""

    num_feature_maps = 4

    def __init__(self, net: ResNet, image_size: int = 224):
        super().__init__()
        self.net = net
        self.feature_channels = tuple(int(f["num_chs"]) for f in net.feature_info[1:])  # [0] is the stem
        self.embed_dim = self.feature_channels[-1]
        self.input_spec = InputSpec(size=image_size, channels=3, mean=IMAGENET_DEFAULT_MEAN,
                                    std=IMAGENET_DEFAULT_STD)
        self.register_load_state_dict_pre_hook(_drop_old_aliases)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        # timm's index 0 is the stem's output (before the max-pool); 1..4 are layer1..layer4
        x, feats = self.net.forward_intermediates(x, indices=[1, 2, 3, 4])
        return BackboneOutput(pooled=x.mean(dim=(2, 3)), features=feats, pooled_map=x)

    def stage_modules(self) -> Sequence[nn.Module]:
        return [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]

    def blocks(self) -> Sequence[nn.Module]:
        return grouped_blocks(self.net)


def _drop_old_aliases(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Let a checkpoint of the older layout (``stem.*``/``stages.*`` duplicating ``net.*``) load."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + a for a in _OLD_ALIASES))]:
        del state_dict[key]


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
