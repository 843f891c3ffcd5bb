"""Device, seeding, mixed precision and DataLoader settings shared by training and inference."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def amp_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, enabled: bool, dtype_name: str):
    """Mixed precision on CUDA only; the CPU runs in float32."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype(dtype_name))


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int | None, device: torch.device, processes: int = 1) -> int:
    """On a GPU machine, every core but one for each of the `processes` training processes decodes images;
    on the CPU the model needs the cores."""
    if requested is not None:
        return requested
    return max(1, available_cores() // processes - 1) if device.type == "cuda" else 0


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
