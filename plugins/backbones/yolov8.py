"""``yolov8n`` / ``yolov8s`` / ``yolov8_tiny``: YOLOv8's own backbone, built by ultralytics from its model YAML.

ultralytics' ``parse_model`` builds the layers of its shipped ``yolov8.yaml`` at a scale (n, s, ... or
the toy ``tiny``) — no weights are downloaded. The layers are the CSP-Darknet backbone (P1..P5 + SPPF) and,
with ``neck=true`` (default), YOLOv8's PAN neck: everything of the detector except its ``Detect`` layer.
``features`` are P3, P4, P5 (strides 8, 16, 32): the neck's outputs (layers 15, 18, 21 — what YOLOv8's
``Detect`` reads) or, without the neck, the backbone's (layers 4, 6, 9). ``yolov8n`` + the ``yolov8``
head with ``head.width=null`` is YOLOv8n's backbone and neck under ultralytics' current ``Detect``, whose
classification branch is the lighter post-v8 one (ultralytics builds v8's own only with its class-wide
``Detect.legacy`` flag; for nc=5 that is 2.69 M parameters against 3.01 M). ``pooled`` is the mean of P5.

``weights``: a local ultralytics checkpoint (``yolov8n.pt`` as ``YOLO`` saves it, read with ultralytics'
weights-only loader) or a state-dict file; the ``Detect`` layer's keys are dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never reach for the network inside a run

import torch  # noqa: E402
from torch import nn  # noqa: E402
from ultralytics.nn.tasks import parse_model, torch_safe_load, yaml_model_load  # noqa: E402

from cxr_automl.plugin.interfaces import Backbone, BackboneOutput, InputSpec  # noqa: E402
from cxr_automl.plugin.weights import WeightsError, load_into  # noqa: E402

#: layer indices of P3, P4, P5 in ultralytics' yolov8.yaml, with and without the PAN neck
OUTPUTS = {True: (15, 18, 21), False: (4, 6, 9)}
#: [depth, width, max_channels] of the toy scale, next to the yaml's n/s/m/l/x
TINY_SCALE = [0.33, 0.125, 1024]


class YoloV8Backbone(Backbone):
    """ultralytics' layers run as its ``BaseModel._predict_once`` does (each layer reads the outputs its
    ``f`` index names); ``blocks()`` are the layers with parameters, in order."""

    num_feature_maps = 3

    def __init__(self, layers: nn.Sequential, outputs: tuple[int, ...], channels: tuple[int, ...], image_size: int):
        super().__init__()
        self.layers = layers
        self.outputs = outputs
        self.feature_channels = channels
        self.embed_dim = channels[-1]
        # YOLO takes RGB in [0, 1] without normalisation; any multiple of 32 works (640 as trained)
        self.input_spec = InputSpec(size=image_size, channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"YOLOv8 needs an input side that is a multiple of 32; got {tuple(x.shape[-2:])}")
        saved: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            if layer.f != -1:
                x = saved[layer.f] if isinstance(layer.f, int) else [x if j == -1 else saved[j] for j in layer.f]
            x = layer(x)
            saved[layer.i] = x
        feats = [saved[i] for i in self.outputs]
        return BackboneOutput(pooled=feats[-1].mean(dim=(2, 3)), features=feats, pooled_map=feats[-1])

    def stage_modules(self) -> Sequence[nn.Module]:
        return [self.layers[i] for i in self.outputs]

    def blocks(self) -> Sequence[nn.Module]:
        return [layer for layer in self.layers if any(True for _ in layer.parameters())]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """State dict of an ultralytics checkpoint (``{"model"|"ema": DetectionModel}``) or a plain file."""
    if path.suffix == ".pt":
        try:
            ckpt, _ = torch_safe_load(str(path), safe_only=True)
        except Exception:  # not an ultralytics checkpoint: a plain state dict, read by load_into
            ckpt = None
        model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
        if isinstance(model, nn.Module):
            return dict(model.float().state_dict())
    return {}


def _build(scale: str, neck: bool, weights: str | None, strict: bool, image_size: int) -> YoloV8Backbone:
    d = yaml_model_load("yolov8.yaml")  # the yaml ultralytics ships
    if scale == "tiny":
        d["scales"] = {**d["scales"], "tiny": TINY_SCALE}
    elif scale not in d["scales"]:
        raise ValueError(f"scale={scale!r} is not one of {', '.join(d['scales'])}, tiny")
    d["scale"] = scale
    last = OUTPUTS[neck][-1]
    layers_cfg = [*d["backbone"], *d["head"]][: last + 1]  # everything up to P5, never the Detect layer
    d["backbone"], d["head"] = layers_cfg[:10], layers_cfg[10:]
    layers, _ = parse_model(d, ch=3, verbose=False)
    channels = tuple(_out_channels(layers[i]) for i in OUTPUTS[neck])
    backbone = YoloV8Backbone(layers, OUTPUTS[neck], channels, image_size)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist; set backbone.weights=PATH to a local YOLOv8 "
                               "checkpoint (.pt as ultralytics saves it) or a state-dict file")
        state = _read_weights(path)
        if state:  # ultralytics keys are model.<layer>...; ours layers.<layer>...
            state = {"layers." + k[len("model."):]: v for k, v in state.items()
                     if k.startswith("model.") and int(k.split(".")[1]) <= last}
            try:
                missing, _ = backbone.load_state_dict(state, strict=strict)
            except RuntimeError as exc:  # shapes of another scale, or keys strict=true refuses
                first = str(exc).strip().splitlines()
                raise WeightsError(f"{path} does not fit YOLOv8 scale {scale!r}: "
                                   f"{' '.join(line.strip() for line in first[:2])}") from exc
            if missing:
                raise WeightsError(f"{path}: {len(missing)} backbone keys missing (e.g. {missing[0]}); is it a "
                                   f"YOLOv8{scale} checkpoint?")
        else:
            load_into(backbone, path, strict=strict, prefixes=("model.", "module."))
    return backbone


def _out_channels(layer: nn.Module) -> int:
    """Output channels of a C2f / SPPF (their output convolution is ``cv2``) or a plain Conv."""
    return getattr(layer, "cv2", layer).conv.out_channels


def yolov8n(weights: str | None = None, strict: bool = True, neck: bool = True,
            image_size: int = 640) -> YoloV8Backbone:
    """YOLOv8n's backbone (+ PAN neck): P3/P4/P5 of 64/128/256 channels; ``weights``: a local .pt."""
    return _build("n", neck, weights, strict, image_size)


def yolov8s(weights: str | None = None, strict: bool = True, neck: bool = True,
            image_size: int = 640) -> YoloV8Backbone:
    """YOLOv8s's backbone (+ PAN neck): P3/P4/P5 of 128/256/512 channels; ``weights``: a local .pt."""
    return _build("s", neck, weights, strict, image_size)


def yolov8_tiny(weights: str | None = None, strict: bool = True, neck: bool = True, image_size: int = 64
                ) -> YoloV8Backbone:
    """The same layers at a toy scale (depth 0.33, width 0.125: P3/P4/P5 of 32/64/128 channels): tests."""
    return _build("tiny", neck, weights, strict, image_size)
