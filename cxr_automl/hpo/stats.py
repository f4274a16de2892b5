"""Error bars for comparing studies: bootstrap CIs and a paired bootstrap on the same test images.

Both resample the test images of a best trial's ``predictions.csv`` (what the classification evaluator
writes: ``label:C``/``prob:C`` columns) with SciPy's bootstrap (percentile intervals, fixed seed).
The statistic is the macro ROC AUC over the classes a resample has both labels of — the same rule
as the run's own metric. The paired test resamples the images two trials share, jointly, and reports
the CI of the AUC difference and a two-sided bootstrap p-value.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

N_RESAMPLES = 1000
SEED = 0


@dataclass
class Predictions:
    ids: list[str]
    classes: list[str]
    labels: np.ndarray  # (N, C), NaN = unknown
    probs: np.ndarray  # (N, C)

    def subset(self, ids: list[str]) -> "Predictions":
        where = {i: n for n, i in enumerate(self.ids)}
        rows = [where[i] for i in ids]
        return Predictions(list(ids), self.classes, self.labels[rows], self.probs[rows])


def load(run_dir: str | Path) -> Predictions | None:
    """A classification run's test predictions, or None (no file, or another task's file)."""
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0] if rows else []
    classes = [h[len("label:"):] for h in header if h.startswith("label:")]
    if not classes or len(rows) < 2:
        return None
    lab = [header.index(f"label:{c}") for c in classes]
    prob = [header.index(f"prob:{c}") for c in classes]
    labels = np.array([[float(r[i]) if r[i] != "" else np.nan for i in lab] for r in rows[1:]])
    probs = np.array([[float(r[i]) for i in prob] for r in rows[1:]])
    return Predictions([r[0] for r in rows[1:]], classes, labels, probs)


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    aucs = []
    for c in range(labels.shape[1]):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c]
        if y.size and y.min() != y.max():
            aucs.append(roc_auc_score(y, probs[known, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


@dataclass
class Interval:
    value: float
    low: float
    high: float
    n: int


def bootstrap_ci(pred: Predictions, confidence: float = 0.95) -> Interval:
    idx = np.arange(len(pred.ids))
    res = sps.bootstrap((idx,), lambda i: macro_auc(pred.labels[i], pred.probs[i]), vectorized=False,
                        n_resamples=N_RESAMPLES, confidence_level=confidence, method="percentile",
                        random_state=np.random.default_rng(SEED))
    return Interval(macro_auc(pred.labels, pred.probs), float(res.confidence_interval.low),
                    float(res.confidence_interval.high), len(idx))


@dataclass
class Paired:
    difference: float  # a - b on the shared images
    low: float
    high: float
    p_value: float
    n: int


def paired_bootstrap(a: Predictions, b: Predictions, confidence: float = 0.95) -> Paired | None:
    """Macro AUC of ``a`` minus ``b`` on the test images both predicted (None if they share < 10)."""
    shared = sorted(set(a.ids) & set(b.ids))
    if len(shared) < 10 or a.classes != b.classes:
        return None
    a, b = a.subset(shared), b.subset(shared)

    def diff(i: np.ndarray) -> float:
        return macro_auc(a.labels[i], a.probs[i]) - macro_auc(b.labels[i], b.probs[i])
    idx = np.arange(len(shared))
    res = sps.bootstrap((idx,), diff, vectorized=False, n_resamples=N_RESAMPLES, confidence_level=confidence,
                        method="percentile", random_state=np.random.default_rng(SEED))
    dist = res.bootstrap_distribution[~np.isnan(res.bootstrap_distribution)]
    p = min(1.0, 2 * min(float(np.mean(dist <= 0)), float(np.mean(dist >= 0)))) if dist.size else float("nan")
    return Paired(diff(idx), float(res.confidence_interval.low), float(res.confidence_interval.high), p, len(shared))
