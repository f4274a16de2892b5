"""Foundation X's trainable part: phases of cls/loc/seg rows, Lock subsets, EMA teacher, consistency
gradients, offloading of inactive heads, evaluation of every task after Release epochs, the LR schedule."""

import json

import pytest
import torch

from conftest import TINY as TINY_ALL
from conftest import run_cli
from cxr_automl import config
from cxr_automl.plugin import registry
from cxr_automl.train.loop import Trainer
from cxr_automl.train.runtime import apply_plan
from cxr_automl_plugins.strategies.foundation_parts import all_components, component, resident
from cxr_automl_plugins.strategies.lock_release import ScheduleError
from cxr_automl_plugins.strategies.student_teacher import Teacher, consistency_loss, mix

TINY = [o for o in TINY_ALL if not o.startswith("strategy.epochs")]  # lock_release's epochs follow its schedule

MEMBER_B = "{name: b, tasks: [cls], dataset: {name: synthetic_cxr, n_train: 64, n_val: 32, n_test: 32, " \
           "image_size: 64, seed: 1}}"
TWO = ["strategy=lock_release", f"strategy.datasets=[{{name: a, tasks: [cls]}}, {MEMBER_B}]",
       "strategy.lock_classification=true"]
#: the shipped Table 8 configuration at toy size
TABLE_8 = ["strategy=lock_release", "dataset.n_train=32", "dataset.n_val=16", "dataset.n_test=16"]
ORGANS = ("heart", "left_lung", "right_lung")


@pytest.fixture
def trainer(tmp_path):
    return Trainer(config.compose([*TINY, *TWO]), tmp_path)


@pytest.fixture
def dense(tmp_path):
    return Trainer(config.compose([*TINY, *TABLE_8]), tmp_path)


def trainable_ids(model):
    return {id(p) for p in model.parameters() if p.requires_grad}


def ids_of(model, names):
    return {id(p) for n in names for p in component(model, n).parameters()}


def batch_of(trainer, indices):
    from cxr_automl.train.loop import collate
    return collate([trainer.data.train[i] for i in indices])


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


def test_classification_phases_train_the_rows_path_and_lock_epochs_see_a_seeded_half(trainer):
    model, s = trainer.model, trainer.strategy
    assert set(model.head.cls_heads) == {"a", "b"} and trainer.data.class_names[:1] == ["a/nodule"]
    assert [(r.dataset, r.mode) for r in s.schedule()] == [("a", "lock"), ("a", "release"), ("b", "lock"),
                                                           ("b", "release")]
    model.train()
    apply_plan(model, s.plan(0, model))  # Lock on a: only a's head
    assert trainable_ids(model) == ids_of(model, ["cls_head/a"])
    apply_plan(model, s.plan(3, model))  # Release on b: backbone + b's head, not a's, never the teacher
    assert trainable_ids(model) == ids_of(model, ["backbone", "cls_head/b"])
    a_range, b_range = s.members["a"]["train"], s.members["b"]["train"]
    assert (a_range, b_range) == ((0, 96), (96, 160))
    lock_a = s.train_indices(0, len(trainer.data.train))
    assert len(lock_a) == 48 and all(0 <= i < 96 for i in lock_a) and lock_a == s.train_indices(0, 160)
    assert s.train_indices(3, 160) == list(range(96, 160))
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in model.teacher.parameters()}
    assert {id(p) for p in model.head.parameters()} <= in_opt


def test_a_classification_batch_trains_only_its_dataset_and_the_student_backbone(trainer):
    model, s = trainer.model, trainer.strategy
    model.train()
    apply_plan(model, s.plan(1, model))  # Release on a
    batch = batch_of(trainer, range(4))
    assert torch.isnan(batch["labels"][:, 5:]).all()  # b's columns are unknown for a's images
    with torch.no_grad():  # make the student differ from the teacher so the consistency term is non-zero
        for p in model.backbone.parameters():
            p.mul_(1.1)
    s.loss(model, s.forward(model, batch["image"], batch), batch).backward()
    assert all(p.grad is None for p in model.head.cls_heads["b"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.cls_heads["a"].parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    model.zero_grad(set_to_none=True)
    s.consistency = 1.0  # the loss is the consistency alone, and it still moves the student's backbone
    s.loss(model, s.forward(model, batch["image"], batch), batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_each_classification_head_is_scored_on_its_own_datasets_columns(trainer):
    trainer.strategy.plan(1, trainer.model)  # after a Release epoch
    metrics, _ = trainer.evaluate("val")
    for ds in ("a", "b"):
        assert {f"val/{ds}/cls/auc/nodule", f"val/{ds}/cls/macro_auc"} <= set(metrics)
    assert metrics["val/objective"] == pytest.approx((metrics["val/a/cls/macro_auc"] + metrics["val/b/cls/macro_auc"]) / 2)


def test_dense_rows_train_exactly_their_components(dense):
    model, s = dense.model, dense.strategy
    heads = model.head
    assert set(heads.loc_decoders) == set(heads.seg_heads) == set(ORGANS) and not len(heads.cls_heads)
    assert all(getattr(d, "encoder", None) is None for d in heads.loc_decoders.values())  # one shared encoder
    expected = {  # Table 8's T entries of each row, as parameters
        0: ["loc_decoder/heart"], 1: ["backbone", "loc_encoder", "loc_decoder/heart"],
        2: ["loc_decoder/left_lung"], 5: ["backbone", "loc_encoder", "loc_decoder/right_lung"],
        6: ["seg_head/heart"], 7: ["backbone", "seg_decoder", "seg_head/heart"],
        10: ["seg_head/right_lung"], 11: ["backbone", "seg_decoder", "seg_head/right_lung"]}
    model.train()
    for epoch, names in expected.items():
        apply_plan(model, s.plan(epoch, model))
        assert trainable_ids(model) == ids_of(model, names), epoch
        assert s.rows[epoch].trainable == names
    assert not trainable_ids(model) & {id(p) for p in model.teacher.parameters()}
    assert set(model.teacher.copies) == {"backbone", "loc_encoder", "seg_decoder"}
    groups = {g["name"]: g["lr"] for g in dense.optimizer.param_groups}
    assert groups == {"backbone": 1e-5, "loc": 1e-4, "seg": 1e-4}  # Table 7's per-part rates


@pytest.mark.parametrize("epoch, shared", [(1, "loc_encoder"), (7, "seg_decoder")])
def test_a_dense_step_moves_only_the_active_path_and_consistency_reaches_the_student(dense, epoch, shared):
    model, s = dense.model, dense.strategy
    row = s.rows[epoch]
    model.train()
    apply_plan(model, s.plan(epoch, model))
    lo, _ = s.members[row.dataset]["train"]
    batch = batch_of(dense, range(lo, lo + 4))
    assert tuple(batch["masks"].shape[1:2]) == (1,) and all(len(b) == 1 for b in batch["boxes"])
    with torch.no_grad():  # student and teacher differ, so every consistency term has a gradient
        for name in ("backbone", shared):
            for p in component(model, name).parameters():
                p.add_(0.01 * torch.randn_like(p))
    s.consistency = 1.0
    out = s.forward(model, batch["image"], batch)
    assert out["task_student"] and len(out["task_student"]) == len(out["task_teacher"])
    s.loss(model, out, batch).backward()
    for name in ("backbone", shared):  # consistency alone reaches the student's backbone and shared part
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in component(model, name).parameters())
    s.consistency = 0.5
    model.zero_grad(set_to_none=True)
    s.loss(model, s.forward(model, batch["image"], batch), batch).backward()
    dense.optimizer.step()
    active = ids_of(model, row.trainable)
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad and with_grad <= active  # inactive heads: no gradient ...
    assert {id(p) for p in dense.optimizer.state} <= active  # ... and no optimizer work
    assert not any(p.grad is not None for p in model.teacher.parameters())


def test_teacher_ema_covers_backbone_and_shared_task_parts(dense):
    model, s = dense.model, dense.strategy
    before = {n: {k: v.clone() for k, v in model.teacher.copies[n].state_dict().items()}
              for n in model.teacher.copies}
    with torch.no_grad():
        for n in before:
            for p in component(model, n).parameters():
                p.add_(1.0)
    s.after_epoch(0, model, {})
    for n, old in before.items():
        student = component(model, n).state_dict()
        for k, v in model.teacher.copies[n].state_dict().items():
            if v.is_floating_point():
                assert torch.allclose(v, 0.8 * old[k] + 0.2 * student[k]), (n, k)


def test_inactive_heads_stay_off_the_accelerator(dense):
    """The ``meta`` device stands in for an accelerator: whatever is placed there is on it. (Nothing
    can come back from meta, so one real move is checked; every row's placement is checked below.)"""
    model, s = dense.model, dense.strategy
    accel = torch.device("meta")
    s.to_device(model, accel)
    on = lambda name: next(component(model, name).parameters()).device  # noqa: E731
    assert next(model.backbone.parameters()).device == accel
    assert next(model.teacher.copies["backbone"].parameters()).device == accel
    assert all(on(n).type == "cpu" for n in all_components(model))  # no head before an epoch needs it
    s.plan(1, model)  # Release: localization of the heart
    on_accel = {n for n in all_components(model) if on(n) == accel}
    assert on_accel == {"loc_encoder", "loc_decoder/heart", "teacher/loc_encoder"}
    # the placement rule for every row: its path (and the teacher's copy of its shared part), nothing else
    for row in s.rows:
        keep = resident(row.components, teacher=True)
        assert f"{'loc_decoder' if row.task == 'loc' else 'seg_head'}/{row.dataset}" in keep
        others = {d for d in ORGANS if d != row.dataset}
        assert not keep & {f"{k}/{d}" for k in ("loc_decoder", "seg_head") for d in others}
        assert ("seg_decoder" in keep) == (row.task == "seg") and ("loc_encoder" in keep) == (row.task == "loc")


def test_every_task_is_evaluated_after_release_epochs_only(dense):
    model, s = dense.model, dense.strategy
    s.plan(0, model)  # a Lock epoch: no evaluation
    assert dense.evaluate("val")[0] == {}
    s.plan(1, model)
    metrics, _ = dense.evaluate("val")
    headline = {f"val/{d}/{t}/{m}" for d in ORGANS for t, m in (("loc", "map_40"), ("seg", "mean_dice"))}
    assert headline <= set(metrics)
    assert metrics["val/objective"] == pytest.approx(sum(metrics[k] for k in headline) / 6)
    assert s.monitor() == "val/objective"
    s.objective = "min"
    assert s.summarize("val", metrics)["val/objective"] == pytest.approx(min(metrics[k] for k in headline))


def test_objective_may_name_one_key_and_bad_ones_are_one_line_errors():
    cfg = config.compose(["strategy=lock_release", "strategy.objective=val/heart/seg/mean_dice"])
    s_cfg = dict(cfg["strategy"])
    assert registry.build("strategy", s_cfg.pop("name"), **s_cfg).monitor() == "val/heart/seg/mean_dice"
    with pytest.raises((ScheduleError, registry.RegistryError), match=r"strategy.objective='val/lungs/seg/mean_dice'.*heart/loc"):
        s_cfg["objective"] = "val/lungs/seg/mean_dice"
        registry.build("strategy", "lock_release", **s_cfg)


@pytest.mark.parametrize("override, message", [
    ("strategy.loc_head.name=yolov8", "strategy.loc_head.name='yolov8'"),
    ("strategy.datasets=[{name: h, tasks: [seg], structure: spleen}]", r"strategy.datasets\[0\].structure='spleen'"),
    ("strategy.seg_head.typo=1", "typo"),
])
def test_bad_dense_configs_are_clear_errors(tmp_path, override, message):
    with pytest.raises(Exception, match=message) as info:
        Trainer(config.compose([*TINY, *TABLE_8, override]), tmp_path)
    assert "\n" not in str(info.value)


def test_structure_datasets_give_that_organs_mask_and_box(dense):
    lo, _ = dense.strategy.members["left_lung"]["train"]
    item = dense.data.train[lo]
    mask = item["masks"][0]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert item["masks"].shape[0] == 1 and item["box_labels"].tolist() == [0]
    assert item["boxes"][0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert dense.strategy.classes["left_lung"] == {"loc": ["left_lung"], "seg": ["left_lung"]}


def test_lr_schedule_counts_a_lock_epoch_as_a_full_epoch(trainer):
    """A Lock epoch visits half of dataset a; the schedule must still advance by exactly one epoch."""
    spe = trainer.steps_per_epoch
    plan = trainer.strategy.plan(0, trainer.model)
    trainer.train_epoch(plan)
    assert trainer.step < spe  # fewer optimizer steps than a full epoch ...
    assert trainer.scheduler.last_epoch == spe  # ... but the schedule is one epoch further
    lr_factor = trainer.optimizer.param_groups[0]["lr"] / trainer.optimizer.param_groups[0]["initial_lr"]
    import math
    assert lr_factor == pytest.approx(0.5 * (1 + math.cos(math.pi * spe / (spe * trainer.strategy.epochs))))


@pytest.mark.slow
def test_one_dataset_with_all_three_tasks_trains_and_is_scored_per_task(tmp_path):
    """Algorithm 1's order on a dataset with classification labels, finding boxes and organ masks."""
    trainer = Trainer(config.compose([*TINY, "strategy=lock_release", "strategy.order=by_dataset",
                                      "dataset.n_train=32", "dataset.n_val=16", "dataset.n_test=16",
                                      "strategy.datasets=[{name: c, tasks: [cls, loc, seg]}]"]), tmp_path)
    s = trainer.strategy
    assert ["c/" + n for n in s.classes["c"]["loc"]] == trainer.data.class_names and len(s.classes["c"]["seg"]) == 4
    assert [(r.task, r.mode) for r in s.rows] == [("cls", "release"), ("loc", "lock"), ("loc", "release"),
                                                  ("seg", "lock"), ("seg", "release")]
    metrics = trainer.fit()
    assert [("val/objective" in m) for m in trainer.history] == [True, False, True, False, True]
    heads = [metrics[f"test/c/{t}/{k}"] for t, k in (("cls", "macro_auc"), ("loc", "map_40"), ("seg", "mean_dice"))]
    assert metrics["test/objective"] == pytest.approx(sum(heads) / 3)
    assert (tmp_path / "c" / "cls" / "predictions.csv").exists() and (tmp_path / "c" / "loc" / "coco_gt.json").exists()


@pytest.mark.slow
def test_table_8_default_trains_end_to_end(in_tmp):
    run_cli("train", *TINY, *TABLE_8, "run_dir=runs/fx", cwd=in_tmp)
    run = in_tmp / "runs" / "fx"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(12))
    evaluated = [m["epoch"] for m in lines if "val/objective" in m]
    assert evaluated == [1, 3, 5, 7, 9, 11]  # after every Release epoch
    assert all(f"val/{d}/{t}/{k}" in lines[11] for d in ORGANS for t, k in (("loc", "map_40"), ("seg", "mean_dice")))
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(f"test/{d}/seg/mean_dice" in metrics and f"test/{d}/loc/map_40" in metrics for d in ORGANS)
    assert (run / "heart" / "loc" / "predictions.json").exists() and (run / "right_lung" / "seg" / "predictions.csv").exists()
    state = torch.load(run / "last.ckpt", weights_only=False)
    for part in ("backbone", "loc_encoder", "seg_decoder"):
        teacher = {k: v for k, v in state["model"].items() if k.startswith(f"teacher.copies.{part}.")}
        prefix = "backbone." if part == "backbone" else f"head.{part}."
        student = {k.replace(f"teacher.copies.{part}.", prefix): v for k, v in teacher.items()}
        assert teacher and not all(torch.equal(v, state["model"][k]) for k, v in student.items()
                                   if v.is_floating_point())  # the EMA teacher lags behind the student


@pytest.mark.slow
def test_classification_lock_release_trains_end_to_end_with_per_dataset_metrics(in_tmp):
    run_cli("train", *TINY, *TWO, "run_dir=runs/fx", cwd=in_tmp)
    metrics = json.loads((in_tmp / "runs" / "fx" / "metrics.json").read_text())
    assert "test/a/cls/auc/nodule" in metrics and "test/b/cls/macro_auc" in metrics


def test_foundation_x_ablation_space_is_table_10s_four_arms():
    from cxr_automl.hpo import searchspace
    space = searchspace.load("foundation_x_ablation")
    arms = {(b["strategy.lock"], b["strategy.teacher"]) for b in space.baselines.values()}
    assert arms == {(False, False), (False, True), (True, False), (True, True)} and space.n_trials == 4
    for fixed in space.baselines.values():
        cfg = config.compose([*space.overrides, *(f"{k}={str(v).lower()}" for k, v in fixed.items())])
        s_cfg = dict(cfg["strategy"])
        strategy = registry.build("strategy", s_cfg.pop("name"), **s_cfg)
        assert {r.task for r in strategy.schedule()} == {"loc"}  # Table 10 is organ localization
        assert {r.mode for r in strategy.schedule()} == ({"lock", "release"} if fixed["strategy.lock"] else {"release"})
        assert strategy.monitor() == space.metric


@pytest.mark.slow
@pytest.mark.parametrize("space, n", [("foundation_x_ablation", 4), ("lock_release", 2)])
def test_lock_release_search_spaces_run_end_to_end(in_tmp, space, n):
    run_cli("search", "-s", space, "-n", str(n), *TINY, "dataset.n_train=32", "dataset.n_val=16",
            "dataset.n_test=16", cwd=in_tmp)
    import optuna
    study = optuna.load_study(study_name=space, storage=f"sqlite:///{in_tmp / 'runs' / 'cxr-automl.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == n and all(0 <= t.value <= 1 for t in done)
    if space == "foundation_x_ablation":
        assert {(t.params["strategy.lock"], t.params["strategy.teacher"]) for t in done} == \
            {(False, False), (False, True), (True, False), (True, True)}


def test_a_members_own_dataset_gets_the_runs_image_size_unless_it_sets_one(tmp_path):
    """The README's mixed example: member ``b`` names only its plugin, so it is built at the run's size;
    a member that insists on another size is a one-line config error."""
    member = "{name: b, tasks: [cls], dataset: {name: synthetic_cxr, n_train: 32, n_val: 16, n_test: 16, seed: 1}}"
    t = Trainer(config.compose([*TINY, "strategy=lock_release", f"strategy.datasets=[{{name: a, tasks: [cls]}}, {member}]"]),
                tmp_path / "same")
    run_size = config.compose(TINY)["dataset"]["image_size"]
    assert {tuple(t.data.train[i]["image"].shape[-2:]) for i in (0, len(t.data.train) - 1)} == {(run_size, run_size)}
    odd = member.replace("seed: 1", f"seed: 1, image_size: {run_size * 2}")
    with pytest.raises(config.ConfigError, match="one image size"):
        Trainer(config.compose([*TINY, "strategy=lock_release", f"strategy.datasets=[{{name: a, tasks: [cls]}}, {odd}]"]),
                tmp_path / "odd")
