"""Foundation X's Lock-Release schedule: the shipped config reproduces the supplement's Table 8."""

import json

import pytest

from conftest import run_cli
from cxr_automl import config
from cxr_automl.plugin import registry
from cxr_automl_plugins.strategies.lock_release import ScheduleError, schedule

# Table 8 of the Foundation X supplement, transcribed row by row:
# (epoch #, data size, Backbone, Loc.Enc, Loc.Dec, Seg.Dec, Seg.Head, mode, training task)
TABLE_8 = [
    (1, "Half", "F", "F", "T", "-", "-", "Lock", "Localization of Heart"),
    (2, "Full", "T", "T", "T", "-", "-", "Release", "Localization of Heart"),
    (3, "Half", "F", "F", "T", "-", "-", "Lock", "Localization of Left Lung"),
    (4, "Full", "T", "T", "T", "-", "-", "Release", "Localization of Left Lung"),
    (5, "Half", "F", "F", "T", "-", "-", "Lock", "Localization of Right Lung"),
    (6, "Full", "T", "T", "T", "-", "-", "Release", "Localization of Right Lung"),
    (7, "Half", "F", "-", "-", "F", "T", "Lock", "Segmentation of Heart"),
    (8, "Full", "T", "-", "-", "T", "T", "Release", "Segmentation of Heart"),
    (9, "Half", "F", "-", "-", "F", "T", "Lock", "Segmentation of Left Lung"),
    (10, "Full", "T", "-", "-", "T", "T", "Release", "Segmentation of Left Lung"),
    (11, "Half", "F", "-", "-", "F", "T", "Lock", "Segmentation of Right Lung"),
    (12, "Full", "T", "-", "-", "T", "T", "Release", "Segmentation of Right Lung"),
]
TASK = {"loc": "Localization", "seg": "Segmentation"}
ORGAN = {"heart": "Heart", "left_lung": "Left Lung", "right_lung": "Right Lung"}


def as_table_8(row: dict) -> tuple:
    """A plan row in Table 8's vocabulary."""
    comps = row["components"]

    def state(kind: str) -> str:
        hit = [on for name, on in comps.items() if name == kind or name == f"{kind}/{row['dataset']}"]
        return "-" if not hit else ("T" if hit[0] else "F")

    return (row["epoch"] + 1, {0.5: "Half", 1.0: "Full"}[row["fraction"]], state("backbone"), state("loc_encoder"),
            state("loc_decoder"), state("seg_decoder"), state("seg_head"), row["mode"].capitalize(),
            f"{TASK[row['task']]} of {ORGAN[row['dataset']]}")


def test_shipped_config_plan_matches_table_8_row_by_row(in_tmp):
    proc = run_cli("plan", "strategy=lock_release", "--json", cwd=in_tmp)
    rows = json.loads(proc.stdout)
    assert len(rows) == len(TABLE_8)
    for row, expected in zip(rows, TABLE_8):
        assert as_table_8(row) == expected
    # evaluation after each Release epoch only (Table 8's note)
    assert [r["evaluate"] for r in rows] == [m == "Release" for *_, m, _ in TABLE_8]
    table = run_cli("plan", "strategy=lock_release", cwd=in_tmp).stdout
    assert "right_lung" in table and "release" in table


def test_strategy_epochs_follow_the_plan_and_switches_change_it():
    cfg = config.compose(["strategy=lock_release", "strategy.cycles=2"])
    s_cfg = dict(cfg["strategy"])
    strategy = registry.build("strategy", s_cfg.pop("name"), **s_cfg)
    assert strategy.epochs == 24 and [r.cycle for r in strategy.schedule()][11:13] == [1, 2]
    datasets = cfg["strategy"]["datasets"]
    no_lock = schedule(datasets, lock=False, order="by_task")
    assert [r.mode for r in no_lock] == ["release"] * 12 and [r.fraction for r in no_lock] == [0.5, 1.0] * 6
    assert all(r.frozen == [] for r in no_lock)  # nothing locked; the half epoch trains the whole path
    # Algorithm 1's order: each dataset's tasks in turn; classification is not locked unless asked
    mixed = [{"name": "a", "tasks": ["seg", "cls"]}, {"name": "b", "tasks": ["loc"]}]
    rows = schedule(mixed, order="by_dataset", lock_fraction=0.25)
    assert [(r.dataset, r.task, r.mode) for r in rows] == [
        ("a", "cls", "release"), ("a", "seg", "lock"), ("a", "seg", "release"), ("b", "loc", "lock"),
        ("b", "loc", "release")]
    assert rows[1].fraction == 0.25 and rows[1].trainable == ["seg_head/a"]
    assert rows[0].trainable == ["backbone", "cls_head/a"]
    locked = schedule(mixed, order="by_dataset", lock_classification=True)
    assert (locked[0].mode, locked[0].trainable) == ("lock", ["cls_head/a"])
    rows = schedule(mixed, order="by_task", task_order="seg-loc-cls")
    assert [r.task for r in rows if r.mode == "release"] == ["seg", "loc", "cls"]
    assert schedule(mixed) == schedule(mixed)  # a pure function of its arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"datasets": [{"name": "a", "tasks": ["det"]}]}, r"datasets\[0\]\.tasks"),
    ({"datasets": [{"name": "a", "tasks": ["cls"]}, {"name": "a", "tasks": ["loc"]}]}, "used twice"),
    ({"datasets": [{"name": "a", "tasks": ["cls"], "typo": 1}]}, "unknown key 'typo'"),
    ({"datasets": []}, "non-empty"),
    ({"datasets": [{"name": "a", "tasks": ["cls"]}], "order": "random"}, "strategy.order"),
    ({"datasets": [{"name": "a", "tasks": ["cls"]}], "lock_fraction": 0}, "lock_fraction"),
])
def test_bad_schedules_name_the_key_to_fix(kwargs, message):
    with pytest.raises(ScheduleError, match=message):
        schedule(**kwargs)


def test_plan_of_a_strategy_without_a_schedule_is_a_clear_error(in_tmp):
    proc = run_cli("plan", "strategy=spft", cwd=in_tmp, check=False)
    assert proc.returncode == 2 and "Strategy.schedule()" in proc.stderr.replace("\n", "")


def test_table_10_arms_train_the_same_epochs_on_the_same_images():
    """Lock-Release on/off × teacher on/off: only what is frozen differs, not training length or data
    (with lock=false an arm used to train half the epochs on 2/3 of the images)."""
    datasets = [{"name": n, "tasks": ["loc"]} for n in ("heart", "left_lung", "right_lung")]
    arms = {(lock, teacher): schedule(datasets, lock=lock, teacher=teacher, lock_fraction=0.5, cycles=2)
            for lock in (True, False) for teacher in (True, False)}
    shape = {arm: ([r.fraction for r in rows], [r.evaluate for r in rows], [r.teacher_update for r in rows])
             for arm, rows in arms.items()}
    assert len(rows := arms[(True, True)]) == 12
    assert shape[(False, True)] == shape[(True, True)] and shape[(False, False)][:2] == shape[(True, False)][:2]
    assert sum(r.fraction for r in arms[(False, False)]) == sum(r.fraction for r in rows) == 9.0
    assert [r.mode for r in rows][:2] == ["lock", "release"] and rows[0].frozen == ["backbone", "loc_encoder"]
    assert all(not r.frozen for r in arms[(False, True)])
