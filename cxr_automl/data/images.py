"""Decoding chest X-ray files into grayscale arrays, and the one resize every loader shares.

``decode_image`` turns PNG/JPEG/TIFF (Pillow) or DICOM (pydicom) into float32 (H, W) in [0, 1] where
bright = dense (bone white), whatever the file's photometric convention. ``Geometry`` is how an image of
(W, H) is placed into the S×S square a backbone sees — boxes and masks go through the same mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_automl.errors import UserError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", *DICOM_SUFFIXES}


class ImageReadError(UserError):
    """A file that exists but cannot be decoded into an image (the message says why)."""


def is_dicom(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    if p.suffix == "":  # DICOM files often have no extension: look for the 'DICM' preamble marker
        try:
            with open(p, "rb") as fh:
                fh.seek(128)
                return fh.read(4) == b"DICM"
        except OSError:
            return False
    return False


def decode_dicom(path: str | Path) -> np.ndarray:
    """DICOM → float32 [0, 1]: modality LUT (rescale slope/intercept), then the first VOI LUT or window
    in the file, then MONOCHROME1 inverted so that bright always means dense. The result is stretched
    min-max over the image: after windowing that is the window's output range; without a window, the
    stored 12–16-bit range actually used (a 12-bit image is not squashed into the bottom of 16 bits)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types; all mean "this file is not usable"
        raise ImageReadError(f"pydicom cannot read pixels: {type(exc).__name__}: {exc}") from exc
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        arr = arr[0]  # multi-frame: a radiograph has one frame of interest, the first
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or arr.ndim == 3:
        arr = np.asarray(arr, np.float32).mean(axis=-1)
    else:
        arr = apply_modality_lut(arr, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            arr = apply_voi_lut(arr, ds, index=0)
    arr = np.asarray(arr, np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":  # stored as "higher = darker": flip so bone is white
        out = 1.0 - out
    return out


def decode_raster(path: str | Path) -> np.ndarray:
    """PNG/JPEG/TIFF → float32 [0, 1]. 8-bit divides by 255; 16-bit files are scaled by the bit depth
    their values use (12-bit data in a 16-bit PNG is common and would otherwise look black)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, np.float32)
                bits = max(8, int(max(arr.max(), 1)).bit_length())
                return np.clip(arr / float(2 ** bits - 1), 0, 1)
            return np.asarray(im.convert("L"), np.float32) / 255.0
    # ImportError: once ultralytics is imported (by a detection plugin) it patches Image.open to retry unknown
    # files with pi_heif, which is not installed, so a corrupt file surfaces as ModuleNotFoundError.
    except (OSError, SyntaxError, ValueError, ImportError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"Pillow cannot decode it: {exc}") from exc


def decode_image(path: str | Path) -> np.ndarray:
    """Any supported file → float32 (H, W) in [0, 1]."""
    if not Path(path).is_file():
        raise FileNotFoundError(str(path))
    return decode_dicom(path) if is_dicom(path) else decode_raster(path)


@dataclass(frozen=True)
class Geometry:
    """How a (W, H) image is mapped into the S×S output: ``x' = x * sx + ox`` (same for y).

    ``fit='stretch'`` scales each axis to S (the usual CXR practice); ``fit='pad'`` keeps the aspect
    ratio and centres the image on a black square (letterbox).
    """

    size: int
    fit: str = "stretch"

    def params(self, width: int, height: int) -> tuple[float, float, float, float]:
        if self.fit == "stretch":
            return self.size / width, self.size / height, 0.0, 0.0
        s = self.size / max(width, height)
        return s, s, (self.size - round(width * s)) / 2 // 1, (self.size - round(height * s)) / 2 // 1

    def image(self, img: np.ndarray) -> np.ndarray:
        """float [0, 1] (H, W) → uint8 (S, S)."""
        h, w = img.shape
        pil = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
        return self._place(pil, w, h, Image.Resampling.BILINEAR)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """bool/uint8 (M, H, W) → uint8 (M, S, S), nearest neighbour so labels stay labels."""
        if mask.shape[0] == 0:
            return np.zeros((0, self.size, self.size), np.uint8)
        h, w = mask.shape[-2:]
        return np.stack([self._place(Image.fromarray(m.astype(np.uint8) * 255), w, h, Image.Resampling.NEAREST)
                         for m in mask]) // 255

    def boxes(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """(K, 4) xyxy in original pixels → output pixels."""
        sx, sy, ox, oy = self.params(width, height)
        out = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], np.float32) + np.array([ox, oy, ox, oy], np.float32)
        return np.clip(out, 0, self.size)

    def _place(self, pil: Image.Image, w: int, h: int, resample: Image.Resampling) -> np.ndarray:
        sx, sy, ox, oy = self.params(w, h)
        if self.fit == "stretch":
            return np.asarray(pil.resize((self.size, self.size), resample))
        nw, nh = max(1, round(w * sx)), max(1, round(h * sy))
        canvas = np.zeros((self.size, self.size), np.uint8)
        canvas[int(oy):int(oy) + nh, int(ox):int(ox) + nw] = np.asarray(pil.resize((nw, nh), resample))
        return canvas


def probe(path: str | Path) -> tuple[tuple[int, int] | None, str | None]:
    """Cheap readability check from the file header only (for ``cache=false``, where nothing decodes
    every file up front): ``((width, height), None)`` when it looks like an image, else ``(None, reason)``.
    The size lets boxes and masks be checked against their image without decoding it."""
    p = Path(path)
    if not p.is_file():
        return None, "file not found"
    try:
        if is_dicom(p):
            import pydicom
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            if "Rows" not in ds:
                return None, "DICOM file without image rows/columns"
            return (int(ds.Columns), int(ds.Rows)), None
        with Image.open(p) as im:
            return (int(im.size[0]), int(im.size[1])), None  # opening parses the header only
    except Exception as exc:  # noqa: BLE001 - any parser failure means the same: not readable
        return None, f"{type(exc).__name__}: {exc}"


def load_resized(path: str | Path, geometry: Geometry) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one file and resize it: uint8 (S, S) and the original (W, H)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(str(p))
    if not is_dicom(p) and p.suffix.lower() in (".jpg", ".jpeg"):
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly (DCT scaling): much faster for big films
        try:
            with Image.open(p) as im:
                full = im.size
                im.draft("L", (geometry.size, geometry.size))
                arr = np.asarray(im.convert("L"), np.float32) / 255.0
        except (OSError, SyntaxError, ValueError, ImportError) as exc:  # ImportError: see decode_raster
            raise ImageReadError(f"Pillow cannot decode it: {exc}") from exc
        return geometry.image(arr), full
    arr = decode_image(p)
    return geometry.image(arr), (arr.shape[1], arr.shape[0])
