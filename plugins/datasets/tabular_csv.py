"""``csv``: any multi-label CSV — the format for a hospital's own export.

One row per image. ``image_col`` holds a path relative to ``images`` (default: the CSV's folder).
Labels come either from ``label_cols`` (one 0/1 column per class, blank = unknown, optionally -1 =
uncertain mapped by ``uncertain``) or from one ``findings_col`` with ``findings_sep``-separated class
names (``no_finding`` marks a negative image). ``patient_col`` keeps a patient's images in one split
(default: each image is its own patient); ``split_col`` with values train/val/test gives an official
split. DICOM files are read by pydicom.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cxr_automl.data import DataError, LoaderOptions, Problems, Record, build_bundle, loader, parse_label, read_csv
from cxr_automl.plugin.interfaces import DatasetBundle

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


@loader("classification")
def tabular_csv(path: str = "data/labels.csv", images: str | None = None, image_col: str = "image",
                label_cols: list[str] | None = None, findings_col: str | None = None, findings_sep: str = "|",
                no_finding: str = "No Finding", patient_col: str | None = None, split_col: str | None = None,
                uncertain: str = "error", delimiter: str = ",", *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """Generic multi-label CSV. ``uncertain``: error | ones | zeros | ignore for -1 cells."""
    csv_path = Path(path).expanduser()
    image_root = Path(images).expanduser() if images else csv_path.parent
    problems = Problems(opts.on_error, "csv")
    if (label_cols is None) == (findings_col is None):
        raise DataError("set exactly one of dataset.label_cols (one 0/1 column per class) or "
                        "dataset.findings_col (one column of separated class names)")
    table: dict[float | None, float] = {1.0: 1.0, 0.0: 0.0, None: math.nan}
    if uncertain != "error":
        u = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}
        if uncertain not in u:
            raise DataError(f"uncertain={uncertain!r}; use error, ones, zeros or ignore")
        table[-1.0] = u[uncertain]
    required = [image_col, *(label_cols or [findings_col]), *[c for c in (patient_col, split_col) if c]]
    rows = list(read_csv(csv_path, required, delimiter))  # type: ignore[list-item]
    classes = list(label_cols) if label_cols else sorted(
        {f.strip() for _, r in rows for f in r[findings_col].split(findings_sep)  # type: ignore[index]
         if f.strip() and f.strip() != no_finding})
    records: list[Record] = []
    for line, row in rows:
        where = f"{csv_path}:{line}"
        if label_cols:
            values = [parse_label(row[c], table, where, c, problems) for c in label_cols]
            if any(v is None for v in values):
                continue
        else:
            found = {f.strip() for f in row[findings_col].split(findings_sep) if f.strip()}  # type: ignore[index]
            values = [float(c in found) for c in classes]
        split = None
        if split_col:
            split = SPLIT_NAMES.get(row[split_col].strip().lower())
            if split is None:
                problems("split", f"{where}: column {split_col!r} has {row[split_col]!r}; use train, val or test")
                continue
        image = image_root / row[image_col]
        if not image.is_file():
            problems("missing", f"{where}: image {row[image_col]!r} not found under {image_root}")
            continue
        records.append(Record(image_id=row[image_col], path=str(image),
                              patient=row[patient_col] if patient_col else row[image_col],
                              labels=np.array(values, np.float32), source=where, split=split))
    return build_bundle("csv", records, classes, problems, opts, task=task, extras={"labels_csv": str(csv_path)})
