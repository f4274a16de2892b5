"""Generic detection layouts: ``coco`` (a COCO JSON per split, or one to be split) and ``yolo``
(Ultralytics ``data.yaml`` + ``labels/*.txt``). TBX11K and ChestX-Det convert to either.

Items carry ``boxes`` (K, 4) xyxy in output pixels and ``box_labels`` (K,), plus classification
labels = "the image has at least one box of this class" so the classification loop runs on them too;
COCO segmentations (polygons or RLE, decoded by pycocotools) become ``masks`` (one per category).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cxr_automl.data import DataError, FileIndex, LoaderOptions, Problems, Record, build_bundle, loader
from cxr_automl.plugin.interfaces import DatasetBundle


class CocoMasks:
    """Mask function (picklable): per category, the union of the image's segmentations."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, rec: Record, width: int, height: int) -> np.ndarray:
        from pycocotools import mask as mask_utils
        out = np.zeros((self.num_classes, height, width), bool)
        for cls, seg in rec.mask:
            if isinstance(seg, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, height, width)
            else:
                rle = seg
            if tuple(rle["size"]) != (height, width):
                raise ValueError(f"segmentation is for {rle['size'][1]}x{rle['size'][0]}, image is {width}x{height}")
            with warnings.catch_warnings():  # pycocotools' own numpy-2 copy= deprecation, not ours
                warnings.simplefilter("ignore", DeprecationWarning)
                out[cls] |= mask_utils.decode(rle).astype(bool)
        return out


def _coco_records(path: Path, images: Path | None, split: str | None, problems: Problems,
                  classes: list[str] | None, patient_field: str | None) -> tuple[list[Record], list[str]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable COCO JSON: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise DataError(f"{path}: missing top-level key {key!r}; a COCO file has images, annotations, categories")
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if classes is not None and names != classes:
        raise DataError(f"{path}: categories {names} differ from the other split's {classes}")
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    index = FileIndex(images or path.parent)
    by_image: dict[Any, list[dict]] = {}
    for k, ann in enumerate(doc["annotations"]):
        by_image.setdefault(ann.get("image_id"), []).append({**ann, "_k": k})
    records = []
    for k, im in enumerate(doc["images"]):
        where = f"{path}:images[{k}]"
        file = index.root / im["file_name"]
        found = str(file) if file.is_file() else index.find(Path(im["file_name"]).name)
        if found is None:
            problems("missing", f"{where}: image {im['file_name']!r} not found under {index.root}")
            continue
        boxes, cls, segs, ok = [], [], [], True
        for ann in by_image.get(im["id"], []):
            aw = f"{path}:annotations[{ann['_k']}]"
            if ann.get("category_id") not in cat_index:
                problems("box", f"{aw}: category_id {ann.get('category_id')!r} is not in categories")
                ok = False
                break
            c = cat_index[ann["category_id"]]
            bbox = ann.get("bbox")
            if bbox is not None:
                if len(bbox) != 4 or bbox[2] < 0 or bbox[3] < 0:
                    problems("box", f"{aw}: bbox {bbox} is not [x, y, width, height]")
                    ok = False
                    break
                boxes.append([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]])
                cls.append(c)
            if ann.get("segmentation"):
                segs.append((c, ann["segmentation"]))
        if not ok:
            continue
        labels = np.zeros(len(names), np.float32)
        labels[list({*cls, *[c for c, _ in segs]})] = 1
        records.append(Record(image_id=str(im["file_name"]), path=found,
                              patient=str(im.get(patient_field, im["file_name"]) if patient_field else im["file_name"]),
                              labels=labels, source=where, split=split,
                              boxes=np.array(boxes, np.float32).reshape(-1, 4), box_labels=np.array(cls, np.int64),
                              mask=segs))
    return records, names


@loader("detection")
def coco(annotations: Any = "data/coco/annotations.json", images: str | None = None, masks: bool = True,
         patient_field: str | None = None, *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """COCO detection (default), segmentation (from the annotations' polygons or RLE, one union mask
    per category) or classification ("has this category"). ``annotations``: one JSON (split 80/10/10
    by ``patient_field`` or image) or a mapping ``{train: a.json, val: b.json, test: c.json}`` (val
    may be left out). Images without annotations stay as negatives."""
    return _coco("coco", annotations, images, masks, patient_field, task, opts)


def _coco(name: str, annotations: Any, images: str | None, masks: bool, patient_field: str | None, task: str,
          opts: LoaderOptions) -> DatasetBundle:
    problems = Problems(opts.on_error, name)
    files = dict(annotations) if isinstance(annotations, dict) or hasattr(annotations, "items") else {None: annotations}
    bad = [k for k in files if k not in (None, "train", "val", "test")]
    if bad:
        raise DataError(f"annotations has keys {bad}; use train, val, test")
    records, classes = [], None
    for split, file in files.items():
        recs, classes = _coco_records(Path(file).expanduser(), Path(images).expanduser() if images else None,
                                      split, problems, classes, patient_field)
        records.extend(recs)
    assert classes is not None
    has_masks = masks and any(r.mask for r in records)
    return build_bundle(name, records, classes, problems, opts, task=task, has_boxes=True,
                        mask_fn=CocoMasks(len(classes)) if has_masks else None,
                        structures=classes if has_masks else ())


@loader("detection")
def tbx11k(root: str = "data/TBX11K", train_json: str = "annotations/json/TBX11K_train.json",
           val_json: str = "annotations/json/TBX11K_val.json", images: str = "imgs", *, task: str,
           opts: LoaderOptions) -> DatasetBundle:
    """TBX11K as published: COCO JSONs for train and val, images under ``imgs/{health,sick,tb}/``.
    Its test labels are withheld, so the official val set is the test split here and val is
    ``val_fraction`` of train. Images without a box (healthy, sick-but-not-TB) stay in every split as negatives, as in the
    TBX11K protocol. Detection by default; classification gives "has a box of this class"."""
    base = Path(root).expanduser()
    return _coco("tbx11k", {"train": str(base / train_json), "test": str(base / val_json)}, str(base / images),
                 False, None, task, opts)


def _yolo_names(doc: dict, where: Path) -> list[str]:
    names = doc.get("names")
    if isinstance(names, dict):
        return [names[k] for k in sorted(names)]
    if isinstance(names, list):
        return list(names)
    raise DataError(f"{where}: 'names' must be a list or an index → name mapping")


@loader("detection")
def yolo(data: str = "data/yolo/data.yaml", *, task: str, opts: LoaderOptions) -> DatasetBundle:
    """Ultralytics YOLO layout: ``data.yaml`` (``path``, ``train``/``val``/``test`` image folders,
    ``names``); each image ``images/x/a.png`` has ``labels/x/a.txt`` with ``class cx cy w h`` per line,
    normalised to [0, 1]. An image without a label file (or with an empty one) has no boxes: a negative
    image, kept. Detection by default; classification gives "has a box of this class"."""
    cfg_path = Path(data).expanduser()
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path}: data.yaml not found; set dataset.data")
    doc = yaml.safe_load(cfg_path.read_text()) or {}
    names = _yolo_names(doc, cfg_path)
    base = (cfg_path.parent / doc.get("path", ".")).resolve()
    problems = Problems(opts.on_error, "yolo")
    records: list[Record] = []
    for split in ("train", "val", "test"):
        if not doc.get(split):
            continue
        folder = base / doc[split]
        for img in sorted(p for p in FileIndex(folder).by_name.values()):
            parts = list(Path(img).relative_to(base).parts)
            if "images" not in parts:
                raise DataError(f"{cfg_path}: {split} images must be under an 'images' folder (got {img})")
            parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
            label_file = (base.joinpath(*parts)).with_suffix(".txt")
            boxes, cls, ok = [], [], True
            if label_file.exists():
                for n, line in enumerate(label_file.read_text().splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        c, cx, cy, w, h = line.split()[:5]
                        c, cx, cy, w, h = int(c), float(cx), float(cy), float(w), float(h)
                        if not 0 <= c < len(names) or not all(0 <= v <= 1 for v in (cx, cy, w, h)):
                            raise ValueError
                    except ValueError:
                        problems("box", f"{label_file}:{n}: {line.strip()!r} is not 'class cx cy w h' with class < "
                                        f"{len(names)} and coordinates in [0, 1]")
                        ok = False
                        break
                    boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                    cls.append(c)
            if not ok:
                continue
            labels = np.zeros(len(names), np.float32)
            labels[list(set(cls))] = 1
            rel = str(Path(img).relative_to(base))
            records.append(Record(image_id=rel, path=img, patient=rel, labels=labels, source=str(label_file),
                                  split=split, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                                  box_labels=np.array(cls, np.int64)))
    return build_bundle("yolo", records, names, problems, opts, task=task, has_boxes=True, boxes_normalized=True)
