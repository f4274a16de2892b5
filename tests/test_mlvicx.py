"""MLVICX: the paper's loss terms by hand, the context bottleneck, the optimizer, and end-to-end runs."""

import json
import math

import pytest
import torch
from timm.optim import Lars

from conftest import TINY, run_cli
from cxr_automl import config
from cxr_automl.plugin import registry
from cxr_automl.train.loop import Trainer
from cxr_automl_plugins.datasets.synthetic_cxr import keep_label_fraction
from cxr_automl_plugins.strategies.mlvicx_parts import ContextBottleneck, covariance, invariance, variance, vicreg

# b = 3 images, r = 2 dimensions; every number below is worked out in the comments
Z1 = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 3.0]])
Z2 = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
SMALL = ["strategy=mlvicx", "strategy.expander_dim=32", "strategy.downstream_epochs=2", "strategy.epochs=2"]


def test_invariance_eq6_and_mse():
    # z - z' = [[-1, 0], [0, -1], [0, 2]]: squared norms 1, 1, 4 -> (1/b)·Σ = 6/3; MSE = 6/(b·r) = 1
    assert invariance(Z1, Z2, "sum").item() == pytest.approx(2.0)
    assert invariance(Z1, Z2, "mse").item() == pytest.approx(1.0)


def test_variance_hinge_eq7():
    # Z1 columns [0,2,1] (Var 1) and [0,1,3] (Var 7/3): both std >= 1 -> no penalty
    assert variance(Z1, 1.0, eps=0.0).item() == pytest.approx(0.0)
    # Z2 columns [1,2,1] (Var 1/3, std 1/√3) and [0,2,1] (Var 1): (1/r)·(1 − 1/√3 + 0)
    assert variance(Z2, 1.0, eps=0.0).item() == pytest.approx((1 - 1 / math.sqrt(3)) / 2)
    # target Λ = 2: ((2 − 1) + (2 − √(7/3))) / 2
    assert variance(Z1, 2.0, eps=0.0).item() == pytest.approx((1 + 2 - math.sqrt(7 / 3)) / 2)
    # a collapsed dimension: std = √(0 + ε), and its gradient stays finite
    z = torch.zeros(4, 1, requires_grad=True)
    v = variance(z, 1.0, eps=1e-4)
    v.backward()
    assert v.item() == pytest.approx(1 - 0.01) and torch.isfinite(z.grad).all()


def test_covariance_eq8():
    # Z1: C_01 = ((−1)(−4/3) + (1)(−1/3) + 0·(5/3)) / (b−1) = 1/2 -> (1/r)·2·(1/2)² = 1/4
    assert covariance(Z1).item() == pytest.approx(0.25)
    # Z2: C_01 = ((−1/3)(−1) + (2/3)(1) + (−1/3)(0)) / 2 = 1/2 -> 1/4
    assert covariance(Z2).item() == pytest.approx(0.25)
    assert covariance(torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])).item() == pytest.approx(2 * 8.0 ** 2 / 2)


def test_vicreg_eq3_weights_and_sums_both_branches():
    out = vicreg(Z1, Z2, alpha=25, beta=25, gamma=1, eps=0.0)
    var = (1 - 1 / math.sqrt(3)) / 2 / 2  # (var(Z1) + var(Z2)) / 2 = (0 + (1 − 1/√3)/2) / 2, VICReg's code
    assert out["inv"].item() == pytest.approx(1.0)
    assert out["var"].item() == pytest.approx(var)
    assert out["cov"].item() == pytest.approx(0.5)
    assert out["loss"].item() == pytest.approx(25 * 1.0 + 25 * var + 1 * 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        vicreg(Z1[:1], Z2[:1], 1, 1, 1)


def test_context_bottleneck_shapes_and_attention():
    block = ContextBottleneck(6)
    y = torch.randn(2, 6, 5, 7)
    assert block(y).shape == y.shape
    for p in block.parameters():  # zero convs: both attentions are σ(0) = 1/2
        torch.nn.init.zeros_(p)
    assert torch.allclose(block(y), 0.25 * y)
    # channel attention sees avg AND max pooling: a channel with a single hot pixel is re-weighted
    torch.nn.init.eye_(block.channel_conv.weight.view(6, 6))
    y = torch.zeros(1, 6, 4, 4)
    y[0, 0, 1, 1] = 4.0
    out = block(y)
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0 * torch.sigmoid(torch.tensor(4.0 / 16 + 4.0)).item() * 0.5)


def test_label_fraction_keeps_a_seeded_subset():
    labels = torch.rand(50, 3).round().numpy()
    kept = keep_label_fraction(labels, 0.1, seed=0)
    known = ~torch.isnan(torch.as_tensor(kept)).all(dim=1)
    assert known.sum().item() == 5
    assert (kept[known.numpy()] == labels[known.numpy()]).all()
    assert (keep_label_fraction(labels, 0.1, seed=0) == kept)[known.numpy()].all()
    with pytest.raises(ValueError, match="label_fraction"):
        keep_label_fraction(labels, 0.0, seed=0)


@pytest.fixture
def trainer(tmp_path):
    cfg = config.compose([*TINY, *SMALL])
    return Trainer(cfg, tmp_path)


def test_every_new_parameter_is_in_the_lars_optimizer_and_gets_a_gradient(trainer):
    model, strategy = trainer.model, trainer.strategy
    assert isinstance(trainer.optimizer, Lars)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    new = list(model.mlvicx.parameters())
    assert len(new) > 0 and all(id(p) in in_opt for p in new)
    assert all(id(p) in in_opt for p in model.backbone.parameters())
    n_before = len(list(model.parameters()))
    model.train()
    images = torch.stack([trainer.data.train[i]["image"] for i in range(8)])
    outputs = strategy.forward(model, images, {})
    strategy.loss(model, outputs, {}).backward()
    assert len(list(model.parameters())) == n_before  # nothing created lazily in forward
    missing = [n for n, p in model.mlvicx.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    for stage in model.backbone.stage_modules():  # inline hooks live only during the forward
        assert not stage._forward_hooks


def test_bottlenecks_are_inline_and_table_iv_flags_select_the_loss(trainer):
    model, strategy = trainer.model, trainer.strategy
    model.eval()
    x = torch.rand(4, 1, 64, 64)
    plain = model.backbone(model.adapter(x)).pooled
    refined: list[torch.Tensor] = []
    with strategy._refining(model, refined):
        hooked = model.backbone(model.adapter(x)).pooled
    assert len(refined) == 4 and not torch.allclose(plain, hooked)  # every stage refined, feeding the next
    model.train()
    images = torch.rand(8, 1, 64, 64)
    for terms, silent in (("global", "local_expander"), ("local", "global_expander")):
        model.zero_grad(set_to_none=True)
        strategy.loss_terms = terms
        strategy.loss(model, strategy.forward(model, images, {}), {}).backward()
        assert all(p.grad is None for p in getattr(model.mlvicx, silent).parameters())
        other = "global_expander" if silent == "local_expander" else "local_expander"
        assert all(p.grad is not None for p in getattr(model.mlvicx, other).parameters())


def test_downstream_probe_freezes_the_encoder_finetune_does_not(trainer):
    model, strategy = trainer.model, trainer.strategy
    probe = strategy.downstream.fit(model, trainer.data, trainer.train_step, seed=0, drop=("mlvicx",))
    assert not hasattr(probe, "mlvicx") and hasattr(model, "mlvicx")
    for (name, a), b in zip(model.backbone.state_dict().items(), probe.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(model.head.parameters(), probe.head.parameters()))
    strategy.downstream.protocol = "finetune"
    tuned = strategy.downstream.fit(model, trainer.data, trainer.train_step, seed=0, drop=("mlvicx",))
    assert not torch.equal(model.backbone.net.conv1.weight, tuned.backbone.net.conv1.weight)


def test_downstream_trains_with_the_runs_step_clipping_precision_and_loader(trainer):
    from cxr_automl.train.runtime import TrainerConfig
    from cxr_automl.train.step import TrainStep
    model, strategy = trainer.model, trainer.strategy
    strategy.downstream.protocol = "finetune"

    def tuned(**trainer_keys):
        step = TrainStep(TrainerConfig(**trainer_keys), torch.device("cpu"))
        torch.manual_seed(0)  # the head's dropout draws from the global RNG
        return strategy.downstream.fit(model, trainer.data, step, seed=0, drop=("mlvicx",))

    @torch.no_grad()
    def moved(copy):  # how far fine-tuning took the encoder's weights
        return sum(float((a - b).abs().sum()) for a, b in zip(model.backbone.parameters(),
                                                                copy.backbone.parameters()))

    free = tuned()
    # trainer.grad_clip bounds the whole gradient's norm: at 1e-12 AdamW's steps shrink to ~lr·1e-4
    assert moved(tuned(grad_clip=1e-12)) < 1e-3 * moved(free)
    # trainer.precision reaches the downstream forward (bf16 autocast on the CPU): other numbers
    half = tuned(precision="bf16")
    assert not all(torch.equal(a, b) for a, b in zip(free.head.parameters(), half.head.parameters()))
    # the loop's loader settings: worker processes, and the same numbers as without them
    workers = tuned(num_workers=2)
    for a, b in zip(free.state_dict().values(), workers.state_dict().values()):
        assert torch.equal(a, b)


def test_the_downstream_copy_is_trained_once_per_epoch(trainer, monkeypatch):
    fits = []
    fit = type(trainer.strategy.downstream).fit
    monkeypatch.setattr(type(trainer.strategy.downstream), "fit",
                        lambda self, *a, **k: fits.append(trainer.epoch) or fit(self, *a, **k))
    trainer.fit()
    assert fits == [0, 1]  # not again for the best-epoch weights, nor for the test


@pytest.mark.slow
def test_mlvicx_trains_end_to_end_and_its_encoder_loads_as_backbone_weights(in_tmp):
    run_cli("train", *TINY, *SMALL, "dataset.label_fraction=0.3", "run_dir=runs/mlvicx", cwd=in_tmp)
    run = in_tmp / "runs" / "mlvicx"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/macro_auc"] <= 1.0 and "best/val/macro_auc" in metrics
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1] and all(math.isfinite(m["train/loss"]) for m in lines)
    saved = torch.load(run / "encoder.pt", weights_only=True)["state_dict"]
    backbone = registry.build("backbone", "resnet_tiny", width=8, image_size=64,
                              weights=str(run / "encoder.pt"), strict=True)
    own = backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())
    # the pretrained encoder really differs from a fresh one (it trained)
    fresh = registry.build("backbone", "resnet_tiny", width=8, image_size=64).state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in saved.items() if v.is_floating_point())
    # and a downstream run picks it up through the config
    run_cli("train", *TINY, "strategy=finetune", "strategy.epochs=1", f"backbone.weights={run / 'encoder.pt'}",
            "backbone.strict=true", "run_dir=runs/down", cwd=in_tmp)


def test_table_iv_ablation_space_is_exactly_its_three_arms():
    from cxr_automl.hpo import searchspace
    space = searchspace.load("mlvicx_ablation")
    assert space.n_trials == len(space.baselines) == 3
    arms = {cfg["strategy.loss_terms"] for cfg in space.baselines.values()}
    assert arms == {"both", "global", "local"}
    for fixed in space.baselines.values():
        cfg = config.compose([*space.overrides, *(f"{k}={v}" for k, v in fixed.items())])
        assert cfg["strategy"]["loss_terms"] == fixed["strategy.loss_terms"] and cfg["head"]["name"] == "linear"


@pytest.mark.slow
def test_mlvicx_search_space_runs_end_to_end(in_tmp):
    tiny = [o for o in TINY if not o.startswith("head.")]  # the space sets head=linear
    run_cli("search", "-s", "mlvicx", "-n", "2", *tiny, "strategy.expander_dim=32", "strategy.epochs=1",
            "strategy.downstream_epochs=2", cwd=in_tmp)
    import optuna
    study = optuna.load_study(study_name="mlvicx", storage=f"sqlite:///{in_tmp / 'runs' / 'cxr-automl.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(0 <= t.value <= 1 for t in done)
    assert {"strategy.lambda_l", "strategy.levels", "strategy.gamma"} <= set(done[1].params)
    assert (in_tmp / "runs" / "mlvicx" / "trial_0001" / "encoder.pt").is_file()


def test_backbone_without_stage_modules_is_refined_post_hoc(tmp_path, monkeypatch):
    from cxr_automl_plugins.backbones.resnet import TimmResNet

    def no_stages(self):
        raise NotImplementedError

    monkeypatch.setattr(TimmResNet, "stage_modules", no_stages)
    trainer = Trainer(config.compose([*TINY, *SMALL]), tmp_path)
    model, strategy = trainer.model, trainer.strategy
    assert strategy.inline is False
    model.train()
    out = strategy.forward(model, torch.rand(4, 1, 64, 64), {})
    strategy.loss(model, out, {}).backward()
    assert all(p.grad is not None for p in model.mlvicx.bottlenecks.parameters())
