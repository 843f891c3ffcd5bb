"""Predicting from a model, written once: the fold's validation and test passes, TTA runs, `predict` and the offline
bundle, `gpucheck` and `bench` all predict through a Predictor.

A Predictor holds one evaluation model, prepared as the trainer prepares it (channels_last, cuDNN, torch.compile
when configured), optionally behind TTA, with the config's normalisation, evaluation transform, image cache, batch
size, workers and autocast. Its loaders cover this rank's shard of the rows under DDP and its predictions are
gathered back in row order, so every rank returns every row. Other weights (another fold's best.pt) are loaded into
the same prepared network, so a compiled model compiles once.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..core.distributed import SINGLE_PROCESS, DistContext, all_gather, gather_shards, shard, sync_buffers
from ..core.runtime import autocast, worker_count
from ..core.schema import ExperimentConfig
from ..data.device_input import DeviceBatches, InputStage
from ..data.image_cache import ImageCache
from ..data.loader import ImageDataset, make_loader
from ..data.transforms import build_eval_transform
from ..model.checkpoints import cast_floating, drop_eval_caches, load_checkpoint, load_weights
from ..model.networks import build_model, normalisation
from ..model.prepare import compiles, prepare_model, uses_channels_last
from .probabilities import predict_probs
from .tta import with_tta


class Predictor:
    def __init__(self, cfg: ExperimentConfig, model: nn.Module, network: nn.Module, device: torch.device,
                 cache: Optional[ImageCache] = None, workers: Optional[int] = None, ctx: DistContext = SINGLE_PROCESS):
        """`model` predicts (prepared, maybe behind TTA); `network` is the ArtistClassifier whose parameters it
        uses, into which `load` puts other weights."""
        self.cfg, self.model, self.network, self.device, self.cache, self.ctx = cfg, model, network, device, cache, ctx
        mean, std = normalisation(network.backbone, cfg.input.mean, cfg.input.std)
        self.inputs = InputStage(mean, std, channels_last=uses_channels_last(cfg, device))
        self.workers = worker_count(cfg.train.num_workers, device) if workers is None else workers
        # a compiled model sees one batch shape: the last batch is padded to it
        self.pad_to = cfg.inference.batch_size if compiles(cfg, device) else None
        self.first_pass_seconds: Optional[float] = None  # of a compiled model: it compiles then

    @classmethod
    def for_checkpoints(cls, cfg: ExperimentConfig, n_classes: int, device: torch.device, tta: str = "none",
                        cache: Optional[ImageCache] = None, workers: Optional[int] = None) -> "Predictor":
        """A network of the config's backbone, prepared once, for fold checkpoints to be loaded into (`load`)."""
        network = build_model(cfg.model.model_copy(update={"pretrained": False}), n_classes,
                              cfg.input.img_size).to(device)
        prepared = prepare_model(network, cfg, device, SINGLE_PROCESS)[1]
        return cls(cfg, with_tta(prepared, tta), network, device, cache, workers)

    def load(self, checkpoint: Path, classes: list[str], weights_dtype: Optional[torch.dtype] = None) -> dict:
        """A checkpoint's weights into the network (checked against the backbone and the artists), rounded
        through `weights_dtype` first when given (the half-precision check)."""
        saved = load_checkpoint(self.network, checkpoint, classes, self.cfg.model.backbone)
        if weights_dtype is not None:
            load_weights(self.network, cast_floating(self.network.state_dict(), weights_dtype))
        return saved

    def dataset(self, paths: Sequence[str], test: bool, boxes: Optional[np.ndarray] = None,
                labels: Optional[Sequence[int]] = None) -> ImageDataset:
        """Images resized whole (test=True: test crops, and validation crops cut by `boxes`) or whole validation
        paintings under the config's validation transform (test=False)."""
        return ImageDataset(paths, labels, build_eval_transform(self.cfg, test=test), cache=self.cache, boxes=boxes)

    def loader(self, dataset: ImageDataset):
        """A loader over this rank's shard of `dataset` (all of it without DDP); keep it to predict every epoch."""
        return make_loader(shard(self.ctx, dataset), self.cfg.inference.batch_size, self.workers, self.device,
                           train=False, pin_memory=self.cfg.speed.pin_memory,
                           persistent_workers=self.cfg.speed.persistent_workers)

    def probs(self, loader, criterion: Optional[nn.Module] = None,
              desc: str = "predict") -> tuple[np.ndarray, Optional[float]]:
        """Probabilities for every row of the loader's whole dataset, in order, gathered from the ranks' shards;
        with `criterion`, the mean loss over all rows too (the dataset must hold labels)."""
        sync_buffers(self.ctx, self.model)
        started = time.perf_counter()
        probs, loss = predict_probs(self.model, DeviceBatches(loader, self.device, self.inputs), self.cfg.train.amp,
                                    self.cfg.train.amp_dtype, criterion=criterion, desc=desc, pad_to=self.pad_to,
                                    progress_seconds=self.cfg.tracking.progress_seconds)
        if self.pad_to is not None and self.first_pass_seconds is None:
            self.first_pass_seconds = time.perf_counter() - started
        if criterion is not None:
            totals = all_gather(self.ctx, (loss * len(probs), len(probs)))
            loss = sum(total for total, _ in totals) / sum(count for _, count in totals)
        return gather_shards(self.ctx, probs, sum(all_gather(self.ctx, len(probs)))), loss

    def predict(self, paths: Sequence[str], test: bool = True, boxes: Optional[np.ndarray] = None,
                desc: str = "predict") -> np.ndarray:
        """Probabilities for these images (or these crops of them); one loader for this call."""
        return self.probs(self.loader(self.dataset(paths, test, boxes)), desc=desc)[0]

    @torch.no_grad()
    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """The model's outputs for one uint8 batch already on the device, under the config's autocast (bench)."""
        drop_eval_caches(self.model)
        self.model.eval()
        with autocast(self.device, self.cfg.train.amp, self.cfg.train.amp_dtype):
            return self.model(self.inputs(images, 0))
