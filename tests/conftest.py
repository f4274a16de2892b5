"""Shared fixtures: offline, a private dataset cache, and a tiny real configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("YOLO_OFFLINE", "1")

#: a real but small run: the production components at toy sizes
TINY = [
    "dataset.n_train=96", "dataset.n_val=48", "dataset.n_test=48", "dataset.image_size=64",
    "backbone.width=8", "backbone.image_size=64", "head.hidden=32",
    "strategy.epochs=3", "trainer.batch_size=16", "trainer.progress=false",
]

CLI = [sys.executable, "-m", "cxr_automl.cli"]

#: a small search space the multi-worker tests (local, PostgreSQL, SLURM) share
WORKER_SPACE = """\
metric: val/macro_auc
overrides: [strategy=spft]
params:
  strategy.unfreeze_k: range(0, 4)
  strategy.lr_backbone: tag(log, interval(1.0e-4, 1.0e-2))
baselines:
  default: {}
"""


@pytest.fixture(scope="session", autouse=True)
def dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    os.environ["CXR_AUTOML_CACHE"] = str(cache)
    return cache


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty working directory (runs/ is written relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def same_backbone_outputs(a, b, size: int) -> None:
    """Two backbones give identical pooled embeddings and maps on the same random batch."""
    import torch
    a.eval(), b.eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    torch.testing.assert_close(oa.pooled, ob.pooled)
    for fa, fb in zip(oa.features, ob.features, strict=True):
        torch.testing.assert_close(fa, fb)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([*CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cxr-automl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
