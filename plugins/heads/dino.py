"""``dino``: DINO-style DETR detection from transformers' RT-DETR modules, on any backbone's maps.

What makes DINO — multi-scale *deformable* attention in the decoder, *contrastive denoising* query
groups during training and *mixed query selection* (anchors chosen top-k from the encoder's memory,
content queries learned) — is what transformers' ``RTDetrForObjectDetection`` implements
(``learn_initial_query=True``, the default, gives the mixed selection; false is RT-DETR's own choice,
content queries taken from the selected memory too). Nothing here re-implements attention. Where it
differs from the paper's DINO (Foundation X's localization branch): the encoder is RT-DETR's hybrid
encoder (attention within the coarsest map, then CNN fusion across levels), not DINO's deformable
encoder over all levels; see the README.

The head splits (``SplittableHead``) as a multi-dataset strategy needs it: ``encoder`` (the *localization
encoder*: projections of our maps + RT-DETR's hybrid encoder) can be shared, ``DinoDecoder`` (query
selection, deformable decoder, class and box heads, Hungarian-matched loss) is one per dataset.
``forward`` runs the encoder; the decoder runs in ``loss`` (it needs the targets for the denoising
queries) and in ``predict``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
from transformers.models.rt_detr.modeling_rt_detr import RTDetrHybridEncoder

from cxr_automl.config import ConfigError
from cxr_automl.plugin.interfaces import BackboneOutput, Head, HeadParts, HeadSpec, SplittableHead, declare_head
from cxr_automl.plugin.targets import check_boxes


class LocalizationEncoder(nn.Module):
    """Our last ``levels`` maps → 1×1 conv + BN to ``hidden`` channels → RT-DETR hybrid encoder
    (attention within the coarsest map, then a top-down/bottom-up fusion of all of them)."""

    def __init__(self, cfg: RTDetrConfig, in_channels: tuple[int, ...]):
        super().__init__()
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, cfg.encoder_hidden_dim, 1, bias=False), nn.BatchNorm2d(cfg.encoder_hidden_dim))
            for c in in_channels)
        self.encoder = RTDetrHybridEncoder(cfg)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        projected = [p(m.contiguous()) for p, m in zip(self.input_proj, maps)]
        # the hybrid encoder fuses levels by exact 2x up/down-sampling; an odd grid (RAD-DINO at 518 px:
        # 74, 37, 19) is resampled to 2^k times the coarsest map so the levels line up
        h, w = projected[-1].shape[-2:]
        n = len(projected)
        projected = [x if x.shape[-2:] == (h << (n - 1 - i), w << (n - 1 - i)) else
                     F.interpolate(x, size=(h << (n - 1 - i), w << (n - 1 - i)), mode="bilinear", align_corners=False)
                     for i, x in enumerate(projected)]
        return list(self.encoder(projected).last_hidden_state)


class _TileableEmbedding(nn.Embedding):
    """transformers 5.24's RT-DETR calls ``weight_embedding.tile(...)`` on the ``nn.Embedding`` of
    learned content queries (it means its weight), so ``learn_initial_query=True`` — DINO's mixed query
    selection — fails there. This keeps the same parameter (same state-dict key) and makes it work."""

    def tile(self, dims: list[int]) -> torch.Tensor:
        return self.weight.tile(dims)


class DinoDecoder(nn.Module):
    """The per-dataset part: RT-DETR's query selection, deformable decoder, class and box heads and
    Hungarian-matched loss, over the encoder's memory. ``forward`` only packs the memory: the decoder
    runs in ``loss`` (it needs the targets for the denoising queries) and in ``predict``."""

    def __init__(self, decoder: RTDetrForObjectDetection, num_classes: int, max_det: int):
        super().__init__()
        self.decoder, self.num_classes, self.max_det = decoder, num_classes, max_det

    def forward(self, memory: list[torch.Tensor]) -> dict[str, Any]:
        return {"memory": memory}

    def _decode(self, outputs: dict[str, Any], labels: list[dict[str, torch.Tensor]] | None):
        memory = outputs["memory"]
        # encoder_outputs given → RT-DETR skips its encoder; inputs_embeds only tells it batch and device
        return self.decoder(None, inputs_embeds=memory[0], encoder_outputs=(memory,), labels=labels)

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any],
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        h, w = batch["image"].shape[-2:]
        device = outputs["memory"][0].device
        labels = [{"class_labels": t["labels"].to(device),
                   "boxes": box_convert(t["boxes"] / t["boxes"].new_tensor([w, h, w, h]), "xyxy", "cxcywh").to(device)}
                  for t in check_boxes(batch, self.num_classes)]
        with torch.autocast(device.type, enabled=False):  # Hungarian matching and focal loss in fp32
            out = self._decode({"memory": [m.float() for m in outputs["memory"]]}, labels)
        return out.loss

    @torch.no_grad()
    def predict(self, outputs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        was_training = self.decoder.training
        self.decoder.eval()
        out = self._decode({"memory": [m.float() for m in outputs["memory"]]}, None)
        self.decoder.train(was_training)
        # sigmoid (focal) scores: the top detections over every query × class, as RT-DETR post-processes
        scores = out.logits.sigmoid().flatten(1)
        k = min(self.max_det, scores.shape[1])
        top, index = scores.topk(k, dim=1)
        boxes = box_convert(out.pred_boxes, "cxcywh", "xyxy").clamp(0, 1)
        query, label = index // self.num_classes, index % self.num_classes
        return [{"boxes": boxes[i, query[i]], "scores": top[i], "labels": label[i]} for i in range(len(top))]


class DinoDetHead(DinoDecoder, Head, SplittableHead):
    """``encoder`` (shareable) on the backbone's last ``levels`` maps, then the decoder part."""

    spec = HeadSpec(task="detection", feature_maps=lambda cfg: max(1, int(cfg["levels"])))  # the last `levels`

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, levels: int, cfg: RTDetrConfig,
                 max_det: int):
        if not 1 <= levels <= len(in_channels):
            raise ValueError(f"levels={levels} but the backbone gives {len(in_channels)} feature maps")
        nn.Module.__init__(self)  # encoder first, then the decoder: registration and initialisation order
        self.levels, self.num_classes, self.max_det = levels, num_classes, max_det
        self.encoder = LocalizationEncoder(cfg, tuple(in_channels[-levels:]))
        det = RTDetrForObjectDetection(cfg)
        # our backbone and our encoder replace RT-DETR's own: drop them so no dead weights are trained/saved
        det.model.backbone = None
        det.model.encoder_input_proj = None
        det.model.encoder = None
        old = getattr(det.model, "weight_embedding", None)  # the learned content queries, if any
        if old is not None:
            det.model.weight_embedding = _TileableEmbedding(old.num_embeddings, old.embedding_dim,
                                                            _weight=old.weight.data.clone())
        self.decoder = det

    def forward(self, feats: BackboneOutput) -> dict[str, Any]:
        maps = feats.features[-self.levels:]
        positions = sum(m.shape[-2] * m.shape[-1] for m in maps)
        if positions < self.decoder.config.num_queries:  # queries are chosen top-k among the positions
            raise ConfigError(f"head.num_queries={self.decoder.config.num_queries} exceeds the {positions} "
                              "positions of the backbone's maps at this input size; lower head.num_queries "
                              "or raise the image size")
        return {"memory": self.encoder(maps)}

    def split(self) -> HeadParts:
        """The localization encoder (shared) and the decoder with its loss (per dataset)."""
        return HeadParts(shared=self.encoder, own=DinoDecoder(self.decoder, self.num_classes, self.max_det),
                         levels=self.levels)


@declare_head(DinoDetHead.spec)
def dino(in_channels: tuple[int, ...], num_classes: int, levels: int = 3, hidden: int = 128,
         encoder_ffn: int = 512, decoder_layers: int = 3, decoder_ffn: int = 512, heads: int = 8,
         num_queries: int = 100, num_denoising: int = 50, decoder_points: int = 4, max_det: int = 100,
         learn_initial_query: bool = True) -> DinoDetHead:
    """DINO-style detector on the backbone's last ``levels`` maps. ``hidden``: encoder and decoder
    width (256 in the papers); ``num_denoising``: contrastive denoising queries per image while
    training (0 = off); ``num_queries``: object queries selected from the encoder memory;
    ``learn_initial_query``: learned content queries with selected anchors (DINO's mixed query
    selection) or, false, content from the selected memory as well (RT-DETR's default)."""
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    # a minimal RT-DETR ResNet config only so the library builds without downloading; its backbone is
    # discarded right after construction
    stub = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    cfg = RTDetrConfig(
        backbone_config=stub, num_labels=num_classes, d_model=hidden, encoder_hidden_dim=hidden,
        encoder_in_channels=[hidden] * levels, feat_strides=[2 ** (k + 3) for k in range(levels)],
        encode_proj_layers=[levels - 1], encoder_ffn_dim=encoder_ffn, encoder_attention_heads=heads,
        decoder_in_channels=[hidden] * levels, num_feature_levels=levels, decoder_layers=decoder_layers,
        decoder_ffn_dim=decoder_ffn, decoder_attention_heads=heads, decoder_n_points=decoder_points,
        num_queries=num_queries, num_denoising=num_denoising, learn_initial_query=learn_initial_query,
        anchor_image_size=None)
    return DinoDetHead(tuple(in_channels), num_classes, levels, cfg, max_det)
