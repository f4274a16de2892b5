"""Foundation X's trainable part (classification): phases, Lock subsets, EMA teacher, consistency gradients."""

import json

import pytest
import torch

from cxr_automl import config, registry
from cxr_automl.loop import Trainer
from cxr_automl.trainer_utils import apply_plan
from cxr_automl_plugins.strategies.student_teacher import Teacher, consistency_loss, mix
from conftest import TINY as TINY_ALL, run_cli

TINY = [o for o in TINY_ALL if not o.startswith("strategy.epochs")]  # lock_release's epochs follow its schedule

MEMBER_B = "{name: b, tasks: [cls], dataset: {name: synthetic_cxr, n_train: 64, n_val: 32, n_test: 32, " \
           "image_size: 64, seed: 1}}"
TWO = ["strategy=lock_release", f"strategy.datasets=[{{name: a, tasks: [cls]}}, {MEMBER_B}]",
       "strategy.lock_classification=true"]


@pytest.fixture
def trainer(tmp_path):
    return Trainer(config.compose([*TINY, *TWO]), tmp_path)


def test_teacher_starts_as_copy_gets_no_gradient_and_follows_the_ema():
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    teacher = Teacher({"net": student})
    t, s = teacher.copies["net"], student
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), s.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not t.training  # model.train() does not switch the teacher to batch statistics
    before = {k: v.clone() for k, v in t.state_dict().items()}
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
        s[1].running_mean.fill_(2.0)
    teacher.update({"net": s}, momentum=0.8)
    for key, value in t.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.8 * before[key] + 0.2 * s.state_dict()[key]), key


def test_consistency_gradient_reaches_the_student_only():
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    task = torch.tensor(2.0, requires_grad=True)
    loss = mix(task, consistency_loss(student, teacher), c=0.5)
    assert loss.item() == pytest.approx(0.5 * 2.0 + 0.5 * ((student - teacher) ** 2).mean().item())
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert task.grad.item() == pytest.approx(0.5)


def test_phases_train_the_rows_path_and_lock_epochs_see_a_seeded_half(trainer):
    model, s = trainer.model, trainer.strategy
    assert set(model.head.heads) == {"a", "b"} and trainer.data.class_names[:1] == ["a/nodule"]
    assert [(r.dataset, r.mode) for r in s.schedule()] == [("a", "lock"), ("a", "release"), ("b", "lock"),
                                                           ("b", "release")]
    model.train()
    apply_plan(model, s.plan(0, model))  # Lock on a: only a's head
    trains = {n.split(".")[0] + ("." + n.split(".")[2] if n.startswith("head.") else "")
              for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"head.a"}
    apply_plan(model, s.plan(3, model))  # Release on b: backbone + b's head, not a's, never the teacher
    trains = {n.split(".")[0] + ("." + n.split(".")[2] if n.startswith("head.") else "")
              for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"backbone", "head.b"}
    a_range, b_range = s.members["a"]["train"], s.members["b"]["train"]
    assert (a_range, b_range) == ((0, 96), (96, 160))
    lock_a = s.train_indices(0, len(trainer.data.train))
    assert len(lock_a) == 48 and all(0 <= i < 96 for i in lock_a) and lock_a == s.train_indices(0, 160)
    assert s.train_indices(3, 160) == list(range(96, 160))
    # every optimizable parameter is the student's; the teacher is in no group
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in model.teacher.parameters()}
    assert {id(p) for p in model.head.parameters()} <= in_opt


def test_a_batch_trains_only_its_datasets_columns_and_the_student_backbone(trainer):
    model, s = trainer.model, trainer.strategy
    model.train()
    apply_plan(model, s.plan(1, model))  # Release on a
    items = [trainer.data.train[i] for i in range(4)]
    batch = {"labels": torch.stack([it["labels"] for it in items])}
    assert torch.isnan(batch["labels"][:, 5:]).all()  # b's columns are unknown for a's images
    with torch.no_grad():  # make the student differ from the teacher so the consistency term is non-zero
        for p in model.backbone.parameters():
            p.mul_(1.1)
    out = s.forward(model, torch.stack([it["image"] for it in items]), batch)
    s.loss(model, out, batch).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.heads["b"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.heads["a"].parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    # with c = 1 the loss is the consistency alone, and it still moves the student's backbone
    model.zero_grad(set_to_none=True)
    s.consistency = 1.0
    s.loss(model, s.forward(model, torch.stack([it["image"] for it in items]), batch), batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


@pytest.mark.slow
def test_lock_release_trains_end_to_end_with_per_dataset_metrics(in_tmp):
    run_cli("train", *TINY, *TWO, "run_dir=runs/fx", cwd=in_tmp)
    run = in_tmp / "runs" / "fx"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2, 3]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/auc/a/nodule" in metrics and "test/auc/b/nodule" in metrics
    state = torch.load(run / "last.ckpt", weights_only=False)
    teacher = {k: v for k, v in state["model"].items() if k.startswith("teacher.copies.backbone.")}
    student = {k.replace("teacher.copies.backbone.", "backbone."): v for k, v in teacher.items()}
    assert teacher and not all(torch.equal(v, state["model"][k]) for k, v in student.items()
                               if v.is_floating_point())  # the EMA teacher lags behind the student


def test_foundation_x_ablation_space_is_table_10s_four_arms():
    from cxr_automl import searchspace
    space = searchspace.load("foundation_x_ablation")
    arms = {(b["strategy.lock"], b["strategy.teacher"]) for b in space.baselines.values()}
    assert arms == {(False, False), (False, True), (True, False), (True, True)} and space.n_trials == 4
    for fixed in space.baselines.values():
        cfg = config.compose([*space.overrides, *(f"{k}={str(v).lower()}" for k, v in fixed.items())])
        s_cfg = dict(cfg["strategy"])
        strategy = registry.build("strategy", s_cfg.pop("name"), **s_cfg)
        assert {r.mode for r in strategy.schedule()} == ({"lock", "release"} if fixed["strategy.lock"] else {"release"})


@pytest.mark.slow
@pytest.mark.parametrize("space, n", [("foundation_x_ablation", 4), ("lock_release", 2)])
def test_lock_release_search_spaces_run_end_to_end(in_tmp, space, n):
    run_cli("search", "-s", space, "-n", str(n), *TINY, cwd=in_tmp)
    import optuna
    study = optuna.load_study(study_name=space, storage=f"sqlite:///{in_tmp / 'runs' / 'cxr-automl.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == n and all(0 <= t.value <= 1 for t in done)
    if space == "foundation_x_ablation":
        assert {(t.params["strategy.lock"], t.params["strategy.teacher"]) for t in done} == \
            {(False, False), (False, True), (True, False), (True, True)}
