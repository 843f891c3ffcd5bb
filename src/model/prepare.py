"""The speed switches applied to a model before it trains or predicts: cuDNN's kernel search, channels_last, DDP and
torch.compile. None of them changes what the model computes (up to float rounding)."""
from __future__ import annotations

import torch
from torch import nn

from ..core.distributed import DistContext
from ..core.schema import ExperimentConfig


def uses_channels_last(cfg: ExperimentConfig, device: torch.device) -> bool:
    return cfg.speed.channels_last and device.type == "cuda"


def compiles(cfg: ExperimentConfig, device: torch.device) -> bool:
    """speed.compile applies on CUDA (on the CPU, compiling costs more than a demo run saves)."""
    return cfg.speed.compile and device.type == "cuda"


def prepare_model(model: nn.Module, cfg: ExperimentConfig, device: torch.device,
                  ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """The model to train (DDP-wrapped under torchrun, compiled when asked) and the one to evaluate (neither:
    each rank predicts its own shard). Both share `model`'s parameters, whose state_dict is what gets saved."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.speed.cudnn_benchmark
    if uses_channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    train_model = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiles(cfg, device):
        return torch.compile(train_model), torch.compile(model)
    return train_model, model
