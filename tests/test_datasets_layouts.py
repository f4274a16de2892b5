"""COCO, YOLO and mask-folder layouts built from covid-seg-100's REAL images, boxes and masks; MedMNIST
(PneumoniaMNIST, real images); the generic CSV loader and its error messages."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_automl.plugin import registry
from cxr_automl.plugin.testing.contracts import DatasetContract
from cxr_files import SHARED, train_once, write_png

COVID = SHARED / "covid-seg-100"
STRUCTURES = ["Cardiomediastinum", "Left Lung", "Right Lung"]


def build(name: str, tmp: Path, **kw):
    return registry.build("dataset", name, cache_dir=str(tmp / "cache"), **kw)


def all_items(d) -> dict[str, dict]:
    return {Path(s[i]["image_id"]).stem: s[i] for s in (d.train, d.val, d.test) for i in range(len(s))}


@pytest.fixture(scope="module")
def covid(tmp_path_factory) -> dict:
    """covid-seg-100's structure.csv rewritten into COCO, YOLO and mask-folder layouts (40 images).

    Its masks are crops of the box size to be placed at (Left, Top); here they are placed into
    full-image masks, as those layouts expect."""
    from pycocotools import mask as mask_utils
    root = tmp_path_factory.mktemp("covid")
    rows = [r for r in csv.DictReader(open(COVID / "structure.csv")) if r["Template Name"] in STRUCTURES]
    images = sorted({r["Image"] for r in rows})[:40]
    coco = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": n} for k, n in enumerate(STRUCTURES)]}
    truth: dict[str, list] = {}
    for k, image in enumerate(images):
        name = Path(image).name
        w, h = Image.open(COVID / image).size
        coco["images"].append({"id": k, "file_name": name, "width": w, "height": h})
        split = ("train", "train", "train", "val", "test")[k % 5]
        for d in (root / "yolo" / "images" / split, root / "masks_layout" / "images"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy(COVID / image, root / "yolo" / "images" / split / name)
        shutil.copy(COVID / image, root / "masks_layout" / "images" / name)
        yolo_lines = []
        for r in rows:
            if r["Image"] != image or not r["Mask"]:
                continue
            c = STRUCTURES.index(r["Template Name"])
            left, top, bw, bh = (int(r[f]) for f in ("Left", "Top", "Width", "Height"))
            crop = np.asarray(Image.open(COVID / r["Mask"]).convert("RGB")).max(axis=-1) > 0
            full = np.zeros((h, w), bool)
            full[top:top + bh, left:left + bw] = crop[:h - top, :w - left]
            rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": k, "category_id": c + 1,
                                        "bbox": [left, top, bw, bh], "area": int(full.sum()), "iscrowd": 0,
                                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
            yolo_lines.append(f"{c} {(left + bw / 2) / w} {(top + bh / 2) / h} {bw / w} {bh / h}")
            truth.setdefault(Path(name).stem, []).append((c, [left, top, left + bw, top + bh], w, h, full))
            out = root / "masks_layout" / "masks" / r["Template Name"] / name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(full.astype(np.uint8) * 255).save(out)
        lab = root / "yolo" / "labels" / split / f"{Path(name).stem}.txt"
        lab.parent.mkdir(parents=True, exist_ok=True)
        lab.write_text("\n".join(yolo_lines) + "\n")
    (root / "coco.json").write_text(json.dumps(coco))
    shutil.copytree(root / "masks_layout" / "images", root / "coco_images")
    (root / "yolo" / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\ntest: images/test\nnames:\n" +
        "".join(f"  {k}: {n}\n" for k, n in enumerate(STRUCTURES)))
    # images lacking one structure's mask cannot be in the mask-folder layout
    for img in (root / "masks_layout" / "images").iterdir():
        if not all((root / "masks_layout" / "masks" / s / img.name).exists() for s in STRUCTURES):
            img.unlink()
    return {"root": root, "truth": truth}


def test_coco_boxes_and_masks_from_real_annotations(covid, tmp_path):
    root = covid["root"]
    d = build("coco", tmp_path, annotations=str(root / "coco.json"), images=str(root / "coco_images"),
              image_size=64, augment=False)
    assert d.class_names == STRUCTURES and d.extras["structures"] == STRUCTURES
    items = all_items(d)
    assert len(items) == 40
    for stem, anns in covid["truth"].items():
        item = items[stem]
        assert item["masks"].shape == (3, 64, 64) and item["masks"].dtype == torch.uint8
        for c, (x0, y0, x1, y1), w, h, full in anns:
            exp = torch.tensor([x0 * 64 / w, y0 * 64 / h, x1 * 64 / w, y1 * 64 / h])
            assert any(torch.allclose(b, exp, atol=1e-3) for b, bc in zip(item["boxes"], item["box_labels"]) if bc == c)
            ys, xs = np.nonzero(item["masks"][c].numpy())
            assert len(xs) and xs.min() >= exp[0] - 1 and xs.max() <= exp[2] + 1  # mask inside its box
            assert abs(item["masks"][c].float().mean() - full.mean()) < 0.03  # same area after resizing
        assert item["labels"].sum() == len({a[0] for a in anns})


def test_yolo_layout_gives_the_same_boxes_as_coco(covid, tmp_path):
    root = covid["root"]
    y = build("yolo", tmp_path, data=str(root / "yolo" / "data.yaml"), image_size=64, augment=False)
    c = build("coco", tmp_path, annotations=str(root / "coco.json"), images=str(root / "coco_images"),
              image_size=64, augment=False, masks=False)
    assert y.class_names == STRUCTURES and (len(y.train), len(y.val), len(y.test)) == (24, 8, 8)
    yi, ci = all_items(y), all_items(c)
    assert set(yi) == set(ci)
    for stem in yi:
        order_y, order_c = np.lexsort(yi[stem]["boxes"].T.numpy()), np.lexsort(ci[stem]["boxes"].T.numpy())
        assert torch.allclose(yi[stem]["boxes"][order_y], ci[stem]["boxes"][order_c], atol=1e-3)
        assert torch.equal(yi[stem]["box_labels"][order_y], ci[stem]["box_labels"][order_c])
    bad = root / "yolo" / "labels" / "train" / next((root / "yolo" / "labels" / "train").iterdir()).name
    text = bad.read_text()
    bad.write_text("7 0.5 0.5 0.1 0.1\n" + text)
    try:
        with pytest.raises(registry.RegistryError, match=rf"{bad.name}:1: '7 0.5 0.5 0.1 0.1' is not 'class cx cy w h'"):
            build("yolo", tmp_path, data=str(root / "yolo" / "data.yaml"), image_size=64)
    finally:
        bad.write_text(text)


def test_mask_folder_with_real_masks(covid, tmp_path):
    root = covid["root"] / "masks_layout"
    d = build("mask_folder", tmp_path, root=str(root), image_size=48, fit="pad", augment=False)
    assert d.extras["structures"] == STRUCTURES and d.class_names == STRUCTURES
    items = all_items(d)
    assert len(items) >= 30
    for stem, item in items.items():
        assert item["masks"].shape == (3, 48, 48) and item["labels"].tolist() == [1.0, 1.0, 1.0]
        left, right = item["masks"][1].nonzero()[:, 1].float().mean(), item["masks"][2].nonzero()[:, 1].float().mean()
        assert left > right  # the patient's left lung is on the image's right in a PA film
    one = next(iter((root / "masks" / "Left Lung").iterdir()))
    original = one.read_bytes()
    Image.new("L", (10, 10)).save(one)
    try:
        with pytest.raises(registry.RegistryError, match=rf"{one.name}: mask is 10x10 but .* is \d+x\d+; masks must match"):
            build("mask_folder", tmp_path, root=str(root), image_size=48)
    finally:
        one.write_bytes(original)


def test_medmnist_official_splits_and_counts(tmp_path):
    d = build("medmnist", tmp_path, path=str(SHARED / "pneumoniamnist" / "pneumoniamnist.npz"),
              class_names=["pneumonia"], image_size=32)
    assert (len(d.train), len(d.val), len(d.test)) == (3882, 524, 624)
    assert [int(d.label_matrix(s).sum()) for s in ("train", "val", "test")] == [3494, 389, 390]
    with np.load(SHARED / "pneumoniamnist" / "pneumoniamnist.npz") as z:
        raw = z["test_images"][5]
    item = d.test[5]
    assert item["image"].shape == (1, 32, 32)
    small = np.asarray(Image.fromarray((item["image"][0].numpy() * 255).astype(np.uint8)).resize((28, 28)))
    assert np.corrcoef(small.ravel(), raw.ravel())[0, 1] > 0.95  # the same picture, resized
    npz = str(SHARED / "pneumoniamnist" / "pneumoniamnist.npz")
    neg_share = lambda lab: float((lab == 0).sum() / (~torch.isnan(lab)).sum())  # noqa: E731
    full = neg_share(d.label_matrix("train"))
    assert abs(full - 0.1) < 0.001  # 388 of 3882 PneumoniaMNIST training images are normal
    for f in (0.1, 0.3):  # label_fraction: every image stays, the others' labels are unknown
        low = build("medmnist", tmp_path, path=npz, image_size=32, label_fraction=f)
        lab = low.label_matrix("train")
        assert len(low.train) == 3882 and len(low.val) == 524
        assert abs(int((~torch.isnan(lab)).sum()) - f * 3882) <= 2
        assert abs(neg_share(lab) - full) < 0.003  # stratified: the class balance of the whole split
        small = build("medmnist", tmp_path, path=npz, image_size=32, subset_fraction=f)  # fewer images
        assert abs(len(small.train) - f * 3882) <= 2 and abs(neg_share(small.label_matrix("train")) - full) < 0.003


def test_generic_csv_and_its_errors(tmp_path):
    rows = [("a/1.png", "p1", "1", "0", ""), ("a/2.png", "p1", "0", "1", "1"), ("b/3.png", "p2", "0", "", "0"),
            ("b/4.png", "p3", "1", "1", "0"), ("b/5.png", "p4", "0", "0", "1"), ("b/6.png", "p5", "1", "0", "0")]
    lines = ["file,patient,effusion,nodule,edema"] + [",".join(r) for r in rows]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    for k, r in enumerate(rows):
        write_png(tmp_path / r[0], 30, 30, seed=k)
    opts = dict(path=str(tmp_path / "labels.csv"), image_col="file", patient_col="patient",
                label_cols=["effusion", "nodule", "edema"], image_size=32)
    d = build("csv", tmp_path, **opts)
    m = np.concatenate([d.label_matrix(s) for s in ("train", "val", "test")])
    assert m.shape == (6, 3) and np.isnan(m).sum() == 2 and np.nansum(m) == 7
    split_of = {r.image_id: s for s in ("train", "val", "test") for r in getattr(d, s).records}
    assert split_of["a/1.png"] == split_of["a/2.png"]  # one patient, one split
    with pytest.raises(registry.RegistryError, match=r"labels.csv:1: missing column\(s\) 'pneumonia'"):
        build("csv", tmp_path, **{**opts, "label_cols": ["effusion", "pneumonia"]})
    lines[4] = "b/4.png,p3,1,-1,0"
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(registry.RegistryError, match=r"labels.csv:5: column 'nodule' has '-1'; expected one of 1, 0, blank"):
        build("csv", tmp_path, **opts)
    d = build("csv", tmp_path, **{**opts, "uncertain": "ignore"})
    assert np.isnan(np.concatenate([d.label_matrix(s) for s in ("train", "val", "test")])).sum() == 3
    (tmp_path / "b" / "5.png").write_bytes(b"not an image")
    with pytest.raises(registry.RegistryError, match=r"5.png \(.*labels.csv:6\): cannot read the image"):
        build("csv", tmp_path, **{**opts, "uncertain": "ignore"})
    with pytest.raises(registry.RegistryError, match=r"5.png \(.*labels.csv:6\): cannot read the image"):
        build("csv", tmp_path, **{**opts, "uncertain": "ignore", "cache": False})  # headers checked up front
    d = build("csv", tmp_path, **{**opts, "uncertain": "ignore", "cache": False, "on_error": "skip"})
    assert d.extras["report"]["skipped"] == {"unreadable": 1} and d.extras["cache"] is None
    assert d.train[0]["image"].shape == (1, 32, 32)  # decoded from the file on access
    # findings in one column, NIH-style
    (tmp_path / "f.csv").write_text("image,findings\na/1.png,Effusion|Nodule\na/2.png,No Finding\nb/3.png,Nodule\n"
                                    "b/4.png,Edema\nb/6.png,No Finding\n")
    d = build("csv", tmp_path, path=str(tmp_path / "f.csv"), findings_col="findings", image_size=32, augment=False)
    assert d.class_names == ["Edema", "Effusion", "Nodule"]
    items = all_items(d)
    assert items["1"]["labels"].tolist() == [0.0, 1.0, 1.0] and items["2"]["labels"].tolist() == [0.0, 0.0, 0.0]


class TestDatasetContracts(DatasetContract):
    @pytest.fixture(params=["coco", "yolo", "mask_folder", "medmnist"])
    def bundle(self, request, covid, tmp_path):
        root = covid["root"]
        kw = {"coco": dict(annotations=str(root / "coco.json"), images=str(root / "coco_images")),
              "yolo": dict(data=str(root / "yolo" / "data.yaml")),
              "mask_folder": dict(root=str(root / "masks_layout")),
              "medmnist": dict(path=str(SHARED / "pneumoniamnist" / "pneumoniamnist.npz"))}[request.param]
        return build(request.param, tmp_path, image_size=32, **kw)


def test_chestx_det_json_with_polygons(covid, tmp_path):
    """covid-seg-100's real images and boxes in ChestX-Det's JSON layout (box corners as polygons)."""
    root = tmp_path / "cxd"
    shutil.copytree(covid["root"] / "coco_images", root / "train")
    entries = []
    for stem, anns in sorted(covid["truth"].items()):
        entries.append({"file_name": f"{stem}.png", "syms": [STRUCTURES[c] for c, *_ in anns],
                        "boxes": [b for _, b, *_ in anns],
                        "polygons": [[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]] for _, b, *_ in anns]})
    (root / "train.json").write_text(json.dumps(entries[:30]))
    (root / "test.json").write_text(json.dumps(entries[30:]))
    d = build("chestx_det", tmp_path, root=str(root), train_json="train.json", test_json="test.json",
              image_size=64, augment=False)
    assert d.class_names == sorted(STRUCTURES) and len(d.test) == 10 and len(d.train) + len(d.val) == 30
    items = all_items(d)
    for stem, anns in covid["truth"].items():
        item = items[stem]
        for c, (x0, y0, x1, y1), w, h, _ in anns:
            k = d.class_names.index(STRUCTURES[c])
            exp = torch.tensor([x0 * 64 / w, y0 * 64 / h, x1 * 64 / w, y1 * 64 / h])
            assert any(torch.allclose(b, exp, atol=1e-3) for b, bc in zip(item["boxes"], item["box_labels"]) if bc == k)
            ys, xs = np.nonzero(item["masks"][k].numpy())  # the polygon is the box: its mask fills it
            assert xs.min() >= exp[0] - 1 and xs.max() <= exp[2] + 1 and ys.min() >= exp[1] - 1
    entries[3]["boxes"] = entries[3]["boxes"][:-1]
    (root / "train.json").write_text(json.dumps(entries[:30]))
    n = len(entries[3]["syms"])
    with pytest.raises(registry.RegistryError, match=rf"train.json:\[3\]: {n} syms, {n - 1} boxes, {n} polygons; expected one"):
        build("chestx_det", tmp_path, root=str(root), train_json="train.json", test_json="test.json", image_size=64)


def test_tbx11k_layout_is_coco_with_val_as_test(covid, tmp_path):
    root = tmp_path / "TBX11K"
    doc = json.loads((covid["root"] / "coco.json").read_text())
    (root / "annotations" / "json").mkdir(parents=True)
    for name, images in (("TBX11K_train.json", doc["images"][:30]), ("TBX11K_val.json", doc["images"][30:])):
        ids = {im["id"] for im in images}
        part = {**doc, "images": [{**im, "file_name": f"sick/{im['file_name']}"} for im in images],
                "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}
        (root / "annotations" / "json" / name).write_text(json.dumps(part))
    shutil.copytree(covid["root"] / "coco_images", root / "imgs" / "sick")
    d = build("tbx11k", tmp_path, root=str(root), image_size=32)
    assert len(d.test) == 10 and len(d.train) + len(d.val) == 30 and d.class_names == STRUCTURES
    assert "masks" not in d.train[0] and len(d.train[0]["boxes"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coco", "yolo", "mask_folder", "csv"])
def test_train_runs_on_each_layout(name, covid, tmp_path):
    root = covid["root"]
    opts = {"coco": [f"dataset.annotations={root / 'coco.json'}", f"dataset.images={root / 'coco_images'}"],
            "yolo": [f"dataset.data={root / 'yolo' / 'data.yaml'}"],
            "mask_folder": [f"dataset.root={root / 'masks_layout'}"],
            "csv": []}[name]
    if name == "csv":  # covid-seg-100's own metadata.csv: one finding column, real images
        (tmp_path / "images").mkdir()
        rows = list(csv.DictReader(open(COVID / "metadata.csv")))
        with open(tmp_path / "meta.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "patient", "finding"])
            for r in rows:
                w.writerow([Path(r["filename"]).stem + ".png", r["patientid"], r["finding"].replace("/", "|")])
        opts = [f"dataset.path={tmp_path / 'meta.csv'}", f"dataset.images={COVID / 'images'}",
                "dataset.findings_col=finding", "dataset.patient_col=patient"]
    metrics = train_once([f"dataset={name}", "dataset.task=classification", f"dataset.cache_dir={tmp_path / 'cache'}",
                          *opts], tmp_path / "run")
    assert metrics["epochs_run"] == 1 and (tmp_path / "run" / "predictions.csv").is_file()
