"""TEMPORARY minimal stand-in (to be replaced by the full generator)."""
from __future__ import annotations
import numpy as np
import torch
from cxr_automl.interfaces import DatasetBundle

CLASSES = ["nodule", "effusion", "cardiomegaly", "consolidation", "pneumothorax"]
PREV = [0.3, 0.2, 0.15, 0.1, 0.06]


class _DS(torch.utils.data.Dataset):
    def __init__(self, images, labels, name):
        self.images, self.labels, self.name = images, labels, name

    def __len__(self):
        return len(self.images)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.images[i]).float().div(255).unsqueeze(0),
                "labels": torch.from_numpy(self.labels[i]), "image_id": f"{self.name}/{i:06d}"}


def _gen(n, size, seed, split):
    imgs = np.zeros((n, size, size), np.uint8)
    labels = np.zeros((n, 5), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        rng = np.random.default_rng([seed, split, i])
        lab = (rng.random(5) < PREV).astype(np.float32)
        img = 0.6 + 0.1 * rng.standard_normal((size, size))
        lung = ((xx - 0.3) ** 2 / 0.03 + (yy - 0.5) ** 2 / 0.1 < 1) | ((xx - 0.7) ** 2 / 0.03 + (yy - 0.5) ** 2 / 0.1 < 1)
        img[lung] -= 0.3
        for c in range(5):
            if lab[c]:
                cx, cy = rng.uniform(0.2, 0.8, 2)
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.02 + 0.02 * c) ** 2] += 0.4
        imgs[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
        labels[i] = lab
    return imgs, labels


def synthetic_cxr(n_train: int = 1000, n_val: int = 250, n_test: int = 250, image_size: int = 128,
                  seed: int = 0, cache_dir: str | None = None, augment: bool = True) -> DatasetBundle:
    splits = {}
    for sid, (name, n) in enumerate([("train", n_train), ("val", n_val), ("test", n_test)]):
        splits[name] = _gen(n, image_size, seed, sid)
    return DatasetBundle(train=_DS(*splits["train"], "train"), val=_DS(*splits["val"], "val"),
                         test=_DS(*splits["test"], "test"), class_names=CLASSES,
                         extras={f"{k}_labels": v[1] for k, v in splits.items()})
