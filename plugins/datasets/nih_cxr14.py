"""``nih_cxr14``: NIH ChestX-ray14 as published.

Layout under ``root``: ``Data_Entry_2017*.csv`` (``Finding Labels`` pipe-separated, ``No Finding`` for
none), images anywhere below ``root`` (the release spreads them over ``images_001/images/`` …),
optional ``train_val_list.txt`` / ``test_list.txt`` (the official patient-disjoint split; val is then
``val_fraction`` of the train_val patients) and optional ``BBox_List_2017.csv`` (984 boxes of 8 findings on 880 images of 726 patients, all in the
official test list; exposed as ``boxes``/``box_labels`` in items, for weak-localization evaluation).

``task=detection`` trains on those 880 images only (an image without a box there has unlocalized
findings, not none, so it cannot be a negative); as they all lie in the official test list, they get
their own seeded patient-level split (``val_fraction`` each for val and test) and the box classes are
the 8 findings of the box file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_automl.data import DataError, FileIndex, LoaderOptions, Problems, Record, build_bundle, loader, read_csv
from cxr_automl.plugin.interfaces import DatasetBundle

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
           "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
BOX_CLASSES = CLASSES[:8]  # the findings BBox_List_2017.csv localizes
NO_FINDING = "No Finding"


def _find_one(root: Path, pattern: str, option: str) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise DataError(f"{root}: no {pattern} found; set dataset.{option} or dataset.root")
    return hits[-1]  # the newest release sorts last (Data_Entry_2017_v2020.csv after Data_Entry_2017.csv)


def read_boxes(path: Path, problems: Problems) -> dict[str, list[tuple[list[float], int]]]:
    """``BBox_List_2017.csv`` → image → [(xyxy, class index)]. Its header is ``Bbox [x,y,w,h],,,``: the
    four numbers are the 3rd to 6th cells whatever the header calls them."""
    out: dict[str, list[tuple[list[float], int]]] = {}
    for line, row in read_csv(path, ["Image Index", "Finding Label"]):
        vals = list(row.values())
        try:
            x, y, w, h = (float(v) for v in vals[2:6])
        except ValueError:
            problems("box", f"{path}:{line}: box {vals[2:6]} is not four numbers x,y,w,h")
            continue
        label = "Infiltration" if row["Finding Label"] == "Infiltrate" else row["Finding Label"]
        if label not in CLASSES:
            problems("box", f"{path}:{line}: unknown finding {row['Finding Label']!r}")
            continue
        out.setdefault(row["Image Index"], []).append(([x, y, x + w, y + h], CLASSES.index(label)))
    return out


@loader("classification")
def nih_cxr14(root: str = "data/nih_cxr14", labels_csv: str | None = None, images: str | None = None,
              official_split: bool = True, boxes: bool = True, view: str = "all", *, task: str,
              opts: LoaderOptions) -> DatasetBundle:
    """NIH ChestX-ray14: classification of 14 findings, multi-label (default), or detection of the 8
    boxed findings on the images of ``BBox_List_2017.csv``. ``view``: all | PA | AP."""
    base = Path(root).expanduser()
    problems = Problems(opts.on_error, "nih_cxr14")
    csv_path = Path(labels_csv) if labels_csv else _find_one(base, "Data_Entry_2017*.csv", "labels_csv")
    index = FileIndex(Path(images) if images else base)
    split_of: dict[str, str] = {}
    if official_split and task != "detection" and (base / "test_list.txt").exists():
        for split, fname in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
            if (base / fname).exists():
                split_of.update({ln.strip(): split for ln in (base / fname).read_text().split() if ln.strip()})
    box_map = read_boxes(base / "BBox_List_2017.csv", problems) if boxes and (base / "BBox_List_2017.csv").exists() else {}
    if view not in ("all", "PA", "AP"):
        raise DataError(f"view={view!r}; use all, PA or AP")
    records: list[Record] = []
    for line, row in read_csv(csv_path, ["Image Index", "Finding Labels", "Patient ID"]):
        where = f"{csv_path}:{line}"
        if view != "all" and row.get("View Position") != view:
            continue
        findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
        unknown = [f for f in findings if f not in CLASSES and f != NO_FINDING]
        if unknown or not findings or (NO_FINDING in findings and len(findings) > 1):
            problems("label", f"{where}: 'Finding Labels' is {row['Finding Labels']!r}; expected "
                              f"'{NO_FINDING}' or findings from {'|'.join(CLASSES)}")
            continue
        name = row["Image Index"]
        path = index.find(name)
        if path is None:
            problems("missing", f"{where}: image {name!r} not found under {index.root}")
            continue
        labels = np.array([c in findings for c in CLASSES], np.float32)
        rec = Record(image_id=name, path=path, patient=row["Patient ID"], labels=labels, source=where,
                     split=split_of.get(name) if split_of else None)
        if name in box_map:
            rec.boxes = np.array([b for b, _ in box_map[name]], np.float32)
            rec.box_labels = np.array([c for _, c in box_map[name]], np.int64)
        records.append(rec)
    if split_of:  # official lists cover every image; a row outside both lists would leak across splits
        orphans = [r for r in records if r.split is None]
        if orphans:
            problems("split", f"{orphans[0].source}: {orphans[0].image_id} is in neither train_val_list.txt nor "
                              f"test_list.txt ({len(orphans)} such rows)")
            records = [r for r in records if r.split is not None]
    if task == "detection":
        records = [r for r in records if r.image_id in box_map]
    return build_bundle("nih_cxr14", records, CLASSES, problems, opts, task=task, has_boxes=bool(box_map),
                        box_classes=BOX_CLASSES,
                        extras={"labels_csv": str(csv_path)})
