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
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from cxr_automl.plugin.interfaces import BackboneOutput, DatasetBundle
from cxr_automl.train.step import TrainStep

PROTOCOLS = ("probe", "finetune")


@dataclass
class Downstream:
    """``probe``: frozen encoder, head trained on cached pooled features (cheap, every epoch);
    ``finetune``: encoder and head trained end to end on the labelled images."""

    protocol: str = "probe"
    epochs: int = 10
    lr: float = 1e-3
    lr_backbone: float = 1e-5
    batch_size: int = 64
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"downstream={self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if self.epochs < 1:
            raise ValueError("downstream_epochs must be >= 1")

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
        head = clone.head
        for p in head.parameters():
            p.requires_grad_(True)
        head.train()
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        opt.zero_grad(set_to_none=True)  # a deep copy keeps any gradient the model had
        scaler = train_step.scaler()
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=gen).to(train_step.device)
            for start in range(0, len(x), self.batch_size):
                sel = order[start:start + self.batch_size]
                train_step.step(opt, scaler, lambda: head.loss(head(BackboneOutput(pooled=x[sel], features=[])),
                                                               {"labels": y[sel]}))

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
        for _ in range(self.epochs):
            for batch in loader:
                images, labels = train_step.images(batch), batch["labels"].to(train_step.device)
                train_step.step(opt, scaler, lambda: clone.head.loss(clone(images), {"labels": labels}))
