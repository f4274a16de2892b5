"""``chexpert``: CheXpert (or CheXpert-small) as published.

Layout under ``root``: ``train.csv`` and optional ``valid.csv`` whose ``Path`` column reads
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``; paths are resolved against
``root``, its parent, or ``root`` with the release folder name dropped. Label cells: 1 positive, 0
negative, -1 uncertain, blank not mentioned. ``valid.csv`` (radiologist-labelled) is the test split
by default, and val is ``val_fraction`` of the training patients (patients never cross splits).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cxr_automl.data import DataError, LoaderOptions, Problems, Record, build_bundle, loader, parse_label, read_csv
from cxr_automl.plugin.interfaces import DatasetBundle

CLASSES = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
           "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
           "Fracture", "Support Devices"]
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
NAN = math.nan


def policy(uncertain: str, blank: str) -> dict[float | None, float]:
    """Cell value → label: the uncertainty policy of Irvin et al. (U-Ones, U-Zeros, U-Ignore). ``ignore``
    makes the label NaN, which the classification loss masks out (and metrics skip)."""
    u = {"ones": 1.0, "zeros": 0.0, "ignore": NAN}
    b = {"zeros": 0.0, "ignore": NAN}
    if uncertain not in u:
        raise DataError(f"uncertain={uncertain!r}; use ones, zeros or ignore")
    if blank not in b:
        raise DataError(f"blank={blank!r}; use zeros (not mentioned = negative) or ignore")
    return {1.0: 1.0, 0.0: 0.0, -1.0: u[uncertain], None: b[blank]}


def resolve(root: Path, rel: str) -> Path | None:
    parts = Path(rel).parts
    for cand in (root / rel, root.parent / rel, root.joinpath(*parts[1:]) if len(parts) > 1 else None):
        if cand is not None and cand.is_file():
            return cand
    return None


@loader("classification")
def chexpert(root: str = "data/CheXpert-v1.0-small", train_csv: str = "train.csv", valid_csv: str = "valid.csv",
             uncertain: str = "ones", blank: str = "zeros", frontal_only: bool = True, competition5: bool = False,
             valid_as: str = "test", *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """CheXpert, 14 observations (or the 5 competition ones with ``competition5=true``)."""
    base = Path(root).expanduser()
    problems = Problems(opts.on_error, "chexpert")
    classes = COMPETITION if competition5 else CLASSES
    table = policy(uncertain, blank)
    if valid_as not in ("test", "val"):
        raise DataError(f"valid_as={valid_as!r}; use test or val")
    sources = [(base / train_csv, None)]
    if valid_csv and (base / valid_csv).exists():
        sources.append((base / valid_csv, valid_as))
    records: list[Record] = []
    for csv_path, split in sources:
        for line, row in read_csv(csv_path, ["Path", "Frontal/Lateral", *classes]):
            where = f"{csv_path}:{line}"
            if frontal_only and row["Frontal/Lateral"] != "Frontal":
                continue
            values = [parse_label(row[c], table, where, c, problems) for c in classes]
            if any(v is None for v in values):
                continue
            path = resolve(base, row["Path"])
            if path is None:
                problems("missing", f"{where}: image {row['Path']!r} not found under {base} or {base.parent}")
                continue
            patient = next((p for p in Path(row["Path"]).parts if p.startswith("patient")), row["Path"])
            records.append(Record(image_id=row["Path"], path=str(path), patient=patient,
                                  labels=np.array(values, np.float32), source=where, split=split))
    return build_bundle("chexpert", records, classes, problems, opts, task=task,
                        extras={"policy": {"uncertain": uncertain, "blank": blank}})
