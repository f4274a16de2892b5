"""The four component kinds and what the core asks of each.

Every plugin is a *factory* with explicit keyword arguments, declared in one of the entry-point groups
``cxr_automl.backbones|heads|strategies|datasets``. The factory returns an object implementing the
matching interface below. The core never reads a plugin's config: it calls the factory with the keys of
the plugin's config node (unknown keys are rejected against the factory's signature, see ``config.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

# the strategy contract lives in ``strategy.py`` (a small core plus opt-in protocols); re-exported here
from cxr_automl.plugin.strategy import (  # noqa: F401
    CustomStep,
    EpochPlan,
    Evaluation,
    MultiTask,
    PlannedSchedule,
    Pretraining,
    Strategy,
)

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
@dataclass(frozen=True)
class HeadSpec:
    """What a head does and needs, as data (read before anything is built, as timm's ``pretrained_cfg``).

    A head class sets it as ``spec`` and its factory declares the same object with ``@declare_head``,
    so ``compat`` checks a backbone × head × dataset combination from the configuration alone.
    """

    #: which evaluator applies (``cxr_automl.train.evaluators``): classification | segmentation | detection
    task: str = "classification"
    #: multi-scale maps the head needs from the backbone: a number, or a function of the head's config (its
    #: factory's keyword arguments, defaults filled in), e.g. ``lambda cfg: cfg["levels"]``; 0 = pooled only
    feature_maps: int | Callable[[dict[str, Any]], int] = 0
    #: ``predict(outputs, batch)``: the head builds its prompts from the batch (e.g. boxes from the masks)
    predict_needs_batch: bool = False

    def maps_needed(self, head_cfg: dict[str, Any]) -> int:
        """How many maps a head built from ``head_cfg`` (defaults filled in) needs."""
        return int(self.feature_maps(head_cfg) if callable(self.feature_maps) else self.feature_maps)


def declare_head(spec: HeadSpec) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a head factory: states the ``HeadSpec`` of the heads it builds (``factory.head_spec``)."""
    def mark(factory: Callable[..., Any]) -> Callable[..., Any]:
        factory.head_spec = spec  # type: ignore[attr-defined]
        return factory
    return mark


class Head(nn.Module, abc.ABC):
    """Maps backbone outputs to task outputs and owns the task loss.

    Built by the core after the backbone and dataset, so its factory receives ``in_dim`` /
    ``in_channels`` and ``num_classes`` from them (the user never writes those). What it does and needs
    is its class's ``spec`` (``HeadSpec``).
    """

    spec: ClassVar[HeadSpec] = HeadSpec()

    @property
    def task(self) -> str:
        """``spec.task``: which evaluator scores this head."""
        return self.spec.task

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
        normalised to [0, 1], ``scores`` and ``labels``. With ``spec.predict_needs_batch`` it takes a
        second argument, the batch (on the CPU), from which it builds its prompts."""
        return torch.sigmoid(outputs.float())


@dataclass
class HeadParts:
    """A head cut in two (``SplittableHead.split``): ``shared(maps)`` turns the backbone's maps into an
    intermediate (a tensor or a list of tensors) several datasets can share; ``own(intermediate)`` gives
    the outputs its ``loss(outputs, batch)`` and ``predict(outputs)`` take, one per dataset."""

    shared: nn.Module
    own: nn.Module
    #: how many of the backbone's last maps ``shared`` reads, made contiguous (None: all of them)
    levels: int | None = None

    def maps(self, feats: BackboneOutput) -> list[torch.Tensor]:
        """The backbone maps ``shared`` reads."""
        return last_maps(feats, self.levels)


def last_maps(feats: BackboneOutput, levels: int | None) -> list[torch.Tensor]:
    """The backbone's last ``levels`` maps (None: all), contiguous (timm's NCHW maps may be permuted views)."""
    return [m.contiguous() for m in (feats.features if levels is None else feats.features[-levels:])]


class SplittableHead(abc.ABC):
    """Opt-in for a head whose network splits into a part shared across datasets and a part each
    dataset owns (a multi-dataset strategy shares one encoder/decoder and keeps one classifier per dataset)."""

    @abc.abstractmethod
    def split(self) -> HeadParts:
        """Called by a multi-dataset strategy once on each freshly built head, before training.

        Returns:
            The head's two parts; ``shared(parts.maps(feats))`` then ``own(...)`` computes what the head's
            ``forward`` computes. The head is not used afterwards (it may give its modules away).
        """


def predict(head: Head, outputs: Any, batch: dict[str, Any]) -> Any:
    """``head.predict`` as every evaluation calls it: with the batch where the head's spec asks for it."""
    spec = getattr(head, "spec", None)
    return head.predict(outputs, batch) if getattr(spec, "predict_needs_batch", False) else head.predict(outputs)


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


def iter_params(modules: Sequence[nn.Module]) -> Iterator[nn.Parameter]:
    """Parameters of several modules, each once."""
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p
