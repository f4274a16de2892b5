"""One training run: resolved config in, run directory with config, checkpoint, metrics and the
exportable best model out."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Sequence

from rich.progress import Progress

from cxr_automl.config import to_yaml
from cxr_automl.train import manifest
from cxr_automl.train.callbacks import BestModelWriter, Checkpointer, MetricsLogger, RichProgress
from cxr_automl.train.loop import Callback, Trainer


def default_run_dir(root: str | Path = "runs") -> Path:
    return Path(root) / "train" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def train(cfg: dict[str, Any], run_dir: Path, callbacks: Sequence[Callback] = (),
          progress: Progress | None = None, label: str = "") -> dict[str, float]:
    """Run (or resume) one training run in ``run_dir`` and return its final metrics."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    manifest.write(cfg, run_dir)
    cbs: list[Callback] = [Checkpointer(resume=bool(cfg.get("resume", True))), MetricsLogger(), BestModelWriter(),
                           *callbacks]
    bar = RichProgress(progress, label) if progress is not None and cfg["trainer"].get("progress", True) else None
    if bar is not None:
        cbs.append(bar)
    trainer = Trainer(cfg, run_dir, cbs)
    try:
        return trainer.fit()
    finally:
        if bar is not None:
            bar.close()
