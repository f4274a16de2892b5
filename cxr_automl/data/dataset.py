"""Records → ``DatasetBundle``: splits, label fractions, the cache, and per-item boxes, masks and
augmentation. Every tabular dataset plugin ends with ``build_bundle``."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxr_automl.data.cache import Decoder, ImageCache, build_or_load, build_or_load_masks
from cxr_automl.data.images import Geometry, ImageReadError, load_resized, probe
from cxr_automl.data.records import SPLITS, DataError, Problems, Record, assign_splits, label_fraction_subset
from cxr_automl.interfaces import DatasetBundle

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


def _box_problem(rec: Record, width: int, height: int) -> str | None:
    """A box outside its image means the labels belong to another image size (or another image)."""
    if not len(rec.boxes):
        return None
    b = rec.boxes
    tol = 0.01 * max(width, height) + 1  # annotators' boxes may touch or slightly cross the border
    if (b[:, 0] < -tol).any() or (b[:, 1] < -tol).any() or (b[:, 2] > width + tol).any() or (b[:, 3] > height + tol).any():
        bad = b[(b[:, 2] > width + tol) | (b[:, 3] > height + tol) | (b[:, 0] < -tol) | (b[:, 1] < -tol)][0]
        return (f"{rec.source}: box {[round(float(v), 1) for v in bad]} lies outside {rec.path} "
                f"({width}x{height}); boxes are in the original image's pixels")
    return None


def build_bundle(name: str, records: list[Record], class_names: Sequence[str], problems: Problems, *,
                 image_size: int, fit: str = "stretch", cache: bool = True, cache_dir: str | None = None,
                 cache_workers: int = 0, seed: int = 0, val_fraction: float = 0.1, label_fraction: float = 1.0,
                 augment: bool = True, has_boxes: bool = False,
                 boxes_normalized: bool = False, box_classes: Sequence[str] | None = None,
                 mask_fn: MaskFn | None = None, mask_check: Callable[[Record, int, int], str | None] | None = None,
                 structures: Sequence[str] = (), decoder: Decoder = load_resized, extras: dict[str, Any] | None = None) -> DatasetBundle:
    """Assign splits (official ones kept), decode into the cache, drop unreadable images per
    ``on_error``, cut the label fraction, and wrap each split."""
    if fit not in ("stretch", "pad"):
        raise DataError(f"fit={fit!r}; use stretch or pad")
    if image_size < 16:
        raise DataError(f"image_size={image_size}; use 16 or more")
    if not records:
        raise DataError(f"{name}: no usable records (skipped: {problems.report()['skipped'] or 'none'}); "
                        "check root and the label file options")
    geometry = Geometry(image_size, fit)
    assign_splits(records, seed, val_fraction)
    image_cache, mask_path = None, None
    rows = list(range(len(records)))
    if cache:
        image_cache = build_or_load(name, [r.path for r in records], geometry, cache_dir, cache_workers, decoder)
        for i, reason in sorted(image_cache.failed.items()):
            problems("unreadable", f"{records[i].path} ({records[i].source}): cannot read the image: {reason}")
        keep = [i for i in rows if i not in image_cache.failed]
        checked = []
        for i in keep:  # boxes and masks that do not fit their image are found now, not mid-epoch
            w, h = (int(v) for v in image_cache.sizes[i])
            msg = _box_problem(records[i], w, h) if has_boxes and not boxes_normalized else None
            if msg:
                problems("box", msg)
                continue
            msg = mask_check(records[i], w, h) if mask_check is not None else None
            if msg:
                problems("mask", msg)
                continue
            checked.append(i)
        keep = checked
        if mask_fn is not None:
            mask_path = str(build_or_load_masks(image_cache, records, set(keep), _RecordMasks(mask_fn), geometry,
                                                len(structures), cache_workers).filename)
        records, rows = [records[i] for i in keep], keep
    elif decoder is load_resized:  # no cache: at least read every header now, not mid-epoch
        readable = []
        for i in rows:
            reason = probe(records[i].path)
            if reason:
                problems("unreadable", f"{records[i].path} ({records[i].source}): cannot read the image: {reason}")
            else:
                readable.append(i)
        records, rows = [records[i] for i in readable], list(range(len(readable)))
    by_split: dict[str, tuple[list[Record], list[int]]] = {s: ([], []) for s in SPLITS}
    for rec, row in zip(records, rows):
        by_split[rec.split][0].append(rec)  # type: ignore[index]
        by_split[rec.split][1].append(row)  # type: ignore[index]
    train_recs, train_rows = by_split["train"]
    if label_fraction < 1:
        subset = {id(r) for r in label_fraction_subset(train_recs, label_fraction, seed)}
        pairs = [(r, row) for r, row in zip(train_recs, train_rows) if id(r) in subset]
        by_split["train"] = ([p[0] for p in pairs], [p[1] for p in pairs])
    for split, (recs, _) in by_split.items():
        if not recs:
            raise DataError(f"{name}: the {split} split is empty after splitting {len(records)} images; "
                            "add data or check the split files")
    report = problems.report()
    splits = {s: RecordSplit(recs, rws, image_cache, geometry, s, seed, augment and s == "train",
                             has_boxes, mask_fn, decoder, boxes_normalized, mask_path) for s, (recs, rws) in by_split.items()}
    labels = {s: np.stack([r.labels for r in recs]).astype(np.float32) for s, (recs, _) in by_split.items()}
    for s, lab in labels.items():
        empty = [c for c, col in zip(class_names, lab.T) if not np.nansum(col == 1)]
        if empty:
            log.warning("%s: no positive %s in the %s split: %s", name, "label" if len(empty) == 1 else "labels",
                        s, ", ".join(empty))
    out_extras: dict[str, Any] = {
        **{f"{s}_labels": labels[s] for s in SPLITS},
        **{f"{s}_patients": sorted({r.patient for r in recs}) for s, (recs, _) in by_split.items()},
        **{f"{s}_box_labels": [r.box_labels for r in recs] for s, (recs, _) in by_split.items()},
        "report": report, "cache": str(image_cache.path) if image_cache else None,
        "structures": list(structures), "box_classes": list(box_classes or class_names),
        "preprocessing": {"image_size": image_size, "fit": fit},
        **(extras or {})}
    return DatasetBundle(train=splits["train"], val=splits["val"], test=splits["test"],
                         class_names=list(class_names), task="classification", channels=1, extras=out_extras)

