"""Foundation X's model parts around one backbone, and where each part lives.

- classification: one head per dataset (the configured head kind, resized to the dataset's classes);
- localization: one shared *localization encoder* and one *localization decoder* per dataset, the two
  parts of a splittable detection head (``SplittableHead.split``; ``dino``: projections + RT-DETR hybrid
  encoder, then query selection, deformable decoder, denoising, Hungarian loss);
- segmentation: one shared *segmentation decoder* and one *segmentation head* per dataset, the parts of a
  splittable segmentation head (``upernet``: PSP + FPN fusion to ``hidden`` channels, then its last 1×1
  classifier with BCE + Dice).

Parts are addressed by the schedule's component names (``backbone``, ``loc_encoder``, ``seg_decoder``,
``cls_head/<ds>``, ``loc_decoder/<ds>``, ``seg_head/<ds>``). ``Placement`` keeps the parts an epoch
does not use off the accelerator (and their optimizer state with them).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from cxr_automl.config import ConfigError
from cxr_automl.plugin import registry
from cxr_automl.plugin.interfaces import BackboneOutput, DatasetBundle, Head, HeadParts, SplittableHead, last_maps


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


class FoundationHeads(nn.Module):
    """Every task part of Foundation X except the backbone, held as ``model.head``. Not a ``Head``: it has
    no one task, loss or prediction; lock_release trains and evaluates each (dataset, task) path itself
    (``LockRelease.loss``, ``LockRelease.evaluations``)."""

    def __init__(self, cls_heads: dict[str, Head], loc_encoder: nn.Module | None, loc_decoders: dict[str, nn.Module],
                 loc_parts: HeadParts | None, seg_decoder: nn.Module | None, seg_heads: dict[str, nn.Module],
                 seg_parts: HeadParts | None):
        super().__init__()
        self.cls_heads = nn.ModuleDict(cls_heads)
        self.loc_encoder = loc_encoder
        self.loc_decoders = nn.ModuleDict(loc_decoders)
        self.seg_decoder = seg_decoder
        self.seg_heads = nn.ModuleDict(seg_heads)
        # which backbone maps each shared part reads (plain data; the modules are registered above)
        self.loc_levels = loc_parts.levels if loc_parts is not None else None
        self.seg_levels = seg_parts.levels if seg_parts is not None else None

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        """The classification logits of every dataset with a classification task, concatenated."""
        if not len(self.cls_heads):
            return feats.pooled.new_zeros(len(feats.pooled), 0)
        return torch.cat([h(feats) for h in self.cls_heads.values()], dim=1)

    def loc_maps(self, feats: BackboneOutput) -> list[torch.Tensor]:
        return last_maps(feats, self.loc_levels)

    def seg_maps(self, feats: BackboneOutput) -> list[torch.Tensor]:
        return last_maps(feats, self.seg_levels)


def class_names(bundle: DatasetBundle, task: str, where: str, dataset: str = "the run's dataset") -> list[str]:
    """The classes of one (dataset, task): labels for cls (they follow the dataset's own ``task``: its
    labels, "has a box of this class" or "structure present"), box classes for loc, mask structures for
    seg. An item without boxes (loc) or masks (seg) is one line naming the tasks the dataset gives."""
    item = bundle.train[0]
    offered = bundle.extras.get("tasks")
    gives = f" (it gives {', '.join(offered)})" if offered else ""
    if task == "seg":
        names = bundle.extras.get("structures") or (bundle.class_names if bundle.task == "segmentation" else None)
        if not names or "masks" not in item:
            raise ConfigError(f"{where} has task seg but {dataset} gives no masks{gives}; drop seg from its tasks "
                              "or name a dataset with masks")
        return list(names)
    if task == "loc":
        if "boxes" not in item:
            hint = (" or view one structure with structure: NAME (its box is the mask's bounding box)"
                    if bundle.extras.get("structures") else "")
            raise ConfigError(f"{where} has task loc but {dataset} gives no boxes{gives}; drop loc from its tasks"
                              f"{hint}")
        names = bundle.extras.get("box_classes")  # what box_labels index, whatever the dataset's own task
        if names:
            return list(names)
        if bundle.task == "segmentation":
            raise ConfigError(f"{where} has task loc but {dataset} is configured for segmentation; use its "
                              "classification or detection task (boxes index those classes)")
    return list(bundle.class_names)


def build_heads(template: Head, backbone: nn.Module, classes: dict[str, dict[str, list[str]]],
                loc_head: dict[str, Any], seg_head: dict[str, Any]) -> FoundationHeads:
    """``classes``: dataset → task → class names, for the tasks it has. ``loc_head``/``seg_head``: the
    ``dino`` / ``upernet`` head configs the shared parts and per-dataset decoders/heads are cut from."""
    supplied = lambda n: {"in_channels": backbone.feature_channels, "in_dim": backbone.embed_dim,  # noqa: E731
                          "num_classes": n}
    cls_heads = {ds: resized_head(template, len(t["cls"])) for ds, t in classes.items() if "cls" in t}

    def per_dataset(task: str, node: dict[str, Any], kind: str, why: str) -> dict[str, HeadParts]:
        """One head per dataset that has ``task``, sized to its classes and split into its parts."""
        node = dict(node)
        name = node.pop("name", None)
        if not any(task in t for t in classes.values()):
            return {}
        parts = {}
        for ds, t in classes.items():
            if task in t:
                try:
                    head = registry.build("head", name, supplied=supplied(len(t[task])), **node) if name else None
                except registry.RegistryError as exc:  # which key, then the registry's own line
                    raise ConfigError(f"strategy.{task}_head.name={name!r}: {exc}") from exc
                if not isinstance(head, SplittableHead) or head.task != kind:
                    raise ConfigError(f"strategy.{task}_head.name={name!r}: {why}")
                parts[ds] = head.split()
        return parts

    # each task's shared part is the first dataset's; every dataset keeps its own part
    loc = per_dataset("loc", loc_head, "detection", "localization needs a splittable detection head such as "
                      "'dino' (a shareable encoder and per-dataset decoders)")
    seg = per_dataset("seg", seg_head, "segmentation", "segmentation needs a splittable segmentation head such "
                      "as 'upernet' (a shareable decoder and per-dataset classifiers)")
    first_loc, first_seg = next(iter(loc.values()), None), next(iter(seg.values()), None)
    return FoundationHeads(cls_heads, first_loc and first_loc.shared, {ds: p.own for ds, p in loc.items()}, first_loc,
                           first_seg and first_seg.shared, {ds: p.own for ds, p in seg.items()}, first_seg)


def component(model: nn.Module, name: str) -> nn.Module:
    """The module of a schedule component name (``teacher/<shared>`` for the teacher's copies)."""
    heads: FoundationHeads = model.head
    kind, _, ds = name.partition("/")
    table = {"backbone": lambda: model.backbone, "loc_encoder": lambda: heads.loc_encoder,
             "seg_decoder": lambda: heads.seg_decoder, "cls_head": lambda: heads.cls_heads[ds],
             "loc_decoder": lambda: heads.loc_decoders[ds], "seg_head": lambda: heads.seg_heads[ds],
             "teacher": lambda: model.teacher.copies[ds]}
    return table[kind]()


def all_components(model: nn.Module) -> list[str]:
    """Every part that can be placed: the shared task parts, each dataset's heads, the teacher's copies
    of the shared task parts (the adapter, backbone and the teacher's backbone always stay on the device)."""
    heads: FoundationHeads = model.head
    names = [*(["loc_encoder"] if heads.loc_encoder is not None else []),
             *(["seg_decoder"] if heads.seg_decoder is not None else []),
             *(f"cls_head/{d}" for d in heads.cls_heads), *(f"loc_decoder/{d}" for d in heads.loc_decoders),
             *(f"seg_head/{d}" for d in heads.seg_heads)]
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        names += [f"teacher/{n}" for n in teacher.copies if n != "backbone"]
    return names


def resident(path: Iterable[str], teacher: bool) -> set[str]:
    """Parts that must be on the device to train or evaluate ``path`` (frozen ones included: the
    forward pass needs them), plus the teacher's copy of the path's shared part."""
    out = {c for c in path if c != "backbone"}
    if teacher:
        out |= {f"teacher/{c}" for c in path if c in ("loc_encoder", "seg_decoder")}
    return out


class Placement:
    """Moves parts between the run's device and the offload device (the CPU), optimizer state with
    them, so an accelerator only holds the backbone and the active task's path. On a CPU run the
    moves are no-ops."""

    def __init__(self, device: torch.device, offload: torch.device | None = None):
        self.device = torch.device(device)
        self.offload = torch.device("cpu") if offload is None else torch.device(offload)
        self.optimizer: torch.optim.Optimizer | None = None

    def move(self, module: nn.Module, device: torch.device) -> None:
        module.to(device)
        if self.optimizer is None:
            return
        for p in module.parameters():
            state = self.optimizer.state.get(p)
            for key, value in (state or {}).items():
                if torch.is_tensor(value) and value.dim() > 0:  # moments; scalar 'step' stays where it is
                    state[key] = value.to(device)

    def apply(self, model: nn.Module, keep: set[str]) -> None:
        """``keep`` on the device, every other placeable part on the offload device."""
        names = all_components(model)
        for name in names:  # out first, then in: the device never holds both sets
            if name not in keep:
                self.move(component(model, name), self.offload)
        for name in names:
            if name in keep:
                self.move(component(model, name), self.device)
