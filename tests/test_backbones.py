"""Weight loading of the Swin, RAD-DINO and ResNet backbones: save a tiny model, load it back, same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import same_backbone_outputs
from cxr_automl.plugin import registry
from cxr_automl.plugin.weights import WeightsError
from cxr_automl.train.model import build_model
from cxr_automl_plugins.backbones.rad_dino import rad_dino, rad_dino_tiny
from cxr_automl_plugins.backbones.swin import swin_tiny


def test_swin_loads_an_ark_style_checkpoint(tmp_path, caplog):
    torch.manual_seed(0)
    src = swin_tiny()
    # Ark-6 layout: a teacher state dict saved from DDP, with its classifier and per-dataset heads
    state = {f"module.{k}": v for k, v in src.net.state_dict().items()}
    state["module.head.weight"] = torch.zeros(14, 128)
    state["module.omni_heads.0.weight"] = torch.zeros(3, 128)
    torch.save({"teacher": state, "epoch": 3}, tmp_path / "ark.pth.tar")
    torch.manual_seed(1)
    loaded = swin_tiny(weights=str(tmp_path / "ark.pth.tar"), strict=True)
    same_backbone_outputs(src, loaded, 64)


def test_swin_strict_reports_unexpected_keys(tmp_path, caplog):
    state = swin_tiny().net.state_dict()
    state["extra_block.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    with caplog.at_level("WARNING"):
        swin_tiny(weights=str(tmp_path / "w.pt"))  # lenient: loads and says what did not fit
    assert "extra_block.weight" in caplog.text
    with pytest.raises(WeightsError, match="strict"):
        swin_tiny(weights=str(tmp_path / "w.pt"), strict=True)


def test_swin_rejects_weights_of_another_architecture(tmp_path):
    torch.save(swin_tiny(embed_dim=32).net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="shape mismatch"):
        swin_tiny(weights=str(tmp_path / "w.pt"))


def test_rad_dino_loads_save_pretrained_dir_and_state_dict_file(tmp_path):
    torch.manual_seed(0)
    src = rad_dino_tiny()
    src.net.save_pretrained(tmp_path / "rad-dino-local")
    # the production factory with weights=DIR loads whatever architecture the directory describes
    from_dir = rad_dino(weights=str(tmp_path / "rad-dino-local"), image_size=64)
    same_backbone_outputs(src, from_dir, 64)
    assert from_dir.input_spec.mean == (0.5307,) * 3 and from_dir.input_spec.std == (0.2583,) * 3
    torch.save({"model": src.net.state_dict()}, tmp_path / "w.pt")
    from_file = rad_dino_tiny(weights=str(tmp_path / "w.pt"), strict=True)
    same_backbone_outputs(src, from_file, 64)


def test_rad_dino_offline_without_cache_says_how_to_point_at_a_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(WeightsError, match=r"backbone.weights=PATH"):
        rad_dino(weights="microsoft/rad-dino")


def test_rad_dino_pyramid_and_pooling():
    bb = rad_dino_tiny().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = bb(x)
        tokens = bb.net(pixel_values=x).last_hidden_state
    # 8×8 patch grid → 32, 16, 8, 4
    assert [f.shape[-1] for f in out.features] == [32, 16, 8, 4]
    assert tokens.shape[1] == 1 + 64  # CLS + patches; the pooled embedding is the patches' mean
    torch.testing.assert_close(out.pooled, tokens[:, 1:].mean(1))
    assert not torch.allclose(out.pooled, tokens.mean(1))



def _with_old_aliases(state: dict, prefix: str = "") -> dict:
    """The state dict a TimmResNet wrote before each tensor was registered once: ``net.*`` plus the same
    tensors again under ``stem.0/1`` (conv1, bn1) and ``stages.0..3`` (layer1..layer4)."""
    old = dict(state)
    renames = {"net.conv1.": "stem.0.", "net.bn1.": "stem.1.",
               **{f"net.layer{i + 1}.": f"stages.{i}." for i in range(4)}}
    for key, value in state.items():
        for src, dst in renames.items():
            if key.startswith(prefix + src):
                old[prefix + dst + key[len(prefix + src):]] = value.clone()
    return old


def test_resnet_checkpoints_of_the_aliased_layout_still_load():
    data = registry.build("dataset", "synthetic_cxr", n_train=8, n_val=4, n_test=4, image_size=32)
    torch.manual_seed(0)
    src = build_model({"name": "resnet_tiny", "width": 8}, {"name": "mlp", "hidden": 16}, data)
    state = src.state_dict()
    assert all(k.startswith("backbone.net.") for k in state if k.startswith("backbone."))
    old = _with_old_aliases(state, "backbone.")
    assert len(old) == 2 * len(state) - sum(k.startswith("head.") for k in state)
    torch.manual_seed(1)
    dst = build_model({"name": "resnet_tiny", "width": 8}, {"name": "mlp", "hidden": 16}, data)
    dst.load_state_dict(old)  # strict: the aliases are dropped and nothing is missing
    same_backbone_outputs(src.backbone, dst.backbone, 32)
    # the loop's best_model deep-copies the model before loading best_state
    twin = copy.deepcopy(build_model({"name": "resnet_tiny", "width": 8}, {"name": "mlp", "hidden": 16}, data))
    twin.load_state_dict(old)
    same_backbone_outputs(src.backbone, twin.backbone, 32)
