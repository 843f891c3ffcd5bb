"""Combining several models' probabilities: soft voting (the weighted mean) and hard voting (the weighted majority
of their predictions, ties broken by the summed probability). Ensembles, `predict` and a teacher made of an
ensemble (pseudo-labels, distillation) all combine through `combine`."""
from __future__ import annotations

import numpy as np

# Hard voting stores vote shares; the summed probability enters at this scale, below one vote, so the argmax
# of the stored scores is the majority with ties broken by the summed probability.
TIE_BREAK_SCALE = 1e-3


def soft_vote(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """probs: (members, images, classes). Weighted mean of the probabilities."""
    weights = np.asarray(weights, dtype=float)
    return np.tensordot(weights / weights.sum(), probs, axes=1)


def hard_vote(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted vote shares of the members' argmax predictions, ties broken by the summed probability."""
    weights = np.asarray(weights, dtype=float)
    n_classes = probs.shape[2]
    votes = np.tensordot(weights, np.eye(n_classes)[probs.argmax(axis=2)], axes=1)
    scores = votes + TIE_BREAK_SCALE * probs.sum(axis=0) / probs.shape[0]
    return scores / scores.sum(axis=1, keepdims=True)


def combine(probs: np.ndarray, weights: np.ndarray, method: str) -> np.ndarray:
    return soft_vote(probs, weights) if method == "soft" else hard_vote(probs, weights)
