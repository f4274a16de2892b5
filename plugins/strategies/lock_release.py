"""Foundation X's cyclic Lock-Release schedule, as data computed from the configuration alone.

One cycle visits every (dataset, task) pair; each visit is a **Lock** epoch on a random
``lock_fraction`` of the dataset with the backbone and the task's shared part (localization encoder,
segmentation decoder) frozen and only the dataset's own head/decoder training, then a **Release**
epoch on all of it with the task's whole path training (Algorithm 1, Table 8 of the supplement).

Training follows the schedule in the one loop: ``prepare_data`` composes the datasets
(``datasets/multi.py``), ``setup`` builds the task parts (``foundation_parts.py``), ``plan`` unfreezes
the row's path and keeps every other head off the accelerator, ``train_indices`` picks the row's
dataset (a random half in Lock epochs), ``forward``/``loss`` add the student-teacher consistency,
``after_epoch`` updates the EMA teacher, and ``evaluations`` scores every (dataset, task) after each
Release epoch; ``monitor`` is the configured aggregate of them (``objective``).

``schedule(...)`` is a pure function: the same configuration always gives the same rows, no model
or data is built, so ``cxr-automl plan`` can print it and the trainable strategy can follow it epoch
by epoch. Component names: ``backbone``, ``loc_encoder``, ``seg_decoder`` (shared) and
``cls_head/<dataset>``, ``loc_decoder/<dataset>``, ``seg_head/<dataset>`` (one per dataset).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cxr_automl.config import ConfigError
from cxr_automl.errors import UserError
from cxr_automl.plugin import registry
from cxr_automl.plugin.interfaces import BackboneOutput, DatasetBundle, EpochPlan, Evaluation, Strategy
from cxr_automl.plugin.strategy import CustomStep, MultiTask, PlannedSchedule
from cxr_automl_plugins.datasets.multi import compose, select_structure
from cxr_automl_plugins.strategies.foundation_parts import Placement, build_heads, class_names, component, resident
from cxr_automl_plugins.strategies.student_teacher import CONSISTENCY, Teacher, consistency_loss, mix

TASKS = ("cls", "loc", "seg")
TASK_NAMES = {"cls": "classification", "loc": "localization", "seg": "segmentation"}
#: the shared component on each task's path besides the backbone (classification has none)
SHARED = {"cls": None, "loc": "loc_encoder", "seg": "seg_decoder"}
OWN = {"cls": "cls_head", "loc": "loc_decoder", "seg": "seg_head"}
ORDERS = ("by_dataset", "by_task")
DATASET_KEYS = {"name", "tasks", "dataset", "structure"}


class ScheduleError(UserError):
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
    (the public code never locks it). Without ``lock`` the Lock epoch becomes an unlocked one on the
    same ``lock_fraction`` (whole path trains, no evaluation after it), so Table 10's arms differ only
    in what is frozen: the same epochs, the same images, the same evaluations and teacher updates.
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
            if task != "cls" or lock_classification:
                rows.append(ScheduleRow(len(rows), cycle, dataset, task, lock_fraction, "lock" if lock else "release",
                                        {c: (c == path[-1]) or not lock for c in path}, False, teacher))
            rows.append(ScheduleRow(len(rows), cycle, dataset, task, 1.0, "release",
                                    {c: True for c in path}, True, teacher))
    return rows


#: the headline metric of each task (Table 7: AUC, mAP@0.40, Dice) and the evaluator that computes it
HEADLINE = {"cls": "macro_auc", "loc": "map_40", "seg": "mean_dice"}
EVAL_TASK = {"cls": "classification", "loc": "detection", "seg": "segmentation"}
OBJECTIVES = ("mean", "min")


class LockRelease(Strategy, CustomStep, MultiTask, PlannedSchedule):
    """Follows ``schedule`` epoch by epoch over classification, localization and segmentation."""

    head_is_template = True  # the configured head is each dataset's classification head, resized

    def __init__(self, rows: list[ScheduleRow], datasets: list[dict[str, Any]], teacher: bool, momentum: float,
                 consistency: float, consistency_kind: str, lrs: dict[str, float], weight_decay: float,
                 objective: str, loc_head: dict[str, Any], seg_head: dict[str, Any], offload: bool, seed: int):
        self.rows, self.datasets = rows, datasets
        self.epochs = len(rows)
        self.teacher, self.momentum, self.consistency, self.consistency_kind = \
            teacher, momentum, consistency, consistency_kind
        self.lrs, self.weight_decay, self.seed = lrs, weight_decay, seed
        self.objective, self.loc_head, self.seg_head, self.offload = objective, loc_head, seg_head, offload
        self.members: dict[str, dict[str, Any]] | None = None
        self.classes: dict[str, dict[str, list[str]]] = {}
        self.placement = Placement(torch.device("cpu"))
        self._epoch = 0

    def schedule(self) -> list[ScheduleRow]:
        return list(self.rows)

    def render_schedule(self, rows: list[dict[str, Any]]) -> Any:
        from cxr_automl_plugins.strategies.lock_release_plan import render
        return render(rows)

    # ------------------------------------------------------------------------------------------ build
    def prepare_data(self, data: DatasetBundle) -> DatasetBundle:
        """Compose the datasets: an entry with ``dataset: {name: PLUGIN, ...}`` builds that dataset,
        one without it uses the run's dataset; ``structure`` makes it that one structure's dataset
        (its mask, the box around it)."""
        bundles = {}
        size = int(data.train[0]["image"].shape[-1])  # a member's own dataset gets the run's image size
        for i, d in enumerate(self.datasets):
            where = f"strategy.datasets[{i}]"
            node = dict(d.get("dataset") or {})
            run_size = {} if "image_size" in node else {"image_size": size}
            plugin = node.pop("name", None)
            if node and not plugin:
                raise ConfigError(f"{where}.dataset needs a name: the dataset plugin, "
                                  "e.g. {name: mask_folder, root: ...}")
            try:
                bundle = registry.build("dataset", plugin, supplied=run_size, **node) if plugin else data
            except registry.RegistryError as exc:  # which entry, then the loader's own line
                raise ConfigError(f"{where}.dataset: {exc}") from exc
            if d.get("structure"):
                bundle = select_structure(bundle, str(d["structure"]), where=f"{where}.structure")
            label = f"dataset {plugin!r}" if plugin else "the run's dataset"
            self.classes[d["name"]] = {t: class_names(bundle, t, where, label) for t in d["tasks"]}
            bundles[d["name"]] = bundle
        composed = compose(bundles)
        self.members = composed.extras["members"]
        return composed

    def setup(self, model: nn.Module, data: DatasetBundle) -> None:
        """The configured head becomes the template of the per-dataset classification heads; the
        localization and segmentation parts are cut from ``loc_head`` (dino) / ``seg_head`` (upernet);
        the teacher starts as an exact copy of the backbone and the shared task parts."""
        if self.members is None:
            raise ValueError("lock_release: prepare_data() must run before setup()")
        model.head = build_heads(model.head, model.backbone, self.classes, self.loc_head, self.seg_head)
        if self.teacher:
            shared = {"backbone": model.backbone, "loc_encoder": model.head.loc_encoder,
                      "seg_decoder": model.head.seg_decoder}
            model.teacher = Teacher({k: m for k, m in shared.items() if m is not None})

    def to_device(self, model: nn.Module, device: torch.device) -> None:
        """Backbone (student and teacher) on the device; every head/decoder on the CPU until an epoch
        or an evaluation needs it (``offload=false``: everything on the device)."""
        self.placement = Placement(device, offload=None if self.offload else device)
        model.to(self.placement.offload)
        for m in (model.adapter, model.backbone, *([model.teacher.copies["backbone"]] if self.teacher else [])):
            m.to(device)
        self.placement.apply(model, set())

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        heads = model.head
        groups = {"backbone": [model.backbone], "cls": [heads.cls_heads],
                  "loc": [m for m in (heads.loc_encoder, heads.loc_decoders) if m is not None],
                  "seg": [m for m in (heads.seg_decoder, heads.seg_heads) if m is not None]}
        out = []
        for name, modules in groups.items():
            params = [p for m in modules for p in m.parameters()]
            if params:
                out.append({"params": params, "lr": self.lrs[name], "name": name, "weight_decay": self.weight_decay})
        return out

    def optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(param_groups)
        self.placement.optimizer = opt  # offloaded parts take their optimizer state with them
        return opt

    # ------------------------------------------------------------------------------------------ train
    def plan(self, epoch: int, model: nn.Module) -> EpochPlan:
        """Exactly the row's trainable components train; the row's path is on the device, the rest
        of the heads off it."""
        row = self.rows[epoch]
        self._epoch = epoch
        self.placement.apply(model, resident(row.components, self.teacher))
        return EpochPlan(phase=f"{row.mode} {row.dataset}/{row.task}",
                         trainable=[component(model, c) for c in row.trainable])

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

    def _task_path(self, model: nn.Module, task: str, ds: str, feats: BackboneOutput, teacher_x=None):
        """(prediction, backbone embeddings, task encoder/decoder embeddings) of one task; with
        ``teacher_x`` (the batch's images) the teacher's embeddings of the same input instead (no
        prediction)."""
        heads = model.head
        if teacher_x is not None:  # the teacher's backbone copy on the student's adapted input
            feats = model.teacher("backbone", model.adapter(teacher_x))
        if task == "cls":
            pred = None if teacher_x is not None else heads.cls_heads[ds](feats)
            return pred, [feats.pooled], []
        maps = heads.loc_maps(feats) if task == "loc" else heads.seg_maps(feats)
        shared = "loc_encoder" if task == "loc" else "seg_decoder"
        if teacher_x is not None:
            out = model.teacher(shared, maps)
            return None, maps, out if task == "loc" else [out]
        if task == "loc":
            memory = heads.loc_encoder(maps)
            return heads.loc_decoders[ds](memory), maps, memory
        fused = heads.seg_decoder(maps)
        return heads.seg_heads[ds](fused), maps, [fused]

    def forward(self, model: nn.Module, images: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
        row = self.rows[self._epoch]
        shared = SHARED[row.task]
        if shared:  # a frozen shared part keeps its BatchNorm statistics in a Lock epoch
            component(model, shared).train(row.components[shared])
        feats = model.features(images)
        pred, emb, task_emb = self._task_path(model, row.task, row.dataset, feats)
        out = {"pred": pred, "student": emb, "task_student": task_emb}
        if self.teacher:
            _, out["teacher"], out["task_teacher"] = self._task_path(model, row.task, row.dataset, feats, images)
        return out

    def loss(self, model: nn.Module, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        """(1−c)·task + c·(consistency of backbone embeddings + of the task encoder/decoder outputs)."""
        row, heads = self.rows[self._epoch], model.head
        if row.task == "cls":
            cols = self.members[row.dataset]["columns"]
            task = heads.cls_heads[row.dataset].loss(outputs["pred"], {**batch, "labels": batch["labels"][:, cols]})
        elif row.task == "loc":
            task = heads.loc_decoders[row.dataset].loss(outputs["pred"], batch)
        else:
            task = heads.seg_heads[row.dataset].loss(outputs["pred"], batch)
        if not self.teacher:
            return task
        terms = [torch.stack([consistency_loss(s, t, self.consistency_kind)
                              for s, t in zip(outputs[f"{p}student"], outputs[f"{p}teacher"])]).mean()
                 for p in ("", "task_") if outputs[f"{p}student"]]
        return mix(task, sum(terms), self.consistency)

    def after_epoch(self, epoch: int, model: nn.Module, val_metrics: dict[str, float]) -> bool:
        """The teacher's epoch-wise EMA update of every shared part (the run's state, so it is
        checkpointed with the model)."""
        if self.teacher and self.rows[epoch].teacher_update:
            model.teacher.update({n: component(model, n) for n in model.teacher.copies}, self.momentum)
        return False

    # ------------------------------------------------------------------------------------------ evaluate
    def pairs(self) -> list[tuple[str, str]]:
        return [(d["name"], t) for d in self.datasets for t in d["tasks"]]

    def evaluations(self, model: nn.Module, split: str) -> list[Evaluation]:
        """Every (dataset, task) after each Release epoch (Table 8's note) and on the test split;
        nothing after a Lock epoch."""
        if split == "val" and not self.rows[self._epoch].evaluate:
            return []
        return [Evaluation(prefix=f"{ds}/{task}", indices=range(*self.members[ds][split]), task=EVAL_TASK[task],
                           class_names=self.classes[ds][task], predict=functools.partial(self._predict, ds, task),
                           place=functools.partial(self._place_for, ds, task),
                           label_columns=self.members[ds]["columns"] if task == "cls" else None,
                           options={"iou_thresholds": (0.4,)} if task == "loc" else {})  # Table 7's mAP@0.40
                for ds, task in self.pairs()]

    def _place_for(self, ds: str, task: str, model: nn.Module) -> None:
        self.placement.apply(model, resident(_path(ds, task), teacher=False))

    def _predict(self, ds: str, task: str, model: nn.Module, images: torch.Tensor, batch: dict[str, Any]) -> Any:
        pred, _, _ = self._task_path(model, task, ds, model.features(images))
        if task == "loc":
            return model.head.loc_decoders[ds].predict(pred)
        return torch.sigmoid(pred.float())

    def summarize(self, split: str, metrics: dict[str, float]) -> dict[str, float]:
        """``<split>/objective``: the mean or min over (dataset, task) of AUC / mAP@0.40 / Dice; a part
        without a value (e.g. AUC of a split with one class) is left out."""
        if self.objective not in OBJECTIVES:
            return {}
        values = [metrics.get(f"{split}/{ds}/{t}/{HEADLINE[t]}") for ds, t in self.pairs()]
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return {}
        return {f"{split}/objective": (sum(values) / len(values)) if self.objective == "mean" else min(values)}

    def monitor(self) -> str:
        return "val/objective" if self.objective in OBJECTIVES else self.objective


def check_objective(objective: str, datasets: list[dict[str, Any]]) -> None:
    if objective in OBJECTIVES:
        return
    pairs = [f"{d['name']}/{t}" for d in datasets for t in d["tasks"]]
    parts = str(objective).split("/")
    if len(parts) < 4 or parts[0] != "val" or "/".join(parts[1:3]) not in pairs:
        raise ScheduleError(f"strategy.objective={objective!r}: use mean, min or a validation key "
                            f"val/<dataset>/<task>/<metric> with <dataset>/<task> one of {', '.join(pairs)} "
                            "(e.g. val/" + pairs[0] + "/" + HEADLINE[pairs[0].split('/')[1]] + ")")


def lock_release(datasets: list | None = None, cycles: int = 1, lock: bool = True, lock_fraction: float = 0.5,
                 lock_classification: bool = False, order: str = "by_dataset", task_order: str = "cls-loc-seg",
                 teacher: bool = True, momentum: float = 0.8, consistency: float = 0.5,
                 consistency_kind: str = "mse", lr_backbone: float = 1e-5, lr_head: float = 1e-4,
                 lr_loc: float = 1e-4, lr_seg: float = 1e-4, weight_decay: float = 0.05, objective: str = "mean",
                 loc_head: dict | None = None, seg_head: dict | None = None, offload: bool = True,
                 seed: int = 0) -> LockRelease:
    """Foundation X. ``datasets``: [{name, tasks: [cls|loc|seg...], dataset: {name: PLUGIN, ...}, structure}];
    ``order``: by_dataset (Algorithm 1) | by_task (Table 8); ``lock``/``teacher``: Table 10's switches;
    ``momentum``: λ of the teacher EMA; ``consistency``: c in (1−c)·task + c·consistency;
    ``objective``: mean | min over the (dataset, task) headline metrics, or one validation key;
    ``loc_head``/``seg_head``: the dino / upernet configs the shared parts and per-dataset heads come
    from; ``offload``: keep heads off the accelerator while their task is not active."""
    if not 0 <= momentum <= 1 or not 0 <= consistency <= 1:
        raise ScheduleError("strategy.momentum and strategy.consistency must be in [0, 1]")
    if consistency_kind not in CONSISTENCY:
        raise ScheduleError(f"strategy.consistency_kind={consistency_kind!r}; use one of {', '.join(CONSISTENCY)}")
    rows = schedule(datasets, cycles=cycles, lock=lock, lock_fraction=lock_fraction,
                    lock_classification=lock_classification, order=order, task_order=task_order, teacher=teacher)
    parsed = parse_datasets(datasets)
    check_objective(objective, parsed)
    for key, node in (("loc_head", loc_head), ("seg_head", seg_head)):
        if node is not None and not isinstance(node, dict):
            raise ScheduleError(f"strategy.{key} must be a mapping such as {{name: dino, hidden: 64}}")
    lrs = {"backbone": lr_backbone, "cls": lr_head, "loc": lr_loc, "seg": lr_seg}
    return LockRelease(rows, parsed, teacher, momentum, consistency, consistency_kind, lrs, weight_decay,
                       objective, dict(loc_head or {"name": "dino"}), dict(seg_head or {"name": "upernet"}),
                       offload, seed)
