"""What a trial cost, recorded as user attrs so a study can search on it (``--objective``, ``--max-cost``).

- ``cost/wall_s``: seconds the trial trained, summed over resumed attempts (kept in ``cost.json``);
- ``cost/device_s``: devices × seconds (one device per trial; a CPU run counts as one device);
- ``cost/peak_mem_mb``: CUDA peak allocated memory on CUDA, else the process's peak resident set;
- ``cost/params``: parameters of the model; ``cost/images_per_s``: training throughput (epoch mean).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cxr_automl.train.loop import Callback

if TYPE_CHECKING:
    from cxr_automl.train.loop import Trainer

KEYS = ("cost/wall_s", "cost/device_s", "cost/peak_mem_mb", "cost/params", "cost/images_per_s")
FILE = "cost.json"
#: the trainer places a trial on one device (the loop is single-device)
DEVICES_PER_TRIAL = 1


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 1024)


class CostMeter(Callback):
    """Measures one run; ``costs`` holds the ``cost/*`` values once an epoch (or the fit) ended."""

    def __init__(self) -> None:
        self.costs: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._before = 0.0

    def on_fit_start(self, trainer: "Trainer") -> None:
        path = Path(trainer.run_dir) / FILE
        if path.is_file() and trainer.epoch > 0:  # resumed: count the earlier attempts too
            self._before = float(json.loads(path.read_text()).get("cost/wall_s", 0.0))
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self._t0 = time.perf_counter()

    def _update(self, trainer: "Trainer") -> None:
        wall = self._before + time.perf_counter() - self._t0
        rates = [h["train/images_per_s"] for h in trainer.history if "train/images_per_s" in h]
        self.costs = {"cost/wall_s": wall, "cost/device_s": wall * DEVICES_PER_TRIAL,
                      "cost/peak_mem_mb": peak_memory_mb(trainer.device),
                      "cost/params": float(sum(p.numel() for p in trainer.model.parameters())),
                      "cost/images_per_s": sum(rates) / len(rates) if rates else 0.0}
        (Path(trainer.run_dir) / FILE).write_text(json.dumps(self.costs, indent=2))

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        self._update(trainer)

    def on_fit_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        self._update(trainer)


def constraint(max_cost: dict[str, float]):
    """Optuna's ``constraints_func``: one value per limit, feasible when <= 0; a trial that recorded no
    cost (failed before training) counts as feasible, Optuna ignores failed trials anyway."""
    def constraints(trial: Any) -> list[float]:
        return [float(trial.user_attrs.get(key, 0.0)) - limit for key, limit in max_cost.items()]
    return constraints


def parse_max_cost(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``3600`` (device-seconds) or ``cost/peak_mem_mb=20000`` (repeatable)."""
    from cxr_automl.errors import UserError
    out = {}
    for item in items:
        key, _, value = item.rpartition("=") if "=" in item else ("cost/device_s", "", item)
        key = key if key.startswith("cost/") else f"cost/{key}"
        try:
            if key not in KEYS:
                raise KeyError
            out[key] = float(value)
        except (KeyError, ValueError):
            raise UserError(f"--max-cost {item!r}: use DEVICE_SECONDS or KEY=VALUE with KEY one of "
                            f"{', '.join(KEYS)}") from None
    return out
