"""The ``trainer`` config section and the small pieces the loop needs (device, precision, schedule)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cxr_automl.errors import TrainingError, UserError
from cxr_automl.plugin.interfaces import EpochPlan, iter_params


class NonFiniteLossError(TrainingError):
    """The loss became NaN/inf; the run (or trial) fails with this message."""


class TrainerConfigError(UserError):
    pass


@dataclass
class TrainerConfig:
    """Keys of the ``trainer`` section (see README, "trainer options")."""

    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int | str = "auto"  # auto: from the SLURM allocation / CPU count when on a GPU
    pin_memory: bool | None = None  # None: on when training on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16 | 16
    accumulate: int = 1
    grad_clip: float | None = None
    scheduler: str = "cosine"  # cosine | linear | step | constant
    warmup_epochs: float = 0.0
    step_epochs: int = 30  # step decay period
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0
    channels_last: bool = False
    compile: bool = False  # torch.compile the backbone; falls back to eager with a warning
    seed: int = 0
    deterministic: bool = False
    progress: bool = True
    #: extra IoU thresholds at which detection runs report mAP (``map_<100·t>``), besides COCO's 0.50 and
    #: 0.50:0.95 (default: also mAP@0.40, the threshold CXR localization benchmarks report)
    map_iou_thresholds: tuple[float, ...] = (0.4,)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainerConfigError(f"unknown trainer option {', '.join(unknown)}; options: {', '.join(sorted(names))}")
        tc = cls(**d)
        tc.precision = str(tc.precision)
        if tc.precision not in ("32", "bf16", "16"):
            raise TrainerConfigError(f"trainer.precision={tc.precision!r}; use 32, bf16 or 16")
        if tc.scheduler not in ("cosine", "linear", "step", "constant"):
            raise TrainerConfigError(f"trainer.scheduler={tc.scheduler!r}; use cosine, linear, step or constant")
        if tc.accumulate < 1 or tc.batch_size < 1:
            raise TrainerConfigError("trainer.batch_size and trainer.accumulate must be >= 1")
        if tc.num_workers != "auto" and not (isinstance(tc.num_workers, int) and tc.num_workers >= 0):
            raise TrainerConfigError(f"trainer.num_workers={tc.num_workers!r}; use auto or an integer >= 0")
        return tc

    def workers(self) -> int:
        """``auto``: under SLURM, the task's CPUs minus one (capped at 8); on a GPU without SLURM, the
        CPUs this process may use (its affinity: a local worker's share) minus one; on a CPU-only run 0
        (worker processes only compete with the model)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if slurm_cpus:
            return max(0, min(8, int(slurm_cpus) - 1))
        if self.device != "cpu" and torch.cuda.is_available():
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            return max(0, min(8, cpus - 1))
        return 0

    def loader_kwargs(self) -> dict[str, Any]:
        pin = self.pin_memory if self.pin_memory is not None else torch.cuda.is_available() and self.device != "cpu"
        workers = self.workers()
        kw: dict[str, Any] = {"num_workers": workers, "pin_memory": pin}
        if workers > 0:
            kw["prefetch_factor"] = 4
        return kw


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainerConfigError(f"trainer.device={spec} but no CUDA device is visible; "
                                     "use trainer.device=auto or cpu")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise TrainerConfigError(f"trainer.device={spec} but only {torch.cuda.device_count()} GPU(s)")
    elif spec != "cpu":
        raise TrainerConfigError(f"trainer.device={spec!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(spec)


def move_held_modules(owner: object, device: torch.device, channels_last: bool = False) -> None:
    """Move every ``nn.Module`` that ``owner`` holds as an attribute to ``device`` (and channels-last).

    A strategy's ``setup`` runs before the model is placed, so what it builds from the model there (an
    EMA copy, a frozen reference) is on the CPU; the loop calls this before ``Strategy.to_device``,
    which still has the last word on where things live.
    """
    for value in vars(owner).values():
        if isinstance(value, nn.Module):
            value.to(device)
            if channels_last:
                value.to(memory_format=torch.channels_last)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "16" and device.type != "cuda":
        raise TrainerConfigError("trainer.precision=16 needs a CUDA device; use trainer.precision=bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls; costs some GPU speed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def fit_threads_to_allocation() -> None:
    """Under SLURM, use as many intra-op threads as the task has CPUs, not one per core of the node.

    Called once when a trainer is built. Without it, tasks sharing a node (an array of workers, or
    other users' jobs) each start a thread per core and slow each other down.
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and 0 < int(cpus) < torch.get_num_threads():
        torch.set_num_threads(int(cpus))


def lr_factor(tc: TrainerConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """The LR factor at each optimizer step: linear warmup, then cosine / linear / step decay / constant."""
    if tc.scheduler == "step" and tc.step_epochs >= epochs:
        logging.getLogger(__name__).warning(
            "trainer.scheduler=step with trainer.step_epochs=%d never decays in this run's %d epochs; "
            "set trainer.step_epochs below %d", tc.step_epochs, epochs, epochs)
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(tc.warmup_epochs * steps_per_epoch))
    floor = tc.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if tc.scheduler == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if tc.scheduler == "linear":
            return floor + (1 - floor) * (1 - t)
        if tc.scheduler == "step":
            return tc.step_gamma ** (step // max(1, tc.step_epochs * steps_per_epoch))
        return 1.0

    return factor


class LRSchedule:
    """Sets every parameter group's ``lr`` to its initial lr × ``factor(position)``: the schedule is one
    function of the optimizer-step position (as nanoGPT's ``get_lr``), so resuming or skipping to a
    position is setting it. The initial lr is kept in the group (``initial_lr``, as torch's schedulers
    do), so it travels with the optimizer's state dict."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]):
        self.optimizer, self.factor, self.position = optimizer, factor, 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.set(0)

    def set(self, position: int) -> None:
        """Move to optimizer step ``position`` (0-based) of the whole run."""
        self.position = int(position)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.factor(self.position)

    def step(self) -> None:
        self.set(self.position + 1)

    @property
    def last_epoch(self) -> int:
        """The position under the name torch's schedulers give it (their "epoch" is a step here)."""
        return self.position

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints written with torch's LambdaLR hold its ``last_epoch``: the same position
        self.position = int(state["position"] if "position" in state else state["last_epoch"])


def make_scheduler(opt: torch.optim.Optimizer, tc: TrainerConfig, steps_per_epoch: int, epochs: int) -> LRSchedule:
    """The run's LR schedule over ``opt`` (see ``lr_factor``)."""
    return LRSchedule(opt, lr_factor(tc, steps_per_epoch, epochs))


def maybe_compile(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.compile ``module`` and try it once on ``example``; on any failure warn and stay eager."""
    try:
        compiled = torch.compile(module)
        with torch.no_grad():
            compiled(example)
        return compiled  # type: ignore[return-value]
    except Exception as exc:  # unsupported platform, missing compiler, graph break errors...
        warnings.warn(f"trainer.compile=true: torch.compile failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); running eagerly", stacklevel=2)
        return module


def apply_plan(model: nn.Module, plan: EpochPlan) -> None:
    """Freeze everything but ``plan.trainable``; frozen backbone blocks go to eval mode (BatchNorm)."""
    trainable = {id(p) for p in iter_params(plan.trainable)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    if model.training:
        for block in model.backbone.blocks():
            if not any(p.requires_grad for p in block.parameters()):
                block.eval()
