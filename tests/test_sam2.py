"""SAM2 pieces: the Hiera backbone's weight loading and maps, the sam2 head's box prompts and what it sees."""

from __future__ import annotations

import pytest
import torch
from transformers import Sam2Config, Sam2Model

from conftest import same_backbone_outputs
from cxr_automl import config
from cxr_automl.config import ConfigError
from cxr_automl.plugin.interfaces import BackboneOutput, predict
from cxr_automl.plugin.weights import WeightsError
from cxr_automl_plugins.backbones.hiera import hiera, hiera_tiny
from cxr_automl_plugins.heads.sam2 import mask_boxes, sam2


def test_hiera_loads_vision_model_dir_whole_sam2_dir_and_state_dict_file(tmp_path):
    torch.manual_seed(0)
    src = hiera_tiny()
    src.net.save_pretrained(tmp_path / "vision")
    same_backbone_outputs(src, hiera(weights=str(tmp_path / "vision"), image_size=64), 64)
    # the released checkpoints are whole SAM2 models (model_type "sam2"): the encoder is taken from them
    whole = Sam2Model(Sam2Config(vision_config=src.net.config.to_dict()))
    whole.vision_encoder.load_state_dict(src.net.state_dict())
    whole.save_pretrained(tmp_path / "sam2")
    same_backbone_outputs(src, hiera(weights=str(tmp_path / "sam2"), image_size=64), 64)
    torch.save({"model": src.net.state_dict()}, tmp_path / "w.pt")
    same_backbone_outputs(src, hiera_tiny(weights=str(tmp_path / "w.pt"), strict=True), 64)
    # a whole SAM2 state dict: the vision_encoder. prefix is stripped, the decoder's keys are left over
    torch.save(whole.state_dict(), tmp_path / "whole.pt")
    same_backbone_outputs(src, hiera_tiny(weights=str(tmp_path / "whole.pt")), 64)


def test_hiera_offline_without_cache_says_how_to_point_at_a_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(WeightsError, match=r"facebook/sam2.1-hiera-tiny.*backbone.weights=PATH"):
        hiera()
    with pytest.raises(WeightsError, match=r"facebook/sam2.1-hiera-tiny.*head.weights=PATH"):
        sam2(in_channels=(8, 16, 32), num_classes=2, weights="facebook/sam2.1-hiera-tiny")


def test_hiera_maps_strides_and_size_check():
    bb = hiera_tiny(image_size=64, width=8, fpn_hidden_size=16).eval()
    with torch.no_grad():
        out = bb(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in out.features] == [(16, 16, 16), (16, 8, 8), (16, 4, 4), (16, 2, 2)]
    assert out.pooled.shape == (1, 64) and bb.embed_dim == 64
    assert bb.input_spec.fixed_size and bb.input_spec.size == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        hiera_tiny(image_size=80)


def test_mask_boxes_known_answer():
    masks = torch.zeros(1, 2, 8, 10, dtype=torch.uint8)
    masks[0, 0, 2:5, 3:7] = 1  # rows 2..4, cols 3..6
    boxes, present = mask_boxes(masks)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([3 / 10, 2 / 8, 7 / 10, 5 / 8]))
    torch.testing.assert_close(boxes[0, 1], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # empty: whole image
    assert present.tolist() == [[True, False]]


def _head(**kw):
    torch.manual_seed(0)
    return sam2(in_channels=(8, 16, 32), num_classes=2, hidden=32, heads=4, mlp_dim=64, **kw).eval()


def _feats():
    gen = torch.Generator().manual_seed(1)
    return BackboneOutput(pooled=torch.randn(2, 32, generator=gen), input_size=(64, 64),
                          features=[torch.randn(2, 8, 16, 16, generator=gen), torch.randn(2, 16, 8, 8, generator=gen),
                                    torch.randn(2, 32, 4, 4, generator=gen)])


def _batch(masks):
    return {"image": torch.rand(len(masks), 1, 64, 64), "image_id": [f"i{k}" for k in range(len(masks))],
            "masks": masks}


def _masks(fill_interior: bool):
    m = torch.zeros(2, 2, 64, 64, dtype=torch.uint8)
    m[:, 0, 10:40, 8:30] = 1
    if not fill_interior:  # the same box, a different mask inside it (only the outline's extremes kept)
        m[:, 0, 11:39, 9:29] = 0
    m[0, 1, 30:60, 35:62] = 1  # class 1 present in image 0 only
    return m


def test_mask_box_prompts_reveal_only_the_box_and_presence():
    head = _head()
    with torch.no_grad():
        out = head(_feats())
        full = predict(head, out, _batch(_masks(True)))
        hollow = predict(head, out, _batch(_masks(False)))
        moved = _masks(True)
        moved[:, 0] = torch.roll(moved[:, 0], shifts=12, dims=-1)
        shifted = predict(head, out, _batch(moved))
    assert full.shape == (2, 2, 16, 16) and ((full >= 0) & (full <= 1)).all()
    torch.testing.assert_close(full, hollow, rtol=0, atol=0)  # same boxes → same prediction
    assert not torch.equal(full[:, 0], shifted[:, 0])  # another box → another prediction
    assert full[1, 1].abs().sum() == 0 and full[0, 1].abs().sum() > 0  # absent class: no prompt, empty mask


def test_image_box_prompts_see_no_ground_truth():
    head = _head(prompt="image_box")
    with torch.no_grad():
        out = head(_feats())
        a = predict(head, out, _batch(_masks(True)))
        b = predict(head, out, _batch(torch.zeros(2, 2, 64, 64, dtype=torch.uint8)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sam2_loss_trains_and_jitter_only_in_training():
    head = _head(box_jitter=0.2).train()
    batch = _batch(_masks(True))
    out = head(_feats())
    loss = head.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and head.class_token.weight.grad.abs().sum() > 0
    boxes_eval, _, _ = head.prompts(batch, torch.device("cpu"), train=False)
    boxes_train, _, _ = head.prompts(batch, torch.device("cpu"), train=True)
    torch.testing.assert_close(boxes_eval, mask_boxes(batch["masks"])[0])
    assert not torch.equal(boxes_train, boxes_eval)


@pytest.mark.parametrize("kwargs,match", [
    ({"prompt": "points"}, "prompt='points' is not one of mask_box, image_box"),
    ({"embed_level": 3}, r"embed_level=3 needs maps 1..3 but the backbone gives 3"),
    ({"hidden": 30}, "multiple of 8"),
])
def test_sam2_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam2(in_channels=(8, 16, 32), num_classes=2, **kwargs)


def test_sam2_maps_that_do_not_halve_and_predict_without_batch_are_errors():
    head = _head()
    feats = _feats()
    feats.features[0] = torch.randn(2, 8, 12, 12)
    with pytest.raises(ValueError, match="not 4x, 2x, 1x"):
        head(feats)
    with pytest.raises(ValueError, match="box-prompted"):
        head.predict(head(_feats()))


def test_sam2_embed_level_beyond_the_backbone_maps_is_a_config_error():
    config.compose(["head=sam2", "dataset.task=segmentation", "backbone=yolov8_tiny"])  # P3/P4/P5: fine
    with pytest.raises(ConfigError, match="head 'sam2' needs 4 multi-scale feature maps but backbone "
                                          "'yolov8_tiny' gives 3"):
        config.compose(["head=sam2", "dataset.task=segmentation", "backbone=yolov8_tiny", "head.embed_level=3"])


def test_sam2_head_loads_a_sam2_checkpoints_prompt_encoder_and_mask_decoder(tmp_path):
    torch.manual_seed(0)
    dec = {"hidden_size": 32, "num_attention_heads": 4, "mlp_dim": 64, "iou_head_hidden_dim": 32}
    ref = Sam2Model(Sam2Config(vision_config=hiera_tiny().net.config.to_dict(),
                               prompt_encoder_config={"hidden_size": 32}, mask_decoder_config=dec))
    ref.save_pretrained(tmp_path / "sam2")
    head = sam2(in_channels=(8, 16, 32), num_classes=2, hidden=32, heads=4, mlp_dim=64, weights=str(tmp_path / "sam2"))
    for k, v in ref.mask_decoder.state_dict().items():
        torch.testing.assert_close(head.mask_decoder.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(head.prompt_encoder.point_embed.weight, ref.prompt_encoder.point_embed.weight)
    with pytest.raises(WeightsError, match="hidden=32.*set head.hidden=32 head.heads=4 head.mlp_dim=64"):
        sam2(in_channels=(8, 16, 32), num_classes=2, weights=str(tmp_path / "sam2"))
