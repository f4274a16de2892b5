"""``chestx_det``: ChestX-Det / ChestX-Det10 JSON (Deepwise), boxes and instance polygons.

Layout under ``root``: ``train_json`` and ``test_json`` (the official split; val is ``val_fraction``
of train), each a JSON list of ``{"file_name": "36199.png", "syms": [...], "boxes": [[x1, y1, x2, y2],
...], "polygons": [[[x, y], ...], ...]}`` with one sym per box (and per polygon, when present), and the
images anywhere below ``root``. Classes default to every sym in the files (sorted). Items carry
``boxes``/``box_labels`` and, when polygons are present, ``masks`` with one union mask per class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cxr_automl.data import DataError, FileIndex, LoaderOptions, Problems, Record, build_bundle, loader
from cxr_automl.plugin.interfaces import DatasetBundle


class PolygonMasks:
    """Mask function (picklable): per class, the union of the image's polygons."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, rec: Record, width: int, height: int) -> np.ndarray:
        out = np.zeros((self.num_classes, height, width), bool)
        for cls, points in rec.mask:
            canvas = Image.new("1", (width, height), 0)
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=1)
            out[cls] |= np.asarray(canvas, bool)
        return out


def _load(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable ChestX-Det JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of {{file_name, syms, boxes, polygons}} entries")
    return doc


@loader("detection")
def chestx_det(root: str = "data/chestx-det", train_json: str = "ChestX_Det_train.json",
               test_json: str | None = "ChestX_Det_test.json", classes: list[str] | None = None, masks: bool = True,
               *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """ChestX-Det JSON: detection of the syms' boxes (default), segmentation from the polygons (one
    union mask per class), or classification ("has this sym"). Entries without syms are negatives."""
    base = Path(root).expanduser()
    files = [(base / train_json, "train")] + ([(base / test_json, "test")] if test_json else [])
    docs = [(p, split, _load(p)) for p, split in files]
    names = list(classes) if classes else sorted({s for _, _, d in docs for e in d for s in e.get("syms", [])})
    problems = Problems(opts.on_error, "chestx_det")
    index = FileIndex(base)
    records = []
    for path, split, doc in docs:
        for k, e in enumerate(doc):
            where = f"{path}:[{k}]"
            syms, boxes, polys = e.get("syms", []), e.get("boxes", []), e.get("polygons") or []
            if "file_name" not in e:
                problems("label", f"{where}: entry has no file_name")
                continue
            unknown = [s for s in syms if s not in names]
            if unknown or len(boxes) != len(syms) or (polys and len(polys) != len(syms)):
                problems("label", f"{where}: {len(syms)} syms, {len(boxes)} boxes, {len(polys)} polygons"
                                  + (f", unknown sym(s) {unknown}" if unknown else "") + "; expected one sym per box")
                continue
            if any(len(b) != 4 or b[2] < b[0] or b[3] < b[1] for b in boxes):
                problems("box", f"{where}: boxes must be [x1, y1, x2, y2] with x1 <= x2, y1 <= y2")
                continue
            if any(len(p) < 3 or any(len(pt) != 2 for pt in p) for p in polys):
                problems("mask", f"{where}: a polygon needs 3 or more [x, y] points")
                continue
            image = index.find(e["file_name"])
            if image is None:
                problems("missing", f"{where}: image {e['file_name']!r} not found under {base}")
                continue
            cls = [names.index(s) for s in syms]
            labels = np.zeros(len(names), np.float32)
            labels[list(set(cls))] = 1
            records.append(Record(image_id=e["file_name"], path=image, patient=e["file_name"], labels=labels,
                                  source=where, split=split, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                                  box_labels=np.array(cls, np.int64), mask=list(zip(cls, polys))))
    has_masks = masks and any(r.mask for r in records)
    return build_bundle("chestx_det", records, names, problems, opts, task=task, has_boxes=True,
                        mask_fn=PolygonMasks(len(names)) if has_masks else None,
                        structures=names if has_masks else ())
