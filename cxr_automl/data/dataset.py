"""Records → ``DatasetBundle``: splits, label fractions, the cache, and per-item boxes, masks and
augmentation. Every tabular dataset plugin ends with ``build_bundle``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxr_automl.data.cache import Decoder, ImageCache, build_or_load, build_or_load_masks
from cxr_automl.data.images import Geometry, ImageReadError, load_resized, probe
from cxr_automl.data.options import LoaderOptions
from cxr_automl.data.records import SPLITS, DataError, Problems, Record, assign_splits, fraction_subset
from cxr_automl.plugin.interfaces import DatasetBundle

log = logging.getLogger(__name__)
#: record, original (width, height) → (M, H, W) bool, one mask per structure, at the original size
MaskFn = Callable[[Record, int, int], np.ndarray]


class RecordSplit(torch.utils.data.Dataset):
    """One split. Items: ``image`` float32 (1, S, S) in [0, 1], ``image_id``, ``labels`` float32 (C,)
    with NaN = unknown, and — when the dataset has them — ``boxes`` float32 (K, 4) xyxy in output
    pixels with ``box_labels`` int64 (K,), and ``masks`` uint8 (M, S, S). Picklable for workers."""

    def __init__(self, records: list[Record], rows: list[int], cache: ImageCache | None, geometry: Geometry,
                 split: str, seed: int, augment: bool, has_boxes: bool, mask_fn: MaskFn | None,
                 decoder: Decoder = load_resized, boxes_normalized: bool = False, mask_cache: str | None = None):
        self.records, self.rows, self.cache, self.geometry = records, rows, cache, geometry
        self.split, self.seed, self.augment, self.epoch = split, seed, augment, 0
        self.has_boxes, self.mask_fn, self.decoder = has_boxes, mask_fn, decoder
        self.boxes_normalized = boxes_normalized
        self.mask_cache, self._masks = mask_cache, None  # path of the packed mask cache; mapped lazily

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_masks": None}

    def masks(self, i: int, w: int, h: int) -> np.ndarray:
        """uint8 (M, S, S): from the mask cache, or made from the record's mask source now."""
        if self.mask_cache is not None:
            if self._masks is None:
                self._masks = np.load(self.mask_cache, mmap_mode="r").view(np.ndarray)
            return np.unpackbits(self._masks[self.rows[i]], axis=-1, count=self.geometry.size)
        rec = self.records[i]
        try:
            return self.geometry.mask(self.mask_fn(rec, w, h))  # type: ignore[misc]
        except (ValueError, OSError) as exc:
            raise DataError(f"{rec.source}: mask of {rec.path} is unusable: {exc}") from exc

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop (in whichever process loads items) before each training epoch."""
        self.epoch = epoch

    def pixels(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """uint8 (S, S) and the original (W, H): from the cache, or decoded from the file now."""
        rec = self.records[i]
        if self.cache is not None:
            w, h = self.cache.sizes[self.rows[i]]
            return np.asarray(self.cache.array()[self.rows[i]]), (int(w), int(h))
        try:
            return self.decoder(rec.path, self.geometry)
        except (ImageReadError, OSError) as exc:
            raise DataError(f"{rec.path} ({rec.source}): cannot read the image: {exc}") from exc

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        img_u8, (w, h) = self.pixels(i)
        img = img_u8.astype(np.float32) / 255.0
        item: dict[str, Any] = {"image_id": rec.image_id, "labels": torch.from_numpy(rec.labels.copy())}
        boxes = None
        if self.has_boxes:  # YOLO stores boxes as fractions of the image: scale by its original size
            raw = rec.boxes * np.array([w, h, w, h], np.float32) if self.boxes_normalized else rec.boxes
            boxes = self.geometry.boxes(raw, w, h)
        masks = None
        if self.mask_fn is not None:
            masks = self.masks(i, w, h)
        if self.augment:
            img, boxes, masks = augment(img, boxes, masks, np.random.default_rng([self.seed, 1000 + self.epoch, i]))
        item["image"] = torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0)
        if boxes is not None:
            item["boxes"] = torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4)
            item["box_labels"] = torch.from_numpy(rec.box_labels.astype(np.int64))
        if masks is not None:
            item["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        return item


class _RecordMasks:
    """Adapts a dataset's mask function to the mask cache, which hashes the records' mask sources
    (``Record.mask``) and the function's settings."""

    def __init__(self, fn: MaskFn):
        self.fn = fn
        self.__dict__.update({k: v for k, v in vars(fn).items() if isinstance(v, (int, float, str, bool))})
        self.__dict__["fn_name"] = f"{type(fn).__module__}.{type(fn).__qualname__}"

    def __call__(self, rec: Record, width: int, height: int) -> np.ndarray:
        return self.fn(rec, width, height)


def augment(img: np.ndarray, boxes: np.ndarray | None, masks: np.ndarray | None, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Light, geometry-consistent training augmentation on top of the cache: brightness/contrast and a
    small translation (applied to boxes and masks too). No flips: laterality matters in a chest film."""
    s = img.shape[-1]
    img = np.clip((img - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.05, 0.05), 0, 1)
    dy, dx = (int(v) for v in rng.integers(-(s // 16), s // 16 + 1, size=2))
    img = shift(img, dy, dx)
    if masks is not None:
        masks = shift(masks, dy, dx)
    if boxes is not None and len(boxes):
        boxes = np.clip(boxes + np.array([dx, dy, dx, dy], np.float32), 0, s)
    return img, boxes, masks


def shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate the last two axes by (dy, dx) pixels, filling with zeros (augmentation of images,
    masks alike)."""
    out = np.zeros_like(a)
    h, w = a.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _box_problem(rec: Record, width: int, height: int, normalized: bool, n_classes: int) -> str | None:
    """A box outside its image means the labels belong to another image size (or another image); a box
    without area or of a class the dataset does not name cannot be learned from."""
    if not len(rec.boxes):
        return None
    b = rec.boxes * np.array([width, height, width, height], np.float32) if normalized else rec.boxes
    shown = lambda k: [round(float(v), 1) for v in b[k]]  # noqa: E731
    tol = 0.01 * max(width, height) + 1  # annotators' boxes may touch or slightly cross the border
    outside = (b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 2] > width + tol) | (b[:, 3] > height + tol)
    if outside.any():
        return (f"{rec.source}: box {shown(np.flatnonzero(outside)[0])} lies outside {rec.path} "
                f"({width}x{height}); boxes are in the original image's pixels")
    empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if empty.any():
        return f"{rec.source}: box {shown(np.flatnonzero(empty)[0])} of {rec.path} has no area (x2 <= x1 or y2 <= y1)"
    bad = (rec.box_labels < 0) | (rec.box_labels >= n_classes)
    if bad.any():
        return (f"{rec.source}: box class {int(rec.box_labels[bad][0])} of {rec.path} is not one of the "
                f"dataset's {n_classes} box classes (0..{n_classes - 1})")
    return None


def _offered(has_boxes: bool, mask_fn: MaskFn | None) -> list[str]:
    return ["classification", *(["detection"] if has_boxes else []), *(["segmentation"] if mask_fn is not None else [])]


def _retarget(name: str, records: list[Record], task: str, class_names: Sequence[str], box_classes: Sequence[str],
              structures: Sequence[str], offered: list[str]) -> list[str]:
    """The class names of ``task``; for detection each record's labels become "has a box of this class"."""
    if task not in offered:
        raise DataError(f"{name}: task={task} is not in these files; they give {', '.join(offered)}: "
                        f"set dataset.task to one of them")
    if task == "detection":
        for r in records:
            r.labels = np.zeros(len(box_classes), np.float32)
            r.labels[np.unique(r.box_labels[(r.box_labels >= 0) & (r.box_labels < len(box_classes))])] = 1
        return list(box_classes)
    if task == "segmentation":
        if records and len(records[0].labels) != len(structures):
            raise DataError(f"{name}: segmentation labels have {len(records[0].labels)} columns for "
                            f"{len(structures)} structures (a loader bug: give one presence label per structure)")
        return list(structures)
    return list(class_names)


def build_bundle(name: str, records: list[Record], class_names: Sequence[str], problems: Problems,
                 opts: LoaderOptions, *, task: str = "classification", has_boxes: bool = False,
                 boxes_normalized: bool = False, box_classes: Sequence[str] | None = None,
                 mask_fn: MaskFn | None = None, mask_check: Callable[[Record, int, int], str | None] | None = None,
                 structures: Sequence[str] = (), decoder: Decoder = load_resized, extras: dict[str, Any] | None = None) -> DatasetBundle:
    """Records → bundle of ``task``: assign splits (official ones kept), decode into the cache (or read
    every header), check boxes and masks against their image and drop bad records per ``on_error``, cut
    ``subset_fraction`` (images dropped) and ``label_fraction`` (labels hidden), and wrap each split.

    The tasks offered follow the targets the loader passes: classification always, detection with
    boxes, segmentation with a mask function. Images without a box stay as negatives. ``class_names``
    become the box classes (detection, labels = "has a box of this class") or the structures
    (segmentation, labels = "structure present", given by the loader)."""
    o = opts
    if o.fit not in ("stretch", "pad"):
        raise DataError(f"fit={o.fit!r}; use stretch or pad")
    if o.image_size < 16:
        raise DataError(f"image_size={o.image_size}; use 16 or more")
    for key in ("label_fraction", "subset_fraction"):
        if not 0 < getattr(o, key) <= 1:
            raise DataError(f"{key}={getattr(o, key)}; use a number in (0, 1], e.g. 0.01, 0.1, 0.3, 1")
    box_names = list(box_classes or class_names)
    class_names = _retarget(name, records, task, class_names, box_names, structures, _offered(has_boxes, mask_fn))
    if task != "classification" and o.label_fraction < 1:
        raise DataError(f"{name}: label_fraction={o.label_fraction} hides classification labels only; a {task} "
                        "head would still see every image's targets. Use subset_fraction to train on fewer images")
    if not records:
        raise DataError(f"{name}: no usable records (skipped: {problems.report()['skipped'] or 'none'}); "
                        "check root and the label file options")
    geometry = Geometry(o.image_size, o.fit)
    assign_splits(records, o.seed, o.val_fraction)
    image_cache, mask_path = None, None
    rows = list(range(len(records)))
    sizes: dict[int, tuple[int, int]] = {}
    if o.cache:
        image_cache = build_or_load(name, [r.path for r in records], geometry, o.cache_dir, o.cache_workers, decoder)
        for i, reason in sorted(image_cache.failed.items()):
            problems("unreadable", f"{records[i].path} ({records[i].source}): cannot read the image: {reason}")
        sizes = {i: (int(image_cache.sizes[i][0]), int(image_cache.sizes[i][1])) for i in rows if i not in image_cache.failed}
    elif decoder is load_resized:  # no cache: at least read every header now, not mid-epoch
        for i in rows:
            size, reason = probe(records[i].path)
            if reason:
                problems("unreadable", f"{records[i].path} ({records[i].source}): cannot read the image: {reason}")
            else:
                sizes[i] = size  # type: ignore[assignment]
    else:  # a decoder of its own (arrays in a file): nothing to read ahead, nothing to check against
        sizes = {i: None for i in rows}  # type: ignore[misc]
    keep = []
    for i in sorted(sizes):  # boxes and masks that do not fit their image are found now, not mid-epoch
        if sizes[i] is not None:
            w, h = sizes[i]
            msg = _box_problem(records[i], w, h, boxes_normalized, len(box_names)) if has_boxes else None
            if msg:
                problems("box", msg)
                continue
            msg = mask_check(records[i], w, h) if mask_check is not None else None
            if msg:
                problems("mask", msg)
                continue
        keep.append(i)
    if image_cache is not None and mask_fn is not None:
        mask_path = str(build_or_load_masks(image_cache, records, set(keep), _RecordMasks(mask_fn), geometry,
                                            len(structures), o.cache_workers).filename)
    # cache rows index the full list; without a cache, a row is the record's position in what is kept
    records, rows = [records[i] for i in keep], keep if image_cache is not None else list(range(len(keep)))
    by_split: dict[str, tuple[list[Record], list[int]]] = {s: ([], []) for s in SPLITS}
    for rec, row in zip(records, rows):
        by_split[rec.split][0].append(rec)  # type: ignore[index]
        by_split[rec.split][1].append(row)  # type: ignore[index]
    train_recs, train_rows = by_split["train"]
    if o.subset_fraction < 1:
        subset = {id(r) for r in fraction_subset(train_recs, o.subset_fraction, o.seed, "subset_fraction")}
        pairs = [(r, row) for r, row in zip(train_recs, train_rows) if id(r) in subset]
        by_split["train"] = ([p[0] for p in pairs], [p[1] for p in pairs])
    if o.label_fraction < 1:  # every image stays; the labels of all but the fraction become unknown
        labelled = {id(r) for r in fraction_subset(by_split["train"][0], o.label_fraction, o.seed)}
        by_split["train"] = ([r if id(r) in labelled else dataclasses.replace(r, labels=np.full_like(r.labels, np.nan))
                              for r in by_split["train"][0]], by_split["train"][1])
    for split, (recs, _) in by_split.items():
        if not recs:
            raise DataError(f"{name}: the {split} split is empty after splitting {len(records)} images; "
                            "add data or check the split files")
    report = problems.report()
    splits = {s: RecordSplit(recs, rws, image_cache, geometry, s, o.seed, o.augment and s == "train",
                             has_boxes, mask_fn, decoder, boxes_normalized, mask_path) for s, (recs, rws) in by_split.items()}
    labels = {s: np.stack([r.labels for r in recs]).astype(np.float32) for s, (recs, _) in by_split.items()}
    for s, lab in labels.items():
        empty = [c for c, col in zip(class_names, lab.T) if not np.nansum(col == 1)]
        if empty and not (s == "train" and o.label_fraction < 1 and len(empty) < len(class_names)):
            log.warning("%s: no positive %s in the %s split: %s", name, "label" if len(empty) == 1 else "labels",
                        s, ", ".join(empty))
    out_extras: dict[str, Any] = {
        **{f"{s}_labels": labels[s] for s in SPLITS},
        **{f"{s}_patients": sorted({r.patient for r in recs}) for s, (recs, _) in by_split.items()},
        **{f"{s}_box_labels": [r.box_labels for r in recs] for s, (recs, _) in by_split.items()},
        "report": report, "cache": str(image_cache.path) if image_cache else None,
        "structures": list(structures), "box_classes": box_names, "tasks": _offered(has_boxes, mask_fn),
        "preprocessing": {"image_size": o.image_size, "fit": o.fit},
        **(extras or {})}
    return DatasetBundle(train=splits["train"], val=splits["val"], test=splits["test"],
                         class_names=class_names, task=task, channels=1, extras=out_extras)
