"""SPFT (Stabilized Progressive Fine-Tuning) and the plain fine-tune / linear-probe baseline.

SPFT: stage 1 trains the head only; stage 2 unfreezes the top-k backbone blocks progressively;
hybrid class reweighting (label-distribution initial weights, refined each epoch from per-class
validation AUC); an EMA of the parameters is what gets evaluated; early stopping on the task's validation metric (macro AUC; mean Dice or mAP@0.5 for dense heads).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from cxr_automl.plugin.interfaces import DatasetBundle, EpochPlan, Strategy
from cxr_automl.plugin.strategy import CustomStep
from cxr_automl.train.evaluators import primary_metric
from cxr_automl.train.step import TrainStep


#: how a class weight enters the BCE. The paper's weighted-BCE equation is blank in our copy of its text
#: (spft.txt, "Hybrid Class Reweighting Strategy"); its words — class weights in a weighted binary
#: cross-entropy, normalised across classes — read as a per-class factor on the class's whole BCE term,
#: ``loss_scale`` (the default). ``pos_weight`` is torch's BCEWithLogits ``pos_weight``: only the
#: positive term is scaled (the usual use of a negatives/positives ratio).
CLASS_WEIGHT_MODES = ("loss_scale", "pos_weight")


def initial_class_weights(labels: torch.Tensor, max_ratio: float | None = None) -> torch.Tensor:
    """negatives/positives per class (unknown labels ignored), capped at ``max_ratio`` (None: no cap;
    on full ChestX-ray14 Hernia's ratio is ~100), normalised to mean 1."""
    known = ~torch.isnan(labels)
    pos = torch.nan_to_num(labels, nan=0.0).sum(0)
    neg = known.sum(0) - pos
    w = neg.clamp_min(1) / pos.clamp_min(1)
    if max_ratio is not None:
        w = w.clamp_max(max_ratio)
    return w / w.mean()


def refine_factors(factors: torch.Tensor, class_aucs: list[float | None], rate: float,
                   max_factor: float | None = None) -> torch.Tensor:
    """One epoch's AUC feedback on the cumulative per-class factors (rate 0 = no refinement).

    Each factor is multiplied by ``1 + rate * (mean_auc - auc_c)`` (that step clamped to [0.5, 2]); classes
    without an AUC keep theirs. The product over epochs is clamped to [1/max_factor, max_factor], so the
    feedback cannot compound without bound over a 50-epoch run (None: no cap).
    """
    known = [a for a in class_aucs if a is not None]
    if not known or rate == 0:
        return factors
    mean_auc = sum(known) / len(known)
    step = torch.tensor([1.0 if a is None else min(2.0, max(0.5, 1 + rate * (mean_auc - a)))
                         for a in class_aucs], dtype=factors.dtype)
    out = factors * step
    return out.clamp(1 / max_factor, max_factor) if max_factor is not None else out


def refine_class_weights(weights: torch.Tensor, class_aucs: list[float | None], rate: float,
                         ) -> torch.Tensor:
    """Shift weight towards classes whose validation AUC is below the mean, renormalised to mean 1
    (one uncapped step of ``refine_factors`` applied to ``weights``)."""
    w = weights * refine_factors(torch.ones_like(weights), class_aucs, rate)
    return w / w.mean()


def check_unfreeze(unfreeze_k: int | str, unfreeze_fraction: float | None) -> tuple[str, float]:
    """("k", k) | ("all", 0) | ("fraction", f) from the two options, or a one-line error."""
    if unfreeze_fraction is not None:
        if not 0 <= float(unfreeze_fraction) <= 1:
            raise ValueError(f"unfreeze_fraction={unfreeze_fraction}: use a share of the backbone's blocks in [0, 1]")
        return ("fraction", float(unfreeze_fraction))
    if isinstance(unfreeze_k, str) and unfreeze_k.strip().lower() == "all":
        return ("all", 0.0)
    if isinstance(unfreeze_k, bool) or not isinstance(unfreeze_k, int) or unfreeze_k < -1:
        raise ValueError(f"unfreeze_k={unfreeze_k!r}: use a number of top blocks (0 = head only), all (or -1), "
                         "or set unfreeze_fraction to a share of the backbone's blocks")
    return ("all", 0.0) if unfreeze_k == -1 else ("k", float(unfreeze_k))


def resolve_unfreeze(request: tuple[str, float], n_blocks: int) -> int:
    """Top blocks to train for a backbone of ``n_blocks`` blocks: k (at most all of them), all, or a
    share of them rounded to the nearest block (at least one when the share is above 0), so one search
    space reaches the same relative depth of ResNet's stages, Swin's, RAD-DINO's or Hiera's blocks."""
    kind, value = request
    if kind == "all":
        return n_blocks
    if kind == "fraction":
        return 0 if value == 0 else min(n_blocks, max(1, round(value * n_blocks)))
    return min(int(value), n_blocks)


class StagedFinetune(Strategy, CustomStep):  # CustomStep: after_step updates the EMA
    """One class for SPFT and its ablations; ``spft`` and ``finetune`` are its two factories."""

    def __init__(self, epochs: int, head_epochs: int, unfreeze_k: int | str, unfreeze_ramp: int,
                 lr_head: float, lr_backbone: float, weight_decay: float, ema_decay: float | None,
                 class_weighting: bool, weight_refine_rate: float, patience: int | None,
                 class_weight_max: float | None = None, class_weight_mode: str = "loss_scale",
                 weight_refine_max: float | None = None, class_boost: dict[str, float] | None = None,
                 unfreeze_fraction: float | None = None):
        if class_weight_mode not in CLASS_WEIGHT_MODES:
            raise ValueError(f"class_weight_mode={class_weight_mode!r}; use one of {', '.join(CLASS_WEIGHT_MODES)}")
        for name, value in (("class_weight_max", class_weight_max), ("weight_refine_max", weight_refine_max)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (or null for no cap)")
        if any(f <= 0 for f in (class_boost or {}).values()):
            raise ValueError(f"class_boost={dict(class_boost or {})}: every factor must be > 0")
        self.epochs = epochs
        self.head_epochs = head_epochs
        self.unfreeze_request = check_unfreeze(unfreeze_k, unfreeze_fraction)
        self.unfreeze_k = 0  # top blocks trained in stage 2, resolved against the backbone in setup
        self.unfreeze_ramp = max(1, unfreeze_ramp)
        self.lr_head, self.lr_backbone, self.weight_decay = lr_head, lr_backbone, weight_decay
        self.ema_decay = ema_decay
        self.class_weighting = class_weighting
        self.weight_refine_rate = weight_refine_rate
        self.class_weight_max, self.class_weight_mode = class_weight_max, class_weight_mode
        self.weight_refine_max, self.class_boost = weight_refine_max, dict(class_boost or {})
        self.base_weights: torch.Tensor | None = None  # label-distribution weights × manual boost
        self.refine_factor: torch.Tensor | None = None  # cumulative AUC feedback per class
        self.patience = patience
        self.class_names: list[str] = []
        self.class_weights: torch.Tensor | None = None
        self.ema: ModelEmaV3 | None = None
        self.best = -math.inf
        self.bad_epochs = 0
        self.task = "classification"

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: DatasetBundle) -> None:
        self.unfreeze_k = resolve_unfreeze(self.unfreeze_request, len(model.backbone.blocks()))
        self.class_names = list(data.class_names)
        self.task = data.task
        # label-frequency weights and their AUC feedback are defined for multi-label classification;
        # dense heads get class_weights=None
        if self.class_weighting and data.task == "classification":
            unknown = sorted(set(self.class_boost) - set(self.class_names))
            if unknown:
                raise ValueError(f"class_boost names {', '.join(unknown)}, not classes of this dataset; "
                                 f"its classes: {', '.join(self.class_names)}")
            # the paper's "heuristic adjustment" of clinically significant classes: a manual factor
            boost = torch.tensor([float(self.class_boost.get(c, 1.0)) for c in self.class_names])
            self.base_weights = initial_class_weights(data.label_matrix("train"), self.class_weight_max) * boost
            self.refine_factor = torch.ones(len(self.class_names))
            self.class_weights = self.base_weights / self.base_weights.mean()
        if self.ema_decay is not None:
            self.ema = ModelEmaV3(model, decay=self.ema_decay)

    def _top_blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = list(model.backbone.blocks())
        return blocks[len(blocks) - self.unfreeze_k:] if self.unfreeze_k else []

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = [{"params": list(model.head.parameters()), "lr": self.lr_head, "name": "head"}]
        top = [p for b in self._top_blocks(model) for p in b.parameters()]
        if top:
            groups.append({"params": top, "lr": self.lr_backbone, "name": "backbone"})
        for g in groups:
            g["weight_decay"] = self.weight_decay
        return groups

    # -- per epoch -------------------------------------------------------------------------------
    def unfrozen_blocks(self, epoch: int) -> int:
        """How many top blocks train in ``epoch``: 0 in stage 1, then ramping up to k."""
        if epoch < self.head_epochs or self.unfreeze_k == 0:
            return 0
        step = epoch - self.head_epochs + 1
        return min(self.unfreeze_k, math.ceil(self.unfreeze_k * step / self.unfreeze_ramp))

    def plan(self, epoch: int, model: nn.Module) -> EpochPlan:
        n = self.unfrozen_blocks(epoch)
        blocks = list(model.backbone.blocks())
        phase = "head" if n == 0 else f"top{n}"
        return EpochPlan(phase=phase, trainable=[model.head, *(blocks[len(blocks) - n:] if n else [])])

    def loss(self, model: nn.Module, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.class_weights
        if weights is not None and self.class_weight_mode == "pos_weight":
            # per element: w on a positive, 1 on a negative — BCE's pos_weight exactly for 0/1 labels
            y = torch.nan_to_num(batch["labels"].float(), nan=0.0).to(outputs.device)
            weights = 1 + (weights.to(y) - 1) * y
        return model.head.loss(outputs, batch, class_weights=weights)

    def monitor(self) -> str:
        """Macro AUC for classification, mean Dice for segmentation, mAP@0.5 for detection."""
        return primary_metric(self.task)

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, model: nn.Module, train_step: TrainStep) -> nn.Module:
        return self.ema.module if self.ema is not None else model

    def after_epoch(self, epoch: int, model: nn.Module, val_metrics: dict[str, float]) -> bool:
        if self.class_weights is not None and self.base_weights is not None:
            aucs = [val_metrics.get(f"val/auc/{c}") for c in self.class_names]
            self.refine_factor = refine_factors(self.refine_factor, aucs, self.weight_refine_rate,
                                                self.weight_refine_max)
            w = self.base_weights * self.refine_factor
            self.class_weights = w / w.mean()
        score = val_metrics.get(self.monitor(), -math.inf)
        if score > self.best:
            self.best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"class_weights": self.class_weights, "refine_factor": self.refine_factor,
                "best": self.best, "bad_epochs": self.bad_epochs,
                "unfreeze_k": self.unfreeze_k,
                "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_weights = state["class_weights"]
        if state.get("refine_factor") is not None:
            self.refine_factor = state["refine_factor"]
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.unfreeze_k = int(state["unfreeze_k"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])


def spft(epochs: int = 10, head_epochs: int = 2, unfreeze_k: int | str = 4, unfreeze_ramp: int = 2,
         lr_head: float = 1e-3, lr_backbone: float = 3e-4, weight_decay: float = 0.05,
         ema_decay: float = 0.99, class_weighting: bool = True, weight_refine_rate: float = 0.5,
         patience: int = 7, class_weight_max: float | None = 10.0, class_weight_mode: str = "loss_scale",
         weight_refine_max: float | None = 4.0, class_boost: dict[str, float] | None = None,
         unfreeze_fraction: float | None = None) -> StagedFinetune:
    """SPFT. ``unfreeze_k``: top blocks trained in stage 2 (all or -1 = every block, 0 = linear probe);
    ``unfreeze_fraction``: instead, that share of the backbone's blocks (0.8 = RAD-DINO's top 10 of 13);
    ``unfreeze_ramp``: stage-2 epochs over which they are unfrozen one after another;
    ``ema_decay``: β of the evaluated parameter EMA; ``weight_refine_rate``: per-epoch AUC feedback;
    ``class_weight_max``: cap on a class's negatives/positives ratio (null: none); ``class_weight_mode``:
    loss_scale (the weight scales both BCE terms of its class) | pos_weight (only the positive term);
    ``weight_refine_max``: cap on the compounded AUC feedback, a factor in [1/max, max] (null: none);
    ``class_boost``: {class: factor}, a manual boost of clinically important classes."""
    return StagedFinetune(epochs, head_epochs, unfreeze_k, unfreeze_ramp, lr_head, lr_backbone,
                          weight_decay, ema_decay, class_weighting, weight_refine_rate, patience,
                          class_weight_max=class_weight_max, class_weight_mode=class_weight_mode,
                          weight_refine_max=weight_refine_max, class_boost=class_boost,
                          unfreeze_fraction=unfreeze_fraction)


def finetune(epochs: int = 10, unfreeze_k: int | str = -1, lr_head: float = 1e-3, lr_backbone: float = 3e-4,
             weight_decay: float = 0.05, patience: int | None = None,
             unfreeze_fraction: float | None = None) -> StagedFinetune:
    """Plain baseline: head + top-k blocks (all or -1 = every block, 0 = linear probe; or
    ``unfreeze_fraction`` of them) train from the first epoch, unweighted BCE, no EMA."""
    return StagedFinetune(epochs, 0, unfreeze_k, 1, lr_head, lr_backbone, weight_decay, None,
                          False, 0.0, patience, unfreeze_fraction=unfreeze_fraction)
