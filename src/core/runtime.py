"""Device, seeding, mixed precision and DataLoader settings shared by training and inference."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def autocast_dtype(enabled: bool, name: str, device: torch.device) -> torch.dtype | None:
    """The dtype a run computes in under autocast, or None for plain float32.

    'auto' reads the GPU's compute capability: bfloat16 from 8.0 (Ampere, Hopper), float16 with a gradient scaler
    below (T4, V100, P100), whose bfloat16 is emulated and slow although torch.cuda.is_bf16_supported() counts it;
    float32 on the CPU. An explicit dtype is used on any device (CPU autocast runs both)."""
    if not enabled:
        return None
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: torch.device, enabled: bool, dtype_name: str):
    dtype = autocast_dtype(enabled, dtype_name, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_record(enabled: bool, dtype_name: str, device: torch.device) -> dict:
    """What a run computes in, for the run record: the resolved dtype, the gradient scaler, and the device."""
    dtype = autocast_dtype(enabled, dtype_name, device)
    record = {"device": device.type, "autocast": str(dtype).removeprefix("torch.") if dtype else "off (float32)",
              "grad_scaler": dtype == torch.float16}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        record["device"] = f"cuda: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return record


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int | None, device: torch.device, processes: int = 1) -> int:
    """DataLoader workers of each of the `processes` training processes on this machine: on a GPU machine every
    core but one decodes images; on the CPU two (as timm's train script), fewer when the processes leave less than
    two cores each, because the model needs the cores too."""
    if requested is not None:
        return requested
    cores = max(1, available_cores() // processes)
    return max(1, cores - 1) if device.type == "cuda" else min(2, cores)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
