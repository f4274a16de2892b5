"""Known answers for the paper-audit fixes (issue 18): Dice conventions, detection P/R with duplicates,
DiRA's two weak-localization thresholds, MLVICX bottlenecks per backbone, SPFT class weights, detectors."""

from __future__ import annotations

import math

import pytest
import torch

from cxr_automl.train.evaluators import DetectionEvaluator, SegmentationEvaluator


# ------------------------------------------------------------------------------------------- Dice (item 5)
def _seg_batch():
    """Four 8x8 images, classes a and b; b is absent from every mask and prediction.
    a: img0 exact (Dice 1), img1 prediction only (0), img2 mask only (0), img3 neither (SIIM: 1)."""
    masks = torch.zeros(4, 2, 8, 8, dtype=torch.long)
    probs = torch.zeros(4, 2, 8, 8)
    masks[0, 0, :2, :2] = 1
    probs[0, 0, :2, :2] = 0.9
    probs[1, 0, 0, :2] = 0.9
    masks[2, 0, 4:6, 4:6] = 1
    return probs, {"masks": masks, "image": torch.zeros(4, 1, 8, 8), "image_id": list("wxyz")}


def test_dice_pooled_and_per_image_known_answers():
    probs, batch = _seg_batch()
    ev = SegmentationEvaluator(["a", "b"])
    ev.update(probs, batch)
    m = ev.compute("val")
    # pooled over the split: TP 4, FP 2, FN 4 -> 2*4 / (2*4 + 2 + 4)
    assert m["val/dice/a"] == pytest.approx(8 / 14)
    # b has no Dice pooled over the split: left out, and the mean is still a number
    assert "val/dice/b" not in m and m["val/mean_dice"] == pytest.approx(8 / 14)
    assert m["val/mean_iou"] == pytest.approx(4 / 10)
    # per image with SIIM's empty-empty = 1: a (1 + 0 + 0 + 1) / 4, b 1 everywhere
    assert m["val/dice_per_image/a"] == pytest.approx(0.5)
    assert m["val/dice_per_image/b"] == pytest.approx(1.0)
    assert m["val/mean_dice_per_image"] == pytest.approx(0.75)
    assert not any(math.isnan(v) for v in m.values())


# ----------------------------------------------------------------------------------- detection P/R (item 5)
def _det_batch():
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 40.0, 60.0, 60.0]])]
    return {"image": torch.zeros(1, 1, 64, 64), "boxes": boxes, "box_labels": [torch.tensor([0, 0])],
            "image_id": ["img0"]}


def test_duplicate_boxes_count_once_in_precision_and_recall():
    batch = _det_batch()
    dup = torch.tensor([[8.0, 8.0, 24.0, 24.0]]).repeat(5, 1) / 64  # five copies of the first box
    pred = {"boxes": dup, "scores": torch.full((5,), 0.9), "labels": torch.zeros(5, dtype=torch.long)}
    ev = DetectionEvaluator(["x"])
    ev.update([pred], batch)
    m = ev.compute("test")
    assert m["test/precision_50"] == pytest.approx(1 / 5)  # one true positive, four duplicates
    assert m["test/recall_50"] == pytest.approx(1 / 2)  # the second box is missed


def test_precision_recall_score_threshold_and_class():
    batch = _det_batch()
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 4.0, 4.0]]) / 64
    # second box right place but below the score threshold; third a confident false positive
    pred = {"boxes": boxes, "scores": torch.tensor([0.9, 0.3, 0.8]), "labels": torch.tensor([0, 0, 0])}
    ev = DetectionEvaluator(["x", "y"])
    ev.update([pred], batch)
    m = ev.compute("test")
    assert m["test/precision_50"] == pytest.approx(1 / 2) and m["test/recall_50"] == pytest.approx(1 / 2)
    wrong_class = {"boxes": boxes[:1], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    ev = DetectionEvaluator(["x", "y"])
    ev.update([wrong_class], batch)
    m = ev.compute("test")
    assert m["test/precision_50"] == 0.0 and m["test/recall_50"] == 0.0


# ------------------------------------------------------------------------------ weak localization (item 2)
def _classifier(backbone: str, num_classes: int = 3):
    from cxr_automl.plugin import registry
    from cxr_automl.train.model import CXRModel
    torch.manual_seed(0)
    bb = registry.build("backbone", backbone)
    head = registry.build("head", "linear", supplied={"in_dim": bb.embed_dim, "in_channels": bb.feature_channels,
                                                      "num_classes": num_classes})
    return CXRModel(bb, head, in_channels=1).eval()


@pytest.mark.parametrize("backbone", ["resnet_tiny", "rad_dino_tiny", "swin_tiny", "hiera_tiny"])
def test_grad_cam_on_every_backbone_family(backbone):
    from cxr_automl.train import weakloc
    model = _classifier(backbone)
    image = torch.rand(1, 64, 64)
    # the map is ReLU'd: at random weights some classes see no positive evidence (an all-zero map)
    cams = [weakloc.grad_cam(model, image, c) for c in range(3)]
    assert all(cam.shape == (64, 64) and torch.isfinite(cam).all() and float(cam.min()) >= 0 for cam in cams)
    assert any(float(cam.max()) == pytest.approx(1.0) for cam in cams)


def test_grad_cam_of_the_pooled_embedding_is_classic_grad_cam():
    """On ResNet the pooled embedding is the mean of features[-1]: the pooled-gradient route must give
    exactly the classic Grad-CAM over that map."""
    import torch.nn.functional as F

    from cxr_automl.train import weakloc
    model = _classifier("resnet_tiny")
    image = torch.rand(1, 64, 64)
    x = image[None].clone().requires_grad_(True)
    out = model.features(x)
    (g,) = torch.autograd.grad(model.head(out)[0, 2], out.features[-1])
    classic = F.relu((g.mean((2, 3), keepdim=True) * out.features[-1]).sum(1, keepdim=True))
    classic = F.interpolate(classic, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    classic = (classic - classic.min()) / (classic.max() - classic.min())
    assert torch.allclose(weakloc.grad_cam(model, image, 2), classic.detach(), atol=1e-5)


def test_dira_thresholds_are_60_and_180_of_255():
    import numpy as np

    from cxr_automl.train import weakloc
    assert weakloc.DIRA_THRESHOLDS == pytest.approx((0.235, 0.706), abs=5e-4)
    cam = np.zeros((32, 32), np.float32)
    cam[2:6, 2:6] = 0.5  # between 60/255 and 180/255: a box at 60, none at 180
    cam[20:30, 10:14] = 1.0
    cam[0, 31] = 0.2  # below 60/255
    low, high = (sorted(map(tuple, weakloc.boxes_from_heatmap(cam, t).tolist())) for t in weakloc.DIRA_THRESHOLDS)
    assert low == [(2, 2, 6, 6), (10, 20, 14, 30)]
    assert high == [(10, 20, 14, 30)]


# ------------------------------------------------------------------------------------------ MLVICX (item 1)
def _mlvicx_trainer(tmp_path, *overrides):
    from conftest import TINY
    from cxr_automl import config
    from cxr_automl.train.loop import Trainer
    cfg = config.compose([*TINY, "dataset.n_train=32", "dataset.n_val=16", "dataset.n_test=16", "strategy=mlvicx",
                          "strategy.expander_dim=32", "strategy.downstream_epochs=2", "strategy.epochs=2",
                          *overrides])
    return Trainer(cfg, tmp_path)


@pytest.mark.parametrize("backbone,stages", [("resnet18", 4), ("resnet_tiny", 4), ("swin_tiny", 4),
                                             ("yolov8_tiny", 3)])
def test_mlvicx_refines_every_stage_of_each_backbone(backbone, stages):
    """Paper Fig. 1 / public code: a context bottleneck after every encoder stage, the last included."""
    from cxr_automl.plugin import registry
    from cxr_automl.train.model import CXRModel
    from cxr_automl_plugins.datasets.synthetic_cxr import synthetic_cxr
    bb = registry.build("backbone", backbone)
    head = registry.build("head", "linear", supplied={"in_dim": bb.embed_dim, "in_channels": bb.feature_channels,
                                                      "num_classes": 5})
    model = CXRModel(bb, head, in_channels=1)
    strategy = registry.build("strategy", "mlvicx", expander_dim=16)
    strategy.setup(model, synthetic_cxr(n_train=8, n_val=4, n_test=4, image_size=64, augment=False))
    assert len(model.mlvicx.bottlenecks) == stages == len(bb.feature_channels)
    assert model.mlvicx.levels == list(range(stages))


def test_mlvicx_local_only_arm_trains_the_last_stage_and_y_is_refined(tmp_path):
    trainer = _mlvicx_trainer(tmp_path, "strategy.loss_terms=local")
    model, strategy = trainer.model, trainer.strategy
    model.train()
    strategy.loss(model, strategy.forward(model, torch.rand(8, 1, 64, 64), {}), {}).backward()
    last = model.backbone.stage_modules()[-1]
    # every parameter is in the graph; some gradients are exactly 0 on this first step only because timm
    # zero-initialises each residual branch's last BatchNorm
    assert all(p.grad is not None for p in last.parameters())
    assert sum(float(p.grad.abs().sum()) for p in last.parameters()) > 0
    # y (the global embedding) is pooled from the refined last stage
    model.eval()
    x = model.adapter(torch.rand(2, 1, 64, 64))
    refined: list[torch.Tensor] = []
    with strategy._refining(model, refined):
        y = model.backbone(x).pooled
    assert len(refined) == 4 and torch.allclose(y, refined[-1].mean(dim=(2, 3)))


def test_mlvicx_lars_schedule_is_the_public_codes(tmp_path):
    from cxr_automl.plugin import registry
    from cxr_automl_plugins.strategies.mlvicx_parts import WarmupLars
    s = registry.build("strategy", "mlvicx")
    assert s.lr == pytest.approx(0.2 * 64 / 256) and s.weight_decay == 1e-6 and s.warmup_epochs == 2
    assert registry.build("strategy", "mlvicx", batch_size=128).lr == pytest.approx(0.1)
    assert registry.build("strategy", "mlvicx", lr=3e-5).lr == 3e-5  # the paper's text, on request
    trainer = _mlvicx_trainer(tmp_path, "trainer.batch_size=8")
    assert trainer.strategy.lr == pytest.approx(0.2 * 8 / 256)  # strategy.batch_size follows the trainer's
    assert isinstance(trainer.optimizer, WarmupLars) and trainer.optimizer.warmup_steps == 2 * (32 // 8)
    # warm-up known answer: no weight decay (so no LARS trust scaling), no momentum, gradient 1
    p = torch.nn.Parameter(torch.zeros(1))
    opt = WarmupLars([p], warmup_steps=4, lr=1.0, momentum=0.0, weight_decay=0.0)
    steps = []
    for _ in range(6):
        before = float(p.detach())
        p.grad = torch.ones(1)
        opt.step()
        steps.append(before - float(p.detach()))
    assert steps == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert opt.param_groups[0]["lr"] == 1.0 and opt.state_dict()["param_groups"][0]["warmup_done"] == 4


def test_vicreg_variance_is_halved_as_in_vicregs_code():
    from cxr_automl_plugins.strategies.mlvicx_parts import variance, vicreg
    z1 = torch.tensor([[0.0, 0.0], [0.1, 0.2], [0.0, 0.1]])
    z2 = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    both = variance(z1) + variance(z2)
    assert vicreg(z1, z2, 25, 25, 1)["var"] == pytest.approx(float(both) / 2)
    assert vicreg(z1, z2, 25, 25, 1, halve_variance=False)["var"] == pytest.approx(float(both))


def test_downstream_early_stopping_keeps_the_best_epoch(tmp_path, monkeypatch):
    from cxr_automl_plugins.strategies import downstream as ds_mod
    trainer = _mlvicx_trainer(tmp_path)
    scores = iter([0.6, 0.7, 0.65, 0.64, 0.9, 0.9, 0.9, 0.9])
    seen: list[dict[str, torch.Tensor]] = []

    def fake_auc(probs, labels, class_names):
        seen.append(None)
        return next(scores)

    monkeypatch.setattr(ds_mod, "_macro_auc", fake_auc)
    states = []
    real_update = ds_mod._EarlyStop.update

    def spy(self, score, module):
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        return real_update(self, score, module)

    monkeypatch.setattr(ds_mod._EarlyStop, "update", spy)
    for protocol in ("probe", "finetune"):
        seen.clear(), states.clear()
        scores = iter([0.6, 0.7, 0.65, 0.64, 0.9, 0.9, 0.9, 0.9])
        down = ds_mod.Downstream(protocol=protocol, epochs=8, patience=2, batch_size=16)
        clone = down.fit(trainer.model, trainer.data, trainer.train_step, seed=0, drop=("mlvicx",))
        assert len(seen) == 4  # 0.7 at epoch 2, then two epochs without a better one
        module = clone.head if protocol == "probe" else clone
        best = states[1]
        assert all(torch.equal(v, best[k]) for k, v in module.state_dict().items())


# ----------------------------------------------------------------------------------- SPFT weights (item 3)
@pytest.fixture(scope="module")
def small_cls():
    from cxr_automl.plugin import registry
    return registry.build("dataset", "synthetic_cxr", n_train=32, n_val=16, n_test=16, image_size=32)


def _spft(data, **kwargs):
    from cxr_automl.plugin import registry
    from cxr_automl.train.model import build_model
    model = build_model({"name": "resnet_tiny", "width": 8}, {"name": "mlp", "hidden": 16}, data)
    s = registry.build("strategy", "spft", **kwargs)
    s.setup(model, data)
    return s, model


def test_class_weight_ratio_is_capped():
    from cxr_automl_plugins.strategies.spft import initial_class_weights
    labels = torch.zeros(100, 2)
    labels[:1, 0] = 1  # 99 negatives per positive (Hernia-like)
    labels[:50, 1] = 1  # 1 negative per positive
    uncapped = initial_class_weights(labels)
    assert float(uncapped[0] / uncapped[1]) == pytest.approx(99.0)
    capped = initial_class_weights(labels, max_ratio=10.0)
    assert float(capped[0] / capped[1]) == pytest.approx(10.0) and float(capped.mean()) == pytest.approx(1.0)


def test_class_weight_modes_match_torch_bce(small_cls):
    import torch.nn.functional as F
    logits = torch.randn(6, 5)
    labels = (torch.rand(6, 5) > 0.6).float()
    batch = {"labels": labels}
    for mode in ("loss_scale", "pos_weight"):
        s, model = _spft(small_cls, class_weight_mode=mode, ema_decay=None)
        w = s.class_weights
        got = s.loss(model, logits, batch)
        if mode == "loss_scale":  # both terms of a class scaled by its weight
            want = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * w).mean()
        else:  # torch's pos_weight: positives only
            want = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=w)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="class_weight_mode"):
        _spft(small_cls, class_weight_mode="focal")


def test_auc_refinement_compounding_is_capped(small_cls):
    s, model = _spft(small_cls, weight_refine_rate=1.0, weight_refine_max=4.0, ema_decay=None)
    names = s.class_names
    aucs = {f"val/auc/{c}": a for c, a in zip(names, [0.95, 0.5, 0.7, 0.7, 0.7])}
    for epoch in range(50):  # the same weak class every epoch: without a cap its factor doubles unboundedly
        s.after_epoch(epoch, model, {"val/macro_auc": 0.7, **aucs})
    assert float(s.refine_factor.max()) == pytest.approx(4.0) and float(s.refine_factor.min()) >= 0.25
    w = s.base_weights * s.refine_factor
    assert torch.allclose(s.class_weights, w / w.mean())
    assert s.class_weights[1] > s.class_weights[0]


def test_class_boost_multiplies_named_classes(small_cls):
    plain, _ = _spft(small_cls, ema_decay=None)
    boosted, _ = _spft(small_cls, ema_decay=None, class_boost={"effusion": 3.0})
    i = plain.class_names.index("effusion")
    ratio = (boosted.class_weights / plain.class_weights)
    assert float(ratio[i] / ratio[(i + 1) % len(ratio)]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="not classes of this dataset.*effusion"):
        _spft(small_cls, ema_decay=None, class_boost={"hernia": 2.0})


# ---------------------------------------------------------------------------------------- detectors (item 6)
def test_dino_learn_initial_query_is_an_option():
    from cxr_automl.plugin.interfaces import BackboneOutput
    from cxr_automl_plugins.heads.dino import dino
    maps = [torch.rand(2, c, s, s) for c, s in ((16, 8), (32, 4), (64, 2))]
    batch = {"image": torch.zeros(2, 1, 64, 64), "boxes": [torch.tensor([[4.0, 4.0, 30.0, 30.0]])] * 2,
             "box_labels": [torch.tensor([1])] * 2}
    for learn in (True, False):
        torch.manual_seed(0)
        head = dino((16, 32, 64), 3, hidden=32, encoder_ffn=64, decoder_layers=1, decoder_ffn=64, heads=4,
                    num_queries=10, num_denoising=4, learn_initial_query=learn)
        assert head.decoder.config.learn_initial_query is learn
        assert (getattr(head.decoder.model, "weight_embedding", None) is not None) is learn
        out = head(BackboneOutput(pooled=torch.zeros(2, 64), features=maps, input_size=(64, 64)))
        loss = head.loss(out, batch)
        assert torch.isfinite(loss)
        loss.backward()
        assert len(head.predict(out)) == 2


def test_yolov8_detect_weights_load_where_shapes_match(tmp_path, caplog):
    import os
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    from cxr_automl.plugin.weights import WeightsError
    from cxr_automl_plugins.heads.yolov8 import yolov8
    torch.manual_seed(0)
    detector = DetectionModel("yolov8n.yaml", nc=5, verbose=False)
    torch.save({"model": detector}, tmp_path / "yolov8n.pt")
    theirs = {k: v for k, v in detector.model[-1].state_dict().items()}
    # the checkpoint's own backbone scale (P3/P4/P5 of 64/128/256), no projection, the same 5 classes: all of it
    head = yolov8((64, 128, 256), 5, width=None, weights=str(tmp_path / "yolov8n.pt"))
    ours = head.detect.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # 3 classes: everything but the class logits' last conv
    head = yolov8((64, 128, 256), 3, width=None, weights=str(tmp_path / "yolov8n.pt"))
    ours = head.detect.state_dict()
    assert torch.equal(ours["cv2.0.0.conv.weight"], theirs["cv2.0.0.conv.weight"])
    assert ours["cv3.0.2.weight"].shape[0] == 3 and "cv3.0.2.weight" not in head.loaded
    assert "shapes differ" in caplog.text
    with pytest.raises(WeightsError, match="does not exist"):
        yolov8((64, 128, 256), 5, width=None, weights=str(tmp_path / "nope.pt"))
