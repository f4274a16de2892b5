"""Loop extensions that every run uses: checkpointing, metric logging and progress display."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cxr_automl.plugin.interfaces import EpochPlan
from cxr_automl.train.checkpoint import BEST_MODEL, LAST, load_latest, save_atomic, save_best_model
from cxr_automl.train.loop import Callback

if TYPE_CHECKING:
    from cxr_automl.train.loop import Trainer

log = logging.getLogger(__name__)


class Checkpointer(Callback):
    """Restores ``run_dir/last.ckpt`` when resuming; writes it atomically after every epoch."""

    def __init__(self, resume: bool = True):
        self.resume = resume
        self.resumed_from: int | None = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        if not self.resume:
            return
        state = load_latest(trainer.run_dir)
        if state is not None:
            trainer.load_state_dict(state)
            self.resumed_from = trainer.epoch
            log.info("resumed %s at epoch %d", trainer.run_dir, trainer.epoch)

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        save_atomic(trainer.state_dict(), trainer.run_dir / LAST)


class BestModelWriter(Callback):
    """After the test: the best epoch's evaluated weights as ``best_model.safetensors`` (the run's export)."""

    def on_fit_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        from cxr_automl.config import to_yaml
        state = trainer.best_state if trainer.best_state is not None else trainer.best_model().state_dict()
        save_best_model(state, trainer.run_dir / BEST_MODEL, to_yaml(trainer.cfg))


class MetricsLogger(Callback):
    """Appends each epoch's metrics to ``metrics.jsonl`` and logs a one-line summary."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        with open(Path(trainer.run_dir) / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        monitor = trainer.strategy.monitor()
        value = metrics.get(monitor)  # absent when the strategy evaluates nothing this epoch (a Lock epoch)
        shown = "not evaluated this epoch" if value is None else f"{value:.4f}"
        log.info("epoch %d  loss %.4f  %s %s  %.0f img/s", metrics["epoch"], metrics["train/loss"],
                 monitor, shown, metrics["train/images_per_s"])


def make_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=False)


class RichProgress(Callback):
    """An epoch bar and a batch bar inside a shared ``rich`` Progress (the search adds a trial bar)."""

    def __init__(self, progress: Progress, label: str = ""):
        self.progress = progress
        self.label = label
        self.epoch_task = None
        self.batch_task = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.epoch_task = self.progress.add_task(f"{self.label}epochs", total=trainer.strategy.epochs,
                                                 completed=trainer.epoch, info="")
        self.batch_task = self.progress.add_task("  batches", total=1, info="")

    def on_epoch_start(self, trainer: "Trainer", plan: EpochPlan, num_batches: int) -> None:
        self.progress.reset(self.batch_task, total=num_batches, info=f"epoch {trainer.epoch} [{plan.phase}]")

    def on_batch_end(self, trainer: "Trainer", loss: float) -> None:
        self.progress.update(self.batch_task, advance=1)

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        monitor = trainer.strategy.monitor()
        self.progress.update(self.epoch_task, completed=trainer.epoch,
                             info=f"{monitor} {metrics.get(monitor, float('nan')):.4f} (best {trainer.best_score:.4f})")

    def on_fit_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        self.close()

    def close(self) -> None:
        for task in (self.epoch_task, self.batch_task):
            if task is not None:
                self.progress.remove_task(task)
        self.epoch_task = self.batch_task = None
