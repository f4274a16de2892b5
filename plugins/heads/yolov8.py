"""``yolov8``: ultralytics' YOLOv8 ``Detect`` head and ``v8DetectionLoss`` on any backbone's maps.

The head takes the backbone's coarsest ``levels`` maps (strides 8/16/32 on a ResNet or Swin), projects
each to ``width`` channels with ultralytics' ``Conv`` (so a 768-channel ViT pyramid does not make the
head huge), and runs YOLOv8's anchor-free, DFL box head. The loss is ultralytics' own (task-aligned
assignment, CIoU + DFL + BCE with its default gains). Each level's stride is the backbone input size over
the map size, so any backbone works without declaring strides. Boxes leave ``predict`` as xyxy in
[0, 1] after ultralytics' NMS.

``weights``: an ultralytics checkpoint (e.g. the ``yolov8n.pt`` given as ``backbone.weights``) whose
``Detect`` layer initialises this head's wherever the shapes match (``width=null`` on the same scale's
backbone and the same classes: all of it). The checkpoint decides which classification branch is built:
YOLOv8's own (3×3 convs, ultralytics' ``legacy``) or the lighter later one; without weights the later one.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# ultralytics must never reach for the network (settings sync, fonts, update checks) inside a run
os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.ops import box_convert  # noqa: E402
from ultralytics.nn.modules import Conv, Detect  # noqa: E402
from ultralytics.utils.loss import v8DetectionLoss  # noqa: E402
from ultralytics.utils.nms import non_max_suppression  # noqa: E402

from cxr_automl.plugin.interfaces import BackboneOutput, Head, HeadSpec, declare_head  # noqa: E402
from cxr_automl.plugin.targets import check_boxes  # noqa: E402
from cxr_automl.plugin.weights import WeightsError  # noqa: E402
from cxr_automl_plugins.backbones.yolov8 import _read_weights  # noqa: E402

log = logging.getLogger(__name__)


# ultralytics' parse_model sets Detect.legacy class-wide for whatever model it last built; these fix it
class _V8Detect(Detect):
    legacy = True  # YOLOv8's own classification branch, as in yolov8*.pt


class _LightDetect(Detect):
    legacy = False  # the lighter depthwise branch of ultralytics' later models


def _checkpoint_detect(path: Path) -> dict[str, torch.Tensor]:
    """The ``Detect`` layer's tensors of an ultralytics checkpoint, keyed as in a ``Detect``."""
    if not path.is_file():
        raise WeightsError(f"head.weights={path} does not exist; give a local ultralytics checkpoint (.pt)")
    state = _read_weights(path)
    layers = [int(k.split(".")[1]) for k in state if k.startswith("model.") and k.split(".")[1].isdigit()]
    if not layers:
        raise WeightsError(f"head.weights={path} is not an ultralytics detection checkpoint (no model.<layer> keys)")
    prefix = f"model.{max(layers)}."  # Detect is a detector's last layer
    detect = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("cv2.") for k in detect):
        raise WeightsError(f"head.weights={path}: its last layer is not a YOLO Detect layer")
    return detect


class YoloV8Head(Head):
    """``model`` is a ``ModuleList`` ending in ``Detect`` — ultralytics' own layout, which is what its
    loss reads (``model.model[-1]``, ``model.args``), so the loss is used unchanged."""

    spec = HeadSpec(task="detection", feature_maps=lambda cfg: max(1, int(cfg["levels"])))  # the last `levels`

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, levels: int, width: int | None,
                 reg_max: int, box: float, cls: float, dfl: float, conf: float, iou: float, max_det: int,
                 weights: str | None = None):
        super().__init__()
        if not 1 <= levels <= len(in_channels):
            raise ValueError(f"levels={levels} but the backbone gives {len(in_channels)} feature maps")
        chans = list(in_channels[-levels:])
        self.levels, self.num_classes = levels, num_classes
        self.proj = nn.ModuleList([Conv(c, width, 1) for c in chans]) if width else None
        theirs = _checkpoint_detect(Path(weights).expanduser()) if weights else None
        legacy = theirs is not None and "cv3.0.0.conv.weight" in theirs  # v8's branch: Conv, not DWConv
        detect = (_V8Detect if legacy else _LightDetect)(nc=num_classes, reg_max=reg_max,
                                                          ch=tuple([width] * levels if width else chans))
        # nominal strides for the prior of the class bias (as ultralytics does after building a model);
        # the real strides are measured on every forward
        detect.stride = torch.tensor([2.0 ** (k + 3) for k in range(levels)])
        detect.bias_init()
        if theirs is not None:
            self.loaded = _load_matching(detect, theirs, weights)
        self.model = nn.ModuleList([detect])
        self.args = SimpleNamespace(box=box, cls=cls, dfl=dfl)  # the loss gains ultralytics reads
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self._criterion: v8DetectionLoss | None = None

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    def forward(self, feats: BackboneOutput) -> dict[str, Any]:
        if feats.input_size is None:
            raise ValueError("the yolov8 head needs BackboneOutput.input_size (set by CXRModel)")
        x = [f.contiguous() for f in feats.features[-self.levels:]]
        if self.proj is not None:
            x = [p(f) for p, f in zip(self.proj, x)]
        # where ultralytics keeps it: a plain attribute (not a buffer), so on the CPU whatever the device
        stride = self.detect.stride.new_tensor([feats.input_size[0] / f.shape[-2] for f in x])
        if not torch.equal(stride, self.detect.stride):
            self.detect.stride = stride
            self._criterion = None  # the loss captured the strides it was built with
        preds = self.detect.forward_head(x, **self.detect.one2many)
        preds["input_size"] = feats.input_size
        return preds

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any],
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self._criterion is None:
            self._criterion = v8DetectionLoss(self)
        crit = self._criterion
        crit.class_weights = None if class_weights is None else class_weights.to(crit.device).view(1, 1, -1)
        h, w = batch["image"].shape[-2:]
        targets = check_boxes(batch, self.num_classes)
        boxes = torch.cat([t["boxes"] for t in targets])  # on the CPU; ultralytics moves them to the device
        boxes = boxes / boxes.new_tensor([w, h, w, h])
        xywh = box_convert(boxes, "xyxy", "cxcywh")  # ultralytics' normalised centre-xywh targets
        yolo_batch = {"batch_idx": torch.cat([torch.full((len(t["labels"]),), i, dtype=torch.float32, device="cpu")
                                              for i, t in enumerate(targets)]),
                      "cls": torch.cat([t["labels"] for t in targets]).float(), "bboxes": xywh}
        n = outputs["scores"].shape[0]
        with torch.autocast(outputs["scores"].device.type, enabled=False):
            preds = {k: outputs[k].float() if k != "feats" else [f.float() for f in outputs[k]]
                     for k in ("boxes", "scores", "feats")}
            total, _ = crit(preds, yolo_batch)
        # ultralytics returns the gained components times the batch size; the loop wants a per-image mean
        return total.sum() / n

    @torch.no_grad()
    def predict(self, outputs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        raw = {k: outputs[k].float() if k != "feats" else [f.float() for f in outputs[k]]
               for k in ("boxes", "scores", "feats")}
        decoded = self.detect._inference(raw)  # (N, 4 + C, anchors): xywh pixels of the backbone input
        kept = non_max_suppression(decoded, conf_thres=self.conf, iou_thres=self.iou, max_det=self.max_det,
                                   nc=self.num_classes)
        h, w = outputs["input_size"]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=decoded.device)
        return [{"boxes": (k[:, :4] / scale).clamp(0, 1), "scores": k[:, 4], "labels": k[:, 5].long()}
                for k in kept]


def _load_matching(detect: Detect, theirs: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy the checkpoint's tensors whose name and shape match; returns the names copied."""
    ours = detect.state_dict()
    fit = {k: v for k, v in theirs.items() if k in ours and tuple(ours[k].shape) == tuple(v.shape)}
    if not fit:
        raise WeightsError(f"head.weights={source}: no Detect tensor fits this head (channels "
                           f"{[m[0].conv.in_channels for m in detect.cv2]}); use head.width=null on the "
                           "checkpoint's own backbone scale")
    detect.load_state_dict({k: v.to(ours[k].dtype) for k, v in fit.items()}, strict=False)
    skipped = sorted(k for k in ours if k not in fit)
    if skipped:
        log.warning("head.weights=%s: loaded %d of %d Detect tensors; shapes differ for %d (e.g. %s: other "
                    "classes or channels), left as initialised", source, len(fit), len(ours), len(skipped),
                    skipped[0])
    return sorted(fit)


@declare_head(YoloV8Head.spec)
def yolov8(in_channels: tuple[int, ...], num_classes: int, levels: int = 3, width: int | None = 128,
           reg_max: int = 16, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5, conf: float = 0.001,
           iou: float = 0.7, max_det: int = 100, weights: str | None = None) -> YoloV8Head:
    """YOLOv8 detection on the backbone's last ``levels`` maps. ``width``: channels each map is projected
    to (null = none); ``box``/``cls``/``dfl``: ultralytics' loss gains; ``conf``/``iou``/``max_det``: NMS
    at evaluation (a low ``conf`` as in ultralytics' validation, so mAP sees the whole ranking);
    ``weights``: an ultralytics checkpoint whose Detect layer initialises this one where shapes match."""
    if not math.isfinite(conf) or not 0 <= conf < 1:
        raise ValueError(f"conf={conf} must be in [0, 1)")
    return YoloV8Head(tuple(in_channels), num_classes, levels, width, reg_max, box, cls, dfl, conf, iou, max_det,
                      weights)
