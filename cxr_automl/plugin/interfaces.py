"""The four component kinds and what the core asks of each.

Every plugin is a *factory* with explicit keyword arguments, declared in one of the entry-point groups
``cxr_automl.backbones|heads|strategies|datasets``. The factory returns an object implementing the
matching interface below. The core never reads a plugin's config: it calls the factory with the keys of
the plugin's config node (unknown keys are rejected against the factory's signature, see ``config.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # step.py builds on trainer_utils, which imports this module
    from cxr_automl.train.step import TrainStep


# ----------------------------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects to see.

    ``size`` is the square side the backbone was trained at; ``fixed_size`` says whether it *requires* it
    (a ViT does, a CNN does not). ``mean``/``std`` are per input channel, for images scaled to [0, 1].
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fixed_size: bool = False


@dataclass
class BackboneOutput:
    """One forward pass of a backbone.

    ``pooled``: (N, D) embedding for classification. ``features``: multi-scale maps, NCHW, ordered from
    high to low resolution, for dense heads. ``input_size``: (H, W) of the backbone's input, filled in by
    the model wrapper, so dense heads can derive each map's stride without knowing the backbone.
    ``pooled_map``: (N, D, h, w), the map whose spatial mean is ``pooled``, where the backbone has one
    (Grad-CAM reads it: a ViT's or Hiera's pooled embedding need not come from any of ``features``).
    """

    pooled: torch.Tensor
    features: list[torch.Tensor]
    input_size: tuple[int, int] | None = None
    pooled_map: torch.Tensor | None = None


class Backbone(nn.Module, abc.ABC):
    """An image encoder.

    ``forward`` is called once per batch by the model wrapper with input already normalised and with
    ``input_spec.channels`` channels (grayscale conversion happens in one place, ``model.InputAdapter``).
    """

    input_spec: InputSpec
    #: dimension of ``BackboneOutput.pooled``
    embed_dim: int
    #: channels of each map in ``BackboneOutput.features``
    feature_channels: tuple[int, ...]
    #: how many maps ``features`` holds, declared on the class so configs are checked before building
    #: (None = undeclared: checked when the model is built)
    num_feature_maps: int | None = None

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """Encode a normalised (N, C, H, W) batch."""

    def stage_modules(self) -> Sequence[nn.Module]:
        """Optional: the modules whose outputs are ``BackboneOutput.features``, in the same order.

        Called by strategies that refine intermediate maps *inline* (e.g. context bottlenecks that
        replace a stage's output through a forward hook, so the refined map feeds the next stage).
        Each module's output must be the NCHW map itself (a Swin stage emitting NHWC tokens should not be
        listed). A backbone without it still works with them, refined post hoc only.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its stage modules")

    @abc.abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The encoder's blocks from input to output. "Unfreeze the top k" means the last k of these.

        Called by strategies when they decide what trains; must cover every parameter of the backbone
        (the stem counts as the first block) so that unfreezing all blocks means full fine-tuning.
        """


# ----------------------------------------------------------------------------------------------- heads
class Head(nn.Module, abc.ABC):
    """Maps backbone outputs to task outputs and owns the task loss.

    Built by the core after the backbone and dataset, so its factory receives ``in_dim`` /
    ``in_channels`` and ``num_classes`` from them (the user never writes those).
    """

    #: which evaluator applies (``cxr_automl.train.evaluators``): "classification", "segmentation", "detection"
    task: str = "classification"
    #: multi-scale maps the head needs from the backbone (0 = the pooled embedding is enough)
    min_feature_maps: int = 0
    #: True for heads prompted from the batch (e.g. box prompts taken from the masks): ``predict`` then also
    #: receives the batch — call it through ``interfaces.predict`` so both kinds get what they need
    prompted: bool = False

    @abc.abstractmethod
    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        """Task outputs (for classification: logits (N, C))."""

    @abc.abstractmethod
    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor],
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar task loss for one batch. ``class_weights`` (C,) come from the strategy, if any (strategies
        pass None for dense tasks unless they derive weights for them)."""

    def predict(self, outputs: torch.Tensor) -> Any:
        """What the task's evaluator scores, called on evaluation batches: class probabilities (N, C);
        mask probabilities (N, C, h, w) at any resolution; or per image a dict of ``boxes`` (K, 4) xyxy
        normalised to [0, 1], ``scores`` and ``labels``. A ``prompted`` head's ``predict`` takes a second
        argument, the batch (on the CPU), from which it builds its prompts."""
        return torch.sigmoid(outputs.float())


def predict(head: Head, outputs: Any, batch: dict[str, Any]) -> Any:
    """``head.predict`` as every evaluation calls it: with the batch for a ``prompted`` head."""
    return head.predict(outputs, batch) if getattr(head, "prompted", False) else head.predict(outputs)


# ----------------------------------------------------------------------------------------------- datasets
@dataclass
class DatasetBundle:
    """What a dataset factory returns.

    Each split is a map-style ``torch.utils.data.Dataset`` whose items are dicts with at least
    ``image`` (float32 (C, H, W) in [0, 1]), ``image_id`` (str) and, for classification, ``labels``
    (float32 (num_classes,), NaN where unknown). ``class_names`` names the label columns.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    class_names: list[str]
    task: str = "classification"
    channels: int = 1
    extras: dict[str, Any] = field(default_factory=dict)

    def label_matrix(self, split: str = "train") -> torch.Tensor:
        """(N, C) labels of a split; datasets with labels in memory override via ``extras['labels']``."""
        labels = self.extras.get(f"{split}_labels")
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.float32)
        ds = getattr(self, split)
        return torch.stack([ds[i]["labels"] for i in range(len(ds))])


# ----------------------------------------------------------------------------------------------- strategies
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
    """One part of a strategy's own evaluation (``Strategy.evaluations``): a task scored on some items
    of a split, with its own class names; metrics are named ``<split>/<prefix>/<metric>`` and the
    test split's per-image file is written under ``run_dir/<prefix>/``."""

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


class Strategy(abc.ABC):
    """How to adapt: what trains when, which loss, what to evaluate with. The core owns the loop.

    Hooks in call order::

        prepare_data(data)                       once, before the model is built (default: data as is)
        setup(model, data)                       once, before the optimizer is built
        to_device(model, device)                 once, after setup (default model.to(device))
        param_groups(model)                      once: the optimizer's parameter groups
        optimizer(groups)                        once: the optimizer over them (default AdamW)
        for epoch in range(epochs):
            plan(epoch, model)                   start of every epoch: EpochPlan
            train_indices(epoch, n)              which training items this epoch uses (default all)
            for batch: outputs = forward(model, images, batch)   (default model(images))
                       loss(model, outputs, batch)  then after_step(model) after every optimizer step
            eval_model(model, train_step)        once: the module evaluated on validation (and tested)
            evaluations(evaluated, "val")        its parts (default None: the head's task on the split)
            summarize("val", metrics)            aggregate metrics added after every evaluation
            after_epoch(epoch, model, val_metrics)  returns True to stop early
        export(model, run_dir)                   once after the last epoch, before the test
        state_dict() / load_state_dict()         saved in / restored from every checkpoint
    """

    #: number of epochs the loop runs (the strategy may stop earlier through ``after_epoch``)
    epochs: int = 1
    #: True when the configured head is only a template the strategy resizes for each dataset and task
    #: it composes (multi-dataset strategies); ``config.compose`` then does not match it to the run's dataset task
    head_is_template: bool = False

    def prepare_data(self, data: DatasetBundle) -> DatasetBundle:
        """Called once with the run's dataset, before the model is built (the head is sized from the
        result): a strategy that trains on several datasets composes them here."""
        return data

    def setup(self, model: "nn.Module", data: DatasetBundle) -> None:
        """Called once before training, e.g. to derive class weights from the training labels."""

    def to_device(self, model: "nn.Module", device: torch.device) -> None:
        """Called once after ``setup``: put the model on the run's device. A strategy that keeps parts
        of the model off the accelerator (e.g. inactive per-dataset heads) places them itself."""
        model.to(device)

    @abc.abstractmethod
    def param_groups(self, model: "nn.Module") -> list[dict[str, Any]]:
        """Optimizer parameter groups (dicts with ``params`` and ``lr``, optional ``weight_decay``).

        Include every parameter that may train in *any* epoch: frozen parameters get no gradient and
        the optimizer skips them, so one optimizer and one LR schedule serve the whole run.
        """

    def optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """Called once, right after ``param_groups``: the optimizer over those groups.

        The default is AdamW; a strategy whose method prescribes another (e.g. LARS) overrides it.
        The loop's LR schedule scales every group's ``lr`` whatever the optimizer.
        """
        return torch.optim.AdamW(param_groups)

    @abc.abstractmethod
    def plan(self, epoch: int, model: "nn.Module") -> EpochPlan:
        """Called at the start of every epoch (0-based)."""

    def train_indices(self, epoch: int, n: int) -> Sequence[int] | None:
        """Called at the start of every epoch, after ``plan``: the indices of the ``n`` training items
        this epoch visits (shuffled by the loop), or None for all (e.g. a Lock epoch on half of one
        dataset). The LR schedule still counts full epochs."""
        return None

    def forward(self, model: "nn.Module", images: torch.Tensor, batch: dict[str, Any]) -> Any:
        """Called for every training micro-batch, inside autocast, in place of ``model(images)``.

        Whatever it returns is what ``loss`` receives as ``outputs``. Self-supervised strategies
        build their augmented views and embeddings here; evaluation never calls it.
        """
        return model(images)

    def loss(self, model: "nn.Module", outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss composition; the default is the head's own loss."""
        return model.head.loss(outputs, batch)

    def after_step(self, model: "nn.Module") -> None:
        """Called after every optimizer step (e.g. EMA update)."""

    def eval_model(self, model: "nn.Module", train_step: "TrainStep") -> "nn.Module":
        """Called once per epoch, after its training and before its validation: the module to evaluate.

        The loop validates the returned module, keeps its weights when the epoch is the best, and tests
        a copy of it with the best epoch's weights (the last epoch's module when none scored). Otherwise called
        only where a model is evaluated without training an epoch first (a restored, finished run).

        Args:
            model: the trained model.
            train_step: the run's training step (precision, loss scaling, clipping, DataLoaders); a
                strategy that *trains* the evaluated module (a downstream probe) trains it with
                this, so the run's ``trainer`` settings apply there too.

        Returns:
            ``model`` itself (the default), a module kept alongside it (an EMA copy), or a new one.
        """
        return model

    def evaluations(self, model: "nn.Module", split: str) -> list[Evaluation] | None:
        """Called before every evaluation (validation after each epoch, test at the end): the parts to
        score, e.g. every (dataset, task) of a multi-task model. ``None`` (default): the model's head on
        the whole split. An empty list skips the evaluation (no metrics that epoch)."""
        return None

    def summarize(self, split: str, metrics: dict[str, float]) -> dict[str, float]:
        """Called after every evaluation with its metrics: extra metrics to add (e.g. the aggregate
        that ``monitor`` names)."""
        return {}

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

    def export(self, model: "nn.Module", run_dir: "Path") -> None:
        """Called once after the last epoch (also when an already finished run is re-run), before the
        test evaluation: write artefacts such as a pretrained encoder into ``run_dir``."""

    def schedule(self) -> list[Any] | None:
        """Optional: every epoch's plan as data computed from the configuration alone (no model, no
        data), for ``cxr-automl plan``. Rows have ``as_dict()`` or are dicts with at least epoch,
        dataset, task, fraction, mode and trainable. ``None``: the plan depends on the model."""
        return None

    def monitor(self) -> str:
        """Name of the validation metric that selects the best epoch and feeds Optuna."""
        return "val/macro_auc"  # classification; strategies that serve dense tasks return theirs

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (phase, class weights, EMA weights, patience...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; called after the model and optimizer are restored."""


def iter_params(modules: Sequence[nn.Module]) -> Iterator[nn.Parameter]:
    """Parameters of several modules, each once."""
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p
