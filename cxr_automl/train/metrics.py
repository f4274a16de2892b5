"""Task metrics (scikit-learn implementations)."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import roc_auc_score

log = logging.getLogger(__name__)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                           prefix: str) -> tuple[dict[str, float], list[str]]:
    """Per-class and macro ROC AUC.

    A class whose split has no positives (or no negatives) has no AUC: it is left out of the metrics
    and of the macro mean and returned in the second value, never reported as 0.5. Unknown labels
    (NaN) are ignored per class.
    """
    out: dict[str, float] = {}
    missing: list[str] = []
    for c, name in enumerate(class_names):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c]
        if y.size == 0 or y.min() == y.max():
            missing.append(name)
            continue
        out[f"{prefix}/auc/{name}"] = float(roc_auc_score(y, probs[known, c]))
    aucs = [v for k, v in out.items() if k.startswith(f"{prefix}/auc/")]
    if aucs:
        out[f"{prefix}/macro_auc"] = float(np.mean(aucs))
    if missing:
        log.warning("%s: no AUC for %s (no positives or no negatives in this split)", prefix, ", ".join(missing))
    return out, missing
