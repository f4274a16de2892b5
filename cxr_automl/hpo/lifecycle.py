"""What a search keeps on disk: bounded by ``--keep-best K``, not by the number of trials.

- a running (or interrupted, re-enqueued) trial keeps ``last.ckpt``/``previous.ckpt``: resume needs them;
- a finished trial keeps its metrics, predictions, config and logs, never its resume files;
- of the complete trials, only the best K (by the searched metric) keep ``best_model.safetensors``;
- pruned and failed trials keep no weights at all.

Safe with many workers: a trial that has fallen out of the best K can never re-enter it (new trials
only push it further down), so a worker deleting on a stale view deletes nothing another still needs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from cxr_automl.train.checkpoint import BEST_MODEL, RESUME_FILES

log = logging.getLogger(__name__)

DEFAULT_KEEP_BEST = 3


def _remove(run_dir: Path, names: tuple[str, ...]) -> int:
    freed = 0
    for name in names:
        path = run_dir / name
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
    return freed


def ranked(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """Complete trials, best first by the (first) objective."""
    trials = trials if trials is not None else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: t.values[0], reverse=maximize)


def tidy(study: optuna.Study, trial_number: int, keep_best: int | None = None) -> int:
    """After ``trial_number`` ended: drop what its state no longer needs, then trim best models to the
    study's best K. Returns the bytes freed."""
    k = int(study.user_attrs.get("keep_best", DEFAULT_KEEP_BEST) if keep_best is None else keep_best)
    trials = study.get_trials(deepcopy=False)
    trial = trials[trial_number]
    run_dir = trial.user_attrs.get("run_dir")
    freed = 0
    if run_dir and trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        resumable = trial.state == TrialState.FAIL and str(trial.user_attrs.get("fail_reason", "")).startswith("interrupted")
        if not resumable:
            freed += _remove(Path(run_dir), RESUME_FILES)
        if trial.state != TrialState.COMPLETE:
            freed += _remove(Path(run_dir), (BEST_MODEL,))
    for t in ranked(study, trials)[k:]:
        if t.user_attrs.get("run_dir"):
            freed += _remove(Path(t.user_attrs["run_dir"]), (BEST_MODEL,))
    return freed


def best_model_path(trial: FrozenTrial) -> Path | None:
    path = Path(trial.user_attrs.get("run_dir") or ".") / BEST_MODEL
    return path if trial.user_attrs.get("run_dir") and path.is_file() else None


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes under a study's runs folder, and how many of them are weight files."""
    total = weights = n_weights = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                size = os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            total += size
            if name.endswith((".ckpt", ".safetensors", ".pt")):
                weights += size
                n_weights += 1
    return {"bytes": total, "weight_bytes": weights, "weight_files": n_weights}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
