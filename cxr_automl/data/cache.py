"""The preprocessed image cache: every image decoded, converted and resized once into one
memory-mapped uint8 array, reused by every trial and every DataLoader worker.

Keyed by the dataset name, the ordered list of image files with their sizes and modification times,
and the preprocessing (size, fit, cache version), so changing any of them builds a new cache and
nothing stale is read. Safe under concurrency: builders take a file lock, write to a temporary file
and publish it with an atomic rename; a reader only trusts the array once its ``.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock

from cxr_automl.data.images import Geometry, ImageReadError, load_resized

log = logging.getLogger(__name__)
CACHE_VERSION = 1
Decoder = Callable[[str, Geometry], "tuple[np.ndarray, tuple[int, int]]"]


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("CXR_AUTOML_CACHE") or Path.home() / ".cache" / "cxr-automl"
    return Path(root).expanduser()


def _stat(path: str) -> list:
    file = path.split("::", 1)[0]  # "archive.npz::key::i" names an array inside a file
    try:
        st = os.stat(file)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, -1, -1]


def cache_key(dataset: str, paths: list[str], geometry: Geometry) -> str:
    h = hashlib.sha256(json.dumps({"dataset": dataset, "size": geometry.size, "fit": geometry.fit,
                                   "v": CACHE_VERSION}, sort_keys=True).encode())
    for p in paths:
        h.update(json.dumps(_stat(p)).encode())
    return h.hexdigest()[:20]


@dataclass
class ImageCache:
    """A built cache: ``array()`` is (N, S, S) uint8, memory-mapped lazily in whichever process reads it
    (so a split pickled into a DataLoader worker carries a path, not the pixels)."""

    path: Path
    sizes: np.ndarray  # (N, 2) original width, height
    failed: dict[int, str]
    _array: np.ndarray | None = field(default=None, repr=False)

    def array(self) -> np.ndarray:
        if self._array is None:
            # a plain ndarray view of the map: indexing a np.memmap pays for subclass bookkeeping per item
            self._array = np.load(self.path, mmap_mode="r").view(np.ndarray)
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def build_or_load(dataset: str, paths: list[str], geometry: Geometry, cache_dir: str | None = None,
                  workers: int = 0, decoder: Decoder = load_resized) -> ImageCache:
    """The cache for these files, building it once. Unreadable files do not stop the build: they are
    recorded (``failed``: index → reason) and the caller applies ``on_error``."""
    root = cache_root(cache_dir) / dataset
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(dataset, paths, geometry)
    npy, meta = root / f"{key}.npy", root / f"{key}.json"
    with FileLock(str(meta) + ".lock"):
        if not meta.exists():
            _build(paths, geometry, npy, meta, workers or min(8, os.cpu_count() or 1), decoder, dataset)
    info = json.loads(meta.read_text())
    return ImageCache(npy, np.asarray(info["sizes"], np.int32).reshape(-1, 2),
                      {int(k): v for k, v in info["failed"].items()})


def _build(paths: list[str], geometry: Geometry, npy: Path, meta: Path, workers: int, decoder: Decoder,
           dataset: str) -> None:
    n, s = len(paths), geometry.size
    log.info("%s: building the image cache (%d images at %d px) in %s", dataset, n, s, npy.parent)
    t0 = time.perf_counter()
    tmp = npy.with_name(f".{npy.stem}.{os.getpid()}.tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, s, s))
    sizes = np.zeros((n, 2), np.int32)
    failed: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            arr[i], sizes[i] = decoder(paths[i], geometry)
        except FileNotFoundError:
            failed[i] = "file not found"
        except (ImageReadError, OSError) as exc:
            failed[i] = str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem, named
            failed[i] = f"{type(exc).__name__}: {exc}"

    # Threads, not processes: Pillow and pydicom's numpy work release the GIL for most of a decode.
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for done, _ in enumerate(pool.map(work, range(n)), 1):
                if done % max(1, n // 10) == 0 and n >= 1000:
                    log.info("%s: cached %d/%d images (%.0f s)", dataset, done, n, time.perf_counter() - t0)
        arr.flush()
        arr = None  # unmap before publishing
        os.replace(tmp, npy)
    finally:  # an interrupted build leaves no half-written file behind
        tmp.unlink(missing_ok=True)
    tmp_meta = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps({"dataset": dataset, "size": s, "fit": geometry.fit, "n": n,
                                    "sizes": sizes.tolist(), "failed": {str(k): v for k, v in failed.items()},
                                    "seconds": round(time.perf_counter() - t0, 2)}))
    os.replace(tmp_meta, meta)  # last: the .json is the "complete" marker readers trust
    log.info("%s: image cache built in %.1f s (%d unreadable)", dataset, time.perf_counter() - t0, len(failed))


def _fingerprint(obj: object, h: "hashlib._Hash") -> None:
    """Feed what a record's mask is made of into a hash: arrays by content, mask files by stat."""
    if isinstance(obj, np.ndarray):
        h.update(str(obj.shape).encode() + obj.tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for o in obj:
            _fingerprint(o, h)
        h.update(b"]")
    elif isinstance(obj, str) and os.path.isfile(obj):
        h.update(json.dumps(_stat(obj)).encode())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def build_or_load_masks(images: ImageCache, records: list, valid: set[int], mask_fn: Callable, geometry: Geometry,
                        channels: int, workers: int = 0) -> np.ndarray:
    """Masks resized like their images, bit-packed: (N, M, S, ceil(S/8)) uint8, memory-mapped, in the
    same row order as the image cache. Keyed by the image cache, every record's mask source (RLE
    content, mask file stats, polygons) and the mask function, so segmentation data is decoded once
    too. Only rows in ``valid`` are made (the loader has already dropped the others per ``on_error``);
    the rest stay empty."""
    h = hashlib.sha256(images.path.stem.encode())
    h.update(f"{type(mask_fn).__module__}.{type(mask_fn).__qualname__}".encode())
    _fingerprint(sorted((k, v) for k, v in vars(mask_fn).items() if isinstance(v, (int, float, str, bool))), h)
    _fingerprint([r.mask for r in records], h)
    path = images.path.with_name(f"{images.path.stem}-{h.hexdigest()[:12]}.masks.npy")
    s, n = geometry.size, len(records)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, channels, s, (s + 7) // 8))

            def work(i: int) -> None:
                if i in valid:
                    w, hgt = (int(v) for v in images.sizes[i])
                    out[i] = np.packbits(geometry.mask(mask_fn(records[i], w, hgt)).astype(bool), axis=-1)

            try:
                with ThreadPoolExecutor(max_workers=max(1, workers or min(8, os.cpu_count() or 1))) as pool:
                    list(pool.map(work, range(n)))
                out.flush()
                out = None  # unmap before publishing
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")
