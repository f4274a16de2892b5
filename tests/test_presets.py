"""Every paper preset (``experiment=NAME``) composes, builds its real-size model (not a tiny variant),
takes two optimizer steps and evaluates on real chest X-rays from ../shared/data on the CPU.

Only what a CPU test cannot afford is changed: batch size 1 (2 for MLVICX, whose loss needs a batch
statistic), two batches of the first epoch's images, fp32 instead of bf16 autocast, no workers, random
weights instead of the checkpoints the presets point at; foundation_x on two of its seven datasets (one
with classification, localization and segmentation). Image sizes stay as each preset sets them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from cxr_automl import config
from cxr_automl.plugin.strategy import MultiTask
from cxr_automl.plugin.testing.layouts import WRITERS, Annotated, read_covid
from cxr_automl.train.loop import Trainer
from cxr_automl.train.runtime import apply_plan
from cxr_files import SHARED

COVID = SHARED / "covid-seg-100"
PRESETS = sorted(config.experiments())
#: dataset folders (the names foundation_x expects under data_root) → layout writer
DIRS = {"nih_cxr14": "nih_cxr14", "vindr-cxr": "vindr_cxr", "chestx-det": "chestx_det", "organs": "mask_folder",
        "siim": "siim_acr"}
#: foundation_x trains on two of its datasets here, one with all three tasks: every part it builds is real
#: size, but seven datasets' evaluations after each step would cost minutes of CPU
FX_DATASETS = ("strategy.datasets=[{name: nih, tasks: [cls]}, {name: chestx_det, tasks: [cls, loc, seg], "
               "dataset: {name: chestx_det, root: '${data_root}/chestx-det'}}]")
#: batch size 1 but where the method needs a batch statistic (VICReg's variance, BatchNorm expanders)
BATCH = {"mlvicx_nih": 2}
CPU = ["trainer.eval_batch_size=2", "trainer.num_workers=0", "trainer.progress=false",
       "trainer.precision=32"]
#: the backbone's parameter count (millions) at real size, lower bound
REAL_SIZE_M = {"rad_dino": 85, "swin_b": 85, "resnet18": 11, "resnet50": 23, "yolov8s": 5, "hiera": 27}
#: the image size each preset keeps
SIZES = {"spft_nih": 518, "spft_chexpert": 518, "spft_det_yolov8": 640, "spft_det_dino": 640, "spft_sam2": 1024,
         "foundation_x": 224, "mlvicx_nih": 224, "mlvicx_nih_downstream": 224, "mlvicx_siim_downstream": 224}


def write_chexpert(items: list[Annotated], out: Path) -> Path:
    """CheXpert's train.csv (Path, Frontal/Lateral and the 14 observations; a lung opacity when the
    image has an opacity mask) with the images under train/patientNNNNN/study1/."""
    from PIL import Image
    obs = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
           "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
           "Fracture", "Support Devices"]
    base = out / "CheXpert-v1.0-small"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *obs])
        for k, a in enumerate(items):
            rel = f"CheXpert-v1.0-small/train/patient{k:05d}/study1/view1_frontal.jpg"
            (base.parent / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.open(a.path).convert("L").save(base.parent / rel)
            sick = any(c not in ("Cardiomediastinum", "Left Lung", "Right Lung") for c, _, _ in a.objects)
            row = {o: "" for o in obs}
            row.update({"Lung Opacity": "1.0" if sick else "0.0", "Consolidation": "1.0" if k % 3 == 0 else "0.0",
                        "Edema": "-1.0" if k % 4 == 1 else "0.0", "Atelectasis": "1.0" if k % 2 else "0.0",
                        "Cardiomegaly": "0.0" if k % 3 else "1.0", "Pleural Effusion": "1.0" if k % 5 == 2 else ""})
            w.writerow([rel, "F", 60, "Frontal", "PA", *(row[o] for o in obs)])
    return base


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preset-data")
    items = read_covid(COVID, 20)
    for folder, layout in DIRS.items():
        WRITERS[layout](items, root / folder)
    write_chexpert(items, root)
    return root


def overrides(name: str, root: Path) -> list[str]:
    """Point the preset at the test data (what a user does with dataset.root / backbone.weights)."""
    per = {
        "spft_nih": [f"dataset.root={root / 'nih_cxr14'}", "backbone.weights=null"],
        "spft_chexpert": [f"dataset.root={root / 'CheXpert-v1.0-small'}", "backbone.weights=null"],
        "spft_det_yolov8": [f"dataset.root={root / 'vindr-cxr'}"],
        "spft_det_dino": [f"dataset.root={root / 'vindr-cxr'}"],
        "spft_sam2": [f"dataset.root={root / 'organs'}", "backbone.weights=null", "head.weights=null",
                      "dataset.val_fraction=0.05"],  # one validation image: each costs a 1024 px forward
        "foundation_x": [f"data_root={root}", FX_DATASETS],
        "mlvicx_nih": [f"dataset.root={root / 'nih_cxr14'}", "strategy.downstream_epochs=1",
                       "strategy.downstream_batch_size=2"],
        "mlvicx_nih_downstream": [f"dataset.root={root / 'nih_cxr14'}"],
        "mlvicx_siim_downstream": [f"dataset.root={root / 'siim'}"],
    }
    return per[name]


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_every_preset_is_covered_and_composes_with_its_paper_values():
    assert set(PRESETS) == set(SIZES)
    for name in PRESETS:
        cfg = config.compose([f"experiment={name}"])
        assert cfg["dataset"]["image_size"] == cfg["backbone"]["image_size"] == SIZES[name], name
    nih = config.compose(["experiment=spft_nih"])
    assert (nih["strategy"]["unfreeze_k"], nih["strategy"]["epochs"], nih["strategy"]["patience"]) == (10, 50, 7)
    assert (nih["trainer"]["batch_size"], nih["trainer"]["precision"], nih["trainer"]["scheduler"]) == (64, "bf16", "cosine")
    assert nih["dataset"]["official_split"] is False and nih["dataset"]["val_fraction"] == 0.1  # 80/10/10
    assert config.compose(["experiment=spft_chexpert"])["dataset"]["competition5"] is True
    for det in ("spft_det_yolov8", "spft_det_dino"):
        cfg = config.compose([f"experiment={det}"])
        assert (cfg["trainer"]["batch_size"], cfg["trainer"]["scheduler"], cfg["strategy"]["unfreeze_k"]) == (16, "linear", -1)
    fx = config.compose(["experiment=foundation_x"])
    assert (fx["trainer"]["batch_size"], fx["trainer"]["scheduler"], fx["head"]["name"]) == (24, "step", "linear")
    s = fx["strategy"]
    assert (s["lr_backbone"], s["lr_loc"], s["lr_seg"], s["momentum"], s["consistency"]) == (1e-5, 1e-4, 1e-4, 0.8, 0.5)
    assert s["lock_classification"] is False
    # the step decay happens within the run (not after it, as a 30-epoch period on 12 epochs would)
    from cxr_automl_plugins.strategies.lock_release import lock_release
    epochs = lock_release(**{k: v for k, v in s.items() if k != "name"}).epochs
    assert fx["trainer"]["step_epochs"] < epochs
    ml = config.compose(["experiment=mlvicx_nih"])
    assert (ml["strategy"]["epochs"], ml["trainer"]["batch_size"], ml["backbone"]["name"]) == (300, 64, "resnet18")
    # the command line still wins over the preset
    assert config.compose(["experiment=spft_nih", "strategy.unfreeze_k=3"])["strategy"]["unfreeze_k"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_its_real_size_model_trains_two_steps_and_evaluates(name, data_root, tmp_path):
    batch = BATCH.get(name, 1)
    cfg = config.compose([f"experiment={name}", *overrides(name, data_root), *CPU, f"trainer.batch_size={batch}",
                          f"dataset.cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(cfg, tmp_path / "run")
    model, strategy = trainer.model, trainer.strategy
    assert params_m(model.backbone) >= REAL_SIZE_M[cfg["backbone"]["name"]], "a real-size backbone"
    assert trainer.data.train[0]["image"].shape[-1] == SIZES[name]  # decoded at the preset's size
    if name == "foundation_x":  # Table 9: each localization decoder ~9.6 M, segmentation decoder ~20.9 M
        for decoder in model.head.loc_decoders.values():
            assert abs(params_m(decoder) - 9.61) < 0.1
        assert abs(params_m(model.head.seg_decoder) - 20.9) < 1.0
    multi = isinstance(strategy, MultiTask)  # it picks each epoch's training items itself
    first = strategy.train_indices(0, len(trainer.data.train)) if multi else None
    take = list(first if first is not None else range(len(trainer.data.train)))[:2 * batch]
    assert len(take) == 2 * batch
    if multi:  # two batches: two optimizer steps
        strategy.train_indices = lambda epoch, n: take
    else:  # for the two steps only: a strategy's own evaluation (a downstream probe) uses the whole split
        full, trainer.data.train = trainer.data.train, Subset(trainer.data.train, take)
    plan = strategy.plan(0, model)
    apply_plan(model, plan)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    stats = trainer.train_epoch(plan)
    assert trainer.step == 2 and math.isfinite(stats["train/loss"])
    changed = [k for k, v in model.named_parameters() if k in before and not torch.equal(before[k], v.detach())]
    assert changed, "the two steps moved the trainable weights"
    if not multi:
        trainer.data.train = full
    metrics, _ = trainer.evaluate("val")
    # one validation image per split here: the AUC may be undefined, the evaluation itself must run
    assert any(k.startswith("val/") for k in metrics), sorted(metrics)


# ------------------------------------------------------------------------------------ spaces and ablations
def test_unfreeze_depth_is_relative_to_the_backbone(tmp_path):
    """A share of the blocks (or k, or all) resolves against each backbone's own blocks, so one space
    serves ResNet's stages, Swin-B's, RAD-DINO's and Hiera's blocks; RAD-DINO's top 10 is reachable."""
    from cxr_automl.plugin import registry
    from cxr_automl_plugins.strategies.spft import check_unfreeze, resolve_unfreeze
    blocks = {name: len(registry.build("backbone", name, weights=None).blocks())
              for name in ("rad_dino", "swin_b", "resnet18", "hiera")}
    assert blocks["rad_dino"] == 13  # embeddings, 12 layers (the last with the final norm)
    for name, n in blocks.items():
        assert resolve_unfreeze(check_unfreeze(4, 1.0), n) == n == resolve_unfreeze(check_unfreeze("all", None), n)
        assert resolve_unfreeze(check_unfreeze(4, 0.0), n) == 0
        assert 1 <= resolve_unfreeze(check_unfreeze(4, 0.5), n) < n
        assert resolve_unfreeze(check_unfreeze(-1, None), n) == n
    assert resolve_unfreeze(check_unfreeze(4, 0.8), 13) == 10  # SPFT Table 1's top 10 of RAD-DINO
    assert resolve_unfreeze(check_unfreeze(10, None), 13) == 10
    for bad in ({"unfreeze_k": -2}, {"unfreeze_k": "most"}, {"unfreeze_fraction": 1.5}):
        with pytest.raises(ValueError, match="unfreeze"):
            check_unfreeze(bad.get("unfreeze_k", 4), bad.get("unfreeze_fraction"))
    # through the strategy on a real model: all of them train in stage 2
    cfg = config.compose(["backbone=resnet_tiny", "strategy.unfreeze_k=all", "strategy.unfreeze_ramp=1",
                          "dataset.n_train=16", "dataset.n_val=8", "dataset.n_test=8", "dataset.image_size=32",
                          "backbone.image_size=32", "trainer.progress=false"])
    trainer = Trainer(cfg, tmp_path)
    n = len(trainer.model.backbone.blocks())
    assert trainer.strategy.unfreeze_k == n
    stage2 = trainer.strategy.plan(cfg["strategy"]["head_epochs"], trainer.model)
    assert len(stage2.trainable) == n + 1  # the head and every block


def _compose_baselines(name: str) -> list[dict]:
    from cxr_automl.hpo import searchspace
    space = searchspace.load(name)
    out = []
    for values in space.baselines.values():
        for key, value in values.items():
            assert space.params[key]._contains(space.params[key].to_internal_repr(value)), (name, key, value)
        out.append(config.compose([*space.overrides, *(f"{k}={searchspace.format_value(v)}" for k, v in values.items())]))
    return out


def test_ablation_spaces_are_exactly_the_papers_tables():
    from cxr_automl.hpo import searchspace
    # SPFT Table 11: four rows, each adding one component to the one before
    space = searchspace.load("spft_ablation")
    assert space.n_trials == len(space.baselines) == 4
    rows = [(s["strategy"]["unfreeze_k"], s["strategy"]["class_weighting"], s["strategy"]["ema_decay"] > 0)
            for s in _compose_baselines("spft_ablation")]
    assert rows == [(0, False, False), (10, False, False), (10, True, False), (10, True, True)]
    assert all(c["backbone"]["name"] == "rad_dino" for c in _compose_baselines("spft_depth"))
    depth = searchspace.load("spft_depth")
    assert depth.n_trials == 2 and sorted(map(str, (v["strategy.unfreeze_k"] for v in depth.baselines.values()))) == ["10", "all"]
    # MLVICX: Table IV's three loss arms; the downstream protocol's 2 x 4 grid
    assert [c["strategy"]["loss_terms"] for c in _compose_baselines("mlvicx_ablation")] == ["both", "global", "local"]
    grid = {(c["dataset"]["subset_fraction"], c["strategy"]["unfreeze_k"]) for c in _compose_baselines("mlvicx_protocol")}
    assert grid == {(f, k) for f in (0.01, 0.1, 0.3, 1.0) for k in (0, -1)}
    seg = _compose_baselines("mlvicx_seg_protocol")  # Table III: frozen / fine-tune on 30 % and all
    assert {(c["dataset"]["subset_fraction"], c["strategy"]["unfreeze_k"]) for c in seg} == {
        (f, k) for f in (0.3, 1.0) for k in (0, -1)}
    assert {(c["head"]["name"], c["dataset"]["name"], c["dataset"]["task"]) for c in seg} == {
        ("unet", "siim_acr", "segmentation")}
    # Foundation X Table 10: four switches, and (tests/test_lock_release_plan.py) equal epochs and images
    arms = {(c["strategy"]["lock"], c["strategy"]["teacher"]) for c in _compose_baselines("foundation_x_ablation")}
    assert arms == {(a, b) for a in (True, False) for b in (True, False)}


def test_mlvicx_segmentation_frozen_trains_the_unet_decoder_only_on_real_siim_masks(data_root, tmp_path):
    """Table III's frozen protocol: the pretrained encoder stays as it is, the random U-Net decoder learns;
    fine-tuning moves both. Real covid-seg-100 images with their opacity masks as SIIM-ACR RLE."""
    small = ["backbone=resnet_tiny", "backbone.image_size=64", "dataset.image_size=64", "head.width=32",
             "trainer.batch_size=4", *CPU, f"dataset.root={data_root / 'siim'}", f"dataset.cache_dir={tmp_path / 'c'}",
             "dataset.balance=false"]  # 20 images here, most with an opacity: balanced, too few to train on
    for k, encoder_moves in ((0, False), (-1, True)):
        cfg = config.compose(["experiment=mlvicx_siim_downstream", *small, f"strategy.unfreeze_k={k}"])
        trainer = Trainer(cfg, tmp_path / f"run{k}")
        model = trainer.model
        assert type(model.head).__name__ == "UnetSegHead"
        trainer.data.train = Subset(trainer.data.train, range(8))
        plan = trainer.strategy.plan(0, model)
        apply_plan(model, plan)
        enc = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        dec = {n: p.detach().clone() for n, p in model.head.named_parameters()}
        trainer.train_epoch(plan)
        moved = lambda module, before: [n for n, p in module.named_parameters()  # noqa: E731
                                        if not torch.equal(before[n], p.detach())]
        assert bool(moved(model.backbone, enc)) is encoder_moves, k
        assert moved(model.head, dec), "the decoder learns in both protocols"
        metrics, _ = trainer.evaluate("val")
        assert math.isfinite(metrics["val/mean_dice"])


def test_siim_balance_keeps_as_many_positives_as_negatives(tmp_path):
    """MLVICX §IV-A's curated SIIM-ACR set, on real covid-seg-100 images (with and without an opacity;
    most have one, so here the positives are cut, where in SIIM-ACR itself the negatives are)."""
    from cxr_automl.plugin import registry
    from cxr_automl.plugin.testing.layouts import write_siim
    items = read_covid(COVID, 40)
    write_siim(items, tmp_path / "siim")
    rows = list(csv.reader(open(tmp_path / "siim" / "train-rle.csv")))[1:]
    pos = {r[0] for r in rows if r[1].strip() != "-1"}
    neg = {r[0] for r in rows} - pos
    assert neg and len(pos) > len(neg), "the real subset has more opacities than clear images"
    common = {"root": str(tmp_path / "siim"), "image_size": 32, "cache": False, "task": "classification"}
    full = registry.build("dataset", "siim_acr", **common)
    kept = registry.build("dataset", "siim_acr", balance=True, **common)
    ids = lambda b: [r.image_id for s in (b.train, b.val, b.test) for r in s.records]  # noqa: E731
    assert len(ids(full)) == len(pos) + len(neg)
    got = set(ids(kept))
    assert neg <= got and len(got & pos) == len(neg) == len(got) // 2
    assert got == set(ids(registry.build("dataset", "siim_acr", balance=True, **common))), "the same each time"


def test_learning_rate_ranges_contain_the_papers_values():
    from cxr_automl.hpo import searchspace

    def contains(space: str, key: str, *values: float) -> None:
        dist = searchspace.load(space).params[key]
        assert all(dist.low <= v <= dist.high for v in values), (space, key, dist)

    for space in ("spft", "yolov8_spft", "dino_spft", "upernet_spft", "sam2_spft"):
        contains(space, "strategy.lr_backbone", 1e-6, 1e-5, 1e-4)  # ViT/Hiera fine-tuning through CNN rates
        assert "strategy.unfreeze_fraction" in searchspace.load(space).params
    contains("lock_release", "strategy.lr_backbone", 1e-5)  # Foundation X Table 7
    contains("lock_release", "strategy.lr_loc", 1e-4)
    contains("lock_release", "strategy.lr_seg", 1e-4)
    contains("mlvicx", "strategy.lr", 3e-5, 0.05)  # the paper's LARS lr and the public code's 0.2 * 64 / 256
    for space in ("spft", "yolov8_spft", "lock_release", "mlvicx"):  # no CPU default passes as "the paper's"
        assert not {"default", "paper"} & set(searchspace.load(space).baselines)


def test_a_step_decay_that_never_happens_is_named(caplog):
    """trainer.step_epochs=30 on Lock-Release's 12 Table 8 epochs used to keep the LR flat, silently."""
    from cxr_automl.train.runtime import TrainerConfig, lr_factor
    factor = lr_factor(TrainerConfig(scheduler="step", step_epochs=30), steps_per_epoch=2, epochs=12)
    assert "never decays in this run's 12 epochs" in caplog.text
    assert {factor(step) for step in range(24)} == {1.0}
    caplog.clear()
    factor = lr_factor(TrainerConfig(scheduler="step", step_epochs=4, step_gamma=0.5), 2, 12)
    assert not caplog.text and factor(8) == 0.5 and factor(16) == 0.25


def test_dataset_image_size_follows_the_backbone_unless_set(caplog, tmp_path):
    """Item 4: NIH used to cache at the loader's 224 and RAD-DINO upsample to 518 at every step, silently."""
    from cxr_automl.plugin import registry
    from cxr_automl.train.model import build_model
    assert config.compose(["dataset=nih_cxr14", "backbone=rad_dino"])["dataset"]["image_size"] == 518
    assert config.compose(["dataset=nih_cxr14", "backbone=swin_b"])["dataset"]["image_size"] == 224
    assert config.compose(["dataset=nih_cxr14", "backbone=rad_dino", "dataset.image_size=256"])["dataset"]["image_size"] == 256
    data = registry.build("dataset", "synthetic_cxr", n_train=4, n_val=2, n_test=2, image_size=48,
                          cache_dir=str(tmp_path))
    build_model({"name": "rad_dino_tiny", "image_size": 64}, {"name": "mlp", "hidden": 16}, data)
    assert "dataset images are 48x48 px but backbone 'rad_dino_tiny' takes 64 px" in caplog.text
    caplog.clear()
    build_model({"name": "rad_dino_tiny", "image_size": 48}, {"name": "mlp", "hidden": 16}, data)
    assert "dataset images are" not in caplog.text


def test_cli_lists_shows_and_plans_the_presets():
    """In-process (typer's runner): the same commands a user types."""
    import json

    from typer.testing import CliRunner

    from cxr_automl.cli.app import app
    runner = CliRunner()
    listed = runner.invoke(app, ["plan", "--presets", "--json"])
    assert listed.exit_code == 0 and set(json.loads(listed.stdout)) == set(PRESETS)
    shown = runner.invoke(app, ["train", "--show-config", "experiment=spft_nih", "strategy.epochs=20"])
    assert shown.exit_code == 0, shown.output
    assert all(t in shown.stdout for t in ("name: rad_dino", "unfreeze_k: 10", "epochs: 20", "precision: bf16"))
    planned = runner.invoke(app, ["plan", "experiment=foundation_x", "--json"])
    rows = json.loads(planned.stdout)
    assert planned.exit_code == 0 and {r["dataset"] for r in rows} >= {"chexpert", "nih", "chestx_det", "siim"}
    bad = runner.invoke(app, ["train", "--show-config", "experiment=spft_nhi"])
    assert bad.exit_code == 2 and "unknown experiment 'spft_nhi'; known: foundation_x" in bad.output
