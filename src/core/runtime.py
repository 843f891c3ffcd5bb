"""Device, seeding, mixed precision and DataLoader settings shared by training and inference."""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")  # present while NVIDIA's kernel driver is loaded
# The oldest Linux driver series each CUDA major version runs on (minor-version compatibility; NVIDIA's CUDA Toolkit
# release notes, "CUDA Toolkit and Minimum Required Driver Version"); the registry's torch 2.14.1 is a CUDA 13.0 build.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
TORCH_INDEX = {13: "https://download.pytorch.org/whl/cu130", 12: "https://download.pytorch.org/whl/cu128"}
PYTORCH_INSTALL = "https://pytorch.org/get-started/locally/"


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def nvidia_driver_version() -> Optional[str]:
    """The loaded NVIDIA driver's version (from its /proc file, else nvidia-smi), None without one."""
    try:
        match = re.search(r"NVRM version:.*?\s(\d+\.\d+(?:\.\d+)?)\s", NVIDIA_DRIVER_FILE.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    versions = re.findall(r"^\s*(\d+\.\d+(?:\.\d+)?)\s*$", done.stdout, re.M) if done.returncode == 0 else []
    return versions[0] if versions else None


def runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether torch built for `arch_list` (torch.cuda.get_arch_list()) runs on a GPU of compute `capability`, by
    NVIDIA's compatibility rules: a cubin sm_XY runs on X.Z for every Z >= Y (sm_XYa only on X.Y); PTX compute_XY
    is compiled by the driver for every capability from X.Y on."""
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if not match:
            continue
        kind, built = match.group(1), (int(match.group(2)), int(match.group(3)))
        if kind == "compute" and capability >= built:
            return True
        if kind == "sm" and capability[0] == built[0] and (
                capability[1] == built[1] if match.group(4) == "a" else capability[1] >= built[1]):
            return True
    return False


def gpu_problem() -> Optional[str]:
    """Why the NVIDIA GPU on this machine cannot run this torch, as one line with what to install; None when there
    is none, it works, or CUDA_VISIBLE_DEVICES hides it on purpose."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return None
    demo = "or pass --profile demo to train the CPU demo profile on purpose"
    if torch.cuda.is_available():
        built = torch.cuda.get_arch_list()
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            if built and not runs_on(capability, built):
                return (f"GPU {index} ({torch.cuda.get_device_name(index)}, compute capability {capability[0]}."
                        f"{capability[1]}) is not among the GPUs torch {torch.__version__} is built for "
                        f"({' '.join(built)}): install a torch built for it ({PYTORCH_INSTALL}), {demo}")
        return None
    driver = nvidia_driver_version()
    if driver is None:
        return None
    series = int(driver.split(".")[0])
    runnable = max((major for major, oldest in MIN_DRIVER.items() if series >= oldest), default=None)
    if torch.version.cuda is None:
        cause = f"torch {torch.__version__} is a CPU build"
    elif series < (oldest := MIN_DRIVER.get(int(torch.version.cuda.split(".")[0]), 0)):
        cause = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs driver {oldest} or "
                 "newer")
    else:
        return (f"an NVIDIA GPU is here (driver {driver}) and torch {torch.__version__} is built for CUDA "
                f"{torch.version.cuda}, which that driver runs, yet torch sees no GPU: check nvidia-smi, the "
                f"container's GPU flags and CUDA_VISIBLE_DEVICES, {demo}")
    fix = (f"pip install torch torchvision --index-url {TORCH_INDEX[runnable]} (a CUDA {runnable} build that driver "
           f"runs; {PYTORCH_INSTALL})" if runnable in TORCH_INDEX else
           f"update the driver to {MIN_DRIVER[12]} or newer, then install a CUDA build ({PYTORCH_INSTALL})")
    return f"an NVIDIA GPU is here (driver {driver}) but torch cannot use it: {cause}; {fix}, {demo}"


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
