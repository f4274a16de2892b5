"""lock_release (Foundation X) with real members: COCO and mask-folder layouts written from
covid-seg-100's real images, boxes and masks. Each member's classes follow its own task (box classes,
mask structures); an entry asking for a task its files cannot give is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_automl import config
from cxr_automl.plugin.testing.layouts import ANATOMY, read_covid, write_coco, write_mask_folder, write_yolo
from cxr_automl.train import run
from cxr_automl.train.loop import Callback, Trainer
from cxr_files import SHARED

COVID = SHARED / "covid-seg-100"
#: tiny model; members at the run's 64 px
RUN = ["strategy=lock_release", "backbone=resnet_tiny", "backbone.width=8", "backbone.image_size=64",
       "dataset.image_size=64", "trainer.batch_size=8", "trainer.eval_batch_size=8", "trainer.num_workers=0",
       "trainer.progress=false",
       "strategy.loc_head={name: dino, levels: 3, hidden: 32, encoder_ffn: 64, decoder_layers: 2, decoder_ffn: 64, "
       "heads: 4, num_queries: 20, num_denoising: 10, max_det: 20}",
       "strategy.seg_head={name: upernet, hidden: 16}"]
HEADLINE = {"cls": "macro_auc", "loc": "map_40", "seg": "mean_dice"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, list[str]]:
    """COCO (6 images without annotations: negatives for "has a box"), a JSRT-style mask folder whose
    Left Lung mask is empty on every third image (negatives for "structure present"), and YOLO."""
    root = tmp_path_factory.mktemp("members")
    items = read_covid(COVID, 24)
    out = {"coco": write_coco(items, root / "coco", negatives=6), "jsrt": write_mask_folder(items, root / "jsrt"),
           "yolo": write_yolo(items, root / "yolo")}
    for k, a in enumerate(items):
        if k % 3 == 0:
            empty = np.zeros((a.height, a.width), np.uint8)
            Image.fromarray(empty).save(root / "jsrt" / "masks" / "Left Lung" / f"{Path(a.name).stem}.png")
    return out


class Seen(Callback):
    """Keeps the trainer ``run.train`` builds and its weights before the first epoch."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.before = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def node(overrides: list[str], **more) -> str:
    """``dataset=coco dataset.images=P`` → ``{name: coco, images: 'P'}`` (a strategy.datasets entry's dataset)."""
    pairs = {k.split(".", 1)[1]: f"'{v}'" for k, v in (o.split("=", 1) for o in overrides[1:])}
    pairs.update(more)
    return "{" + ", ".join(f"{k}: {v}" for k, v in {"name": overrides[0].split("=", 1)[1], **pairs}.items()) + "}"


@pytest.mark.slow
def test_two_real_members_train_evaluate_every_dataset_task_and_write_metrics(layouts, tmp_path):
    """The run's dataset (COCO: cls + loc + seg) and a member of its own (mask folder: cls + seg), one
    cycle: every (dataset, task) is evaluated on val after its Release epochs and on test."""
    jsrt = node(layouts["jsrt"], val_fraction=0.25, seed=1)
    cfg = config.compose([*RUN, *layouts["coco"], "dataset.val_fraction=0.25", "dataset.seed=1",
                          f"strategy.datasets=[{{name: coco, tasks: [cls, loc, seg]}}, "
                          f"{{name: jsrt, tasks: [cls, seg], dataset: {jsrt}}}]"])
    run_dir, seen = tmp_path / "fx", Seen()
    metrics = run.train(cfg, run_dir, [seen])
    model = seen.trainer.model
    assert seen.trainer.strategy.classes == {
        "coco": {t: list(ANATOMY) for t in ("cls", "loc", "seg")},  # "has a box of", box classes, masks
        "jsrt": {t: list(ANATOMY) for t in ("cls", "seg")}}  # "structure present", masks
    for part in ("backbone.", "head.loc_encoder.", "head.seg_decoder.", "head.cls_heads.coco.", "head.cls_heads.jsrt.",
                 "head.loc_decoders.coco.", "head.seg_heads.coco.", "head.seg_heads.jsrt."):
        assert any(not torch.equal(seen.before[k], v) for k, v in model.state_dict().items()
                   if k.startswith(part) and v.is_floating_point()), f"{part} did not train"
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 8 and all(math.isfinite(h["train/loss"]) for h in history)  # cls 2 + loc 2 + seg 2 x 2
    pairs = [("coco", "cls"), ("coco", "loc"), ("coco", "seg"), ("jsrt", "cls"), ("jsrt", "seg")]
    for ds, task in pairs:
        for split in ("val", "test"):
            value = (history[-1] if split == "val" else metrics)[f"{split}/{ds}/{task}/{HEADLINE[task]}"]
            assert 0 <= value <= 1 and math.isfinite(value), (ds, task, split)
        written = run_dir / ds / task / ("predictions.json" if task == "loc" else "predictions.csv")
        assert written.stat().st_size > 0
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(saved["test/objective"]) and "best/val/objective" in saved


def test_an_entry_asking_for_a_task_its_files_cannot_give_is_one_line(layouts, tmp_path):
    with pytest.raises(config.ConfigError, match=r"strategy.datasets\[0\] has task loc but the run's dataset gives "
                                                 r"no boxes \(it gives classification, segmentation\); drop loc .* "
                                                 r"structure: NAME"):
        Trainer(config.compose([*RUN, *layouts["jsrt"], "strategy.datasets=[{name: jsrt, tasks: [cls, loc]}]"]),
                tmp_path / "a")
    yolo = node(layouts["yolo"])
    with pytest.raises(config.ConfigError, match=r"strategy.datasets\[1\] has task seg but dataset 'yolo' gives no "
                                                 r"masks \(it gives classification, detection\)"):
        Trainer(config.compose([*RUN, *layouts["jsrt"], "strategy.datasets=[{name: jsrt, tasks: [seg]}, "
                                f"{{name: y, tasks: [loc, seg], dataset: {yolo}}}]"]), tmp_path / "b")
    with pytest.raises(config.ConfigError, match=r"strategy.datasets\[0\].dataset: dataset 'mask_folder': .*"
                                                 r"mask folder not found"):
        Trainer(config.compose([*RUN, "strategy.datasets=[{name: j, tasks: [seg], dataset: "
                                f"{{name: mask_folder, root: '{tmp_path}'}}}}]"]), tmp_path / "c")


def test_one_structure_of_a_mask_folder_gives_its_box_for_loc(layouts, tmp_path):
    """``structure:`` views a real mask folder through one structure: loc gets the box around its mask."""
    t = Trainer(config.compose([*RUN, *layouts["jsrt"],
                                "strategy.datasets=[{name: heart, tasks: [loc, seg], structure: Cardiomediastinum}]"]),
                tmp_path)
    assert t.strategy.classes == {"heart": {"loc": ["Cardiomediastinum"], "seg": ["Cardiomediastinum"]}}
    item = t.data.train[0]
    assert item["masks"].shape[0] == 1 and item["boxes"].shape == (1, 4)
