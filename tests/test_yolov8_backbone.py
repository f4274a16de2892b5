"""YOLOv8's native backbone: the same layers as ultralytics' detector, loaded from its checkpoint format."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")

from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from cxr_automl.plugin.weights import WeightsError  # noqa: E402
from cxr_automl_plugins.backbones.yolov8 import yolov8_tiny, yolov8n  # noqa: E402


@pytest.mark.parametrize("neck,taps", [(True, [15, 18, 21]), (False, [4, 6, 9])])
def test_yolov8n_loads_an_ultralytics_checkpoint_and_matches_its_layers(tmp_path, neck, taps):
    torch.manual_seed(0)
    detector = DetectionModel("yolov8n.yaml", nc=5, verbose=False).eval()
    torch.save({"model": detector.half()}, tmp_path / "yolov8n.pt")  # as ultralytics saves: a half model
    detector.float()
    ours = yolov8n(weights=str(tmp_path / "yolov8n.pt"), neck=neck, image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        # ultralytics' own forward, pooled at the layers our P3/P4/P5 come from
        ref = torch.stack(detector._predict_once(x, embed=taps))
    got = torch.cat([f.mean(dim=(2, 3)) for f in out.features], dim=1)
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)  # the checkpoint holds fp16 weights
    assert ours.feature_channels == (64, 128, 256)
    assert [f.shape[-1] for f in out.features] == [8, 4, 2]  # strides 8, 16, 32


def test_yolov8_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        yolov8_tiny(weights=str(tmp_path / "nope.pt"))
    torch.manual_seed(0)
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=5, verbose=False)}, tmp_path / "n.pt")
    # a YOLOv8n checkpoint into the tiny scale
    with pytest.raises(WeightsError, match="does not fit YOLOv8 scale 'tiny'.*size mismatch"):
        yolov8_tiny(weights=str(tmp_path / "n.pt"))


def test_yolov8_blocks_and_input_size():
    bb = yolov8_tiny()
    assert len(bb.blocks()) == 16  # 22 layers up to P5, the 6 Upsample/Concat layers hold no parameters
    with pytest.raises(ValueError, match="multiple of 32"):
        bb(torch.rand(1, 3, 48, 48))
