"""The torch Dataset that reads images, and DataLoaders whose results do not depend on their worker processes.

Training loaders draw their order and every image's augmentation seed from (seed, epoch) (sampler.EpochSampler),
so 0, 2 or 15 workers give the same batches and a resumed run repeats them exactly. Worker processes run OpenCV
with one thread each: the workers already use the cores, and OpenCV's own pool in each of them (a thread per core)
would only oversubscribe them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from ..core.schema import ExperimentConfig
from .images import read_image
from .geometry import crop_image
from .image_cache import ImageCache, training_cache
from .sampler import EpochSampler
from .transforms import build_train_transform, reseed


class ImageDataset:
    """(image tensor, label) pairs; label is -1 where unknown (test). A key is a row index, or (row index, seed) to
    augment the image with that seed. With `boxes` (relative, one per row) each row is that crop of its image, as
    validation crops are. With an image cache (src/data/image_cache.py) each image is decoded once, shrunk, and loaded
    from the cache afterwards."""

    def __init__(self, paths: list[str], labels: Optional[list[int]], transform: Callable, cache=None,
                 boxes: Optional[np.ndarray] = None):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.cache = cache
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            reseed(self.transform, seed)
        path = self.paths[index]
        image = self.cache.load(path) if self.cache is not None else read_image(path)
        if self.boxes is not None:
            image = crop_image(image, self.boxes[index])
        return self.transform(image=image)["image"], self.labels[index]


def training_dataset(cfg: ExperimentConfig, paths: list[str], labels: list[int], cache: Optional[ImageCache],
                     seed: int) -> ImageDataset:
    """The training images as the trainer reads them: through training_cache(cfg, cache), with a transform that
    leaves out the first resize when the cache has made it."""
    cache = training_cache(cfg, cache)
    resized = cache is not None and cache.square is not None
    return ImageDataset(paths, labels, build_train_transform(cfg, seed, resized), cache=cache)


@contextlib.contextmanager
def opencv_threads(count: int):
    """OpenCV's thread count set to `count` for the duration, then restored."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes start with OpenCV limited to `opencv_threads` threads (None: OpenCV's
    default, a thread per core, in every worker).

    The limit is set in the parent just before the workers are forked and restored right after, so each worker
    inherits it. Setting it inside a worker (worker_init_fn) deadlocks when the parent had already used OpenCV's
    thread pool: the forked child holds the pool's state without its threads."""

    def __init__(self, *args, opencv_threads: int | None = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.opencv_threads = opencv_threads

    def __iter__(self):
        if self.num_workers == 0 or self.opencv_threads is None:
            return super().__iter__()
        with opencv_threads(self.opencv_threads):
            return super().__iter__()


def make_loader(dataset: ImageDataset, batch_size: int, workers: int, device: torch.device, train: bool,
                seed: int = 0, sampler=None, pin_memory: bool = True, persistent_workers: bool = True,
                worker_opencv_threads: int | None = 1) -> DataLoader:
    """Training loaders shuffle (or draw from `sampler`), seed every image's augmentation and drop the last
    incomplete batch (call loader.sampler.set_epoch(epoch) before each epoch); others keep the dataset's order.
    Each loader has a generator of its own, so creating one never draws from torch's global random stream."""
    order = EpochSampler(sampler or RandomSampler(dataset), seed) if train else None
    return WorkerLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                        pin_memory=pin_memory and device.type == "cuda",
                        persistent_workers=persistent_workers and workers > 0,
                        drop_last=train and len(dataset) > batch_size,
                        generator=torch.Generator().manual_seed(seed), opencv_threads=worker_opencv_threads)
