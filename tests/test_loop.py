"""Loop mechanics: gradient accumulation, LR schedules, device selection, throughput metrics."""

import pytest
import torch

from conftest import TINY
from cxr_automl import config
from cxr_automl.train.loop import Trainer
from cxr_automl.train.runtime import TrainerConfig, TrainerConfigError, make_scheduler, resolve_device


def _trainer(tmp_path, *extra):
    return Trainer(config.compose([*TINY, *extra]), tmp_path, callbacks=[])


def test_accumulation_equals_one_big_batch(tmp_path):
    # frozen backbone (BatchNorm in eval) and no dropout: the only difference is how the batch is split
    common = ["strategy=finetune", "strategy.unfreeze_k=0", "strategy.epochs=1", "head.dropout=0.0"]
    big = _trainer(tmp_path / "big", *common, "trainer.batch_size=16")
    small = _trainer(tmp_path / "small", *common, "trainer.batch_size=8", "trainer.accumulate=2")
    assert big.steps_per_epoch == small.steps_per_epoch == 6
    for t in (big, small):
        t.fit()
    assert big.step == small.step == 6
    for (name, a), b in zip(big.model.head.named_parameters(), small.model.head.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("kind", ["cosine", "linear", "step", "constant"])
def test_schedules_with_warmup(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    tc = TrainerConfig(scheduler=kind, warmup_epochs=1, step_epochs=2, step_gamma=0.5)
    sched = make_scheduler(opt, tc, steps_per_epoch=4, epochs=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup over one epoch
    if kind == "cosine":
        assert lrs[4] == pytest.approx(1.0) and lrs[-1] < 0.05
        assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    elif kind == "linear":
        assert lrs[12] == pytest.approx(0.5)
    elif kind == "step":
        assert lrs[7] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5) and lrs[16] == pytest.approx(0.25)
    else:
        assert lrs[4:] == [1.0] * 16


def test_device_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainerConfigError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_num_workers_auto_follows_slurm_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert TrainerConfig.from_dict({"num_workers": "auto"}).workers() == 5
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert TrainerConfig.from_dict({"num_workers": "auto", "device": "cpu"}).workers() == 0
    assert TrainerConfig.from_dict({"num_workers": 3}).workers() == 3


def test_throughput_is_logged_per_epoch(tmp_path):
    t = _trainer(tmp_path, "strategy.epochs=1")
    metrics = t.fit()
    assert metrics["train/images_per_s"] > 0
    assert 0 <= metrics["train/data_wait_share"] < 1


def test_compile_option_runs(tmp_path):
    t = _trainer(tmp_path, "strategy.epochs=1", "trainer.compile=true")
    assert t.fit()["test/macro_auc"] >= 0


def test_worker_count_does_not_change_results(tmp_path):
    """Per-epoch augmentation is seeded by (seed, epoch, index) inside the loading process."""
    a = _trainer(tmp_path / "w0", "strategy.epochs=2", "trainer.num_workers=0").fit()
    b = _trainer(tmp_path / "w2", "strategy.epochs=2", "trainer.num_workers=2").fit()
    assert a["test/macro_auc"] == pytest.approx(b["test/macro_auc"], abs=1e-6)
    assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)


def test_threads_follow_the_slurm_allocation(monkeypatch):
    import torch

    from cxr_automl.train.runtime import fit_threads_to_allocation
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        fit_threads_to_allocation()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # never more threads than before
        fit_threads_to_allocation()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_eval_model_is_asked_once_per_epoch_and_the_test_uses_its_module(tmp_path):
    t = _trainer(tmp_path, "strategy=spft", "strategy.ema_decay=0.5")
    asked, tested = [], []
    eval_model, evaluate = t.strategy.eval_model, t.evaluate
    t.strategy.eval_model = lambda model, step: asked.append(t.epoch) or eval_model(model, step)
    t.evaluate = lambda split, model=None: (tested.append((split, model)), evaluate(split, model))[1]
    t.fit()
    assert asked == [0, 1, 2]
    assert [s for s, _ in tested] == ["val", "val", "val", "test"]
    ema = t.strategy.ema.module
    assert all(m is ema for _, m in tested[:3])  # the module eval_model gave, validated as is
    assert type(tested[3][1]) is type(ema)  # and tested as a copy with the best epoch's weights
