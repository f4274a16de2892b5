"""``medmnist``: a MedMNIST ``.npz`` (PneumoniaMNIST, ChestMNIST, ...) with its official splits.

Keys ``{train,val,test}_images`` (N, H, W) uint8 and ``{train,val,test}_labels`` (N, 1) for binary or
multi-class tasks (one-hot into classes), (N, C) 0/1 for multi-label ones (ChestMNIST). Images go
through the same cache and resize as every other loader.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from cxr_automl.data import DataError, Geometry, LoaderOptions, Problems, Record, build_bundle, loader
from cxr_automl.plugin.interfaces import DatasetBundle


class NpzDecoder:
    """Decoder for ``file.npz::<split>_images::<i>`` paths; loads each array once per process."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, path: str, geometry: Geometry) -> tuple[np.ndarray, tuple[int, int]]:
        file, key, i = path.split("::")
        with self._lock:
            if (file, key) not in self._arrays:
                with np.load(file) as z:
                    self._arrays[(file, key)] = z[key]
        img = self._arrays[(file, key)][int(i)]
        if img.ndim == 3:  # RGB MedMNIST variants: grayscale like every other loader
            img = img.mean(axis=-1)
        return geometry.image(img.astype(np.float32) / 255.0), (img.shape[1], img.shape[0])


@loader("classification", image_size=64)
def medmnist(path: str = "data/pneumoniamnist.npz", class_names: list[str] | None = None, *, task: str,
             opts: LoaderOptions) -> DatasetBundle:
    """MedMNIST archive; ``class_names`` default: ``class_<k>`` (binary: one class, ``class_1``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{file}: MedMNIST .npz not found; set dataset.path")
    with np.load(file) as z:
        missing = [k for s in ("train", "val", "test") for k in (f"{s}_images", f"{s}_labels") if k not in z]
        if missing:
            raise DataError(f"{file}: missing array(s) {', '.join(missing)}; a MedMNIST .npz has "
                            "{train,val,test}_{images,labels}")
        labels = {s: z[f"{s}_labels"] for s in ("train", "val", "test")}
    multilabel = labels["train"].shape[1] > 1
    k = labels["train"].shape[1] if multilabel else int(max(v.max() for v in labels.values())) + 1
    names = list(class_names) if class_names else (
        [f"class_{i}" for i in range(k)] if multilabel or k > 2 else ["class_1"])
    if len(names) != (k if multilabel or k > 2 else 1):
        raise DataError(f"class_names has {len(names)} names; {file} has {k if multilabel or k > 2 else 1} classes")
    problems = Problems(opts.on_error, "medmnist")
    records = []
    for split, lab in labels.items():
        for i, row in enumerate(lab):
            if multilabel:
                y = row.astype(np.float32)
            elif k > 2:
                y = np.eye(k, dtype=np.float32)[int(row[0])]
            else:
                y = np.array([float(row[0])], np.float32)
            records.append(Record(image_id=f"{file.stem}/{split}/{i:05d}", path=f"{file}::{split}_images::{i}",
                                  patient=f"{split}/{i}", labels=y, source=f"{file}:{split}_labels[{i}]", split=split))
    return build_bundle("medmnist", records, names, problems, opts, task=task, decoder=NpzDecoder())
