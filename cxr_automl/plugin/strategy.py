"""The strategy contract: a small core every strategy implements, and opt-in protocols for the rest.

``Strategy`` holds the eight hooks every way of adapting a model needs: ``setup``, ``param_groups``,
``plan``, ``loss``, ``monitor``, ``after_epoch``, ``eval_model`` and the resume state
(``state_dict``/``load_state_dict``); only ``param_groups`` and ``plan`` are abstract. A strategy that
needs more *declares* it by also inheriting one of the protocol classes below, and the loop asks
``isinstance(strategy, Protocol)`` before calling those hooks::

    class MyStrategy(Strategy, CustomStep):   # its own forward / optimizer / after_step
        ...

- ``CustomStep``: its own training forward, optimizer or per-step update (EMA, self-supervised views).
- ``MultiTask``: trains on several datasets or tasks (composes the data, places per-dataset heads,
  picks each epoch's items, scores every (dataset, task) part and aggregates them).
- ``Pretraining``: writes an artefact such as a pretrained encoder after the last epoch.
- ``PlannedSchedule``: its epoch-by-epoch schedule follows from its configuration alone and it renders
  it itself for ``cxr-automl plan``.

A protocol's hooks keep the names and signatures they always had; a hook defined on a strategy that
does not declare its protocol would never be called, so ``undeclared_hooks`` reports it (the loop
refuses such a strategy and the contract suite fails it).

Hooks in call order (``[P]``: only for strategies declaring protocol P)::

    [MultiTask]  prepare_data(data)              once, before the model is built
                 setup(model, data)              once, before the optimizer is built
    [MultiTask]  to_device(model, device)        once, after setup (else: model.to(device))
                 param_groups(model)             once: the optimizer's parameter groups
    [CustomStep] optimizer(groups)               once: the optimizer over them (else: AdamW)
                 for epoch in range(epochs):
                     plan(epoch, model)          start of every epoch: EpochPlan
    [MultiTask]      train_indices(epoch, n)     which training items this epoch uses (else: all)
                     for each micro-batch:
    [CustomStep]         forward(model, images, batch)   (else: model(images))
                         loss(model, outputs, batch)
    [CustomStep]         after_step(model)        after every optimizer step
                     eval_model(model, train_step)    once: the module validated (and tested)
    [MultiTask]      evaluations(evaluated, "val")    its parts (else: the head's task on the split)
    [MultiTask]      summarize("val", metrics)        aggregate metrics added after every evaluation
                     after_epoch(epoch, model, val_metrics)   True stops early
    [Pretraining] export(model, run_dir)          once after the last epoch, before the test
                 state_dict() / load_state_dict() saved in / restored from every checkpoint
    [PlannedSchedule] schedule() / render_schedule()  only by ``cxr-automl plan``: no model, no data
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # interfaces re-exports this module; step.py builds on runtime, which imports interfaces
    from cxr_automl.plugin.interfaces import DatasetBundle
    from cxr_automl.train.step import TrainStep


@dataclass
class EpochPlan:
    """What a strategy wants for one epoch: a human-readable phase name and the modules that train.

    Every parameter of the model outside ``trainable`` is frozen for that epoch (and frozen
    backbone blocks are put in eval mode so BatchNorm statistics stay put).
    """

    phase: str
    trainable: list[nn.Module]


@dataclass
class Evaluation:
    """One part of a ``MultiTask`` strategy's evaluation (``MultiTask.evaluations``): a task scored on
    some items of a split, with its own class names; metrics are named ``<split>/<prefix>/<metric>`` and
    the test split's per-image file is written under ``run_dir/<prefix>/``."""

    prefix: str
    indices: Sequence[int]  # items of the split this part scores
    task: str  # classification | detection | segmentation (picks the evaluator)
    class_names: list[str]
    #: (model, images, batch) -> what the task's evaluator scores (as ``Head.predict`` returns), under no_grad
    predict: Callable[["nn.Module", torch.Tensor, dict[str, Any]], Any]
    #: called before the part runs, e.g. to move the part's head onto the device
    place: Callable[["nn.Module"], None] | None = None
    #: the columns of the items' ``labels`` that are this part's classes (None: all of them)
    label_columns: Sequence[int] | None = None
    #: keyword arguments of the task's evaluator, e.g. ``{"iou_thresholds": (0.4,)}`` for mAP@0.40
    options: dict[str, Any] = field(default_factory=dict)


class Strategy(abc.ABC):
    """How to adapt: what trains when, with which loss, what is evaluated. The core owns the loop.

    A strategy's factory builds it from its configuration alone (no model, no data), so ``epochs``
    is known before anything is built: the loop, the LR schedule, progress bars and the search's
    look-ahead pruner read it.
    """

    #: number of epochs the loop runs (the strategy may stop earlier through ``after_epoch``); set it in
    #: ``__init__`` from the configuration (e.g. the length of a schedule)
    epochs: int = 1

    def setup(self, model: "nn.Module", data: DatasetBundle) -> None:
        """Called once, after the model is built and before it is moved to the device and the optimizer
        is built: derive what depends on the data (class weights) and attach what the strategy trains
        or keeps besides backbone and head.

        A strategy may replace ``model.head`` (a head of its own, e.g. per-dataset heads) and attach
        further submodules to ``model`` under its own names (an EMA teacher, projection heads). Anything
        attached here is moved to the device, checkpointed with the model and restored on resume;
        attach nothing later, or the optimizer and checkpoints will not know it.

        Args:
            model: the ``CXRModel`` (``adapter``, ``backbone``, ``head``), still on the CPU.
            data: the run's dataset (a ``MultiTask`` strategy's composed one).
        """

    @abc.abstractmethod
    def param_groups(self, model: "nn.Module") -> list[dict[str, Any]]:
        """Called once, after ``setup`` and the move to the device: the optimizer's parameter groups.

        Include every parameter that may train in *any* epoch: frozen parameters get no gradient and
        the optimizer skips them, so one optimizer and one LR schedule serve the whole run.

        Returns:
            Dicts with ``params`` and ``lr``, optionally ``weight_decay`` and a ``name``.
        """

    @abc.abstractmethod
    def plan(self, epoch: int, model: "nn.Module") -> EpochPlan:
        """Called at the start of every epoch, before it trains.

        Args:
            epoch: the epoch about to run (0-based); after a resume, the first epoch not yet run.
            model: the model (on the device).

        Returns:
            The epoch's phase name and the modules that train in it (every other parameter is frozen).
        """

    def loss(self, model: "nn.Module", outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Called for every training micro-batch, inside autocast, after the forward pass.

        Args:
            model: the model in training mode.
            outputs: ``model(images)``, or what a ``CustomStep``'s ``forward`` returned.
            batch: the batch on the device (``image``, ``labels``, ``masks``, ``boxes``... as the dataset gives).

        Returns:
            The scalar loss to minimise. The default is the head's own loss.
        """
        return model.head.loss(outputs, batch)

    def eval_model(self, model: "nn.Module", train_step: "TrainStep") -> "nn.Module":
        """Called once per epoch, after its training and before its validation: the module to evaluate.

        The loop validates the returned module, keeps its weights when the epoch is the best, and tests
        a copy of it with the best epoch's weights (the last epoch's module when none scored). Otherwise
        called only where a model is evaluated without training an epoch first (a restored, finished run).

        Args:
            model: the trained model.
            train_step: the run's training step (precision, loss scaling, clipping, DataLoaders); a
                strategy that *trains* the evaluated module (a downstream probe) trains it with
                this, so the run's ``trainer`` settings apply there too.

        Returns:
            ``model`` itself (the default), a module kept alongside it (an EMA copy), or a new one.
        """
        return model

    def after_epoch(self, epoch: int, model: "nn.Module", val_metrics: dict[str, float]) -> bool:
        """Called at the end of every epoch, after its validation (and after the loop has kept the
        best epoch's weights), before the checkpoint is written.

        Args:
            epoch: the epoch that just finished (0-based).
            model: the trained model (not ``eval_model``'s module), e.g. for an epoch-wise EMA teacher.
            val_metrics: that epoch's validation metrics (empty when the strategy skipped validation).

        Returns:
            True to stop training after this epoch (early stopping), else False.
        """
        return False

    def monitor(self) -> str:
        """Called after every validation and by the search: the name of the validation metric that
        selects the best epoch and that Optuna maximises (default ``val/macro_auc``, classification;
        strategies that serve dense tasks return theirs)."""
        return "val/macro_auc"

    def state_dict(self) -> dict[str, Any]:
        """Called whenever a checkpoint is written (after every epoch): everything besides the model
        and optimizer needed to resume exactly (phase, class weights, EMA weights, patience...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called on resume, after ``setup`` and after the model and optimizer are restored: the inverse
        of ``state_dict``."""


# ----------------------------------------------------------------------------------------- protocols
class CustomStep(abc.ABC):
    """Opt-in: a strategy with its own training forward, optimizer or per-step update. Each hook has
    the default the loop uses for strategies that do not declare the protocol; override those you need."""

    def forward(self, model: "nn.Module", images: torch.Tensor, batch: dict[str, Any]) -> Any:
        """Called for every training micro-batch, inside autocast, in place of ``model(images)``
        (evaluation never calls it).

        Returns:
            What ``Strategy.loss`` receives as ``outputs`` (e.g. a self-supervised strategy's two views'
            embeddings).
        """
        return model(images)

    def optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """Called once, right after ``param_groups``.

        Returns:
            The optimizer over those groups (default AdamW). The loop's LR schedule scales every
            group's ``lr`` whatever the optimizer.
        """
        return torch.optim.AdamW(param_groups)

    def after_step(self, model: "nn.Module") -> None:
        """Called after every optimizer step (and after the LR schedule moved), e.g. an EMA update."""


class MultiTask(abc.ABC):
    """Opt-in: a strategy that trains one model on several datasets or tasks.

    Its configured head is only a template it resizes for each dataset and task it composes, so
    ``config.compose`` does not match the head to the run's dataset task (``head_is_template``).
    """

    #: the configured head is a template (see the class docstring)
    head_is_template: bool = True

    @abc.abstractmethod
    def prepare_data(self, data: DatasetBundle) -> DatasetBundle:
        """Called once with the run's dataset, before the model is built (the head is sized from the
        result).

        Returns:
            The dataset the run trains on, e.g. several datasets composed into one.
        """

    @abc.abstractmethod
    def to_device(self, model: "nn.Module", device: torch.device) -> None:
        """Called once after ``setup`` in place of ``model.to(device)``: put the model on the run's
        device, keeping parts off the accelerator where they are not needed (inactive per-dataset heads).
        Modules the strategy holds as attributes (an EMA copy, a teacher built in ``setup``) are already on
        the device: the loop moves them just before this call, for every strategy."""

    @abc.abstractmethod
    def train_indices(self, epoch: int, n: int) -> Sequence[int] | None:
        """Called at the start of every epoch, after ``plan``.

        Args:
            epoch: the epoch about to run (0-based).
            n: the number of training items of the (composed) dataset.

        Returns:
            The indices this epoch visits (the loop shuffles them), or None for all of them (e.g. a
            Lock epoch on half of one dataset). The LR schedule still counts full epochs.
        """

    @abc.abstractmethod
    def evaluations(self, model: "nn.Module", split: str) -> list[Evaluation] | None:
        """Called before every evaluation (validation after each epoch, test at the end).

        Returns:
            The parts to score, e.g. every (dataset, task) of a multi-task model; None: the model's head
            on the whole split; an empty list skips the evaluation (no metrics that epoch).
        """

    @abc.abstractmethod
    def summarize(self, split: str, metrics: dict[str, float]) -> dict[str, float]:
        """Called after every evaluation with its metrics.

        Returns:
            Extra metrics to add, e.g. the aggregate over the parts that ``monitor`` names.
        """


class Pretraining(abc.ABC):
    """Opt-in: a strategy whose product is an artefact besides the scored model (a pretrained encoder)."""

    @abc.abstractmethod
    def export(self, model: "nn.Module", run_dir: Path) -> None:
        """Called once after the last epoch (also when an already finished run is re-run), before the
        test evaluation: write the artefacts (e.g. ``encoder.pt`` for ``backbone.weights=PATH``) into
        ``run_dir``."""


class PlannedSchedule(abc.ABC):
    """Opt-in: a strategy whose every epoch follows from its configuration alone, shown by
    ``cxr-automl plan`` before anything is trained (no model and no data are built)."""

    @abc.abstractmethod
    def schedule(self) -> list[Any]:
        """Called by ``cxr-automl plan`` on the freshly built strategy.

        Returns:
            One row per epoch: dicts or objects with ``as_dict()``, JSON-serialisable (``--json``
            prints them as they are).
        """

    @abc.abstractmethod
    def render_schedule(self, rows: list[dict[str, Any]]) -> Any:
        """Called by ``cxr-automl plan`` without ``--json``, with ``schedule()``'s rows as dicts.

        Returns:
            Something ``rich`` prints (a ``rich.table.Table``).
        """


#: every opt-in protocol and the hooks it adds
PROTOCOLS: dict[type, tuple[str, ...]] = {
    CustomStep: ("forward", "optimizer", "after_step"),
    MultiTask: ("prepare_data", "to_device", "train_indices", "evaluations", "summarize"),
    Pretraining: ("export",),
    PlannedSchedule: ("schedule", "render_schedule"),
}
#: the core hooks (``state_dict``/``load_state_dict`` count as one concept, the resume state)
CORE_HOOKS = ("setup", "param_groups", "plan", "loss", "monitor", "after_epoch", "eval_model",
              "state_dict", "load_state_dict")


def declared(strategy: Any) -> list[type]:
    """The opt-in protocols ``strategy`` declares."""
    return [p for p in PROTOCOLS if isinstance(strategy, p)]


def undeclared_hooks(strategy: Any) -> list[str]:
    """``"<hook> (declare <Protocol>)"`` for every protocol hook the strategy's class defines without
    inheriting its protocol: the loop would never call it."""
    cls = type(strategy)
    return [f"{hook} (declare {proto.__name__})" for proto, hooks in PROTOCOLS.items()
            if not isinstance(strategy, proto) for hook in hooks if callable(getattr(cls, hook, None))]


__all__ = ["CORE_HOOKS", "PROTOCOLS", "CustomStep", "EpochPlan", "Evaluation", "MultiTask", "PlannedSchedule",
           "Pretraining", "Strategy", "declared", "undeclared_hooks"]
