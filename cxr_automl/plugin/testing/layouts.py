"""Every dataset layout written from one folder of real annotated chest X-rays (tests and benchmarks).

``covid-seg-100`` (../shared/data, see its PROVENANCE.md) holds real CXRs with boxes and mask crops in
``structure.csv``. :func:`read_covid` places each crop into a full-image mask; each ``write_*`` writes
the same images and annotations in one published layout and returns the config overrides that load
it, so one test can run every layout × task × head on real pixels, boxes and masks.

What each layout gets:
- anatomy (Cardiomediastinum, Left Lung, Right Lung) as boxes and masks in the generic layouts
  (``yolo``, ``coco``, ``tbx11k``, ``chestx_det``, ``mask_folder``); the ``negatives`` images are
  written without any annotation (an empty YOLO label file, a COCO image without annotations, a
  ChestX-Det entry without syms, TBX11K's ``health`` folder);
- the opacities (Ground Glass Opacities, Consolidation) under each dataset's own vocabulary where
  its classes are fixed: VinDr ``Lung Opacity``/``Consolidation`` (two readers, the second's box
  shifted 3 px, a third reading "No finding"), RSNA ``Pneumonia`` boxes (Target 0 for images
  without), NIH ``Infiltrate``/``Pneumonia`` boxes in ``BBox_List_2017.csv``, and SIIM's one RLE
  mask channel (named Pneumothorax there) from the opacity masks, ``-1`` for images without.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ANATOMY = ("Cardiomediastinum", "Left Lung", "Right Lung")
OPACITIES = ("Ground Glass Opacities", "Consolidation")


@dataclass
class Annotated:
    """One image and its annotations: (class, xyxy box in pixels, bool (H, W) full-image mask)."""

    name: str
    path: Path
    width: int
    height: int
    objects: list[tuple[str, list[float], np.ndarray]] = field(default_factory=list)

    def of(self, classes: tuple[str, ...]) -> list[tuple[int, list[float], np.ndarray]]:
        return [(classes.index(c), b, m) for c, b, m in self.objects if c in classes]


def read_covid(root: Path, n: int = 24, need: tuple[str, ...] = ANATOMY) -> list[Annotated]:
    """The first ``n`` images (sorted by name) that have a mask for every class in ``need``."""
    rows = list(csv.DictReader(open(root / "structure.csv", newline="")))
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        if r["Mask"]:
            by_image.setdefault(r["Image"], []).append(r)
    out = []
    for image in sorted(by_image):
        if not set(need) <= {r["Template Name"] for r in by_image[image]}:
            continue
        w, h = Image.open(root / image).size
        item = Annotated(Path(image).name, root / image, w, h)
        for r in by_image[image]:
            left, top, bw, bh = (int(r[f]) for f in ("Left", "Top", "Width", "Height"))
            crop = np.asarray(Image.open(root / r["Mask"]).convert("RGB")).max(axis=-1) > 0
            full = np.zeros((h, w), bool)
            full[top:top + bh, left:left + bw] = crop[:h - top, :w - left]
            if full.any():
                item.objects.append((r["Template Name"], [left, top, left + bw, top + bh], full))
        out.append(item)
        if len(out) == n:
            break
    return out


def _copy(items: list[Annotated], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for a in items:
        shutil.copy(a.path, folder / a.name)


def write_yolo(items: list[Annotated], out: Path, negatives: int = 2) -> list[str]:
    """``data.yaml`` + images/labels per split (every 5th image val, the next test); the last
    ``negatives`` images get an empty label file."""
    out.mkdir(parents=True, exist_ok=True)
    for k, a in enumerate(items):
        split = {3: "val", 4: "test"}.get(k % 5, "train")
        _copy([a], out / "images" / split)
        lines = [] if k >= len(items) - negatives else [
            f"{c} {(b[0] + b[2]) / 2 / a.width} {(b[1] + b[3]) / 2 / a.height} {(b[2] - b[0]) / a.width} "
            f"{(b[3] - b[1]) / a.height}" for c, b, _ in a.of(ANATOMY)]
        label = out / "labels" / split / f"{Path(a.name).stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(f"{line}\n" for line in lines))
    # an absolute path: ultralytics reads a relative one under its own datasets folder, not beside the yaml
    (out / "data.yaml").write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\ntest: images/test\n"
                                   "names:\n" + "".join(f"  {k}: {n}\n" for k, n in enumerate(ANATOMY)))
    return ["dataset=yolo", f"dataset.data={out / 'data.yaml'}"]


def coco_doc(items: list[Annotated], classes: tuple[str, ...] = ANATOMY, negatives: int = 2,
             masks: bool = True) -> dict:
    from pycocotools import mask as mask_utils
    doc: dict = {"images": [], "annotations": [],
                 "categories": [{"id": k + 1, "name": n} for k, n in enumerate(classes)]}
    for k, a in enumerate(items):
        doc["images"].append({"id": k, "file_name": a.name, "width": a.width, "height": a.height})
        if k >= len(items) - negatives:
            continue
        for c, b, m in a.of(classes):
            ann = {"id": len(doc["annotations"]), "image_id": k, "category_id": c + 1, "iscrowd": 0,
                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": int(m.sum())}
            if masks:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            doc["annotations"].append(ann)
    return doc


def write_coco(items: list[Annotated], out: Path, negatives: int = 2) -> list[str]:
    """One COCO JSON (RLE segmentations) and its images; split 80/10/10 by the loader."""
    out.mkdir(parents=True, exist_ok=True)
    _copy(items, out / "images")
    (out / "annotations.json").write_text(json.dumps(coco_doc(items, negatives=negatives)))
    return ["dataset=coco", f"dataset.annotations={out / 'annotations.json'}", f"dataset.images={out / 'images'}"]


def write_tbx11k(items: list[Annotated], out: Path, negatives: int = 2) -> list[str]:
    """TBX11K as published: train/val JSONs (val is the test split here), ``imgs/{health,sick}``;
    the negatives go to ``health`` with no annotation."""
    n_val = max(2, len(items) // 5)
    for name, part in (("TBX11K_train.json", items[:-n_val]), ("TBX11K_val.json", items[-n_val:])):
        doc = coco_doc(part, negatives=negatives if name.endswith("train.json") else 1, masks=False)
        (out / "annotations" / "json").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / "json" / name).write_text(json.dumps(doc))
        for k, a in enumerate(part):
            negative = not any(ann["image_id"] == k for ann in doc["annotations"])
            _copy([a], out / "imgs" / ("health" if negative else "sick"))
    return ["dataset=tbx11k", f"dataset.root={out}"]


def _polygon(mask: np.ndarray) -> list[list[float]]:
    import cv2  # opencv comes with ultralytics
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    biggest = max(contours, key=cv2.contourArea)
    return [[float(x), float(y)] for x, y in biggest[:, 0, :]]


def write_chestx_det(items: list[Annotated], out: Path, negatives: int = 2) -> list[str]:
    """ChestX-Det JSON lists (train and test) with syms, boxes and the masks' outer polygons."""
    out.mkdir(parents=True, exist_ok=True)
    n_test = max(2, len(items) // 5)
    for name, part in (("ChestX_Det_train.json", items[:-n_test]), ("ChestX_Det_test.json", items[-n_test:])):
        entries = []
        for k, a in enumerate(part):
            objs = [] if (name.endswith("train.json") and k >= len(part) - negatives) else a.of(ANATOMY)
            entries.append({"file_name": a.name, "syms": [ANATOMY[c] for c, _, _ in objs],
                            "boxes": [b for _, b, _ in objs], "polygons": [_polygon(m) for _, _, m in objs]})
        (out / name).write_text(json.dumps(entries))
    _copy(items, out / "images")
    return ["dataset=chestx_det", f"dataset.root={out}"]


def write_mask_folder(items: list[Annotated], out: Path, image_suffix: str = "") -> list[str]:
    """``images/`` + ``masks/<structure>/`` (JSRT/SCR style); ``image_suffix='.IMG'`` names the images
    ``<name>.IMG.png`` and the masks ``<name>.png``, as public JSRT copies do."""
    out.mkdir(parents=True, exist_ok=True)
    for a in items:
        stem = Path(a.name).stem
        (out / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(a.path, out / "images" / f"{stem}{image_suffix}.png")
        for c, _, m in a.of(ANATOMY):
            folder = out / "masks" / ANATOMY[c]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(folder / f"{stem}.png")
    return ["dataset=mask_folder", f"dataset.root={out}"]


def _opacity(a: Annotated) -> np.ndarray:
    out = np.zeros((a.height, a.width), bool)
    for _, _, m in a.of(OPACITIES):
        out |= m
    return out


def write_siim(items: list[Annotated], out: Path) -> list[str]:
    """``train-rle.csv`` (the original relative RLE, one row per opacity; ``-1`` when none) + PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    from cxr_automl_plugins.datasets.siim_acr import rle_encode
    _copy(items, out / "images")
    with open(out / "train-rle.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageId", " EncodedPixels"])
        for a in items:
            masks = [m for _, _, m in a.of(OPACITIES)]
            for m in masks or [None]:
                w.writerow([Path(a.name).stem, " " + (rle_encode(m) if m is not None else "-1")])
    return ["dataset=siim_acr", f"dataset.root={out}"]


def write_vindr(items: list[Annotated], out: Path) -> list[str]:
    """VinBigData ``train.csv``: per opacity two readers (R1 the box, R2 it shifted 3 px), R3 reads
    "No finding"; images without opacities: three "No finding" rows."""
    out.mkdir(parents=True, exist_ok=True)
    names = {"Ground Glass Opacities": ("Lung Opacity", 7), "Consolidation": ("Consolidation", 4)}
    _copy(items, out / "train")
    with open(out / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
        for a in items:
            stem = Path(a.name).stem
            objs = a.of(OPACITIES)
            for c, b, _ in objs:
                name, cid = names[OPACITIES[c]]
                w.writerow([stem, name, cid, "R1", *b])
                shifted = [min(b[0] + 3, b[2] - 1), min(b[1] + 3, b[3] - 1), min(b[2] + 3, a.width), min(b[3] + 3, a.height)]
                w.writerow([stem, name, cid, "R2", *shifted])
            for reader in (["R3"] if objs else ["R1", "R2", "R3"]):
                w.writerow([stem, "No finding", 14, reader, "", "", "", ""])
    return ["dataset=vindr_cxr", f"dataset.root={out}"]


def write_rsna(items: list[Annotated], out: Path) -> list[str]:
    """``stage_2_train_labels.csv`` with one row per opacity box (Target 1) or one Target-0 row."""
    out.mkdir(parents=True, exist_ok=True)
    _copy(items, out / "stage_2_train_images")
    with open(out / "stage_2_train_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for a in items:
            stem, objs = Path(a.name).stem, a.of(OPACITIES)
            for _, b, _ in objs:
                w.writerow([stem, b[0], b[1], b[2] - b[0], b[3] - b[1], 1])
            if not objs:
                w.writerow([stem, "", "", "", "", 0])
    return ["dataset=rsna_pneumonia", f"dataset.root={out}"]


def write_nih(items: list[Annotated], out: Path) -> list[str]:
    """``Data_Entry_2017.csv`` (opacities as Infiltration / Pneumonia findings, one patient per image) and
    ``BBox_List_2017.csv`` with their boxes (NIH's own spelling ``Infiltrate``)."""
    out.mkdir(parents=True, exist_ok=True)
    findings = {"Ground Glass Opacities": ("Infiltration", "Infiltrate"), "Consolidation": ("Pneumonia", "Pneumonia")}
    _copy(items, out / "images_001" / "images")
    with open(out / "Data_Entry_2017.csv", "w", newline="") as fh, \
            open(out / "BBox_List_2017.csv", "w", newline="") as bh:
        w, bw = csv.writer(fh), csv.writer(bh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        bw.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""])
        for k, a in enumerate(items):
            objs = a.of(OPACITIES)
            labels = sorted({findings[OPACITIES[c]][0] for c, _, _ in objs}) or ["No Finding"]
            w.writerow([a.name, "|".join(labels), 0, f"{k:05d}", 50, "M", "PA", a.width, a.height, 0.14, 0.14])
            for c, b, _ in objs:
                bw.writerow([a.name, findings[OPACITIES[c]][1], b[0], b[1], b[2] - b[0], b[3] - b[1], "", "", ""])
    return ["dataset=nih_cxr14", f"dataset.root={out}"]


#: layout name → writer(items, out) → overrides
WRITERS = {"yolo": write_yolo, "coco": write_coco, "tbx11k": write_tbx11k, "chestx_det": write_chestx_det,
           "mask_folder": write_mask_folder, "siim_acr": write_siim, "vindr_cxr": write_vindr,
           "rsna_pneumonia": write_rsna, "nih_cxr14": write_nih}


def write_all(covid: Path, out: Path, n: int = 24) -> dict[str, list[str]]:
    """Every layout of :data:`WRITERS` under ``out/<layout>``; returns layout → overrides."""
    out.mkdir(parents=True, exist_ok=True)
    items = read_covid(covid, n)
    return {name: writer(items, out / name) for name, writer in WRITERS.items()}
