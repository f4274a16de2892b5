"""The shared dataset core: decoding (DICOM included), geometry, splits, label fractions, the cache."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest
from PIL import Image

from cxr_automl.data import Geometry, ImageReadError, decode_image
from cxr_automl.data.cache import build_or_load
from cxr_automl.data.images import load_resized
from cxr_automl.data.records import Record, fraction_subset, patient_split
from cxr_files import SHARED, write_dicom

COVID = SHARED / "covid-seg-100" / "images"


def ramp(bits: int = 12, h: int = 8, w: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 2 ** bits - 1, w).round().astype(np.uint16), (h, 1))


def test_dicom_monochrome1_12bit_is_inverted_and_fully_scaled(tmp_path):
    raw = ramp(12)
    m1 = decode_image(write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", bits=12))
    m2 = decode_image(write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", bits=12))
    assert m1.dtype == np.float32 and m1.shape == raw.shape
    # 12-bit data uses the whole [0, 1] range (not 4095/65535 of it), MONOCHROME1 runs the other way
    assert m2[0, 0] == 0.0 and m2[0, -1] == pytest.approx(1.0)
    assert m1[0, 0] == pytest.approx(1.0) and m1[0, -1] == 0.0
    assert np.all(np.diff(m1[0]) < 0) and np.allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_window_and_rescale_are_applied(tmp_path):
    raw = ramp(12)
    win = decode_image(write_dicom(tmp_path / "w.dcm", raw, bits=12, window=(1024, 512)))
    x = raw[0].astype(float)
    assert np.all(win[0][x <= 768] == 0.0) and np.all(win[0][x >= 1280] == pytest.approx(1.0))
    inside = (x > 800) & (x < 1250)
    assert inside.sum() > 3 and np.all(np.diff(win[0][inside]) > 0)  # linear ramp inside the window
    # rescale slope/intercept (modality LUT) runs before the window: the same window over shifted values
    shifted = decode_image(write_dicom(tmp_path / "r.dcm", raw, bits=12, window=(1024 + 1000, 512),
                                       slope=1.0, intercept=1000.0))
    assert np.allclose(shifted, win, atol=1e-5)


def test_16bit_png_with_12bit_values_is_not_dark(tmp_path):
    raw = ramp(12, 4, 32)
    Image.fromarray(raw.astype(np.uint16)).save(tmp_path / "a.png")
    img = decode_image(tmp_path / "a.png")
    assert img.max() == pytest.approx(1.0) and img.min() == 0.0


def test_corrupt_file_is_an_image_read_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk")
    for name in ("bad.png", "bad.dcm"):
        with pytest.raises(ImageReadError):
            decode_image(tmp_path / name)


def test_geometry_pad_keeps_aspect_and_maps_boxes():
    g = Geometry(64, "pad")
    img = np.ones((50, 100), np.float32)  # landscape 100x50
    out = g.image(img)
    assert out.shape == (64, 64) and out[:16].max() == 0 and out[16:48].min() == 255
    box = g.boxes(np.array([[0, 0, 100, 50]], np.float32), 100, 50)
    assert np.allclose(box, [[0, 16, 64, 48]])
    masks = g.mask(np.ones((2, 50, 100), bool))
    assert masks.shape == (2, 64, 64) and masks[:, 16:48].all() and not masks[:, :16].any()
    s = Geometry(32, "stretch")
    assert np.allclose(s.boxes(np.array([[10, 20, 50, 40]], np.float32), 100, 50), [[3.2, 12.8, 16, 25.6]])


def test_patient_split_is_deterministic_disjoint_and_proportional():
    patients = [f"p{i // 3}" for i in range(3000)]  # 1000 patients, 3 images each
    a = patient_split(patients, seed=0)
    assert a == patient_split(list(reversed(patients)), seed=0)  # row order does not matter
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 800, "val": 100, "test": 100}
    b = patient_split(patients, seed=1)
    assert a != b and sum(v == "train" for v in b.values()) == 800
    assert set(patient_split(["a", "b", "c"]).values()) == {"train", "val", "test"}


def test_fractions_are_nested_stratified_patient_level_subsets():
    # 1000 images of 500 patients; class 0 on 10 % of patients, class 1 on 30 %
    recs = [Record(f"i{i}", "", f"p{i // 2}", np.array([(i // 2) % 10 == 0, (i // 2) % 10 in (1, 2, 3)],
                                                      np.float32), "") for i in range(1000)]
    subsets = {f: fraction_subset(recs, f, seed=0) for f in (0.01, 0.1, 0.3, 1.0)}
    ids = {f: {r.image_id for r in s} for f, s in subsets.items()}
    assert ids[0.01] < ids[0.1] < ids[0.3] < ids[1.0]
    assert abs(len(ids[0.1]) - 100) <= 4 and abs(len(ids[0.3]) - 300) <= 4
    for f, s in subsets.items():  # a patient is in or out with all their images
        patients = {r.patient for r in s}
        assert len(s) == sum(r.patient in patients for r in recs)
        if f >= 0.1:  # every stratum keeps its share (exactly, up to one patient)
            share = np.stack([r.labels for r in s]).mean(axis=0)
            assert abs(share[0] - 0.1) <= 2 / len(s) and abs(share[1] - 0.3) <= 2 / len(s), (f, share)
    assert ids[0.1] == {r.image_id for r in fraction_subset(recs, 0.1, seed=0)}
    assert ids[0.1] != {r.image_id for r in fraction_subset(recs, 0.1, seed=1)}
    assert len(fraction_subset(recs, 0.0001, seed=0)) == 2  # never empty: one patient


def _build(args):
    cache_dir, paths = args
    c = build_or_load("race", paths, Geometry(48), cache_dir)
    return str(c.path), np.asarray(c.array()).sum()


def test_cache_is_built_once_and_safe_under_concurrent_builders(tmp_path):
    paths = sorted(str(p) for p in COVID.glob("*.png"))[:24] + [str(tmp_path / "missing.png")]
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build, [(str(tmp_path), paths)] * 2)
    assert results[0] == results[1]
    files = sorted(p.name for p in (tmp_path / "race").iterdir())
    assert len([f for f in files if f.endswith(".npy")]) == 1 and not [f for f in files if ".tmp" in f]
    cache = build_or_load("race", paths, Geometry(48), str(tmp_path))
    assert cache.failed == {24: "file not found"}
    first, size = load_resized(paths[0], Geometry(48))
    assert np.array_equal(cache.array()[0], first) and tuple(cache.sizes[0]) == size
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker receives: a path, not pixels
    assert clone._array is None and np.array_equal(clone.array()[3], cache.array()[3])
    # another preprocessing is another cache
    other = build_or_load("race", paths, Geometry(32, "pad"), str(tmp_path))
    assert other.path != cache.path and other.array().shape == (25, 32, 32)
