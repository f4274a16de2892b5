"""Writers for small image files with the names real datasets use (tests only).

Real label files from ../shared/data are read as they are; where the images are absent, these write
small, valid images under the exact names the label files expect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():  # worktrees live beside shared/, CI clones beside a copy of it
    SHARED = Path("/work/shared/data")


def chest_like(width: int, height: int, seed: int, lesion: bool = False, noise: float = 0.03) -> np.ndarray:
    """A cheap film-like uint8 image: smooth gradient, two dark lung fields, noise; a bright blob if lesion."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    img = 0.6 + 0.1 * yy
    for cx in (0.32, 0.68):
        img -= 0.3 * ((((xx - cx) / 0.14) ** 2 + ((yy - 0.47) / 0.28) ** 2) < 1)
    if lesion:
        img += 0.35 * np.exp(-(((xx - 0.3) ** 2 + (yy - 0.45) ** 2) / 0.004))
    if noise:
        img += rng.normal(0, noise, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_png(path: str | Path, width: int = 48, height: int = 48, seed: int = 0, lesion: bool = False,
              noise: float = 0.03) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(chest_like(width, height, seed, lesion, noise)).save(path, fmt)
    return path


def write_dicom(path: str | Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                window: tuple[float, float] | None = None, slope: float = 1.0, intercept: float = 0.0) -> Path:
    """An uncompressed single-frame DICOM (Digital X-ray) with pydicom's own writer."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def flat_png(path: Path, width: int, height: int, value: int = 100) -> None:
    """Full-size images whose content does not matter (boxes/RLE refer to the original pixel grid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (width, height), value).save(path)


def make_nih(root: Path, n_rows: int) -> Path:
    """NIH ChestX-ray14 layout: the first ``n_rows`` of the real Data_Entry file, images spread over
    ``images_00k/images/``, official-style train_val/test lists (every 4th patient in test), the real
    BBox_List, and three of its boxed images (1024 px) joined with their box finding as label."""
    import csv
    labels = SHARED / "labels"
    lines = (labels / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:n_rows + 1]
    boxed: list[list[str]] = []
    for r in list(csv.reader(open(labels / "BBox_List_2017.csv")))[1:]:
        if r[0] not in {b[0] for b in boxed} and len(boxed) < 3:
            boxed.append(r)
            finding = r[1].replace("Infiltrate", "Infiltration")
            rows.append(f"{r[0]},{finding},0,{int(r[0][:8])},50,M,PA,1024,1024,0.14,0.14")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([header, *rows]) + "\n")
    big = {r[0] for r in csv.reader(open(labels / "BBox_List_2017.csv"))}  # boxes need the real 1024 px grid
    for i, row in enumerate(rows):
        name = row.split(",")[0]
        target = root / f"images_{1 + i % 3:03d}" / "images" / name
        if name in big:
            flat_png(target, 1024, 1024)
        else:
            write_png(target, 40, 40, seed=i, lesion="No Finding" not in row)
    patients = sorted({row.split(",")[3] for row in rows})
    test_patients = set(patients[::4])
    lists: dict[str, list[str]] = {"train_val_list.txt": [], "test_list.txt": []}
    for row in rows:
        lists["test_list.txt" if row.split(",")[3] in test_patients else "train_val_list.txt"].append(row.split(",")[0])
    for fname, names in lists.items():
        (root / fname).write_text("\n".join(names) + "\n")
    (root / "BBox_List_2017.csv").write_text((labels / "BBox_List_2017.csv").read_text())
    return root


#: the production components at toy sizes, for one-epoch training runs on each layout
TRAIN_TINY = ["backbone.width=8", "backbone.image_size=32", "head.hidden=16", "strategy=finetune",
              "strategy.epochs=1", "trainer.batch_size=8", "trainer.progress=false", "dataset.image_size=32"]


def train_once(overrides: list[str], run_dir: Path) -> dict:
    """Compose a config the way `cxr-automl train` does and run one tiny epoch of the real loop."""
    from cxr_automl import config
    from cxr_automl.train import run
    cfg = config.compose([*TRAIN_TINY, *overrides])
    return run.train(cfg, run_dir)
