"""Class-balancing sampler: torch's WeightedRandomSampler with per-image weights from its artist's count."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


def image_weights(labels: np.ndarray, scheme: str) -> np.ndarray:
    """inverse_count: total/count (every artist equally likely); inverse_log_count: total/log(count)
    (rare artists boosted, less aggressively). Counts below 2 are clamped so log(count) stays positive."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = {"inverse_count": len(labels) / counts,
                 "inverse_log_count": len(labels) / np.log(np.maximum(counts, 2))}[scheme]
    lookup = dict(zip(classes.tolist(), per_class))
    return np.array([lookup[label] for label in labels.tolist()], dtype=np.float64)


def build_sampler(labels: np.ndarray, scheme: str, seed: int, shards: int = 1) -> WeightedRandomSampler | None:
    """One epoch draws as many images as there are; under DDP each of the `shards` ranks draws its share."""
    if scheme == "none":
        return None
    weights = torch.as_tensor(image_weights(labels, scheme), dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=-(-len(weights) // shards), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))
