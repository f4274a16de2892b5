"""``synthetic_cxr``: the embedded default dataset — seeded, chest-X-ray-like images with findings.

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the data never depends
on generation order. Anatomy: body, two lung fields with rib-like texture, heart, spine, a smooth
exposure field, noise and blur. Five findings, drawn independently (so they combine), with prevalences
chosen so that some are rare: nodule, effusion, cardiomegaly, consolidation, pneumothorax. Each lesion
has a box; each image has masks for heart, left lung, right lung (patient's sides: the patient's left
is on the image's right, as in a PA film) and the union of lesions. Generated once into a ``.npz``
cache keyed by the parameters; masks are stored bit-packed and unpacked per item.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from cxr_automl.data.dataset import shift
from cxr_automl.plugin.interfaces import DatasetBundle
from cxr_automl.plugin.targets import mask_boxes

GENERATOR_VERSION = 1
CLASSES = ["nodule", "effusion", "cardiomegaly", "consolidation", "pneumothorax"]
PREVALENCE = [0.30, 0.20, 0.15, 0.10, 0.06]
STRUCTURES = ["heart", "left_lung", "right_lung", "lesions"]
SPLITS = {"train": 0, "val": 1, "test": 2}


def _blur(img: np.ndarray) -> np.ndarray:
    """3×3 box blur with edge padding (cheap stand-in for the X-ray system's blur)."""
    p = np.pad(img, 1, mode="edge")
    h, w = img.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _box(mask: np.ndarray, cls: int) -> tuple[float, float, float, float, int] | None:
    box, present = mask_boxes(torch.from_numpy(np.ascontiguousarray(mask)))
    if not bool(present):
        return None
    x0, y0, x1, y1 = (float(v) for v in box.tolist())
    return x0, y0, x1, y1, cls


def render(size: int, rng: np.random.Generator, labels: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, float, float, int]]]:
    """One image (uint8 (S, S)), its masks (bool (4, S, S)) and lesion boxes, for given labels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    j = lambda s: rng.normal(0.0, s)  # noqa: E731 - small positional jitter
    body = ((xx - 0.5) / 0.47) ** 2 + ((yy - 0.62) / 0.62) ** 2 < 1
    img = np.where(body, 0.62, 0.08).astype(np.float32)
    # lungs: ellipses cut by a domed diaphragm
    lungs = []
    for cx, a in ((0.32, 0.135), (0.68, 0.125)):  # image left = patient's right lung
        cx, cy, b = cx + j(0.012), 0.47 + j(0.015), 0.29 + j(0.015)
        dome = cy + b * 0.75 - 0.06 * ((xx - cx) / a) ** 2
        lungs.append((((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1) & (yy < dome))
    right_lung, left_lung = lungs
    lung = right_lung | left_lung
    img[lung] -= 0.34
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (8.5 * yy - 1.8 * (xx - 0.5) ** 2 + rng.random()))
    texture = 0.09 * ribs ** 4 + 0.03 * _blur(rng.standard_normal((size, size)).astype(np.float32))
    # heart: cardiothoracic ratio ~0.42 normally, ~0.60 with cardiomegaly
    thorax = 0.62
    ctr = rng.normal(0.60, 0.035) if labels[2] else rng.normal(0.43, 0.03)
    hw, hh = ctr * thorax / 2, 0.12 + j(0.01)
    hx, hy = 0.53 + 0.25 * hw + j(0.01), 0.66 + j(0.01)
    heart = ((xx - hx) / hw) ** 2 + ((yy - hy) / hh) ** 2 < 1
    lesions = np.zeros((size, size), bool)
    boxes: list[tuple[float, float, float, float, int]] = []
    no_texture = np.zeros((size, size), bool)

    def pick_lung() -> np.ndarray:
        return lungs[int(rng.integers(2))]

    def point_in(mask: np.ndarray) -> tuple[float, float]:
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(len(xs)))
        return xs[k] / size, ys[k] / size

    if labels[0]:  # nodule(s): small bright round opacities
        for _ in range(int(rng.integers(1, 3))):
            lung_m = pick_lung() & ~heart
            cx, cy = point_in(lung_m)
            r = rng.uniform(0.03, 0.05)
            d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2
            img += 0.38 * np.exp(-d2 * 1.2) * (d2 < 2.2)
            m = d2 < 1
            lesions |= m
            boxes.append(_box(m, 0))
    if labels[1]:  # effusion: fluid in the lung base with a meniscus, laterally higher
        for lung_m in ([pick_lung()] if rng.random() < 0.7 else lungs):
            ys, xs = np.nonzero(lung_m)
            bottom, left, right = ys.max() / size, xs.min() / size, xs.max() / size
            mid = (left + right) / 2
            level = bottom - rng.uniform(0.09, 0.16)
            m = lung_m & (yy > level - 0.06 * np.abs(xx - mid) / ((right - left) / 2))
            img[m] += 0.30
            no_texture |= m
            lesions |= m
            boxes.append(_box(m, 1))
    if labels[2]:
        boxes.append(_box(heart, 2))
    if labels[3]:  # consolidation: a larger, patchy, textured opacity
        lung_m = pick_lung()
        cx, cy = point_in(lung_m & ~heart)
        r = rng.uniform(0.07, 0.11)
        blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2))
        patch = _blur(_blur(rng.random((size, size)).astype(np.float32)))
        m = lung_m & (blob * (0.6 + patch) > 0.55)
        img[m] += 0.24 + 0.08 * patch[m]
        lesions |= m
        boxes.append(_box(m, 3))
    if labels[4]:  # pneumothorax: dark apical-lateral rim without lung markings, thin pleural line
        side = int(rng.integers(2))
        lung_m = lungs[side]
        ys, xs = np.nonzero(lung_m)
        cx = xs.mean() / size
        a = (xs.max() - xs.min()) / size / 2
        top = ys.min() / size
        sign = -1.0 if side == 0 else 1.0  # lateral is away from the midline
        u = sign * (xx - cx) / a
        depth = rng.uniform(0.25, 0.45)
        m = lung_m & ((u > 1 - depth) | (yy < top + depth * 0.25))
        img[m] -= 0.12
        no_texture |= m
        inner = lung_m & ~m  # the collapsed lung's edge is the visible pleural line
        edge = m & (np.roll(inner, 1, 0) | np.roll(inner, -1, 0) | np.roll(inner, 1, 1) | np.roll(inner, -1, 1))
        img[edge] += 0.18
        lesions |= m
        boxes.append(_box(m, 4))
    img += np.where(lung & ~no_texture, texture, 0.0)
    img[heart] = np.maximum(img[heart], 0.58 + 0.02 * texture[heart])
    img[np.abs(xx - 0.5 - 0.02 * np.sin(6 * yy)) < 0.03] += 0.12  # spine / mediastinum
    exposure = 0.06 * np.sin(2 * np.pi * (xx * rng.uniform(0.3, 0.8) + yy * rng.uniform(0.3, 0.8) + rng.random()))
    img = img * rng.uniform(0.85, 1.15) + exposure + rng.normal(0, 0.03, (size, size))
    img = _blur(img)
    masks = np.stack([heart, left_lung & ~heart, right_lung & ~heart, lesions])
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), masks, [b for b in boxes if b is not None]


def generate(n: int, size: int, seed: int, split: str) -> dict[str, np.ndarray]:
    """Arrays of one split: images (N,S,S) u8, labels (N,C) f32, masks bit-packed, boxes (M,6)."""
    images = np.empty((n, size, size), np.uint8)
    labels = np.empty((n, len(CLASSES)), np.float32)
    masks = np.empty((n, len(STRUCTURES), size, (size + 7) // 8), np.uint8)
    boxes: list[list[float]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        labels[i] = (rng.random(len(CLASSES)) < PREVALENCE).astype(np.float32)
        images[i], m, bxs = render(size, rng, labels[i])
        masks[i] = np.packbits(m, axis=-1)
        boxes.extend([i, *b] for b in bxs)
    return {"images": images, "labels": labels, "masks": masks,
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 6)}


class SyntheticSplit(torch.utils.data.Dataset):
    """One split held in memory (uint8); picklable for DataLoader workers."""

    def __init__(self, arrays: dict[str, np.ndarray], split: str, seed: int, augment: bool):
        self.images, self.labels, self.masks = arrays["images"], arrays["labels"], arrays["masks"]
        self.split, self.seed, self.augment, self.epoch = split, seed, augment, 0
        boxes = arrays["boxes"]
        self.box_rows = [boxes[boxes[:, 0] == i, 1:] for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        size = self.images.shape[-1]
        img = self.images[i].astype(np.float32) / 255.0
        masks = np.unpackbits(self.masks[i], axis=-1, count=size)
        rows = self.box_rows[i]
        boxes, cls = rows[:, :4].copy(), rows[:, 4].astype(np.int64)
        if self.augment:  # cheap and deterministic in (seed, epoch, index); no flips: laterality matters
            rng = np.random.default_rng([self.seed, 1000 + self.epoch, i])
            img = np.clip((img - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.05, 0.05), 0, 1)
            dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
            img, masks = shift(img, dy, dx), shift(masks, dy, dx)
            boxes = np.clip(boxes + np.array([dx, dy, dx, dy], np.float32), 0, size)
            kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # shifted out of the image
            boxes, cls = boxes[kept], cls[kept]
        return {"image": torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0),
                "labels": torch.from_numpy(self.labels[i].copy()),
                "image_id": f"synthetic_cxr/{self.split}/{i:06d}",
                "boxes": torch.from_numpy(boxes), "box_labels": torch.from_numpy(cls),
                "masks": torch.from_numpy(np.ascontiguousarray(masks))}


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("CXR_AUTOML_CACHE") or Path.home() / ".cache" / "cxr-automl"
    return Path(root).expanduser() / "synthetic_cxr"


def load_or_generate(params: dict, cache_dir: str | None) -> tuple[dict[str, dict[str, np.ndarray]], Path]:
    """All splits from the cache, generating them once; concurrent processes wait on a file lock."""
    key = hashlib.sha256(json.dumps({**params, "v": GENERATOR_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.npz"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            arrays = {f"{s}_{k}": v for s in SPLITS
                      for k, v in generate(params[f"n_{s}"], params["image_size"], params["seed"], s).items()}
            tmp = root / f".{key}.{os.getpid()}.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    with np.load(path) as z:
        data = {s: {k: z[f"{s}_{k}"] for k in ("images", "labels", "masks", "boxes")} for s in SPLITS}
    return data, path


def keep_label_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Labels with all but a seeded ``fraction`` of the rows set to NaN (unknown); at least one row stays.

    Images keep their place, so self-supervised pretraining still sees all of them while every
    supervised loss (which masks NaN) learns from the labelled fraction only.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label_fraction={fraction} must be in (0, 1]; e.g. 0.01, 0.1, 0.3 or 1")
    if fraction == 1:
        return labels
    n = len(labels)
    keep = np.random.default_rng([seed, 7_919]).permutation(n)[:max(1, round(fraction * n))]
    out = np.full_like(labels, np.nan)
    out[keep] = labels[keep]
    return out


TASKS = ("classification", "segmentation", "detection")


def synthetic_cxr(n_train: int = 1000, n_val: int = 250, n_test: int = 250, image_size: int = 128,
                  seed: int = 0, cache_dir: str | None = None, augment: bool = True,
                  label_fraction: float = 1.0, task: str = "classification") -> DatasetBundle:
    """Seeded synthetic chest X-rays, cached after the first call. The same images serve every ``task``:
    classification (5 multi-label findings), segmentation (masks of heart, left lung, right lung and
    lesions) or detection (finding boxes, classes = the findings).

    ``label_fraction`` keeps the training labels of a seeded subset of images (the rest are unknown),
    for label-efficiency protocols such as MLVICX's 1/10/30/100 %."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small to draw anatomy; use 32 or more")
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size, "seed": seed}
    data, path = load_or_generate(params, cache_dir)
    data["train"]["labels"] = keep_label_fraction(data["train"]["labels"], float(label_fraction), seed)
    splits = {s: SyntheticSplit(data[s], s, seed, augment and s == "train") for s in SPLITS}
    return DatasetBundle(train=splits["train"], val=splits["val"], test=splits["test"],
                         class_names=list(STRUCTURES if task == "segmentation" else CLASSES), task=task, channels=1,
                         extras={**{f"{s}_labels": data[s]["labels"] for s in SPLITS},
                                 "structures": list(STRUCTURES),
                                 "generator": {"params": params, "version": GENERATOR_VERSION, "cache": str(path)}})
