"""Every valid (tiny) backbone × head pair: train two steps, evaluate, save, reload, same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from cxr_automl import config
from cxr_automl.plugin import compat, registry
from cxr_automl.plugin.interfaces import predict
from cxr_automl.train.callbacks import Checkpointer
from cxr_automl.train.checkpoint import load_latest
from cxr_automl.train.evaluators import primary_metric
from cxr_automl.train.loop import Trainer, collate

#: small sizes for each component; the architectures are the production ones
SMALL = {"resnet_tiny": ["backbone.width=8"], "mlp": ["head.hidden=16"], "upernet": ["head.hidden=16"],
         "unet": ["head.width=16"], "yolov8": ["head.width=16"],
         "sam2": ["head.hidden=32", "head.heads=4", "head.mlp_dim=64"],
         "dino": ["head.hidden=32", "head.heads=4", "head.num_queries=20", "head.num_denoising=10",
                  "head.decoder_layers=2", "head.encoder_ffn=64", "head.decoder_ffn=64"]}


def _pairs():
    backbones = [n for n, i in registry.available("backbone").items()
                 if i.distribution == "cxr-automl" and n.endswith("_tiny")]
    heads = [n for n, i in registry.available("head").items() if i.distribution == "cxr-automl"]
    return [(c.backbone, c.head) for c in compat.matrix() if c.ok and c.backbone in backbones and c.head in heads]


def _same(a, b) -> None:
    if torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("backbone,head", _pairs())
def test_pair_trains_evaluates_and_reloads(backbone, head, tmp_path):
    task = compat.head_task(head)
    cfg = config.compose([
        f"backbone={backbone}", f"head={head}", f"dataset.task={task}", "strategy=finetune",
        "dataset.n_train=8", "dataset.n_val=4", "dataset.n_test=4", "dataset.image_size=64",
        "backbone.image_size=64", "strategy.epochs=1", "trainer.batch_size=4", "trainer.eval_batch_size=4",
        "trainer.num_workers=0", "trainer.progress=false", *SMALL.get(backbone, []), *SMALL.get(head, [])])
    trainer = Trainer(cfg, tmp_path, [Checkpointer()])
    before = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    metrics = trainer.fit()
    assert trainer.step == 2
    assert primary_metric(task, "test") in metrics and 0 <= metrics[primary_metric(task, "test")] <= 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.head.state_dict().items()), "head did not train"
    written = "predictions.json" if task == "detection" else "predictions.csv"
    assert (tmp_path / written).stat().st_size > 0
    if task == "detection":
        assert isinstance(json.loads((tmp_path / written).read_text()), list)

    fresh = Trainer(cfg, tmp_path)
    fresh.load_state_dict(load_latest(tmp_path))
    batch = collate([trainer.data.test[i] for i in range(2)])
    images = batch["image"]
    trainer.model.eval(), fresh.model.eval()
    with torch.no_grad():
        a, b = trainer.model(images), fresh.model(images)
        _same(a, b)
        _same(predict(trainer.model.head, a, batch), predict(fresh.model.head, b, batch))
