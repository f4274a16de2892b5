import math

import pytest
import torch

from cxr_automl.plugin import registry
from cxr_automl.train.model import build_model
from cxr_automl.train.runtime import TrainerConfig, apply_plan
from cxr_automl.train.step import TrainStep
from cxr_automl_plugins.strategies.spft import initial_class_weights, refine_class_weights


def test_initial_weights_follow_label_distribution_and_are_normalised():
    labels = torch.tensor([[1, 0], [0, 0], [0, 0], [1, 1], [0, float("nan")]])
    w = initial_class_weights(labels)
    # class 0: 2 pos / 3 neg -> 1.5; class 1: 1 pos / 3 neg (NaN ignored) -> 3.0
    assert w.mean().item() == pytest.approx(1.0)
    assert (w[1] / w[0]).item() == pytest.approx(2.0)


def test_refinement_moves_weight_to_weak_classes():
    w = torch.ones(3)
    refined = refine_class_weights(w, [0.9, 0.6, None], rate=1.0)
    assert refined[1] > refined[0]  # weaker class weighs more
    assert refined.mean().item() == pytest.approx(1.0)
    assert torch.equal(refine_class_weights(w, [0.9, 0.6, None], rate=0.0), w)


@pytest.fixture(scope="module")
def data():
    return registry.build("dataset", "synthetic_cxr", n_train=32, n_val=16, n_test=16, image_size=32)


def _model(data):
    return build_model({"name": "resnet_tiny", "width": 8}, {"name": "mlp", "hidden": 16}, data)


def test_stage1_head_only_then_top_k_unfrozen_progressively(data):
    model = _model(data)
    s = registry.build("strategy", "spft", epochs=6, head_epochs=2, unfreeze_k=4, unfreeze_ramp=2)
    s.setup(model, data)
    blocks = list(model.backbone.blocks())
    assert [s.unfrozen_blocks(e) for e in range(6)] == [0, 0, 2, 4, 4, 4]
    model.train()
    apply_plan(model, s.plan(0, model))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not blocks[-1].training  # frozen block keeps BatchNorm statistics
    apply_plan(model, s.plan(2, model))
    trainable = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert trainable == [False] * (len(blocks) - 2) + [True, True]


def test_linear_probe_is_k0_and_finetune_trains_everything(data):
    model = _model(data)
    probe = registry.build("strategy", "finetune", epochs=2, unfreeze_k=0)
    probe.setup(model, data)
    apply_plan(model, probe.plan(1, model))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    full = registry.build("strategy", "finetune", epochs=2)
    full.setup(model, data)
    apply_plan(model, full.plan(0, model))
    assert all(p.requires_grad for p in model.parameters())


def test_ema_is_what_gets_evaluated_and_early_stopping(data):
    model = _model(data)
    s = registry.build("strategy", "spft", epochs=20, ema_decay=0.5, patience=2)
    s.setup(model, data)
    ema = s.eval_model(model, TrainStep(TrainerConfig(), torch.device("cpu")))
    assert ema is not model
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.head.parameters()]
    s.after_step(model)
    for b, e, m in zip(before, ema.head.parameters(), model.head.parameters()):
        assert torch.allclose(e, 0.5 * b + 0.5 * m, atol=1e-5)
    assert [s.after_epoch(e, model, {"val/macro_auc": v}) for e, v in enumerate([0.6, 0.7, 0.65, 0.69])] == \
        [False, False, False, True]
    assert math.isclose(s.best, 0.7)
