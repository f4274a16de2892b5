"""What every tabular CXR dataset reduces to: a list of ``Record`` s, read from the dataset's own files.

Also here: reading a CSV with the line number of every row (so errors can name ``file:line``), finding
image files under a root, the ``on_error=raise|skip`` policy, deterministic patient-level splits and
nested, stratified label and subset fractions.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cxr_automl.data.images import IMAGE_SUFFIXES
from cxr_automl.errors import UserError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class DataError(UserError):
    """Bad dataset input, phrased as ``file:line: what is wrong; what to do``."""


@dataclass
class Record:
    """One image of a dataset, before decoding.

    ``labels`` are float32 (C,) with NaN = unknown; ``boxes`` (K, 4) xyxy in the *original* image's
    pixels with ``box_labels`` (K,); ``mask`` is whatever the dataset's mask function needs (RLE strings,
    mask file paths, polygons), decoded per item. ``source`` names where the record came from
    (``file:line``) for error messages.
    """

    image_id: str
    path: str
    patient: str
    labels: np.ndarray
    source: str
    split: str | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    mask: Any = None


class Problems:
    """Applies ``on_error``: ``raise`` stops at the first problem; ``skip`` counts it by kind and the
    record is dropped. Skips are logged once at the end (``report``) and kept in the bundle's extras."""

    def __init__(self, on_error: str, dataset: str):
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error={on_error!r}; use raise or skip")
        self.on_error, self.dataset = on_error, dataset
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def __call__(self, kind: str, message: str) -> None:
        """Report one problem; raises in ``raise`` mode, otherwise records it and returns."""
        if self.on_error == "raise":
            raise DataError(f"{message} (set dataset.on_error=skip to drop such rows and count them)")
        self.counts[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def report(self) -> dict[str, Any]:
        if self.counts:
            log.warning("%s: skipped %d record(s): %s; first: %s", self.dataset, sum(self.counts.values()),
                        ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())), self.examples[0])
        return {"skipped": dict(self.counts), "skipped_total": sum(self.counts.values()),
                "examples": list(self.examples)}


def read_csv(path: str | Path, required: list[str], delimiter: str = ",") -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV as ``(line, {column: text})``; missing required columns are one clear error.

    Column names are stripped of surrounding spaces (SIIM's header is ``ImageId, EncodedPixels``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; set the dataset's root / file options to where it is")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(repr(m) for m in missing)}; "
                            f"the header has {', '.join(header)}")
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            yield reader.line_num, dict(zip(header, (c.strip() for c in row)))


class FileIndex:
    """Image files under a root, found by walking it once: name → path and stem → path.

    Published layouts scatter images over sub-folders (NIH ``images_001/images/``, SIIM's
    study/series folders), so loaders look files up by name instead of guessing folders.
    """

    def __init__(self, root: str | Path, suffixes: set[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found; set dataset.root (or the image folder option)")
        suffixes = suffixes or IMAGE_SUFFIXES
        self.by_name: dict[str, str] = {}
        self.by_stem: dict[str, str] = {}
        for dirpath, _, files in os.walk(self.root, followlinks=True):
            for f in files:
                suffix = os.path.splitext(f)[1].lower()
                if suffix in suffixes or suffix == "":
                    full = os.path.join(dirpath, f)
                    self.by_name.setdefault(f, full)
                    self.by_stem.setdefault(os.path.splitext(f)[0], full)

    def find(self, name: str) -> str | None:
        """By file name (``00000001_000.png``) or, failing that, by stem (``<ImageId>`` → ``.dcm``/``.png``)."""
        return self.by_name.get(name) or self.by_stem.get(name) or self.by_stem.get(os.path.splitext(name)[0])


def parse_label(value: str, allowed: dict[float | None, float], where: str, column: str,
                problems: Problems) -> float | None:
    """One label cell through a policy: ``allowed`` maps the number in the cell (None = blank) to the
    label value (NaN = unknown). Anything else is a problem naming the cell; None means "drop the row"."""
    v = value.strip()
    try:
        key: float | None | str = float(v) if v else None
    except ValueError:
        key = v
    if key in allowed:
        return allowed[key]  # type: ignore[index]
    shown = ", ".join("blank" if k is None else f"{k:g}" for k in allowed)
    problems("label", f"{where}: column {column!r} has {value!r}; expected one of {shown}")
    return None


def seeded_rank(key: str, seed: int) -> str:
    """A stable pseudo-random sort key: the same patient always sorts the same way for one seed."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def patient_split(patients: list[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> dict[str, str]:
    """patient → split. Patients are ordered by a seeded hash, then cut by counts, so a patient never
    crosses splits and the assignment does not depend on row order. Every split gets at least one
    patient when there are three or more."""
    uniq = sorted(set(patients), key=lambda p: seeded_rank(p, seed))
    n = len(uniq)
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if n >= 3:  # a requested split is never empty just because the dataset is small
        n_val = max(1, n_val) if fractions[1] > 0 else 0
        n_test = max(1, n_test) if fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    order = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return dict(zip(uniq, order))


def assign_splits(records: list[Record], seed: int, val_fraction: float = 0.1) -> None:
    """Fill in ``split`` where the dataset has no official one.

    - no record has a split: patient-level ``1 - 2f`` / ``f`` / ``f`` with ``f = val_fraction``;
    - official splits but no val (or no test): ``val_fraction`` of the training patients become the
      missing split(s); official val/test assignments are never changed.
    """
    if all(r.split is None for r in records):
        table = patient_split([r.patient for r in records], (1 - 2 * val_fraction, val_fraction, val_fraction), seed)
        for r in records:
            r.split = table[r.patient]
        return
    missing = [s for s in ("val", "test") if not any(r.split == s for r in records)]
    if missing:
        pool = [r.patient for r in records if r.split in (None, "train")]
        fr = {s: (val_fraction if s in missing else 0.0) for s in ("val", "test")}
        table = patient_split(pool, (1 - fr["val"] - fr["test"], fr["val"], fr["test"]), seed)
        for r in records:
            if r.split in (None, "train"):
                r.split = table[r.patient]
    for r in records:
        if r.split is None:
            r.split = "train"


def fraction_subset(records: list[Record], fraction: float, seed: int, option: str = "label_fraction") -> list[Record]:
    """A stratified, nested ``fraction`` of ``records``, taking whole patients.

    Patients are grouped by a stratum — the rarest class positive on any of their images (prevalence
    over ``records``), or "no positive label" — and each stratum is cut at ``round(fraction × its
    images)`` in one seeded patient order. So every class keeps its share (an unstratified cut of a
    small split drifts: a 10 % draw of 400 images can lose a quarter of a 10 % class), and the subsets
    are nested: the 1 % subset is inside the 10 %, inside the 30 %, so low-label results are comparable.
    At least one patient is always taken.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"{option}={fraction}; use a number in (0, 1], e.g. 0.01, 0.1, 0.3, 1")
    if fraction >= 1 or not records:
        return list(records)
    by_patient: dict[str, list[Record]] = {}
    for r in records:
        by_patient.setdefault(r.patient, []).append(r)
    labels = np.stack([r.labels for r in records]).astype(np.float32)
    prevalence = np.nansum(labels == 1, axis=0)
    strata: dict[int, list[str]] = {}
    for p, recs in by_patient.items():
        pos = np.flatnonzero((np.stack([r.labels for r in recs]) == 1).any(axis=0))
        key = int(pos[np.argmin(prevalence[pos])]) if len(pos) else -1
        strata.setdefault(key, []).append(p)
    taken: list[str] = []
    for key in sorted(strata):
        patients = sorted(strata[key], key=lambda p: seeded_rank(p, seed + 7919))
        target = round(fraction * sum(len(by_patient[p]) for p in patients))
        n = 0
        for p in patients:
            if n >= target:
                break
            taken.append(p)
            n += len(by_patient[p])
    if not taken:  # a fraction too small for any stratum: the first patient of the overall order
        taken = [min(by_patient, key=lambda p: seeded_rank(p, seed + 7919))]
    keep = set(taken)
    return [r for r in records if r.patient in keep]
