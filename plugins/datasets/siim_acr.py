"""``siim_acr``: SIIM-ACR Pneumothorax Segmentation as published on Kaggle.

Layout under ``root``: ``train-rle.csv`` (``ImageId, EncodedPixels``; ``-1`` = no pneumothorax; an
image with several pneumothoraces has several rows, which are unioned) and the images anywhere below
``root`` as ``<ImageId>.dcm`` (the original study/series folders) or ``<ImageId>.png``.

RLE: the original competition encoding is *relative* (``offset length`` pairs, each offset counted
from the end of the previous run) over the pixels in column-major order; ``rle=absolute`` reads the
usual 1-based ``start length`` pairs of the later stage-2 file. Items carry the classification label
``Pneumothorax`` and ``masks`` uint8 (1, S, S).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_automl.data import (DataError, FileIndex, LoaderOptions, Problems, Record, build_bundle, loader, read_csv,
                             seeded_rank)
from cxr_automl.plugin.interfaces import DatasetBundle

CLASSES = ["Pneumothorax"]


def parse_rle(text: str) -> np.ndarray:
    """``"a0 l0 a1 l1 ..."`` → int64 (K, 2); ``-1`` (no mask) → (0, 2). Raises ValueError."""
    text = text.strip()
    if text in ("-1", ""):
        return np.zeros((0, 2), np.int64)
    nums = np.array([int(t) for t in text.split()], np.int64)
    if len(nums) % 2:
        raise ValueError(f"odd number of values ({len(nums)}); RLE is pairs")
    pairs = nums.reshape(-1, 2)
    if (pairs[:, 1] <= 0).any() or (pairs[:, 0] < 0).any():
        raise ValueError("negative offset or non-positive run length")
    return pairs


def run_spans(pairs: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) as 0-based flat indices."""
    if mode == "relative":
        starts = np.cumsum(pairs[:, 0]) + np.concatenate([[0], np.cumsum(pairs[:-1, 1])])
    else:
        starts = pairs[:, 0] - 1
    return starts, pairs[:, 1]


def rle_decode(pairs: np.ndarray, width: int, height: int, mode: str = "relative") -> np.ndarray:
    """bool (H, W). Raises ValueError when a run does not fit a W×H image."""
    flat = np.zeros(width * height, bool)
    if len(pairs):
        starts, lengths = run_spans(pairs, mode)
        end = int((starts + lengths).max())
        if end > flat.size or starts.min() < 0:
            raise ValueError(f"runs reach pixel {end} but the image has {width}x{height} = {flat.size}")
        for s, n in zip(starts, lengths):
            flat[s:s + n] = True
    return flat.reshape(width, height).T  # column-major: the flat index runs down the columns


def rle_encode(mask: np.ndarray, mode: str = "relative") -> str:
    """Inverse of ``rle_decode`` (for writing test files and predictions)."""
    flat = np.concatenate([[0], mask.T.reshape(-1).astype(np.int8), [0]])
    change = np.flatnonzero(np.diff(flat))
    starts, ends = change[0::2], change[1::2]
    if not len(starts):
        return "-1"
    if mode == "relative":
        offsets = starts - np.concatenate([[0], ends[:-1]])
    else:
        offsets = starts + 1
    return " ".join(f"{a} {b}" for a, b in zip(offsets, ends - starts))


class SiimMasks:
    """Mask function (picklable): the union of an image's RLE rows at its original size."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, rec: Record, width: int, height: int) -> np.ndarray:
        mask = np.zeros((height, width), bool)
        for pairs in rec.mask:
            mask |= rle_decode(pairs, width, height, self.mode)
        return mask[None]

    def check(self, rec: Record, width: int, height: int) -> str | None:
        """Called once per image after decoding (sizes known): does every RLE row fit?"""
        for pairs, where in zip(rec.mask, rec.source.split(";")):
            if len(pairs):
                starts, lengths = run_spans(pairs, self.mode)
                if int((starts + lengths).max()) > width * height:
                    return (f"{where}: RLE runs reach pixel {int((starts + lengths).max())} but "
                            f"{rec.path} is {width}x{height}; check rle=relative|absolute")
        return None


def balanced(records: list[Record], seed: int) -> list[Record]:
    """As many pneumothorax images as negatives: every image of the smaller group, and the first of the
    larger one in a seeded hash order of the ids; the file order kept."""
    groups = [[r for r in records if r.labels[0]], [r for r in records if not r.labels[0]]]
    small, large = sorted(groups, key=len)
    cut = sorted(large, key=lambda r: seeded_rank(r.image_id, seed))[:len(small)]
    keep = {r.image_id for r in small + cut}
    return [r for r in records if r.image_id in keep]


@loader("segmentation")
def siim_acr(root: str = "data/siim-acr-pneumothorax", labels_csv: str = "train-rle.csv", rle: str = "relative",
             balance: bool = False, *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """SIIM-ACR pneumothorax: segmentation of its RLE masks (default; images with ``-1`` are empty-mask
    negatives, kept) or classification of the same label. ``balance``: as many pneumothorax images as negatives
    (MLVICX's curated set, §IV-A): the larger group is cut, in a seeded hash order of the ids, before the
    split."""
    if rle not in ("relative", "absolute"):
        raise DataError(f"rle={rle!r}; use relative (original SIIM file) or absolute (stage-2 file)")
    base = Path(root).expanduser()
    csv_path = base / labels_csv
    problems = Problems(opts.on_error, "siim_acr")
    index = FileIndex(base)
    groups: dict[str, dict] = {}
    bad: set[str] = set()
    for line, row in read_csv(csv_path, ["ImageId", "EncodedPixels"]):
        where = f"{csv_path}:{line}"
        g = groups.setdefault(row["ImageId"], {"where": [], "rles": []})
        try:
            g["rles"].append(parse_rle(row["EncodedPixels"]))
            g["where"].append(where)
        except ValueError as exc:
            problems("mask", f"{where}: EncodedPixels is not a valid RLE: {exc}")
            bad.add(row["ImageId"])
    records = []
    for image_id, g in groups.items():
        if image_id in bad:
            continue
        path = index.find(image_id)
        if path is None:
            problems("missing", f"{g['where'][0]}: image {image_id}.dcm not found under {index.root}")
            continue
        positive = any(len(p) for p in g["rles"])
        records.append(Record(image_id=image_id, path=path, patient=image_id, labels=np.array([float(positive)], np.float32),
                              source=";".join(g["where"]), mask=g["rles"]))
    if balance:
        records = balanced(records, opts.seed)
    masks = SiimMasks(rle)
    return build_bundle("siim_acr", records, CLASSES, problems, opts, task=task, mask_fn=masks, mask_check=masks.check,
                        structures=CLASSES)
