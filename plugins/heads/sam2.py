"""``sam2``: box-prompted segmentation with SAM2's prompt encoder and mask decoder (transformers).

SAM2's mask decoder reads an image embedding at stride 16 and two high-resolution maps at strides 4 and
8 (each exactly 2× the next). On our backbones these are three consecutive maps of
``BackboneOutput.features`` ending at ``embed_level`` (default 2: the stride-16 map of ResNet, Swin and
Hiera; 1× the patch grid of the RAD-DINO pyramid; P5 of the 3-map YOLOv8 backbone, with P3/P4 as the
high-resolution maps), each projected by a 1×1 convolution to the decoder's ``hidden`` channels (the
role SAM2's FPN neck plays), then through the decoder's own ``conv_s0``/``conv_s1``. Image-wide position
encodings are computed for whatever grid the backbone gives, so any input size works.

**Prompts.** One box prompt per image and class — the decoder predicts one mask per prompt
(``multimask_output=False``) — plus a learned token per class appended to the box's sparse embedding,
so prompts of overlapping structures (heart and lungs) are told apart. Where the box comes from
(``prompt``):

- ``mask_box`` (default, SAM/MedSAM's box-prompted protocol): the tight bounding box of the class's
  ground-truth mask. At training time each coordinate is jittered by up to ``box_jitter`` × the box's
  side (SAM's box noise); at evaluation the exact box, no jitter. **What evaluation reveals of the ground
  truth**: per image and class, that box — and so whether the class is present; a class with an empty
  mask gets no prompt and an all-zero prediction. Nothing else of the mask reaches the model. Scores are
  therefore box-prompted Dice/IoU, not comparable with fully automatic segmentation.
- ``image_box``: every class is prompted with the whole-image box: no ground truth at evaluation at all
  (the masks are only read for their size). The class token tells the decoder what to segment and
  SAM2's object-score head decides presence (SAM2's rule: score ≤ 0 → empty mask).

The dataset's detection ``boxes`` are not used: on ``synthetic_cxr`` they box *findings*, while the
segmentation classes are structures (heart, lungs, lesions).

**Loss** (per prompted image-class pair, masks compared at the image's resolution): focal loss
(torchvision's ``sigmoid_focal_loss``) × ``focal_weight`` + soft Dice × ``dice_weight`` — the focal + Dice
of SPFT's segmentation recipe, 1:1 by default (SAM trains at 20:1 for far longer; on a short CPU schedule
20:1 kept every prediction below 0.5 for the first ~50 steps of a one-batch overfit, 1:1 did not) — plus
SAM2's auxiliary terms: MSE of the predicted
IoU against the mask's actual IoU (× ``iou_weight``) and BCE of the object score against "mask not empty"
(× ``obj_weight``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss
from transformers import Sam2MaskDecoderConfig, Sam2PromptEncoderConfig
from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder, Sam2PromptEncoder

from cxr_automl.plugin.interfaces import BackboneOutput, Head, HeadSpec, declare_head
from cxr_automl.plugin.targets import check_masks, soft_dice_loss
from cxr_automl.plugin.targets import mask_boxes as pixel_mask_boxes
from cxr_automl.plugin.weights import WeightsError

PROMPTS = ("mask_box", "image_box")
DEFAULT_EMBED_LEVEL = 2


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of (N, C, H, W) 0/1 masks as (N, C, 4) xyxy normalised to [0, 1] (x1, y1 exclusive),
    and (N, C) whether each mask is non-empty; an empty mask's box is the whole image."""
    h, w = masks.shape[-2:]
    boxes, present = pixel_mask_boxes(masks)
    boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32, device=masks.device)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
    return torch.where(present[..., None], boxes, whole), present


class Sam2SegHead(Head):
    """Backbone maps → projected SAM2 image features (``forward``); box prompts from the batch → masks
    (``loss`` and ``predict``, the only places that see the batch)."""

    #: maps 0..embed_level (at least 3); ``predict`` needs the batch: the box prompts come from it
    spec = HeadSpec(task="segmentation", feature_maps=lambda cfg: max(3, int(cfg["embed_level"]) + 1),
                    predict_needs_batch=True)

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, embed_level: int, hidden: int,
                 decoder_layers: int, heads: int, mlp_dim: int, prompt: str, box_jitter: float,
                 focal_weight: float, dice_weight: float, iou_weight: float, obj_weight: float,
                 focal_alpha: float, focal_gamma: float):
        super().__init__()
        self.num_classes, self.embed_level, self.prompt = num_classes, embed_level, prompt
        self.box_jitter = box_jitter
        self.weights = {"focal": focal_weight, "dice": dice_weight, "iou": iou_weight, "obj": obj_weight}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        chans = in_channels[embed_level - 2: embed_level + 1]  # stride-4-like, stride-8-like, embedding
        self.proj = nn.ModuleList([nn.Conv2d(c, hidden, kernel_size=1) for c in chans])
        self.prompt_encoder = Sam2PromptEncoder(Sam2PromptEncoderConfig(hidden_size=hidden))
        # mask prompts are never given (at evaluation they would be the ground truth): drop their encoder
        del self.prompt_encoder.mask_embed
        dec_cfg = Sam2MaskDecoderConfig(hidden_size=hidden, num_hidden_layers=decoder_layers,
                                        num_attention_heads=heads, mlp_dim=mlp_dim, iou_head_hidden_dim=hidden,
                                        dynamic_multimask_via_stability=False)
        dec_cfg._attn_implementation = "sdpa"  # Sam2Model sets this on its decoder's config; so do we
        self.mask_decoder = Sam2MaskDecoder(dec_cfg)
        self.class_token = nn.Embedding(num_classes, hidden)

    def forward(self, feats: BackboneOutput) -> dict[str, torch.Tensor]:
        maps = feats.features[self.embed_level - 2: self.embed_level + 1]
        s0, s1, embed = (p(m.contiguous()) for p, m in zip(self.proj, maps))
        h, w = embed.shape[-2:]
        if tuple(s1.shape[-2:]) != (2 * h, 2 * w) or tuple(s0.shape[-2:]) != (4 * h, 4 * w):
            raise ValueError(
                f"sam2 head: maps {embed_level_sizes(maps)} at embed_level={self.embed_level} are not 4x, 2x, 1x "
                "the embedding's size, as SAM2's mask decoder needs; choose another head.embed_level or backbone")
        return {"embed": embed, "s0": self.mask_decoder.conv_s0(s0), "s1": self.mask_decoder.conv_s1(s1)}

    # ---------------------------------------------------------------------------------------- prompts
    def prompts(self, batch: dict[str, Any], device: torch.device, train: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, 4) boxes in [0, 1], (N, C) prompted pairs and (N, C, H, W) masks of the batch."""
        masks = check_masks(batch, self.num_classes).to(device)
        boxes, present = mask_boxes(masks)
        if self.prompt == "image_box":
            return torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).expand_as(boxes), \
                torch.ones_like(present), masks
        if train and self.box_jitter > 0:
            side = (boxes[..., 2:] - boxes[..., :2]).repeat(1, 1, 2)
            boxes = (boxes + (torch.rand_like(boxes) * 2 - 1) * self.box_jitter * side).clamp(0, 1)
        return boxes, present, masks

    def decode(self, outputs: dict[str, torch.Tensor], boxes: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask logits (N, C, 4h, 4w), predicted IoU (N, C) and object-score logits (N, C)."""
        embed = outputs["embed"]
        n, _, h, w = embed.shape
        size = self.prompt_encoder.input_image_size  # box prompts are in pixels of SAM2's 1024 px frame
        sparse, _ = self.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes.to(embed) * size,
                                        input_masks=None)
        token = self.class_token.weight[None, :, None, :].expand(n, -1, -1, -1)
        sparse = torch.cat([sparse, token.to(sparse)], dim=2)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        masks, iou, _, obj = self.mask_decoder(
            image_embeddings=embed, image_positional_embeddings=self._grid_encoding(h, w, embed).expand(n, -1, -1, -1),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            high_resolution_features=[outputs["s0"], outputs["s1"]])
        return masks[:, :, 0], iou[:, :, 0], obj[:, :, 0]

    def _grid_encoding(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """SAM2's image-wide positional encoding (cell centres in [0, 1]) for an h×w grid, through the
        prompt encoder's own random-Fourier encoding so boxes and image share one coordinate system."""
        ys = (torch.arange(h, device=like.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=like.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self.prompt_encoder.shared_embedding(grid).permute(2, 0, 1).unsqueeze(0).to(like.dtype)

    # ---------------------------------------------------------------------------------- loss, predict
    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any],
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        embed = outputs["embed"]
        boxes, prompted, masks = self.prompts(batch, embed.device, train=True)
        logits, iou_pred, obj = self.decode(outputs, boxes)
        with torch.autocast(embed.device.type, enabled=False):
            logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
            target = masks.float()
            focal = sigmoid_focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                       reduction="none").mean(dim=(2, 3))
            dice = soft_dice_loss(logits.sigmoid(), target, dims=(2, 3))  # per image-class pair
            hard = (logits > 0).float()
            hard_inter = (hard * target).sum(dim=(2, 3))
            true_iou = hard_inter / (hard.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) - hard_inter).clamp_min(1)
            iou = (iou_pred.float() - true_iou.detach()) ** 2
            obj_loss = F.binary_cross_entropy_with_logits(obj.float(), target.flatten(2).amax(-1), reduction="none")
            # mask terms only where the class has a mask and a prompt; presence is learned on every prompted pair
            has_mask = prompted & (target.flatten(2).amax(-1) > 0)
            per_pair = {"focal": focal, "dice": dice, "iou": iou, "obj": obj_loss}
            select = {"focal": has_mask, "dice": has_mask, "iou": has_mask, "obj": prompted}
            weight = (torch.ones(self.num_classes, device=embed.device) if class_weights is None
                      else class_weights.to(embed.device).float())[None].expand_as(focal)
            total = logits.sum() * 0  # keeps the graph when a batch has no prompted pair
            for name, value in per_pair.items():
                sel = select[name]
                if sel.any() and self.weights[name]:
                    total = total + self.weights[name] * (value[sel] * weight[sel]).sum() / weight[sel].sum()
        return total

    @torch.no_grad()
    def predict(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any] | None = None) -> torch.Tensor:
        if batch is None:
            raise ValueError("the sam2 head is box-prompted: predict(outputs, batch) needs the batch, whose masks "
                             "give the prompts (cxr_automl.plugin.interfaces.predict passes it)")
        boxes, prompted, _ = self.prompts(batch, outputs["embed"].device, train=False)
        logits, _, obj = self.decode(outputs, boxes)
        probs = logits.float().sigmoid() * prompted[..., None, None]
        if self.prompt == "image_box":  # nothing says the class is there: SAM2's object score decides
            probs = probs * (obj > 0)[..., None, None]
        return probs


def embed_level_sizes(maps: list[torch.Tensor]) -> str:
    return "x".join(str(tuple(m.shape[-2:])) for m in maps)


@declare_head(Sam2SegHead.spec)
def sam2(in_channels: tuple[int, ...], num_classes: int, embed_level: int = DEFAULT_EMBED_LEVEL, hidden: int = 256,
         decoder_layers: int = 2, heads: int = 8, mlp_dim: int = 2048, prompt: str = "mask_box",
         box_jitter: float = 0.1, focal_weight: float = 1.0, dice_weight: float = 1.0, iou_weight: float = 1.0,
         obj_weight: float = 1.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
         weights: str | None = None) -> Sam2SegHead:
    """SAM2 prompt encoder + mask decoder, box-prompted (``prompt``: mask_box | image_box; see the module
    docstring for what each reveals at evaluation). ``embed_level``: index of the backbone map used as the
    image embedding, the two maps before it being the 4× and 2× high-resolution ones; ``hidden``,
    ``decoder_layers``, ``heads``, ``mlp_dim``: the decoder's size (SAM2's: 256, 2, 8, 2048);
    ``box_jitter``: training-time box noise as a fraction of the box side; ``weights``: a SAM2 checkpoint
    (HF id from the cache, e.g. facebook/sam2.1-hiera-tiny, or a save_pretrained directory) whose prompt
    encoder and mask decoder are loaded — the projections and class tokens stay newly initialised."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt={prompt!r} is not one of {', '.join(PROMPTS)}")
    if not 2 <= embed_level < len(in_channels):
        raise ValueError(f"embed_level={embed_level} needs maps {embed_level - 2}..{embed_level} but the backbone "
                         f"gives {len(in_channels)} (indices 0..{len(in_channels) - 1}); use 2..{len(in_channels) - 1}")
    if hidden % 8 or (hidden // 2) % heads:  # cross-attention runs at hidden/2 channels split over heads
        raise ValueError(f"hidden={hidden} must be a multiple of 8, and hidden/2 a multiple of heads={heads}")
    if not 0 <= box_jitter < 1:
        raise ValueError(f"box_jitter={box_jitter} must be in [0, 1)")
    ref = None
    if weights:
        from cxr_automl_plugins.backbones.hiera import sam2_model
        ref = sam2_model(weights, "head.weights")
        dec = ref.config.mask_decoder_config
        theirs = {"hidden": dec.hidden_size, "decoder_layers": dec.num_hidden_layers, "heads": dec.num_attention_heads,
                  "mlp_dim": dec.mlp_dim}
        ours = {"hidden": hidden, "decoder_layers": decoder_layers, "heads": heads, "mlp_dim": mlp_dim}
        if theirs != ours:
            raise WeightsError(f"head.weights={weights!r} has a mask decoder of "
                               f"{', '.join(f'{k}={v}' for k, v in theirs.items())}; set "
                               f"{' '.join(f'head.{k}={v}' for k, v in theirs.items() if ours[k] != v)}")
    head = Sam2SegHead(tuple(in_channels), num_classes, embed_level, hidden, decoder_layers, heads, mlp_dim, prompt,
                       box_jitter, focal_weight, dice_weight, iou_weight, obj_weight, focal_alpha, focal_gamma)
    if ref is not None:  # SAM2's trained prompt encoder (its mask-prompt part dropped) and mask decoder
        head.prompt_encoder.load_state_dict({k: v for k, v in ref.prompt_encoder.state_dict().items()
                                             if not k.startswith("mask_embed.")})
        head.mask_decoder.load_state_dict(ref.mask_decoder.state_dict())
    return head
