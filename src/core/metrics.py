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


def painting_means(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean probabilities of each painting's rows (its crops), paintings in order of first appearance."""
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    sums = np.zeros((len(unique), probs.shape[1]))
    np.add.at(sums, inverse, probs)
    means = sums / np.bincount(inverse)[:, None]
    order = np.argsort(first)
    return unique[order], means[order]


def painting_scores(ids: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """scores() of the paintings, each scored on the mean of its rows' probabilities."""
    painting_ids, means = painting_means(ids, probs)
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    return scores(np.array([label_of[i] for i in painting_ids.tolist()]), means)
