"""NIH ChestX-ray14, CheXpert, VinDr-CXR, RSNA and SIIM loaders on their REAL label files
(../shared/data/labels), with small generated images under the names those files expect."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_automl.data.records import Problems
from cxr_automl.plugin import registry
from cxr_automl.plugin.testing.contracts import DatasetContract
from cxr_automl_plugins.datasets import siim_acr
from cxr_automl_plugins.datasets.nih_cxr14 import CLASSES as NIH_CLASSES
from cxr_automl_plugins.datasets.nih_cxr14 import read_boxes
from cxr_files import SHARED, flat_png, make_nih, train_once, write_dicom, write_png

LABELS = SHARED / "labels"


def build(name: str, tmp: Path, **kw):
    return registry.build("dataset", name, cache_dir=str(tmp / "cache"), **kw)


def patients_of(split) -> set[str]:
    return {r.patient for r in split.records}


# ------------------------------------------------------------------------------------------- NIH
@pytest.fixture(scope="module")
def nih_root(tmp_path_factory) -> Path:
    return make_nih(tmp_path_factory.mktemp("nih"), 150)


def test_nih_labels_official_split_and_boxes(nih_root, tmp_path):
    data = build("nih_cxr14", tmp_path, root=str(nih_root), image_size=32, augment=False)
    assert data.class_names == NIH_CLASSES and len(data.class_names) == 14
    test_list = set((nih_root / "test_list.txt").read_text().split())
    assert {r.image_id for r in data.test.records} == test_list
    assert not (patients_of(data.train) | patients_of(data.val)) & patients_of(data.test)
    assert not patients_of(data.train) & patients_of(data.val)
    expected = {}
    for row in csv.DictReader(open(nih_root / "Data_Entry_2017_v2020.csv")):
        found = row["Finding Labels"].split("|")
        expected[row["Image Index"]] = np.array([c in found for c in NIH_CLASSES], np.float32)
    for split in (data.train, data.val, data.test):
        for i in range(len(split)):
            item = split[i]
            assert np.array_equal(item["labels"].numpy(), expected[item["image_id"]])
            assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
            assert 0 <= item["image"].min() and item["image"].max() <= 1
    bbox = {r[0]: r for r in list(csv.reader(open(LABELS / "BBox_List_2017.csv")))[1:]}
    boxed = [(s, i) for s in (data.train, data.val, data.test) for i in range(len(s)) if s.records[i].image_id in bbox]
    assert len(boxed) == 3
    split, i = boxed[0]
    item = split[i]
    x, y, w, h = (float(v) for v in bbox[item["image_id"]][2:6])
    assert item["boxes"].shape[1] == 4 and item["box_labels"].dtype == torch.int64
    assert torch.allclose(item["boxes"][0], torch.tensor([x, y, x + w, y + h]) * 32 / 1024, atol=1e-4)
    assert data.extras["report"]["skipped_total"] == 0


def test_nih_full_bbox_list_parses():
    boxes = read_boxes(LABELS / "BBox_List_2017.csv", Problems("raise", "nih"))
    assert sum(len(v) for v in boxes.values()) == 984
    classes = {NIH_CLASSES[c] for v in boxes.values() for _, c in v}
    assert len(classes) == 8 and "Infiltration" in classes  # the file spells it "Infiltrate"
    assert all(b[2] > b[0] and b[3] > b[1] for v in boxes.values() for b, _ in v)


def test_nih_bad_inputs_name_file_and_row(nih_root, tmp_path):
    import shutil
    root = tmp_path / "nih"
    shutil.copytree(nih_root, root)
    csv_file = root / "Data_Entry_2017_v2020.csv"
    lines = csv_file.read_text().splitlines()
    missing = lines[5].split(",")[0]
    next(root.rglob(missing)).unlink()
    corrupt = lines[9].split(",")[0]
    next(root.rglob(corrupt)).write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(registry.RegistryError, match=rf"Data_Entry_2017_v2020.csv:6: image '{missing}' not found"):
        build("nih_cxr14", tmp_path, root=str(root), image_size=32)
    data = build("nih_cxr14", tmp_path, root=str(root), image_size=32, on_error="skip")
    assert data.extras["report"]["skipped"] == {"missing": 1, "unreadable": 1}
    ids = {r.image_id for s in (data.train, data.val, data.test) for r in s.records}
    assert missing not in ids and corrupt not in ids and len(ids) == len(lines) - 3
    src = next(nih_root.rglob(missing))
    shutil.copy(src, root / src.relative_to(nih_root))  # back: now only the corrupt image is left
    with pytest.raises(registry.RegistryError, match=rf"{corrupt} \(.*Data_Entry_2017_v2020.csv:10\): cannot read"):
        build("nih_cxr14", tmp_path, root=str(root), image_size=32)
    lines[3] = lines[3].replace(lines[3].split(",")[1], "Cardiomegaly|Flu", 1)
    csv_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(registry.RegistryError, match=r"Data_Entry_2017_v2020.csv:4: 'Finding Labels' is 'Cardiomegaly\|Flu'"):
        build("nih_cxr14", tmp_path, root=str(root), image_size=32)
    csv_file.write_text("\n".join(ln.replace("Patient ID", "Patient") for ln in lines) + "\n")
    with pytest.raises(registry.RegistryError, match=r"Data_Entry_2017_v2020.csv:1: missing column\(s\) 'Patient ID'"):
        build("nih_cxr14", tmp_path, root=str(root), image_size=32)


# -------------------------------------------------------------------------------------- CheXpert
@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cx") / "CheXpert-v1.0-small"
    lines = (LABELS / "chexpert_train.csv").read_text().splitlines()[:301]
    root.mkdir()
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    for i, row in enumerate(csv.DictReader(lines)):
        write_png(root.parent / row["Path"], 36, 40, seed=i)
    return root


def _frontal_rows(root: Path) -> list[dict]:
    return [r for r in csv.DictReader(open(root / "train.csv")) if r["Frontal/Lateral"] == "Frontal"]


def test_chexpert_uncertainty_policies(chexpert_root, tmp_path):
    rows = _frontal_rows(chexpert_root)
    comp = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    count = lambda v: sum(float(r[c]) == v for r in rows for c in comp if r[c])  # noqa: E731
    blanks = sum(not r[c] for r in rows for c in comp)
    got = {}
    for pol in ("ones", "zeros", "ignore"):
        d = build("chexpert", tmp_path, root=str(chexpert_root), uncertain=pol, competition5=True, image_size=32)
        assert d.class_names == comp
        got[pol] = np.concatenate([d.label_matrix(s) for s in ("train", "val", "test")])
        assert len(got[pol]) == len(rows)  # frontal only
    assert count(-1.0) > 10
    assert got["ones"].sum() == count(1.0) + count(-1.0)
    assert got["zeros"].sum() == count(1.0)
    assert np.isnan(got["ignore"]).sum() == count(-1.0) and np.nansum(got["ignore"]) == count(1.0)
    d = build("chexpert", tmp_path, root=str(chexpert_root), blank="ignore", uncertain="ignore", image_size=32,
              frontal_only=False)
    allm = np.concatenate([d.label_matrix(s) for s in ("train", "val", "test")])
    assert allm.shape == (300, 14) and np.isnan(allm).sum() > blanks
    assert not patients_of(d.train) & (patients_of(d.val) | patients_of(d.test))


def test_chexpert_ignored_labels_are_masked_in_the_loss(chexpert_root, tmp_path):
    from cxr_automl.train.loop import collate
    from cxr_automl_plugins.heads.classification import linear
    d = build("chexpert", tmp_path, root=str(chexpert_root), uncertain="ignore", blank="ignore", image_size=32)
    batch = collate([d.train[i] for i in range(16)])
    assert torch.isnan(batch["labels"]).any()
    head = linear(in_dim=4, num_classes=14)
    logits = torch.randn(16, 14)
    loss = head.loss(logits, batch)
    known = ~torch.isnan(batch["labels"])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], batch["labels"][known])
    assert torch.isfinite(loss) and torch.allclose(loss, ref)


def test_chexpert_label_outside_policy(chexpert_root, tmp_path):
    import shutil
    root = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(chexpert_root, root)
    lines = (root / "train.csv").read_text().splitlines()
    cells = next(csv.reader([lines[2]]))
    cells[7] = "2.0"  # Cardiomegaly
    lines[2] = ",".join(cells)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(registry.RegistryError, match=r"train.csv:3: column 'Cardiomegaly' has '2.0'; expected one of 1, 0, -1, blank"):
        build("chexpert", tmp_path, root=str(root), image_size=32)
    d = build("chexpert", tmp_path, root=str(root), image_size=32, on_error="skip")
    assert d.extras["report"]["skipped"] == {"label": 1}


# ----------------------------------------------------------------------------------------- VinDr
@pytest.fixture(scope="module")
def vindr_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vindr")
    rows = list(csv.DictReader(open(LABELS / "vinbigdata-train.csv")))
    ids = list(dict.fromkeys(r["image_id"] for r in rows))[:40]
    keep = [r for r in rows if r["image_id"] in set(ids)]
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    for image_id in ids:  # big enough for every box of the image
        xs = [float(r["x_max"]) for r in keep if r["image_id"] == image_id and r["x_max"]] or [100]
        ys = [float(r["y_max"]) for r in keep if r["image_id"] == image_id and r["y_max"]] or [100]
        flat_png(root / "train" / f"{image_id}.png", int(max(xs)) + 2, int(max(ys)) + 2)
    return root


def test_vindr_fusion_rules(vindr_root, tmp_path):
    rows = list(csv.DictReader(open(vindr_root / "train.csv")))
    pos = {}
    for fusion in ("any", "majority", "all"):
        d = build("vindr_cxr", tmp_path, root=str(vindr_root), fusion=fusion, image_size=32)
        recs = {r.image_id: r for s in (d.train, d.val, d.test) for r in s.records}
        assert len(recs) == 40
        pos[fusion] = sum(r.labels.sum() for r in recs.values())
        for image_id, rec in recs.items():
            mine = [r for r in rows if r["image_id"] == image_id]
            readers = {r["rad_id"] for r in mine}
            for c, name in enumerate(d.class_names):
                votes = len({r["rad_id"] for r in mine if r["class_name"] == name})
                need = {"any": 1, "majority": len(readers) // 2 + 1, "all": len(readers)}[fusion]
                assert rec.labels[c] == float(votes >= need), (image_id, name)
            assert set(rec.box_labels.tolist()) == set(np.flatnonzero(rec.labels).tolist())
    assert pos["any"] > pos["majority"] >= pos["all"]


# ------------------------------------------------------------------------------------------- RSNA
def test_rsna_boxes_targets_and_dicom(tmp_path):
    root = tmp_path / "rsna"
    lines = (LABELS / "kaggle_stage_2_train_labels.csv").read_text().splitlines()[:81]
    root.mkdir()
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    rows = list(csv.DictReader(lines))
    ids = list(dict.fromkeys(r["patientId"] for r in rows))
    for k, pid in enumerate(ids):
        if k < 2:  # the real files are 1024x1024 8-bit MONOCHROME2 DICOMs
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", np.full((1024, 1024), 90, np.uint16), bits=8)
        else:
            flat_png(root / "stage_2_train_images" / f"{pid}.png", 1024, 1024)
    d = build("rsna_pneumonia", tmp_path, root=str(root), image_size=64, augment=False)
    items = {s[i]["image_id"]: s[i] for s in (d.train, d.val, d.test) for i in range(len(s))}
    assert set(items) == set(ids) and d.class_names == ["Pneumonia"]
    for pid in ids:
        mine = [r for r in rows if r["patientId"] == pid]
        assert items[pid]["labels"].item() == float(mine[0]["Target"])
        assert len(items[pid]["boxes"]) == sum(r["Target"] == "1" for r in mine)
    r = next(r for r in rows if r["Target"] == "1")
    x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
    assert any(torch.allclose(b, torch.tensor([x, y, x + w, y + h]) / 16, atol=1e-3) for b in items[r["patientId"]]["boxes"])
    lines[3] = lines[3].rsplit(",", 1)[0] + ",1"  # a positive row without its box
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(registry.RegistryError, match=r"stage_2_train_labels.csv:4: Target 1 needs a box"):
        build("rsna_pneumonia", tmp_path, root=str(root), image_size=64)


# ------------------------------------------------------------------------------------------- SIIM
@pytest.fixture(scope="module")
def siim_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("siim")
    lines = (LABELS / "siim-pneumothorax-train-rle.csv").read_text().splitlines()[:121]
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    for k, line in enumerate(lines[1:]):
        image_id = line.split(",")[0]
        flat_png(root / "dicom-images-train" / f"study{k}" / f"{image_id}.png", 1024, 1024)
    return root


def test_siim_rle_masks_roundtrip(siim_root, tmp_path):
    rows = list(csv.reader(open(siim_root / "train-rle.csv")))[1:]
    per_image: dict[str, list[str]] = {}
    for image_id, rle in rows:
        per_image.setdefault(image_id, []).append(rle.strip())
    single = next(i for i, v in per_image.items() if len(v) == 1 and v[0] != "-1")
    pairs = siim_acr.parse_rle(per_image[single][0])
    mask = siim_acr.rle_decode(pairs, 1024, 1024)
    assert mask.sum() == pairs[:, 1].sum()
    assert siim_acr.rle_encode(mask) == per_image[single][0]  # the file's own encoding, exactly
    assert siim_acr.rle_decode(siim_acr.parse_rle("-1"), 1024, 1024).sum() == 0
    d = build("siim_acr", tmp_path, root=str(siim_root), image_size=64, augment=False)
    items = {s[i]["image_id"]: s[i] for s in (d.train, d.val, d.test) for i in range(len(s))}
    assert set(items) == set(per_image) and d.extras["structures"] == ["Pneumothorax"]
    for image_id, rles in per_image.items():
        positive = any(r != "-1" for r in rles)
        assert items[image_id]["labels"].item() == float(positive)
        assert items[image_id]["masks"].shape == (1, 64, 64)
        assert bool(items[image_id]["masks"].any()) == positive
    frac = items[single]["masks"].float().mean().item()
    assert frac == pytest.approx(mask.mean(), abs=0.01)  # same area after resizing
    assert len(list((tmp_path / "cache" / "siim_acr").glob("*.masks.npy"))) == 1  # masks decoded once, like images
    direct = build("siim_acr", tmp_path, root=str(siim_root), image_size=64, augment=False, cache=False)
    for i in range(len(direct.test)):  # the mask cache holds exactly what decoding on the fly gives
        assert torch.equal(direct.test[i]["masks"], items[direct.test[i]["image_id"]]["masks"])


def test_siim_rle_that_does_not_fit(siim_root, tmp_path):
    import shutil
    root = tmp_path / "siim"
    shutil.copytree(siim_root, root)
    lines = (root / "train-rle.csv").read_text().splitlines()
    image_id = lines[1].split(",")[0]
    lines[1] = f"{image_id}, 1048570 10"
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(registry.RegistryError, match=r"train-rle.csv:2: RLE runs reach pixel 1048580 but .* is 1024x1024"):
        build("siim_acr", tmp_path, root=str(root), image_size=32)
    d = build("siim_acr", tmp_path, root=str(root), image_size=32, on_error="skip")
    assert d.extras["report"]["skipped"] == {"mask": 1}
    lines[1] = f"{image_id}, 12 x"
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(registry.RegistryError, match=r"train-rle.csv:2: EncodedPixels is not a valid RLE"):
        build("siim_acr", tmp_path, root=str(root), image_size=32)


class TestDatasetContracts(DatasetContract):
    @pytest.fixture(params=["nih_cxr14", "chexpert", "vindr_cxr", "siim_acr"])
    def bundle(self, request, tmp_path):
        root = request.getfixturevalue({"nih_cxr14": "nih_root", "chexpert": "chexpert_root",
                                        "vindr_cxr": "vindr_root", "siim_acr": "siim_root"}[request.param])
        return build(request.param, tmp_path, root=str(root), image_size=32)


def test_chexpert_valid_csv_is_the_official_test_split(chexpert_root, tmp_path):
    import shutil
    root = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(chexpert_root, root)
    lines = (root / "train.csv").read_text().splitlines()
    last = {ln.split("/")[2] for ln in lines[-40:]}  # the last patients become "valid"
    keep = [ln for ln in lines[1:] if ln.split("/")[2] not in last]
    valid = [ln.replace("/train/", "/valid/") for ln in lines[1:] if ln.split("/")[2] in last]
    (root / "train.csv").write_text("\n".join([lines[0], *keep]) + "\n")
    (root / "valid.csv").write_text("\n".join([lines[0], *valid]) + "\n")
    shutil.move(str(root / "train"), str(root / "all"))
    for ln in keep + valid:
        rel = next(csv.reader([ln]))[0].split("/", 1)[1]
        src = root / "all" / rel.split("/", 1)[1]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / rel)
    d = build("chexpert", tmp_path, root=str(root), image_size=32)
    frontal_valid = sum("Frontal" in ln for ln in valid)
    assert len(d.test) == frontal_valid and all("/valid/" in r.image_id for r in d.test.records)
    assert patients_of(d.test) == last - {p for p in last if not any(
        p in ln and "Frontal" in ln for ln in valid)}
    assert not patients_of(d.train) & patients_of(d.val)
    d2 = build("chexpert", tmp_path, root=str(root), image_size=32, valid_as="val")
    assert len(d2.val) == frontal_valid and len(d2.test) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nih_cxr14", "chexpert", "vindr_cxr", "siim_acr"])
def test_train_runs_on_each_layout(name, request, tmp_path):
    root = request.getfixturevalue({"nih_cxr14": "nih_root", "chexpert": "chexpert_root",
                                    "vindr_cxr": "vindr_root", "siim_acr": "siim_root"}[name])
    extra = {"chexpert": ["dataset.uncertain=ignore"], "siim_acr": ["dataset.task=classification"]}.get(name, [])
    metrics = train_once([f"dataset={name}", f"dataset.root={root}", *extra], tmp_path / "run")
    assert metrics["epochs_run"] == 1 and (tmp_path / "run" / "predictions.csv").is_file()
