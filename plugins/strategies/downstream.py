"""Downstream evaluation of a (self-supervised) encoder: linear probe or fine-tuning on labelled images.

Used by pretraining strategies inside ``Strategy.eval_model``: it returns a trained *copy* of the
model (backbone + the configured head), which the loop then evaluates on validation/test like any
classifier, so ``val/macro_auc`` is the downstream AUC and feeds best-epoch selection and Optuna.
It trains with the run's ``TrainStep`` (``cxr_automl/train/step.py``), the loop's own step: the
``trainer`` section's precision, gradient clipping and loader settings apply here as in the loop.
The labelled images are the training rows with at least one known label — with
``dataset.label_fraction`` that is the 1/10/30/100 % protocol, while pretraining sees every image.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from cxr_automl.plugin.interfaces import BackboneOutput, DatasetBundle
from cxr_automl.train.metrics import classification_metrics
from cxr_automl.train.step import TrainStep

PROTOCOLS = ("probe", "finetune")


@dataclass
class Downstream:
    """``probe``: frozen encoder, head trained on cached pooled features (cheap, every epoch);
    ``finetune``: encoder and head trained end to end on the labelled images.

    ``patience`` > 0: early stopping on the validation macro AUC after every downstream epoch — stop
    after ``patience`` epochs without a better one and keep the best epoch's weights (the MLVICX paper,
    Sec. IV-B: patience 10 in all downstream tasks). 0 trains all ``epochs``. A validation split
    without any class that has both positives and negatives has no AUC: then every epoch is trained.
    """

    protocol: str = "probe"
    epochs: int = 10
    lr: float = 1e-3
    lr_backbone: float = 1e-5
    batch_size: int = 64
    weight_decay: float = 0.0
    patience: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"downstream={self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if self.epochs < 1:
            raise ValueError("downstream_epochs must be >= 1")
        if self.patience < 0:
            raise ValueError("downstream_patience must be >= 0 (0: no early stopping)")

    def fit(self, model: nn.Module, data: DatasetBundle, train_step: TrainStep, seed: int,
            drop: tuple[str, ...] = ()) -> nn.Module:
        """A trained copy of ``model`` without the submodules named in ``drop`` (the pretraining parts).

        Every step is the run's ``train_step`` (autocast at ``trainer.precision``, the fp16 loss scaler,
        ``trainer.grad_clip``) and the labelled images come through its loader (``num_workers``,
        ``pin_memory``). Runs under ``torch.enable_grad`` because the loop may ask for the evaluated
        model inside ``torch.no_grad``. Shuffling uses its own generator seeded by ``seed``."""
        if getattr(model.head, "task", "classification") != "classification":
            raise ValueError("downstream evaluation trains a classification head; choose head=linear or mlp")
        labels = data.label_matrix("train")
        labelled = torch.nonzero(~torch.isnan(labels).all(dim=1)).flatten().tolist()
        if not labelled:
            raise ValueError("no labelled training images for the downstream evaluation; "
                             "raise dataset.label_fraction")
        keep = {k: v for k, v in model._modules.items() if k not in drop}
        shell, model._modules = model._modules, keep  # copy without the pretraining parts
        try:
            clone = copy.deepcopy(model)
        finally:
            model._modules = shell
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            if self.protocol == "probe":
                self._probe(clone, data, labelled, train_step, gen)
            else:
                self._finetune(clone, data, labelled, train_step, gen)
        clone.eval()
        return clone

    def _loader(self, data: DatasetBundle, idx: list[int], train_step: TrainStep, shuffle: bool,
                gen: torch.Generator) -> DataLoader:
        # not persistent_workers: a loader per pass keeps the generator's draws (shuffle order and
        # worker seeds) the same whatever trainer.num_workers is
        return train_step.loader(Subset(data.train, idx), self.batch_size, shuffle=shuffle, generator=gen)

    def _probe(self, clone: nn.Module, data: DatasetBundle, idx: list[int], train_step: TrainStep,
               gen: torch.Generator) -> None:
        for p in clone.parameters():
            p.requires_grad_(False)
        clone.eval()
        feats, ys = [], []
        with torch.no_grad(), train_step.autocast():  # the encoder is frozen: its pooled features are computed once
            for batch in self._loader(data, idx, train_step, False, gen):
                feats.append(clone.features(train_step.images(batch)).pooled.float())
                ys.append(batch["labels"].to(train_step.device))
        x, y = torch.cat(feats), torch.cat(ys)
        val_x = val_y = None
        if self.patience:  # the frozen encoder's validation features, also computed once
            with torch.no_grad(), train_step.autocast():
                batches = list(self._val_loader(data, train_step))
                val_x = torch.cat([clone.features(train_step.images(b)).pooled.float() for b in batches])
                val_y = torch.cat([b["labels"] for b in batches])
        head = clone.head
        for p in head.parameters():
            p.requires_grad_(True)
        head.train()
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        opt.zero_grad(set_to_none=True)  # a deep copy keeps any gradient the model had
        scaler = train_step.scaler()
        stopper = _EarlyStop(self.patience)
        for _ in range(self.epochs):
            head.train()
            order = torch.randperm(len(x), generator=gen).to(train_step.device)
            for start in range(0, len(x), self.batch_size):
                sel = order[start:start + self.batch_size]
                train_step.step(opt, scaler, lambda: head.loss(head(BackboneOutput(pooled=x[sel], features=[])),
                                                               {"labels": y[sel]}))
            if val_x is not None:
                head.eval()
                with torch.no_grad():
                    probs = head.predict(head(BackboneOutput(pooled=val_x, features=[])))
                if stopper.update(_macro_auc(probs, val_y, data.class_names), head):
                    break
        stopper.restore(head)

    def _finetune(self, clone: nn.Module, data: DatasetBundle, idx: list[int], train_step: TrainStep,
                  gen: torch.Generator) -> None:
        for p in clone.parameters():
            p.requires_grad_(True)
        clone.train()
        opt = torch.optim.AdamW([
            {"params": list(clone.head.parameters()), "lr": self.lr},
            {"params": list(clone.backbone.parameters()), "lr": self.lr_backbone},
        ], weight_decay=self.weight_decay)
        opt.zero_grad(set_to_none=True)  # a deep copy keeps any gradient the model had
        scaler = train_step.scaler()
        loader = self._loader(data, idx, train_step, True, gen)
        stopper = _EarlyStop(self.patience)
        for _ in range(self.epochs):
            clone.train()
            for batch in loader:
                images, labels = train_step.images(batch), batch["labels"].to(train_step.device)
                train_step.step(opt, scaler, lambda: clone.head.loss(clone(images), {"labels": labels}))
            if self.patience:
                clone.eval()
                probs, labels = [], []
                with torch.no_grad(), train_step.autocast():
                    for b in self._val_loader(data, train_step):
                        probs.append(clone.head.predict(clone(train_step.images(b))))
                        labels.append(b["labels"])
                if stopper.update(_macro_auc(torch.cat(probs), torch.cat(labels), data.class_names), clone):
                    break
        stopper.restore(clone)

    def _val_loader(self, data: DatasetBundle, train_step: TrainStep) -> DataLoader:
        return train_step.loader(data.val, self.batch_size, shuffle=False)


def _macro_auc(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> float | None:
    """Validation macro AUC of a downstream fit (None where no class has both outcomes in val)."""
    metrics_log = logging.getLogger("cxr_automl.train.metrics")
    metrics_log.disabled = True  # its missing-class warning once per downstream epoch would flood the log
    try:
        out, _ = classification_metrics(probs.float().cpu().numpy(), labels.float().cpu().numpy(), class_names, "val")
    finally:
        metrics_log.disabled = False
    return out.get("val/macro_auc")


class _EarlyStop:
    """Best score, its weights, and epochs since (for ``Downstream.patience``)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.since, self.state = patience, -float("inf"), 0, None

    def update(self, score: float | None, module: nn.Module) -> bool:
        """Record one epoch's score; True when training should stop."""
        if score is None:
            return False
        if score > self.best:
            self.best, self.since = score, 0
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return False
        self.since += 1
        return self.since >= self.patience

    def restore(self, module: nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)
