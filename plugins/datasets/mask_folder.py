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

from cxr_automl.data import DataError, FileIndex, LoaderOptions, Problems, Record, build_bundle, loader
from cxr_automl.plugin.interfaces import DatasetBundle


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


def stems(name: str) -> list[str]:
    """The name with 1, 2, … of its trailing suffixes removed: ``JPCLN001.IMG.png`` → ``JPCLN001.IMG``,
    ``JPCLN001`` (JSRT/SCR copies name the image ``JPCLN001.IMG.png`` and its masks ``JPCLN001.png``)."""
    out = []
    while "." in name.lstrip("."):
        name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


class MaskIndex:
    """One structure's mask files, looked up by the image's file name, then by its stems from the
    longest (``a.webp-day5.png`` pairs with ``a.webp-day5.png`` and never with ``a.webp-day10``)."""

    def __init__(self, folder: Path):
        self.files = FileIndex(folder)

    def find(self, image_name: str) -> str | None:
        for key in (image_name, *stems(image_name)):
            hit = self.files.by_name.get(key) or self.files.by_stem.get(key)
            if hit is not None:
                return hit
        return None

    @staticmethod
    def tried(image_name: str) -> str:
        return ", ".join([image_name, *(f"{s}.*" for s in stems(image_name))])


@loader("segmentation")
def mask_folder(root: str = "data/jsrt", images: str = "images", masks: str = "masks",
                structures: list[str] | None = None, label_regex: str | None = None, label_name: str = "abnormal",
                *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """Images with one binary mask per structure: segmentation of the structures (default), or
    classification — of ``label_regex``'s flag when set, else "structure present". A mask pairs with
    its image by the same file name, the same stem, or the same name without all suffixes."""
    base = Path(root).expanduser()
    mask_root = base / masks
    if not mask_root.is_dir():
        raise DataError(f"{mask_root}: mask folder not found; set dataset.masks")
    names = list(structures) if structures else sorted(p.name for p in mask_root.iterdir() if p.is_dir())
    if not names:
        raise DataError(f"{mask_root}: no structure sub-folders; set dataset.structures")
    indexes = {s: MaskIndex(mask_root / s) for s in names}
    pattern = re.compile(label_regex) if label_regex and task == "classification" else None
    problems = Problems(opts.on_error, "mask_folder")
    records = []
    image_files = sorted(FileIndex(base / images).by_name.items())
    for name, path in image_files:
        found = [indexes[s].find(name) for s in names]
        if None in found:
            missing = [s for s, f in zip(names, found) if f is None]
            problems("missing", f"{path}: no mask for structure(s) {', '.join(missing)} under {mask_root} "
                                f"(tried {MaskIndex.tried(name)})")
            continue
        if pattern:
            m = pattern.search(name)
            if not m or m.group(1) not in ("0", "1"):
                problems("label", f"{path}: label_regex {label_regex!r} does not give 0 or 1 for {name!r}")
                continue
            labels = np.array([float(m.group(1))], np.float32)
        else:
            labels = np.array([float(read_mask(f).any()) for f in found], np.float32)  # type: ignore[arg-type]
        records.append(Record(image_id=name, path=path, patient=stems(name)[-1] if stems(name) else name, labels=labels, source=path,
                              mask=found))
    if not records and image_files:
        name = image_files[0][0]
        raise DataError(f"mask_folder: no image under {base / images} has a mask in every structure folder of "
                        f"{mask_root} ({', '.join(names)}); for {name!r} the names tried were "
                        f"{MaskIndex.tried(name)}")
    return build_bundle("mask_folder", records, [label_name] if pattern else names, problems, opts, task=task,
                        mask_fn=FolderMasks(), mask_check=FolderMasks.check, structures=names)
