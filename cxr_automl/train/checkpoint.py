"""Atomic checkpoints and RNG state, loaded with weights-only unpickling; the exportable best model.

A run directory holds ``last.ckpt`` (+ ``previous.ckpt``) while it trains: everything resume needs
(model, optimizer, schedule, EMA/teacher, RNG and the best epoch's weights). When it ends it writes
``best_model.safetensors``: the best epoch's evaluated weights alone, with the resolved config in the
file's metadata (and ``config.yaml`` beside it) — the one file to export. A search deletes the resume
files of finished trials and keeps best models for its best K trials only (``hpo.lifecycle``).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_automl.errors import UserError

log = logging.getLogger(__name__)

LAST, PREVIOUS = "last.ckpt", "previous.ckpt"
BEST_MODEL = "best_model.safetensors"
#: what resume needs; a finished trial of a search no longer does
RESUME_FILES = (LAST, PREVIOUS)


class CheckpointError(UserError):
    pass


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, in a form weights-only loading accepts (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, gauss = state["python"][1], state["python"][2]
    random.setstate((version, tuple(state["python"][0]), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target.

    The previous ``last.ckpt`` is kept as ``previous.ckpt`` so a checkpoint truncated by a crash
    (on a file system that does not honour rename atomicity) still leaves one good file.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if path.exists():
        os.replace(path, path.with_name(PREVIOUS))
    os.replace(tmp, path)


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run directory, or None if it has none."""
    for name in (LAST, PREVIOUS):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or corrupt: fall back to the previous one
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                        path, type(exc).__name__, exc)
    if (Path(run_dir) / LAST).exists():
        raise CheckpointError(f"no readable checkpoint in {run_dir}; delete it to start over")
    return None


def save_best_model(state: dict[str, torch.Tensor], path: Path, config_yaml: str) -> None:
    """The best epoch's weights as one safetensors file (no pickle: safe to load from anywhere); tensors
    are cloned so weights tied in the module (shared storage) are stored independently."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    save_file(tensors, str(tmp), metadata={"format": "pt", "config": config_yaml})
    os.replace(tmp, path)


def load_best_model(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, config YAML) of a ``best_model.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as fh:
        config_yaml = (fh.metadata() or {}).get("config", "")
    return load_file(str(path)), config_yaml
