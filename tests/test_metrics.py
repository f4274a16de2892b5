import numpy as np
import pytest

from cxr_automl.train.metrics import classification_metrics


def test_auc_per_class_and_macro_missing_class_reported_not_faked():
    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, np.nan], [0, 0, 0]], dtype=float)
    probs = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.7, 0.2, 0.9], [0.1, 0.4, 0.3]])
    metrics, missing = classification_metrics(probs, labels, ["a", "b", "c"], "val")
    assert missing == ["b"]  # no positives: no AUC, not 0.5
    assert "val/auc/b" not in metrics
    assert metrics["val/auc/a"] == pytest.approx(1.0)
    assert metrics["val/auc/c"] == pytest.approx(1.0)  # NaN label ignored
    assert metrics["val/macro_auc"] == pytest.approx(1.0)


def test_auc_matches_rank_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 1)).astype(float)
    p = rng.random((200, 1)) + 0.3 * y
    metrics, _ = classification_metrics(p, y, ["x"], "test")
    pos, neg = p[y[:, 0] == 1, 0], p[y[:, 0] == 0, 0]
    expected = (pos[:, None] > neg[None, :]).mean()
    assert metrics["test/auc/x"] == pytest.approx(expected, abs=1e-9)
