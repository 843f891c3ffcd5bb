"""Training samplers: the class-balancing WeightedRandomSampler, and the epoch sampler that gives every image of an
epoch its own augmentation seed."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler


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


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed for (seed, epoch) in one of several independent streams."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


class EpochSampler(Sampler):
    """The order of a training epoch, with an augmentation seed for every position: yields (index, seed) pairs.

    Both are functions of (seed, epoch) alone. The order comes from the wrapped sampler, reseeded each epoch
    (DistributedSampler reseeds itself in set_epoch); the i-th image of epoch e is augmented with a seed drawn
    from (seed, e, i). So an image's augmentation does not depend on which DataLoader worker loads it or on how
    many workers there are, every worker and epoch draws different augmentations, and a resumed run needs only
    the epoch number to repeat the same order and augmentations.
    """

    ORDER, AUGMENT = 0, 1

    def __init__(self, order: Sampler, seed: int):
        self.order = order
        self.seed = seed
        self.epoch = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)
        else:
            self.order.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.ORDER))

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        seeds = np.random.default_rng(epoch_seed(self.seed, self.epoch, self.AUGMENT)).integers(0, 2**32, len(self))
        return zip(iter(self.order), seeds.tolist())

