"""``rsna_pneumonia``: RSNA Pneumonia Detection Challenge as published on Kaggle.

Layout under ``root``: ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``; one row per
box, one row with blank box for a negative image) and the DICOMs ``stage_2_train_images/<patientId>.dcm``
(PNG/JPEG conversions with the same stem work too). Classification label ``Pneumonia`` = Target; the
boxes (xyxy, original pixels mapped to the output size) are in items as ``boxes`` / ``box_labels``.
One image per patientId, so the seeded 80/10/10 split is patient-level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_automl.data import FileIndex, LoaderOptions, Problems, Record, build_bundle, loader, read_csv
from cxr_automl.plugin.interfaces import DatasetBundle

CLASSES = ["Pneumonia"]


@loader("classification")
def rsna_pneumonia(root: str = "data/rsna-pneumonia", labels_csv: str = "stage_2_train_labels.csv",
                   images: str = "stage_2_train_images", *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """RSNA pneumonia: classification of ``Target`` (default) or detection of its lung-opacity boxes;
    Target-0 images stay in every split as negatives (the challenge scores them too)."""
    base = Path(root).expanduser()
    csv_path = base / labels_csv
    problems = Problems(opts.on_error, "rsna_pneumonia")
    index = FileIndex(base / images if (base / images).is_dir() else base)
    groups: dict[str, dict] = {}
    bad: set[str] = set()
    for line, row in read_csv(csv_path, ["patientId", "x", "y", "width", "height", "Target"]):
        where = f"{csv_path}:{line}"
        pid, target = row["patientId"], row["Target"]
        g = groups.setdefault(pid, {"where": where, "target": set(), "boxes": []})
        cells = [row[k] for k in ("x", "y", "width", "height")]
        if target not in ("0", "1"):
            problems("label", f"{where}: Target is {target!r}; expected 0 or 1")
            bad.add(pid)
            continue
        g["target"].add(target)
        if target == "1":
            try:
                x, y, w, h = (float(c) for c in cells)
            except ValueError:
                problems("box", f"{where}: Target 1 needs a box, got x,y,width,height = {','.join(cells)}")
                bad.add(pid)
                continue
            g["boxes"].append([x, y, x + w, y + h])
        elif any(cells):
            problems("box", f"{where}: Target 0 with a box {','.join(cells)}; a negative row has no box")
            bad.add(pid)
    records = []
    for pid, g in groups.items():
        if pid in bad:
            continue
        if len(g["target"]) != 1:
            problems("label", f"{g['where']}: patient {pid} has rows with Target 0 and 1")
            continue
        path = index.find(pid)
        if path is None:
            problems("missing", f"{g['where']}: image {pid}.dcm not found under {index.root}")
            continue
        boxes = np.array(g["boxes"], np.float32).reshape(-1, 4)
        records.append(Record(image_id=pid, path=path, patient=pid, labels=np.array([float(len(boxes) > 0)], np.float32),
                              source=g["where"], boxes=boxes, box_labels=np.zeros(len(boxes), np.int64)))
    return build_bundle("rsna_pneumonia", records, CLASSES, problems, opts, task=task, has_boxes=True)
