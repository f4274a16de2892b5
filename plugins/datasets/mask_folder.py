"""``mask_folder``: per-structure mask folders, as JSRT (SCR masks) and Montgomery/Shenzhen publish them.

Layout: ``images/<name>.<ext>`` and ``masks/<structure>/<name>.<ext>`` (any image format; a pixel is
foreground when any channel is > 0). Structures default to the sub-folders of ``masks`` (sorted), e.g.
Montgomery's ``ManualMask/leftMask`` and ``ManualMask/rightMask``. Items carry ``masks`` uint8
(M, S, S), one per structure, and classification labels: by default "structure present" per
structure; with ``label_regex`` (e.g. ``_([01])\\.png$`` for Montgomery's TB flag in the file name) one
class ``label_name`` from the regex's first group.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_automl.data import DataError, FileIndex, Problems, Record, build_bundle
from cxr_automl.interfaces import DatasetBundle


def read_mask(path: str) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA", "LA") else im)
    return (arr.max(axis=-1) if arr.ndim == 3 else arr) > 0


class FolderMasks:
    """Mask function (picklable): one mask file per structure, read at item time."""

    def __call__(self, rec: Record, width: int, height: int) -> np.ndarray:
        out = np.zeros((len(rec.mask), height, width), bool)
        for k, path in enumerate(rec.mask):
            m = read_mask(path)
            if m.shape != (height, width):
                raise ValueError(f"{path} is {m.shape[1]}x{m.shape[0]}, its image is {width}x{height}")
            out[k] = m
        return out

    @staticmethod
    def check(rec: Record, width: int, height: int) -> str | None:
        """After decoding: every mask file has its image's size (read from the header only)."""
        for path in rec.mask:
            try:
                with Image.open(path) as im:
                    size = im.size
            except OSError as exc:
                return f"{path}: cannot read the mask: {exc}"
            if size != (width, height):
                return f"{path}: mask is {size[0]}x{size[1]} but {rec.path} is {width}x{height}; masks must match"
        return None


def mask_folder(root: str = "data/jsrt", images: str = "images", masks: str = "masks",
                structures: list[str] | None = None, label_regex: str | None = None, label_name: str = "abnormal",
                image_size: int = 224, fit: str = "stretch", cache: bool = True, cache_dir: str | None = None,
                cache_workers: int = 0, seed: int = 0, val_fraction: float = 0.1, label_fraction: float = 1.0,
                on_error: str = "raise", augment: bool = True) -> DatasetBundle:
    """Images with one binary mask per structure."""
    base = Path(root).expanduser()
    mask_root = base / masks
    if not mask_root.is_dir():
        raise DataError(f"{mask_root}: mask folder not found; set dataset.masks")
    names = list(structures) if structures else sorted(p.name for p in mask_root.iterdir() if p.is_dir())
    if not names:
        raise DataError(f"{mask_root}: no structure sub-folders; set dataset.structures")
    indexes = {s: FileIndex(mask_root / s) for s in names}
    pattern = re.compile(label_regex) if label_regex else None
    problems = Problems(on_error, "mask_folder")
    records = []
    for name, path in sorted(FileIndex(base / images).by_name.items()):
        found = [indexes[s].find(name) for s in names]
        if None in found:
            missing = [s for s, f in zip(names, found) if f is None]
            problems("missing", f"{path}: no mask for structure(s) {', '.join(missing)} under {mask_root}")
            continue
        if pattern:
            m = pattern.search(name)
            if not m or m.group(1) not in ("0", "1"):
                problems("label", f"{path}: label_regex {label_regex!r} does not give 0 or 1 for {name!r}")
                continue
            labels = np.array([float(m.group(1))], np.float32)
        else:
            labels = np.array([float(read_mask(f).any()) for f in found], np.float32)  # type: ignore[arg-type]
        records.append(Record(image_id=name, path=path, patient=Path(name).stem, labels=labels, source=path,
                              mask=found))
    return build_bundle("mask_folder", records, [label_name] if pattern else names, problems, image_size=image_size,
                        fit=fit, cache=cache, cache_dir=cache_dir, cache_workers=cache_workers, seed=seed,
                        val_fraction=val_fraction, label_fraction=label_fraction, augment=augment,
                        mask_fn=FolderMasks(), mask_check=FolderMasks.check, structures=names)
