"""What every section of `bench` shares: a row of its table, timing with the device's queue drained, peak GPU
memory, and the configs it compares (the plain path, one switch changed)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch

from ..core.runtime import synchronize
from ..core.schema import ExperimentConfig
from ..training.loop import EpochStats

T = TypeVar("T")


@dataclass
class Figure:
    section: str
    setting: str
    images_per_s: Optional[float]
    baseline: Optional[float] = None
    peak_gib: Optional[float] = None
    note: str = ""

    def row(self) -> str:
        rate = f"{self.images_per_s:,.1f}" if self.images_per_s is not None else "-"
        speedup = f"{self.images_per_s / self.baseline:.2f}x" if self.images_per_s and self.baseline else ""
        memory = f"{self.peak_gib:.2f}" if self.peak_gib is not None else ""
        return f"| {self.section} | {self.setting} | {rate} | {speedup} | {memory} | {self.note} |"


def timed_seconds(work: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """What `work()` returns and its seconds, the device's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - started


def images_per_second(run: Callable[[], int], device: torch.device) -> float:
    """Run `run` (which returns the number of images it handled) and time it, waiting for the GPU."""
    count, seconds = timed_seconds(run, device)
    return count / seconds


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def with_speed(cfg: ExperimentConfig, amp: bool, **speed) -> ExperimentConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": amp}),
                                  "speed": cfg.speed.model_copy(update=speed)})


def no_download(cfg: ExperimentConfig) -> ExperimentConfig:
    """Random weights: speed does not depend on them, and nothing is downloaded."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})})


def waiting(stats: EpochStats) -> str:
    return f"input pipeline: {100 * stats.data_seconds / stats.seconds:.0f}% of the time" if stats.seconds else ""


def plain(cfg: ExperimentConfig) -> ExperimentConfig:
    """fp32, NCHW, no cudnn benchmark, eager, no cache, no pinned memory, workers restarted every epoch, the
    augmentation on the CPU."""
    return with_speed(cfg, amp=False, channels_last=False, cudnn_benchmark=False, compile=False,
                      image_cache="none", pin_memory=False, persistent_workers=False, train_cache="short_side",
                      gpu_augment=False)
