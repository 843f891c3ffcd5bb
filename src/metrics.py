"""Scores from scikit-learn. Macro F1 is the competition metric."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score


def macro_f1(y_true, y_pred) -> float:
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def scores(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    y_pred = probs.argmax(axis=1)
    return {"macro_f1": macro_f1(y_true, y_pred), "accuracy": float(accuracy_score(y_true, y_pred))}


def solution_f1(ids, predicted_artists, solution: pd.DataFrame) -> float:
    """Macro F1 of predicted artists against solution.csv (id, artist), matched by id (demo data only)."""
    truth = solution.set_index("id")["artist"].reindex(list(ids))
    return macro_f1(truth.to_numpy(), np.asarray(predicted_artists))
