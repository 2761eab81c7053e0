"""AUC and logloss, computed the same way everywhere (scikit-learn)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def auc_logloss(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``{"auc", "logloss"}``; AUC is NaN when the labels hold one class only."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    if len(labels) == 0:
        return {"auc": math.nan, "logloss": math.nan}
    auc = roc_auc_score(labels, probs) if 0 < labels.sum() < len(labels) else math.nan
    return {"auc": float(auc), "logloss": float(log_loss(labels, probs, labels=[0, 1]))}
