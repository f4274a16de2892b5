"""``vindr_cxr``: VinDr-CXR (VinBigData competition ``train.csv`` layout).

Layout under ``root``: ``train.csv`` with ``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max``
— one row per finding box per radiologist (``No finding`` rows have no box) — and the images anywhere
below ``root`` as ``<image_id>.dicom`` / ``.dcm`` / ``.png``.

**Fusion rule** (each training image was read independently by several radiologists): for every
class, ``votes`` = the number of distinct radiologists who marked it; the image label is 1 when
``votes >= min_votes`` where ``fusion=any`` → 1, ``majority`` → more than half of the image's
readers, ``all`` → every reader. Boxes are kept from every reader who marked a class that is
positive after fusion (no box merging; a detection head can apply WBF/NMS). ``No finding`` is not a
class: an image is negative for every class nobody (or too few) marked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cxr_automl.data import DataError, FileIndex, Problems, Record, build_bundle, read_csv
from cxr_automl.interfaces import DatasetBundle

CLASSES = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
           "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening",
           "Pneumothorax", "Pulmonary fibrosis"]
NO_FINDING = "No finding"


def min_votes(fusion: str, readers: int) -> int:
    if fusion == "any":
        return 1
    if fusion == "majority":
        return readers // 2 + 1
    if fusion == "all":
        return readers
    raise DataError(f"fusion={fusion!r}; use any, majority or all")


def vindr_cxr(root: str = "data/vindr-cxr", labels_csv: str = "train.csv", fusion: str = "majority",
              image_size: int = 224, fit: str = "stretch", cache: bool = True, cache_dir: str | None = None,
              cache_workers: int = 0, seed: int = 0, val_fraction: float = 0.1, label_fraction: float = 1.0,
              on_error: str = "raise", augment: bool = True) -> DatasetBundle:
    """VinDr-CXR: 14 local findings fused over radiologists, with their boxes."""
    min_votes(fusion, 3)  # validate early
    base = Path(root).expanduser()
    csv_path = base / labels_csv
    problems = Problems(on_error, "vindr_cxr")
    index = FileIndex(base)
    groups: dict[str, dict] = {}
    bad: set[str] = set()
    for line, row in read_csv(csv_path, ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"]):
        where = f"{csv_path}:{line}"
        g = groups.setdefault(row["image_id"], {"where": where, "readers": set(), "marks": []})
        g["readers"].add(row["rad_id"])
        name = row["class_name"]
        if name == NO_FINDING:
            continue
        if name not in CLASSES:
            problems("label", f"{where}: class_name {name!r} is not a VinDr-CXR finding ({', '.join(CLASSES)}, "
                              f"{NO_FINDING})")
            bad.add(row["image_id"])
            continue
        cells = [row[k] for k in ("x_min", "y_min", "x_max", "y_max")]
        try:
            box = [float(c) for c in cells]
        except ValueError:
            problems("box", f"{where}: a {name} row needs x_min,y_min,x_max,y_max, got {','.join(cells)}")
            bad.add(row["image_id"])
            continue
        if any(math.isnan(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            problems("box", f"{where}: box {cells} is empty or inverted")
            bad.add(row["image_id"])
            continue
        g["marks"].append((CLASSES.index(name), row["rad_id"], box))
    records = []
    for image_id, g in groups.items():
        if image_id in bad:
            continue
        need = min_votes(fusion, len(g["readers"]))
        votes = {c: len({r for cc, r, _ in g["marks"] if cc == c}) for c in range(len(CLASSES))}
        labels = np.array([float(votes[c] >= need) for c in range(len(CLASSES))], np.float32)
        kept = [(c, b) for c, _, b in g["marks"] if labels[c]]
        path = index.find(image_id)
        if path is None:
            problems("missing", f"{g['where']}: image {image_id}.dicom not found under {index.root}")
            continue
        records.append(Record(image_id=image_id, path=path, patient=image_id, labels=labels, source=g["where"],
                              boxes=np.array([b for _, b in kept], np.float32).reshape(-1, 4),
                              box_labels=np.array([c for c, _ in kept], np.int64),
                              ))
    return build_bundle("vindr_cxr", records, CLASSES, problems, image_size=image_size, fit=fit, cache=cache,
                        cache_dir=cache_dir, cache_workers=cache_workers, seed=seed, val_fraction=val_fraction,
                        label_fraction=label_fraction, augment=augment, has_boxes=True,
                        extras={"fusion": fusion})
