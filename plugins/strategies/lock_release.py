"""Foundation X's cyclic Lock-Release schedule, as data computed from the configuration alone.

One cycle visits every (dataset, task) pair; each visit is a **Lock** epoch on a random
``lock_fraction`` of the dataset with the backbone and the task's shared part (localization encoder,
segmentation decoder) frozen and only the dataset's own head/decoder training, then a **Release**
epoch on all of it with the task's whole path training (Algorithm 1, Table 8 of the supplement).

``schedule(...)`` is a pure function: the same configuration always gives the same rows, no model
or data is built, so ``cxr-automl plan`` can print it and the trainable strategy can follow it epoch
by epoch. Component names: ``backbone``, ``loc_encoder``, ``seg_decoder`` (shared) and
``cls_head/<dataset>``, ``loc_decoder/<dataset>``, ``seg_head/<dataset>`` (one per dataset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from cxr_automl.interfaces import DatasetBundle, EpochPlan, Strategy

TASKS = ("cls", "loc", "seg")
TASK_NAMES = {"cls": "classification", "loc": "localization", "seg": "segmentation"}
#: the shared component on each task's path besides the backbone (classification has none)
SHARED = {"cls": None, "loc": "loc_encoder", "seg": "seg_decoder"}
OWN = {"cls": "cls_head", "loc": "loc_decoder", "seg": "seg_head"}
ORDERS = ("by_dataset", "by_task")
DATASET_KEYS = {"name", "tasks", "dataset", "structure"}


class ScheduleError(ValueError):
    """A lock_release configuration that cannot be scheduled; the message names the key to fix."""


@dataclass(frozen=True)
class ScheduleRow:
    """One epoch of the schedule. ``components`` maps every component on the task's path to
    ``True`` (trains) or ``False`` (frozen); components off the path are absent (Table 8's "-")."""

    epoch: int  # 0-based, as in metrics.jsonl
    cycle: int  # 1-based
    dataset: str
    task: str  # cls | loc | seg
    fraction: float  # share of the dataset used in this epoch
    mode: str  # lock | release
    components: dict[str, bool] = field(default_factory=dict)
    evaluate: bool = False  # every task is evaluated after each Release epoch (Table 8's note)
    teacher_update: bool = False  # EMA update of the teacher after the epoch

    @property
    def trainable(self) -> list[str]:
        return [c for c, on in self.components.items() if on]

    @property
    def frozen(self) -> list[str]:
        return [c for c, on in self.components.items() if not on]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable": self.trainable, "frozen": self.frozen}


def parse_datasets(datasets: Any) -> list[dict[str, Any]]:
    """Check the ``datasets`` list: each entry a mapping with a unique ``name`` and its ``tasks``."""
    if not isinstance(datasets, (list, tuple)) or not datasets:
        raise ScheduleError("strategy.datasets must be a non-empty list of {name: ..., tasks: [cls|loc|seg, ...]}")
    out, seen = [], set()
    for i, entry in enumerate(datasets):
        where = f"strategy.datasets[{i}]"
        if not isinstance(entry, dict) or "name" not in entry or "tasks" not in entry:
            raise ScheduleError(f"{where} must be a mapping with 'name' and 'tasks'")
        unknown = sorted(set(entry) - DATASET_KEYS)
        if unknown:
            raise ScheduleError(f"{where} has unknown key {unknown[0]!r}; keys: {', '.join(sorted(DATASET_KEYS))}")
        name, tasks = str(entry["name"]), entry["tasks"]
        if name in seen:
            raise ScheduleError(f"{where}: dataset name {name!r} is used twice; names must be unique")
        seen.add(name)
        if isinstance(tasks, str):
            tasks = [tasks]
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks or len(set(tasks)) != len(tasks):
            raise ScheduleError(f"{where}.tasks={list(tasks)}: use distinct tasks among {', '.join(TASKS)}")
        out.append({**entry, "name": name, "tasks": list(tasks)})
    return out


def parse_task_order(task_order: str) -> list[str]:
    """``"cls-loc-seg"`` → ["cls", "loc", "seg"]: the order in which a dataset's tasks are visited."""
    order = [t for t in str(task_order).split("-") if t]
    if sorted(order) != sorted(TASKS):
        raise ScheduleError(f"strategy.task_order={task_order!r}: write all of {', '.join(TASKS)} joined by '-', "
                            "e.g. cls-loc-seg")
    return order


def _visits(datasets: list[dict[str, Any]], task_order: list[str], order: str) -> list[tuple[str, str]]:
    rank = {t: i for i, t in enumerate(task_order)}
    if order == "by_dataset":  # Algorithm 1: for each dataset, each of its tasks
        return [(d["name"], t) for d in datasets for t in sorted(d["tasks"], key=rank.__getitem__)]
    if order == "by_task":  # Table 8: for each task kind, every dataset that has it
        return [(d["name"], t) for t in task_order for d in datasets if t in d["tasks"]]
    raise ScheduleError(f"strategy.order={order!r}; use one of {', '.join(ORDERS)}")


def _path(dataset: str, task: str) -> list[str]:
    shared = SHARED[task]
    return ["backbone", *([shared] if shared else []), f"{OWN[task]}/{dataset}"]


def schedule(datasets: Any, cycles: int = 1, lock: bool = True, lock_fraction: float = 0.5,
             lock_classification: bool = False, order: str = "by_dataset", task_order: str = "cls-loc-seg",
             teacher: bool = True) -> list[ScheduleRow]:
    """Every epoch of the run, in order.

    With ``lock`` each visit is a Lock epoch (own head only, ``lock_fraction`` of the data) then a
    Release epoch (whole path, all data); classification is locked only with ``lock_classification``
    (the public code never locks it). Without ``lock`` each visit is one Release epoch.
    """
    if cycles < 1:
        raise ScheduleError(f"strategy.cycles={cycles} must be >= 1")
    if not 0 < lock_fraction <= 1:
        raise ScheduleError(f"strategy.lock_fraction={lock_fraction} must be in (0, 1]")
    visits = _visits(parse_datasets(datasets), parse_task_order(task_order), order)
    rows: list[ScheduleRow] = []
    for cycle in range(1, cycles + 1):
        for dataset, task in visits:
            path = _path(dataset, task)
            if lock and (task != "cls" or lock_classification):
                rows.append(ScheduleRow(len(rows), cycle, dataset, task, lock_fraction, "lock",
                                        {c: c == path[-1] for c in path}, False, teacher))
            rows.append(ScheduleRow(len(rows), cycle, dataset, task, 1.0, "release",
                                    {c: True for c in path}, True, teacher))
    return rows


class LockRelease(Strategy):
    """Holds the schedule; training it needs the multi-dataset data and the localization and
    segmentation heads, which are not in this build yet — ``setup`` says so instead of guessing."""

    def __init__(self, rows: list[ScheduleRow], momentum: float, consistency: float, options: dict[str, Any]):
        self.rows = rows
        self.epochs = len(rows)
        self.momentum, self.consistency = momentum, consistency
        self.options = options

    def schedule(self) -> list[ScheduleRow]:
        return list(self.rows)

    def setup(self, model: nn.Module, data: DatasetBundle) -> None:
        raise ValueError("strategy lock_release cannot train yet: it needs the multi-dataset loader and the "
                         "localization/segmentation heads; `cxr-automl plan strategy=lock_release` shows its schedule")

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:  # pragma: no cover - setup refuses first
        return []

    def plan(self, epoch: int, model: nn.Module) -> EpochPlan:  # pragma: no cover - setup refuses first
        row = self.rows[epoch]
        return EpochPlan(phase=f"{row.mode}:{row.dataset}:{row.task}", trainable=[])


def lock_release(datasets: list | None = None, cycles: int = 1, lock: bool = True, lock_fraction: float = 0.5,
                 lock_classification: bool = False, order: str = "by_dataset", task_order: str = "cls-loc-seg",
                 teacher: bool = True, momentum: float = 0.8, consistency: float = 0.5) -> LockRelease:
    """Foundation X. ``datasets``: [{name, tasks: [cls|loc|seg...], dataset: {...}, structure: ...}];
    ``order``: by_dataset (Algorithm 1) | by_task (Table 8); ``lock``/``teacher``: Table 10's switches;
    ``momentum``: λ of the teacher EMA; ``consistency``: c in (1−c)·task + c·consistency."""
    if not 0 <= momentum <= 1 or not 0 <= consistency <= 1:
        raise ScheduleError("strategy.momentum and strategy.consistency must be in [0, 1]")
    options = {"cycles": cycles, "lock": lock, "lock_fraction": lock_fraction,
               "lock_classification": lock_classification, "order": order, "task_order": task_order,
               "teacher": teacher}
    rows = schedule(datasets, **options)
    return LockRelease(rows, momentum, consistency, options)
