"""One training step as every training inside a run takes it, and the run's DataLoaders.

The loop (``Trainer.train_epoch``) and whatever a strategy trains during the run — a pretraining strategy's downstream
probe and fine-tune — take their steps through one ``TrainStep``, so ``trainer.precision`` (autocast,
the fp16 loss scaler), ``trainer.grad_clip`` and the loader settings (``num_workers``, ``pin_memory``)
mean the same everywhere. What only the loop does (gradient accumulation over micro-batches, the LR
schedule, ``after_step``) stays in the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from cxr_automl.train.runtime import TrainerConfig, autocast_context


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack what stacks (images, labels, masks); keep per-image lists otherwise (boxes, ids)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if torch.is_tensor(values[0]) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


@dataclass(frozen=True)
class TrainStep:
    """The run's device and ``trainer`` settings, applied to one step: ``step(optimizer, scaler,
    compute)`` is forward and loss under autocast, backward, clipping, optimizer step."""

    tc: TrainerConfig
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's precision: a no-op for 32, bf16/fp16 autocast otherwise."""
        return autocast_context(self.device, self.tc.precision)

    def scaler(self) -> torch.amp.GradScaler:
        """A fresh loss scaler: active only for ``precision=16``, otherwise a pass-through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.tc.precision == "16")

    def loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        """A DataLoader with the run's ``num_workers``/``pin_memory`` and the loop's collate;
        ``kwargs`` (shuffle, sampler, generator, drop_last...) go to the DataLoader."""
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, **self.tc.loader_kwargs(), **kwargs)

    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's images on the device, channels-last where the run asks for it."""
        images = batch["image"].to(self.device, non_blocking=True)
        if self.tc.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler, accumulate: int = 1) -> None:
        """Gradients of ``loss / accumulate`` (scaled for fp16), added to those already there."""
        scaler.scale(loss / accumulate).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Clip the gradients of the optimizer's parameters to ``trainer.grad_clip`` (after unscaling),
        step, update the scaler, and clear the gradients."""
        if self.tc.grad_clip:
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One whole step: ``compute()`` (forward and loss) under autocast, backward, clipped optimizer
        step. Returns the (detached) loss."""
        with self.autocast():
            loss = compute()
        self.backward(loss, scaler)
        self.optimizer_step(optimizer, scaler)
        return loss.detach()
