"""The real path: every dataset layout (written from covid-seg-100's REAL images, boxes and masks) ×
every task its files give × every head of that task trains, evaluates, writes its predictions and
reloads; bad input per layout is one clear line (or a counted skip), with and without the cache;
``label_fraction`` keeps every image (MLVICX pretrains on all of them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_matrix import SMALL, _same

from cxr_automl import config
from cxr_automl.data import DataError
from cxr_automl.plugin import compat, registry
from cxr_automl.plugin.interfaces import predict
from cxr_automl.plugin.testing.contracts import DatasetContract
from cxr_automl.plugin.testing.layouts import ANATOMY, WRITERS, read_covid, write_mask_folder
from cxr_automl.train.callbacks import Checkpointer
from cxr_automl.train.checkpoint import load_latest
from cxr_automl.train.evaluators import primary_metric
from cxr_automl.train.loop import Trainer, collate
from cxr_files import SHARED

COVID = SHARED / "covid-seg-100"
NPZ = SHARED / "pneumoniamnist" / "pneumoniamnist.npz"
HEADS = {t: [h for h in registry.available("head") if compat.head_task(h) == t]
         for t in ("classification", "detection", "segmentation")}
#: layout → tasks its files give (the first is the layout's default)
TASKS = {"yolo": ["detection", "classification"], "coco": ["detection", "segmentation", "classification"],
         "tbx11k": ["detection", "classification"], "chestx_det": ["detection", "segmentation", "classification"],
         "mask_folder": ["segmentation", "classification"], "siim_acr": ["segmentation", "classification"],
         "vindr_cxr": ["classification", "detection"], "rsna_pneumonia": ["classification", "detection"],
         "nih_cxr14": ["classification", "detection"], "medmnist": ["classification"]}
CELLS = [(layout, task, head) for layout, tasks in TASKS.items() for task in tasks for head in HEADS[task]]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("layouts")
    items = read_covid(COVID, 24)
    out = {name: writer(items, root / name) for name, writer in WRITERS.items()}
    out["medmnist"] = ["dataset=medmnist", f"dataset.path={NPZ}", "dataset.subset_fraction=0.005"]
    return out


def test_every_loader_declares_its_default_task_and_refuses_a_task_its_files_lack(layouts, tmp_path):
    for layout, tasks in TASKS.items():
        p = registry.factory_params(registry.load("dataset", layout))["task"]
        assert p.default == tasks[0], layout
    for layout, missing, offered in (("yolo", "segmentation", "classification, detection"),
                                     ("mask_folder", "detection", "classification, segmentation"),
                                     ("medmnist", "detection", "classification")):
        with pytest.raises(registry.RegistryError, match=f"task={missing} is not in these files; they give {offered}"):
            _bundle(layouts[layout], tmp_path, task=missing)
    # the natural task needs nothing more: yolo + yolov8, mask_folder + upernet compose as they are
    config.compose([*layouts["yolo"], "head=yolov8", "backbone=resnet_tiny"])
    config.compose([*layouts["mask_folder"], "head=upernet", "backbone=resnet_tiny"])
    with pytest.raises(config.ConfigError, match="head 'mlp' does classification but dataset 'yolo' gives "
                                                 "task=detection: add dataset.task=classification"):
        config.compose(layouts["yolo"])


PAIRS = [(layout, task) for layout, tasks in TASKS.items() for task in tasks]


class TestEveryLayoutAndTaskKeepsTheDatasetContract(DatasetContract):
    @pytest.fixture(params=PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
    def bundle(self, request, layouts, tmp_path):
        layout, task = request.param
        b = _bundle(layouts[layout], tmp_path, task=task, image_size=32)
        assert b.task == task
        return b


def _bundle(overrides: list[str], tmp: Path, **kw):
    node = {k.split(".", 1)[1]: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides[1:])}
    return registry.build("dataset", overrides[0].split("=")[1], cache_dir=str(tmp / "cache"),
                          **{"image_size": 64, **node, **kw})


def test_class_names_follow_the_task_and_negatives_stay(layouts, tmp_path):
    det = _bundle(layouts["nih_cxr14"], tmp_path, task="detection")
    cls = _bundle(layouts["nih_cxr14"], tmp_path)
    assert len(cls.class_names) == 14 and det.class_names == cls.class_names[:8]  # the 8 boxed findings
    n_boxed = sum(len(s) for s in (det.train, det.val, det.test))
    assert n_boxed == 21 and sum(len(s) for s in (cls.train, cls.val, cls.test)) == 24  # 3 have no opacity box
    yolo = _bundle(layouts["yolo"], tmp_path)
    items = [s[i] for s in (yolo.train, yolo.val, yolo.test) for i in range(len(s))]
    negatives = [it for it in items if len(it["boxes"]) == 0]
    assert len(negatives) == 2 and all(it["labels"].sum() == 0 for it in negatives)  # empty label files stay
    seg = _bundle(layouts["siim_acr"], tmp_path)
    empty = [seg.train[i] for i in range(len(seg.train)) if seg.train[i]["labels"][0] == 0]
    assert empty and all(it["masks"].sum() == 0 for it in empty)  # "-1" rows: empty-mask negatives, kept
    tbx = _bundle(layouts["tbx11k"], tmp_path)
    assert sum(float(tbx.label_matrix(s).sum(1).eq(0).sum()) for s in ("train", "val", "test")) == 3


def test_vindr_readers_boxes_are_fused_or_kept(layouts, tmp_path):
    fused = _bundle(layouts["vindr_cxr"], tmp_path, task="detection")
    kept = _bundle(layouts["vindr_cxr"], tmp_path, task="detection", boxes="all")
    n_fused = sum(len(fused.train[i]["boxes"]) for i in range(len(fused.train)))
    n_all = sum(len(kept.train[i]["boxes"]) for i in range(len(kept.train)))
    assert n_fused > 0 and n_all == 2 * n_fused  # two readers drew each opacity, 3 px apart: one fused box each
    no_finding = [i for i in range(len(fused.train)) if fused.train[i]["labels"].sum() == 0]
    assert no_finding and all(len(fused.train[i]["boxes"]) == 0 for i in no_finding)


def test_mask_folder_pairs_jsrt_style_names_and_says_what_it_tried(tmp_path):
    items = read_covid(COVID, 6)
    overrides = write_mask_folder(items, tmp_path / "jsrt", image_suffix=".IMG")  # a.IMG.png ↔ masks/*/a.png
    d = _bundle(overrides, tmp_path, val_fraction=0.2)
    assert sum(len(s) for s in (d.train, d.val, d.test)) == 6 and d.class_names == list(ANATOMY)
    for f in (tmp_path / "jsrt" / "masks" / "Left Lung").iterdir():
        f.rename(f.with_name("x" + f.name))
    with pytest.raises(registry.RegistryError, match=r"no mask for structure\(s\) Left Lung .*\(tried "
                                                     r"[^,]+\.IMG\.png, [^,]+\.IMG\.\*, [^,]+\.\*"):
        _bundle(overrides, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout,task,head", CELLS, ids=[f"{a}-{b}-{c}" for a, b, c in CELLS])
def test_layout_task_head_trains_evaluates_and_reloads(layout, task, head, layouts, tmp_path_factory, tmp_path):
    cache = tmp_path_factory.getbasetemp() / "layout-cache"
    cfg = config.compose([
        *layouts[layout], f"dataset.task={task}", f"head={head}", "backbone=resnet_tiny", "strategy=finetune",
        "strategy.epochs=1", "dataset.image_size=64", "backbone.image_size=64", f"dataset.cache_dir={cache}",
        "trainer.batch_size=6", "trainer.eval_batch_size=8", "trainer.num_workers=0", "trainer.progress=false",
        *SMALL["resnet_tiny"], *SMALL.get(head, [])])
    trainer = Trainer(cfg, tmp_path, [Checkpointer()])
    assert trainer.data.task == task
    before = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    metrics = trainer.fit()
    assert trainer.step >= 2
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.head.state_dict().items()), "head did not train"
    key = primary_metric(task, "test")
    if task == "classification" and key not in metrics:  # AUC needs both classes in the 2-image test split
        labels = trainer.data.label_matrix("test")
        assert all(len(set(col[~torch.isnan(col)].tolist())) < 2 for col in labels.T)
    else:
        assert 0 <= metrics[key] <= 1 and not math.isnan(metrics[key])
    written = tmp_path / ("predictions.json" if task == "detection" else "predictions.csv")
    assert written.stat().st_size > 0
    if task == "detection":
        assert isinstance(json.loads(written.read_text()), list)

    fresh = Trainer(cfg, tmp_path)
    fresh.load_state_dict(load_latest(tmp_path))
    batch = collate([trainer.data.test[i] for i in range(min(2, len(trainer.data.test)))])
    trainer.model.eval(), fresh.model.eval()
    with torch.no_grad():
        a, b = trainer.model(batch["image"]), fresh.model(batch["image"])
        _same(a, b)
        _same(predict(trainer.model.head, a, batch), predict(fresh.model.head, b, batch))


# ------------------------------------------------------------------------------------------ bad input
def _corrupt(layout: str, root: Path) -> tuple[str, str]:
    """Break one annotation of ``layout`` under ``root``; returns (skip kind, message pattern)."""
    if layout == "yolo":
        label = sorted((root / "labels" / "train").glob("*.txt"))[0]
        label.write_text("7 0.5 0.5 0.2 0.2\n")  # class 7 of 3
        return "box", r"'7 0.5 0.5 0.2 0.2' is not 'class cx cy w h' with class < 3"
    if layout == "coco":
        doc = json.loads((root / "annotations.json").read_text())
        w = doc["images"][0]["width"]
        doc["annotations"][0]["bbox"] = [w + 40, 10, 30, 30]  # right of the image
        (root / "annotations.json").write_text(json.dumps(doc))
        return "box", r"box \[.*\] lies outside .* boxes are in the original image's pixels"
    if layout == "chestx_det":
        doc = json.loads((root / "ChestX_Det_train.json").read_text())
        doc[0]["boxes"][0] = [doc[0]["boxes"][0][0], 5.0, doc[0]["boxes"][0][0], 50.0]  # zero width
        (root / "ChestX_Det_train.json").write_text(json.dumps(doc))
        return "box", r"has no area"
    if layout == "vindr_cxr":
        text = (root / "train.csv").read_text().splitlines()
        first = next(i for i, line in enumerate(text) if ",R1," in line and "No finding" not in line)
        for row in (first, first + 1):  # both readers' boxes of one finding, so fusion keeps it
            cells = text[row].split(",")
            cells[4:8] = ["5000", "10", "5100", "60"]
            text[row] = ",".join(cells)
        (root / "train.csv").write_text("\n".join(text) + "\n")
        return "box", r"lies outside"
    if layout == "mask_folder":
        mask = sorted((root / "masks" / "Left Lung").iterdir())[0]
        Image.open(mask).resize((20, 20)).save(mask)  # a mask of the wrong size
        return "mask", r"mask is 20x20 but .* masks must match"
    if layout == "siim_acr":
        text = (root / "train-rle.csv").read_text().splitlines()
        row = next(i for i, line in enumerate(text[1:], 1) if not line.endswith("-1"))
        text[row] = text[row].split(",")[0] + ", 1 999999"  # a run past the last pixel
        (root / "train-rle.csv").write_text("\n".join(text) + "\n")
        return "mask", r"RLE runs reach pixel \d+ but .* check rle=relative\|absolute"
    raise AssertionError(layout)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("layout", ["yolo", "coco", "chestx_det", "vindr_cxr", "mask_folder", "siim_acr"])
def test_bad_annotation_is_one_line_or_a_counted_skip(layout, cache, tmp_path):
    items = read_covid(COVID, 8)
    overrides = WRITERS[layout](items, tmp_path / layout)
    clean = _bundle(overrides, tmp_path, cache=cache, val_fraction=0.2)
    n_clean = sum(len(s) for s in (clean.train, clean.val, clean.test))
    kind, pattern = _corrupt(layout, tmp_path / layout)
    with pytest.raises(registry.RegistryError, match=pattern) as err:
        _bundle(overrides, tmp_path, cache=cache, val_fraction=0.2)
    assert "\n" not in str(err.value) and "dataset.on_error=skip" in str(err.value)
    skipped = _bundle(overrides, tmp_path, cache=cache, val_fraction=0.2, on_error="skip")
    assert sum(len(s) for s in (skipped.train, skipped.val, skipped.test)) == n_clean - 1
    assert skipped.extras["report"]["skipped"] == {kind: 1}


def test_an_image_without_its_mask_is_named_with_the_names_tried(tmp_path):
    items = read_covid(COVID, 6)
    overrides = write_mask_folder(items, tmp_path / "m")
    victim = sorted((tmp_path / "m" / "masks" / "Right Lung").iterdir())[0]
    victim.unlink()
    with pytest.raises(registry.RegistryError, match=rf"no mask for structure\(s\) Right Lung .*tried {victim.name}"):
        _bundle(overrides, tmp_path)
    d = _bundle(overrides, tmp_path, on_error="skip", val_fraction=0.2)
    assert d.extras["report"]["skipped"] == {"missing": 1}


def test_dense_tasks_refuse_label_fraction_and_take_subset_fraction(layouts, tmp_path):
    with pytest.raises(registry.RegistryError, match="label_fraction=0.5 hides classification labels only.*"
                                                     "Use subset_fraction"):
        _bundle(layouts["yolo"], tmp_path, label_fraction=0.5)
    full = _bundle(layouts["coco"], tmp_path)
    half = _bundle(layouts["coco"], tmp_path, subset_fraction=0.5)
    assert len(half.train) == len(full.train) // 2 and len(half.test) == len(full.test)


# ------------------------------------------------------------------------------------------ label fractions
@pytest.mark.slow
def test_mlvicx_pretrains_on_every_training_image_at_label_fraction_0_1(tmp_path):
    cfg = config.compose([
        "dataset=medmnist", f"dataset.path={NPZ}", "dataset.image_size=32", "dataset.label_fraction=0.1",
        f"dataset.cache_dir={tmp_path / 'cache'}", "strategy=mlvicx", "strategy.epochs=1",
        "strategy.expander_dim=32", "strategy.downstream_epochs=1", "backbone=resnet_tiny", "backbone.width=8",
        "backbone.image_size=32", "head=linear", "trainer.batch_size=512", "trainer.eval_batch_size=512",
        "trainer.num_workers=0", "trainer.progress=false"])
    trainer = Trainer(cfg, tmp_path)
    labels = trainer.data.label_matrix("train")
    known = ~torch.isnan(labels).all(dim=1)
    assert len(trainer.data.train) == 3882 and abs(int(known.sum()) - 388) <= 2  # all images, 10 % labelled
    trainer.fit()
    assert trainer.step == 3882 // 512  # pretraining went over the whole training split (full batches)
    assert np.isclose(float((labels[known] == 0).float().mean()), 388 / 3882, atol=0.005)  # stratified


@pytest.mark.slow
def test_cli_train_and_data_check_on_a_real_layout_as_a_user_types_them(layouts, in_tmp):
    from conftest import run_cli
    check = json.loads(run_cli("data", "check", *layouts["mask_folder"], "dataset.image_size=32", "--json",
                               cwd=in_tmp).stdout)
    assert check["task"] == "segmentation" and check["classes"] == list(ANATOMY) and check["ok"]
    bad = run_cli("train", *layouts["mask_folder"], "head=yolov8", cwd=in_tmp, check=False)
    assert bad.returncode == 2 and "head 'yolov8' does detection but dataset 'mask_folder' gives " \
                                  "task=segmentation" in bad.stderr
    run_cli("train", *layouts["mask_folder"], "head=upernet", "backbone=resnet_tiny", "backbone.width=8",
            "head.hidden=16", "strategy=finetune", "strategy.epochs=1", "dataset.image_size=32",
            "backbone.image_size=32", "trainer.batch_size=6", "trainer.progress=false", "run_dir=runs/jsrt",
            cwd=in_tmp)
    metrics = json.loads((in_tmp / "runs" / "jsrt" / "metrics.json").read_text())
    assert 0 <= metrics["test/mean_dice"] <= 1 and (in_tmp / "runs" / "jsrt" / "predictions.csv").is_file()


@pytest.mark.slow
def test_nih_detection_uses_the_880_images_of_the_real_box_list(tmp_path):
    """The real BBox_List_2017.csv (all 984 rows), joined with Data_Entry rows for its images (their box
    findings as labels) and flat 1024 px images, without the cache (the headers give the sizes)."""
    import csv as csv_mod

    from cxr_files import flat_png
    rows = list(csv_mod.reader(open(SHARED / "labels" / "BBox_List_2017.csv")))[1:]
    findings: dict[str, set[str]] = {}
    for r in rows:
        findings.setdefault(r[0], set()).add(r[1].replace("Infiltrate", "Infiltration"))
    header = (SHARED / "labels" / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0]
    entries = [f"{name},{'|'.join(sorted(f))},0,{int(name[:8])},50,M,PA,1024,1024,0.14,0.14"
               for name, f in sorted(findings.items())]
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join([header, *entries]) + "\n")
    (tmp_path / "BBox_List_2017.csv").write_text((SHARED / "labels" / "BBox_List_2017.csv").read_text())
    for name in findings:
        flat_png(tmp_path / "images_001" / "images" / name, 1024, 1024)
    d = registry.build("dataset", "nih_cxr14", root=str(tmp_path), task="detection", cache=False, image_size=64)
    splits = (d.train, d.val, d.test)
    assert sum(len(s) for s in splits) == 880 and d.class_names == ["Atelectasis", "Cardiomegaly", "Effusion",
                                                                    "Infiltration", "Mass", "Nodule", "Pneumonia",
                                                                    "Pneumothorax"]
    assert sum(len(d.extras[f"{s}_patients"]) for s in ("train", "val", "test")) == 726  # patient-level split
    assert sum(len(b) for s in ("train", "val", "test") for b in d.extras[f"{s}_box_labels"]) == 984
    assert all(len(s[i]["boxes"]) for s in splits for i in range(0, len(s), 50))  # no negatives: all boxed
