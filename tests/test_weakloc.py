"""Weak localization (Grad-CAM boxes vs ground-truth boxes) on a real tiny classification run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, run_cli
from cxr_automl import config
from cxr_automl.train import run, weakloc


def test_boxes_from_heatmap_and_accuracy_known_answers():
    cam = np.zeros((20, 30), np.float32)
    cam[2:5, 3:9] = 1.0  # rows 2-4, cols 3-8
    cam[10:18, 20:25] = 0.8
    cam[0, 29] = 0.3  # below threshold
    boxes = weakloc.boxes_from_heatmap(cam, 0.5)
    assert sorted(map(tuple, boxes.tolist())) == [(3, 2, 9, 5), (20, 10, 25, 18)]
    acc = weakloc.accuracy_at([0.05, 0.25, 0.45, 0.65])
    assert acc["loc_acc@0.1"] == 0.75 and acc["loc_acc@0.3"] == 0.5 and acc["loc_acc@0.6"] == 0.25


def test_grad_cam_points_at_the_evidence():
    """Two feature channels, one seeing the top-left quadrant and one the rest; the logit reads only
    the first, so its gradient weight is the only non-zero one and the map lights up top-left only."""
    import torch
    from torch import nn

    from cxr_automl.plugin.interfaces import BackboneOutput, InputSpec
    from cxr_automl.train.model import CXRModel

    tl = torch.zeros(1, 1, 16, 16)
    tl[..., :8, :8] = 1

    class Split(nn.Module):
        input_spec = InputSpec(size=16, channels=1, mean=(0.0,), std=(1.0,))  # the adapter is the identity

        def forward(self, x):
            feats = torch.cat([x * tl, x * (1 - tl)], dim=1)
            return BackboneOutput(pooled=feats.mean((2, 3)), features=[feats])

    class FirstChannel(nn.Module):
        def forward(self, out):
            return out.features[-1][:, :1].mean((1, 2, 3))[:, None]

    model = CXRModel(Split(), FirstChannel(), in_channels=1)
    image = torch.rand(1, 16, 16) + 0.1
    cam = weakloc.grad_cam(model, image, 0)
    assert float(cam[8:, :].max()) == 0.0 and float(cam[:, 8:].max()) == 0.0
    assert float(cam.max()) == 1.0 and float(cam[:8, :8].min()) > 0
    box = weakloc.boxes_from_heatmap(cam.numpy(), 1e-6)
    assert box.tolist() == [[0, 0, 8, 8]]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cls") / "run"
    run.train(config.compose([*TINY, "strategy=finetune", "strategy.epochs=2"]), run_dir)
    return run_dir


def test_evaluate_reports_accuracy_per_delta_and_writes_overlays(trained_run):
    res = weakloc.evaluate(trained_run, split="test", overlays=2)
    for t in ("t0.235", "t0.706"):  # DiRA's two thresholds, both reported
        accs = [res.metrics[f"{t}/loc_acc@{d:.1f}"] for d in weakloc.DELTAS]
        assert res.n_boxes > 0 and all(0 <= a <= 1 for a in accs)
        assert accs == sorted(accs, reverse=True)  # a higher IoU bar never passes more boxes
        # the headline is the mean over the findings with boxes, not pooled over boxes
        for d in weakloc.DELTAS:
            key = f"{t}/loc_acc@{d:.1f}"
            assert res.metrics[key] == pytest.approx(np.mean([m[key] for m in res.per_class.values()]))
    assert len(res.overlays) == 2 and Image.open(res.overlays[0]).mode == "RGB"
    saved = json.loads((trained_run / "weakloc" / "weakloc.json").read_text())
    assert saved["n_boxes"] == res.n_boxes
    assert set(saved["per_class"]) <= {"nodule", "effusion", "cardiomegaly", "consolidation", "pneumothorax"}


def test_cli_evaluate_and_its_errors(trained_run, tmp_path):
    proc = run_cli("evaluate", str(trained_run), "--json", "--overlays", "0", cwd=tmp_path)
    assert json.loads(proc.stdout)["n_boxes"] > 0
    bad = run_cli("evaluate", str(tmp_path), cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "has no config.yaml" in bad.stderr
    bad = run_cli("evaluate", str(trained_run), "--cam-threshold", "1.5", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "cam_threshold" in bad.stderr
