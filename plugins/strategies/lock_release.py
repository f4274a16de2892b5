"""Foundation X's cyclic Lock-Release schedule, as data computed from the configuration alone.

One cycle visits every (dataset, task) pair; each visit is a **Lock** epoch on a random
``lock_fraction`` of the dataset with the backbone and the task's shared part (localization encoder,
segmentation decoder) frozen and only the dataset's own head/decoder training, then a **Release**
epoch on all of it with the task's whole path training (Algorithm 1, Table 8 of the supplement).

Training follows the schedule in the one loop: ``prepare_data`` composes the datasets
(``datasets/multi.py``), ``plan`` unfreezes the row's path, ``train_indices`` picks the row's dataset
(a random half in Lock epochs), ``forward``/``loss`` add the student-teacher consistency and
``after_epoch`` updates the EMA teacher. Classification trains now; localization and segmentation
rows wait for their heads.

``schedule(...)`` is a pure function: the same configuration always gives the same rows, no model
or data is built, so ``cxr-automl plan`` can print it and the trainable strategy can follow it epoch
by epoch. Component names: ``backbone``, ``loc_encoder``, ``seg_decoder`` (shared) and
``cls_head/<dataset>``, ``loc_decoder/<dataset>``, ``seg_head/<dataset>`` (one per dataset).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cxr_automl import registry
from cxr_automl.interfaces import BackboneOutput, DatasetBundle, EpochPlan, Head, Strategy
from cxr_automl_plugins.datasets.multi import compose
from cxr_automl_plugins.strategies.student_teacher import CONSISTENCY, Teacher, consistency_loss, mix

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


def resized_head(template: Head, num_classes: int) -> Head:
    """A copy of ``template`` whose last Linear layer outputs ``num_classes`` (a per-dataset head of
    the configured kind: ``linear`` is Foundation X's, ``mlp`` gets its own hidden layers too)."""
    head = copy.deepcopy(template)
    linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"lock_release needs a head ending in a Linear layer; {type(template).__name__} has none")
    name, last = linears[-1]
    parent = head.get_submodule(name.rpartition(".")[0]) if "." in name else head
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))
    return head


class DatasetHeads(Head):
    """One classification head per dataset; logits are concatenated into the union label columns
    (``multi.compose``), so the usual masked BCE trains a head only on its own dataset's images."""

    task = "classification"

    def __init__(self, template: Head, members: dict[str, dict[str, Any]]):
        super().__init__()
        self.heads = nn.ModuleDict({name: resized_head(template, len(m["columns"])) for name, m in members.items()})

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        return torch.cat([h(feats) for h in self.heads.values()], dim=1)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor],
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        return next(iter(self.heads.values())).loss(outputs, batch, class_weights)


class LockRelease(Strategy):
    """Follows ``schedule`` epoch by epoch. Classification across datasets trains now; localization
    and segmentation rows need their heads, so ``prepare_data`` refuses them with a clear message."""

    def __init__(self, rows: list[ScheduleRow], datasets: list[dict[str, Any]], teacher: bool, momentum: float,
                 consistency: float, consistency_kind: str, lr_backbone: float, lr_head: float,
                 weight_decay: float, seed: int):
        self.rows, self.datasets = rows, datasets
        self.epochs = len(rows)
        self.teacher, self.momentum, self.consistency, self.consistency_kind = \
            teacher, momentum, consistency, consistency_kind
        self.lr_backbone, self.lr_head, self.weight_decay, self.seed = lr_backbone, lr_head, weight_decay, seed
        self.members: dict[str, dict[str, Any]] | None = None
        self.model: nn.Module | None = None

    def schedule(self) -> list[ScheduleRow]:
        return list(self.rows)

    def prepare_data(self, data: DatasetBundle) -> DatasetBundle:
        """Compose the datasets: an entry with ``dataset: {name: PLUGIN, ...}`` builds that dataset,
        one without it uses the run's dataset."""
        dense = sorted({d["name"] for d in self.datasets if set(d["tasks"]) - {"cls"}})
        if dense:
            raise ValueError(f"lock_release trains classification only in this build; datasets {', '.join(dense)} "
                             "have loc/seg tasks, which need the localization/segmentation heads "
                             "(`cxr-automl plan` shows their schedule)")
        bundles = {}
        for d in self.datasets:
            node = dict(d.get("dataset") or {})
            bundles[d["name"]] = registry.build("dataset", node.pop("name"), **node) if node else data
        composed = compose(bundles)
        self.members = composed.extras["members"]
        return composed

    def setup(self, model: nn.Module, data: DatasetBundle) -> None:
        """Per-dataset heads of the configured kind replace the single head; the teacher starts as an
        exact copy of the backbone (``model.teacher``)."""
        if self.members is None:
            raise ValueError("lock_release: prepare_data() must run before setup()")
        model.head = DatasetHeads(model.head, self.members)
        if self.teacher:
            model.teacher = Teacher({"backbone": model.backbone})
        self.model = model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": list(model.backbone.parameters()), "lr": self.lr_backbone, "name": "backbone",
                 "weight_decay": self.weight_decay},
                {"params": list(model.head.parameters()), "lr": self.lr_head, "name": "heads",
                 "weight_decay": self.weight_decay}]

    def plan(self, epoch: int, model: nn.Module) -> EpochPlan:
        row = self.rows[epoch]
        trainable = [model.head.heads[row.dataset]]
        if row.components.get("backbone"):
            trainable.append(model.backbone)
        return EpochPlan(phase=f"{row.mode} {row.dataset}/{row.task}", trainable=trainable)

    def train_indices(self, epoch: int, n: int) -> list[int]:
        """The row's dataset; in a Lock epoch a random ``lock_fraction`` of it, seeded by (seed, epoch)."""
        row = self.rows[epoch]
        start, stop = self.members[row.dataset]["train"]
        count = stop - start
        if row.fraction >= 1:
            return list(range(start, stop))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        keep = torch.randperm(count, generator=gen)[:max(1, round(row.fraction * count))]
        return sorted(start + int(i) for i in keep)

    def forward(self, model: nn.Module, images: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = model.adapter(images)
        feats = model.backbone(x)
        out = {"logits": model.head(feats), "student": feats.pooled}
        if self.teacher:
            out["teacher"] = model.teacher("backbone", x).pooled
        return out

    def loss(self, model: nn.Module, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        task = model.head.loss(outputs["logits"], batch)
        if not self.teacher:
            return task
        return mix(task, consistency_loss(outputs["student"], outputs["teacher"], self.consistency_kind),
                   self.consistency)

    def after_epoch(self, epoch: int, val_metrics: dict[str, float]) -> bool:
        """The teacher's epoch-wise EMA update (the run's state, so it is checkpointed with the model)."""
        if self.teacher and self.rows[epoch].teacher_update and self.model is not None:
            self.model.teacher.update({"backbone": self.model.backbone}, self.momentum)
        return False


def lock_release(datasets: list | None = None, cycles: int = 1, lock: bool = True, lock_fraction: float = 0.5,
                 lock_classification: bool = False, order: str = "by_dataset", task_order: str = "cls-loc-seg",
                 teacher: bool = True, momentum: float = 0.8, consistency: float = 0.5,
                 consistency_kind: str = "mse", lr_backbone: float = 1e-5, lr_head: float = 1e-4,
                 weight_decay: float = 0.05, seed: int = 0) -> LockRelease:
    """Foundation X. ``datasets``: [{name, tasks: [cls|loc|seg...], dataset: {name: PLUGIN, ...}, structure}];
    ``order``: by_dataset (Algorithm 1) | by_task (Table 8); ``lock``/``teacher``: Table 10's switches;
    ``momentum``: λ of the teacher EMA; ``consistency``: c in (1−c)·task + c·consistency."""
    if not 0 <= momentum <= 1 or not 0 <= consistency <= 1:
        raise ScheduleError("strategy.momentum and strategy.consistency must be in [0, 1]")
    if consistency_kind not in CONSISTENCY:
        raise ScheduleError(f"strategy.consistency_kind={consistency_kind!r}; use one of {', '.join(CONSISTENCY)}")
    rows = schedule(datasets, cycles=cycles, lock=lock, lock_fraction=lock_fraction,
                    lock_classification=lock_classification, order=order, task_order=task_order, teacher=teacher)
    return LockRelease(rows, parse_datasets(datasets), teacher, momentum, consistency, consistency_kind,
                       lr_backbone, lr_head, weight_decay, seed)
