"""Device placement over every strategy × head, proven without a GPU.

CPU-only CI has one real device, so a module left behind on the CPU looks placed. Two checks give it a
second device:

* **meta trainer** (the shape-only part): the trainer is built with ``meta`` as its device — a real
  device with shapes and no data — and every parameter, buffer and module the strategy keeps (an EMA,
  a teacher) must be on it after setup, and again with the optimizer state after one optimizer step
  (gradients are zeros: ``meta`` cannot run the forward). Anything a strategy creates and the loop
  does not place stays on the CPU and is reported.
* **meta default device** (the step): the trainer runs for real on the CPU, while inside the training
  forward, the losses, ``after_step`` and the evaluation's predict the *default* device is ``meta`` for
  tensors this project's code creates. On a
  GPU run the default device (CPU) differs from the trainer's (CUDA); here it is the other way round
  with the same consequence: a tensor created without ``device=`` meets the model's tensors and fails
  ("Tensor on device meta is not on the expected device cpu"). A tensor meant for the CPU (boxes
  for a matcher) says ``device="cpu"`` or takes its device from the tensors it meets.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import cxr_automl
import cxr_automl_plugins

from cxr_automl import config
from cxr_automl.plugin import compat, registry
from cxr_automl.train import loop
from cxr_automl.train.loop import Trainer
from cxr_automl.train.model import CXRModel
from cxr_automl.train.runtime import apply_plan

#: the production architectures at toy sizes (as in test_matrix)
SMALL = {"mlp": ["head.hidden=16"], "upernet": ["head.hidden=16"], "unet": ["head.width=16"],
         "yolov8": ["head.width=16"],
         "sam2": ["head.hidden=32", "head.heads=4", "head.mlp_dim=64"],
         "dino": ["head.hidden=32", "head.heads=4", "head.num_queries=20", "head.num_denoising=10",
                  "head.decoder_layers=2", "head.encoder_ffn=64", "head.decoder_ffn=64"]}
BASE = ["backbone=resnet_tiny", "backbone.width=8", "backbone.image_size=64", "dataset.image_size=64",
        "dataset.n_train=8", "dataset.n_val=4", "dataset.n_test=4", "trainer.batch_size=4",
        "trainer.eval_batch_size=4", "trainer.num_workers=0", "trainer.progress=false"]
#: per strategy: a one- or two-epoch run; lock_release on one dataset with all three tasks (its cls
#: head is the configured one, its loc/seg parts come from its own dino/upernet configs)
STRATEGY = {
    "spft": ["strategy.epochs=2", "strategy.head_epochs=1", "strategy.unfreeze_ramp=1"],
    "finetune": ["strategy.epochs=1"],
    "mlvicx": ["strategy.epochs=1", "strategy.expander_dim=16", "strategy.downstream_epochs=1",
               "strategy.downstream_batch_size=4"],
    "lock_release": ["strategy.datasets=[{name: heart, tasks: [cls, loc, seg], structure: heart}]",
                     "strategy.offload=false"],
}


def _cells() -> list[tuple[str, str]]:
    """Built-in strategy × head pairs that the compatibility checks accept on resnet_tiny; a strategy
    whose head is a template (it builds per-task parts itself) takes classification heads."""
    cells = []
    for strategy in STRATEGY:
        template = getattr(compat._returned_class("strategy", strategy), "head_is_template", False)
        pretrains = strategy == "mlvicx"  # its downstream evaluation is a classification probe
        for head, info in registry.available("head").items():
            task = compat.head_task(head)
            if info.distribution != "cxr-automl" or ((template or pretrains) and task != "classification"):
                continue
            if compat.check_config(config.compose(_overrides(strategy, head))) is None:
                cells.append((strategy, head))
    return cells


def _overrides(strategy: str, head: str) -> list[str]:
    return [*BASE, f"strategy={strategy}", f"head={head}", f"dataset.task={compat.head_task(head)}",
            *STRATEGY[strategy], *SMALL.get(head, [])]


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Same device, a missing index meaning the current one (``cuda`` is ``cuda:0`` on one GPU)."""
    if tensor.device.type != device.type:
        return False
    if device.type != "cuda" or device.index is None or tensor.device.index is None:
        return True
    return tensor.device.index == device.index


def _module_tensors(prefix: str, module: nn.Module):
    for name, t in module.named_parameters(prefix, remove_duplicate=False):
        yield name, t
    for name, t in module.named_buffers(prefix, remove_duplicate=False):
        yield name, t


def misplaced(trainer: Trainer) -> list[str]:
    """Every parameter, buffer, module held by the strategy (EMA, teacher, copies) and optimizer
    moment that is not on the trainer's device. The optimizer's scalar ``step`` counters stay on the
    CPU by PyTorch's design (unless capturable/fused) and are not counted."""
    device, found = trainer.device, []
    tensors = list(_module_tensors("model", trainer.model))
    for attr, value in vars(trainer.strategy).items():
        if isinstance(value, nn.Module):
            tensors += list(_module_tensors(f"strategy.{attr}", value))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for p, state in trainer.optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors.append((f"optimizer.state[{names.get(id(p), '?')}][{key}]", value))
    for name, t in tensors:
        if not _on(t, device):
            found.append(f"{name} on {t.device}")
    return found


def _report(found: list[str], when: str) -> str:
    return f"{len(found)} tensor(s) not on the trainer's device {when}: " + "; ".join(found[:6])


@pytest.mark.slow
@pytest.mark.parametrize("strategy,head", _cells())
def test_everything_a_strategy_and_head_create_is_on_the_trainers_device(strategy, head, tmp_path, monkeypatch):
    cfg = config.compose(_overrides(strategy, head))

    # 1) meta trainer: placement after setup and after one optimizer step
    with monkeypatch.context() as m:
        m.setattr(loop, "resolve_device", lambda spec: torch.device("meta"))
        meta = Trainer(cfg, tmp_path / "meta")
    found = misplaced(meta)
    assert not found, _report(found, "after setup")
    plan = meta.strategy.plan(0, meta.model)
    apply_plan(meta.model, plan)
    for p in meta.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    meta.optimizer_step()  # optimizer moments are created; after_step (an EMA update) runs
    found = misplaced(meta)
    assert meta.optimizer.state and not found, _report(found, "after an optimizer step")

    # 2) a real CPU run in which our code's tensors created without a device land on meta
    trainer = Trainer(cfg, tmp_path / "cpu")
    for cls, name in ((CXRModel, "forward"), (type(trainer.model.head), "loss")):
        if hasattr(cls, name):  # a strategy's own head container may have no loss (the strategy computes it)
            monkeypatch.setattr(cls, name, _project_default_meta(getattr(cls, name)))  # class-level: copies too
    for name in ("forward", "loss", "after_step"):
        setattr(trainer.strategy, name, _project_default_meta(getattr(trainer.strategy, name)))
    trainer._head_predict = _project_default_meta(trainer._head_predict)
    metrics = trainer.fit()
    assert trainer.step > 0 and metrics
    found = misplaced(trainer)
    assert not found, _report(found, "after training and testing")


#: where "our code" lives: the core and the built-in plugins
PROJECT = tuple(str(Path(m.__file__).parent) + os.sep for m in (cxr_automl, cxr_automl_plugins))
TORCH = str(Path(torch.__file__).parent) + os.sep


class ProjectFactoriesOnMeta(TorchFunctionMode):
    """``torch.device("meta")`` as the default device, for tensor factories called from this project's
    code only (the first caller outside torch decides). Libraries' own CPU-side tensors (torchvision's
    random augmentation parameters, a loss module transformers builds and then moves) are left alone:
    the rule checked is that *our* code names the device of what it creates during a step."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and _from_project():
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def _from_project() -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PROJECT)


def _project_default_meta(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with ProjectFactoriesOnMeta():
            return fn(*args, **kwargs)
    return wrapped


def test_the_check_sees_a_module_the_loop_did_not_place(tmp_path, monkeypatch):
    """The walk itself: a module a strategy keeps and nobody moves is reported."""
    cfg = config.compose(_overrides("finetune", "linear"))
    monkeypatch.setattr(loop, "resolve_device", lambda spec: torch.device("meta"))
    meta = Trainer(cfg, tmp_path)
    meta.strategy.stray = nn.Linear(2, 2)
    assert misplaced(meta) == ["strategy.stray.weight on cpu", "strategy.stray.bias on cpu"]
