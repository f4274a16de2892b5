"""The embedded dataset: deterministic, cached once (also under concurrency), learnable."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

from cxr_automl import config
from cxr_automl.train import run
from cxr_automl_plugins.datasets import synthetic_cxr as syn


def test_deterministic_and_order_independent():
    a = syn.generate(12, 64, seed=3, split="train")
    b = syn.generate(12, 64, seed=3, split="train")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # image 5 does not depend on how many images come before or after it
    c = syn.generate(6, 64, seed=3, split="train")
    assert np.array_equal(a["images"][5], c["images"][5])
    assert not np.array_equal(a["images"], syn.generate(12, 64, seed=4, split="train")["images"])


def test_labels_boxes_masks_are_consistent():
    arrays = syn.generate(200, 64, seed=0, split="train")
    prevalence = arrays["labels"].mean(0)
    assert np.all(np.abs(prevalence - syn.PREVALENCE) < 0.08)
    assert prevalence[-1] < 0.15  # a rare class, so class weighting matters
    boxes = arrays["boxes"]
    for i in range(200):
        classes = set(boxes[boxes[:, 0] == i, 5].astype(int))
        assert classes == set(np.nonzero(arrays["labels"][i])[0]), i  # a box for every finding
    assert np.all(boxes[:, 1] < boxes[:, 3]) and np.all(boxes[:, 2] < boxes[:, 4])
    masks = np.unpackbits(arrays["masks"], axis=-1, count=64).astype(bool)
    assert masks[:, 0].any(axis=(1, 2)).all() and masks[:, 1].any(axis=(1, 2)).all()
    has_lesion = masks[:, 3].any(axis=(1, 2))
    assert np.array_equal(has_lesion, arrays["labels"][:, [0, 1, 3, 4]].any(1))


def test_items_and_augmentation(tmp_path):
    data = syn.synthetic_cxr(n_train=8, n_val=4, n_test=4, image_size=64, cache_dir=str(tmp_path))
    item = data.train[0]
    assert item["image"].shape == (1, 64, 64) and item["masks"].shape == (4, 64, 64)
    data.train.set_epoch(0)
    e0 = data.train[0]["image"]
    data.train.set_epoch(1)
    assert not torch.equal(e0, data.train[0]["image"])  # a new augmentation each epoch
    data.train.set_epoch(0)
    assert torch.equal(e0, data.train[0]["image"])  # ...reproducibly
    assert torch.equal(data.val[0]["image"], data.val[0]["image"])


def _build(cache):
    syn.synthetic_cxr(n_train=300, n_val=10, n_test=10, image_size=64, cache_dir=cache)


def test_cache_built_once_even_by_two_processes_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    files = list((tmp_path / "synthetic_cxr").glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    _build(str(tmp_path))
    assert files[0].stat().st_mtime_ns == mtime  # reused, not regenerated


@pytest.mark.slow
def test_findings_are_learnable_and_beat_a_linear_probe(tmp_path):
    # the default sizes (96 px, width-16 tiny ResNet), fewer images and epochs
    common = ["trainer.progress=false", "dataset.n_train=800", "dataset.n_val=200", "dataset.n_test=200",
              "strategy=finetune", "strategy.epochs=8", "strategy.lr_head=3e-3", "strategy.lr_backbone=3e-3"]
    tuned = run.train(config.compose(common), tmp_path / "ft")
    probe = run.train(config.compose([*common, "strategy.unfreeze_k=0"]), tmp_path / "probe")
    assert tuned["test/macro_auc"] > 0.72, (tuned, probe)
    assert tuned["test/macro_auc"] > probe["test/macro_auc"] + 0.08
