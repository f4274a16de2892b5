"""``hiera`` / ``hiera_tiny``: SAM2's own image encoder — transformers' ``Sam2VisionModel`` (Hiera + FPN neck).

The released SAM2 encoders (``facebook/sam2.1-hiera-tiny`` and larger) are Hiera trunks whose four stages
(strides 4, 8, 16, 32) feed an FPN neck that projects each to ``fpn_hidden_size`` (256) channels. Every
neck level is a feature map here (high → low resolution, NCHW), so the ``sam2`` head gets exactly what
SAM2's mask decoder was trained on (strides 4 and 8 as its high-resolution features, 16 as the image
embedding) and UperNet / YOLOv8 / DINO heads get a 4-level pyramid. ``pooled`` is the mean of the last
Hiera stage's tokens.

Input size: SAM2 is trained at 1024 px (the default of ``hiera``). Hiera interpolates its background
position embedding to any grid but tiles an 8×8 window embedding over the stride-4 grid, so the side must
be a multiple of 32; ``hiera_tiny`` runs at 64 px.

SPFT: ``blocks()`` are the patch embedding (with both position embeddings), every Hiera block, and the last
block grouped with the FPN neck. The SAM2 paper's "memory attention" exists only in the *video* model
(``Sam2VideoModel``); the image model used here has none, so "unfreeze the top k" means the top k Hiera
blocks (see README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from transformers import AutoConfig, Sam2HieraDetConfig, Sam2Model, Sam2VisionConfig, Sam2VisionModel

from cxr_automl.plugin.interfaces import Backbone, BackboneOutput, InputSpec
from cxr_automl.plugin.weights import WeightsError, load_into

SAM2_ID = "facebook/sam2.1-hiera-tiny"


class HieraBackbone(Backbone):
    """Wraps a ``Sam2VisionModel``; ``features``: the neck's 4 levels, strides 4/8/16/32 of the input."""

    num_feature_maps = 4

    def __init__(self, net: Sam2VisionModel, image_size: int):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size={image_size}: Hiera needs a multiple of 32 (its 8x8 window position "
                             "embedding is tiled over the stride-4 grid); SAM2 is trained at 1024")
        self.net = net
        cfg = net.config
        self.feature_channels = tuple(cfg.fpn_hidden_size for _ in cfg.backbone_channel_list)
        self.embed_dim = cfg.backbone_config.embed_dim_per_stage[-1]
        # SAM2's image preprocessing (``Sam2ImageProcessor``) uses the ImageNet statistics
        self.input_spec = InputSpec(size=image_size, channels=3, mean=IMAGENET_DEFAULT_MEAN,
                                    std=IMAGENET_DEFAULT_STD, fixed_size=True)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        trunk = self.net.backbone(x)
        fpn, _ = self.net.neck(trunk.intermediate_hidden_states)  # low → high resolution
        last = trunk.last_hidden_state  # NHWC
        return BackboneOutput(pooled=last.mean(dim=(1, 2)), features=list(fpn[::-1]),
                              pooled_map=last.permute(0, 3, 1, 2))

    def blocks(self) -> Sequence[nn.Module]:
        hiera = self.net.backbone
        # the position embeddings are bare parameters of the trunk: a container made here holds them
        # (not registered on self, so the state dict keeps transformers' keys)
        stem = nn.ModuleList([hiera.patch_embed, nn.ParameterList([hiera.pos_embed, hiera.pos_embed_window])])
        layers = list(hiera.blocks)
        return [stem, *layers[:-1], nn.ModuleList([layers[-1], self.net.neck])]


def _offline_error(source: str, exc: OSError, key: str) -> WeightsError:
    return WeightsError(
        f"cannot load SAM2 weights {source!r} ({str(exc).strip().splitlines()[0]}); offline and not in the "
        f"Hugging Face cache: download it once (`huggingface-cli download {SAM2_ID}`) or set "
        f"{key}=PATH to a local copy (a save_pretrained directory or a .safetensors/.pt file)")


def _from_pretrained(source: str) -> Sam2VisionModel:
    """A ``Sam2VisionModel`` from a hub id or directory holding either a whole SAM2 (``model_type`` sam2,
    as the released checkpoints are: its ``vision_encoder`` is taken) or a saved vision model."""
    try:
        cfg = AutoConfig.from_pretrained(source)
        if cfg.model_type == "sam2":
            return Sam2Model.from_pretrained(source).vision_encoder
        return Sam2VisionModel.from_pretrained(source)
    except OSError as exc:
        raise _offline_error(source, exc, "backbone.weights") from exc


def sam2_model(source: str, key: str) -> Sam2Model:
    """A whole ``Sam2Model`` from a hub id (cache when offline) or a save_pretrained directory; ``key`` is
    the config key named in the error (e.g. ``head.weights``)."""
    try:
        return Sam2Model.from_pretrained(str(Path(source).expanduser()) if Path(source).expanduser().is_dir()
                                         else source)
    except OSError as exc:
        raise _offline_error(source, exc, key) from exc


def _build(weights: str | None, strict: bool, config: Sam2VisionConfig) -> Sam2VisionModel:
    path = Path(weights).expanduser() if weights else None
    if path is not None and path.is_dir():
        return _from_pretrained(str(path))
    if path is not None and path.is_file():
        net = Sam2VisionModel(config)
        # a whole SAM2 state dict keeps the encoder under vision_encoder.
        load_into(net, path, strict=strict, prefixes=("vision_encoder.", "module.", "model."))
        return net
    if weights:
        return _from_pretrained(weights)
    return Sam2VisionModel(config)


def _sam2_tiny_config() -> Sam2VisionConfig:
    """The architecture of facebook/sam2.1-hiera-tiny's image encoder, for a bare state-dict file."""
    trunk = Sam2HieraDetConfig(hidden_size=96, blocks_per_stage=[1, 2, 7, 2],
                               embed_dim_per_stage=[96, 192, 384, 768], num_attention_heads_per_stage=[1, 2, 4, 8],
                               window_size_per_stage=[8, 4, 14, 7], global_attention_blocks=[5, 7, 9])
    return Sam2VisionConfig(backbone_config=trunk, backbone_channel_list=[768, 384, 192, 96], fpn_hidden_size=256)


def hiera(weights: str | None = SAM2_ID, strict: bool = False, image_size: int = 1024) -> HieraBackbone:
    """SAM2's Hiera image encoder (default ``facebook/sam2.1-hiera-tiny``, 1024 px, ImageNet statistics).
    ``weights``: a Hugging Face id of a SAM2 checkpoint (from the local cache when offline), a
    ``save_pretrained`` directory (whole SAM2 or vision model), a state-dict file of the tiny encoder,
    or null for random init."""
    return HieraBackbone(_build(weights, strict, _sam2_tiny_config()), image_size)


def hiera_tiny(weights: str | None = None, strict: bool = False, image_size: int = 64, width: int = 16,
               fpn_hidden_size: int = 32) -> HieraBackbone:
    """The same ``Sam2VisionModel`` class at toy size (random init unless ``weights``): Hiera stages of
    ``width``..8×width channels with 1, 1, 2, 1 blocks (the 4th block global attention, as SAM2 puts global
    blocks inside stage 3), SAM2's window sizes, an FPN of ``fpn_hidden_size``; tests and CPU runs."""
    dims = [width, 2 * width, 4 * width, 8 * width]
    trunk = Sam2HieraDetConfig(hidden_size=width, blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=dims,
                               num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[8, 4, 14, 7],
                               global_attention_blocks=[3], image_size=[image_size, image_size])
    config = Sam2VisionConfig(backbone_config=trunk, backbone_channel_list=dims[::-1],
                              fpn_hidden_size=fpn_hidden_size)
    return HieraBackbone(_build(weights, strict, config), image_size)
