"""``vindr_cxr``: VinDr-CXR (VinBigData competition ``train.csv`` layout).

Layout under ``root``: ``train.csv`` with ``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max``
— one row per finding box per radiologist (``No finding`` rows have no box) — and the images anywhere
below ``root`` as ``<image_id>.dicom`` / ``.dcm`` / ``.png``.

**Fusion rule** (each training image was read independently by several radiologists): for every
class, ``votes`` = the number of distinct radiologists who marked it; the image label is 1 when
``votes >= min_votes`` where ``fusion=any`` → 1, ``majority`` → more than half of the image's
readers, ``all`` → every reader. Boxes are kept from every reader who marked a class that is
positive after fusion. ``boxes=fused`` (default) merges them: per class, readers' boxes that overlap
(IoU >= ``box_iou``) form one finding whose box is their mean, kept when at least as many readers as
the label rule needs drew it (so a class positive by votes whose readers drew disjoint boxes has no
box, and is negative for detection); ``boxes=all`` keeps every reader's box. ``No finding`` is not a
class: an image is negative for every class nobody (or too few) marked, and "No finding" images stay
in every split as detection negatives, as in the VinBigData protocol.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from cxr_automl.data import DataError, FileIndex, LoaderOptions, Problems, Record, build_bundle, loader, read_csv
from cxr_automl.plugin.interfaces import DatasetBundle

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


def fuse_boxes(marks: list[tuple[str, list[float]]], need: int, iou: float) -> list[list[float]]:
    """One class's (reader, box) marks → fused boxes: greedy clusters of boxes from distinct readers
    overlapping the cluster's first box by ``iou``; a cluster of ``need`` or more readers gives the
    mean of its boxes."""
    left = sorted(marks, key=lambda m: -(m[1][2] - m[1][0]) * (m[1][3] - m[1][1]))
    out = []
    while left:
        (reader, seed_box), rest = left[0], left[1:]
        cluster, left, seen = [seed_box], [], {reader}
        for r, b in rest:
            if r not in seen and float(box_iou(torch.tensor([seed_box]), torch.tensor([b]))[0, 0]) >= iou:
                cluster.append(b)
                seen.add(r)
            else:
                left.append((r, b))
        if len(seen) >= need:
            out.append(np.mean(np.array(cluster, np.float32), axis=0).tolist())
    return out


@loader("classification")
def vindr_cxr(root: str = "data/vindr-cxr", labels_csv: str = "train.csv", fusion: str = "majority",
              boxes: str = "fused", box_iou: float = 0.4, *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """VinDr-CXR: classification of 14 local findings fused over radiologists (default), or detection
    of their boxes (fused or all, see the module docstring)."""
    min_votes(fusion, 3)  # validate early
    if boxes not in ("fused", "all"):
        raise DataError(f"boxes={boxes!r}; use fused (one box per finding agreed by readers) or all (every reader's)")
    base = Path(root).expanduser()
    csv_path = base / labels_csv
    problems = Problems(opts.on_error, "vindr_cxr")
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
        if boxes == "all":
            kept = [(c, b) for c, _, b in g["marks"] if labels[c]]
        else:
            kept = [(c, b) for c in range(len(CLASSES)) if labels[c]
                    for b in fuse_boxes([(r, bb) for cc, r, bb in g["marks"] if cc == c], need, box_iou)]
        path = index.find(image_id)
        if path is None:
            problems("missing", f"{g['where']}: image {image_id}.dicom not found under {index.root}")
            continue
        records.append(Record(image_id=image_id, path=path, patient=image_id, labels=labels, source=g["where"],
                              boxes=np.array([b for _, b in kept], np.float32).reshape(-1, 4),
                              box_labels=np.array([c for c, _ in kept], np.int64),
                              ))
    return build_bundle("vindr_cxr", records, CLASSES, problems, opts, task=task, has_boxes=True,
                        extras={"fusion": fusion, "boxes": boxes})
