"""The speed switches applied to a model before it trains or predicts: cuDNN's kernel search, channels_last, DDP and
torch.compile. None of them changes what the model computes (up to float rounding)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from ..core.distributed import DistContext
from ..core.schema import ExperimentConfig


def uses_channels_last(cfg: ExperimentConfig, device: torch.device) -> bool:
    return cfg.speed.channels_last and device.type == "cuda"


def compiles(cfg: ExperimentConfig, device: torch.device) -> bool:
    """speed.compile applies on CUDA (on the CPU, compiling costs more than a demo run saves)."""
    return cfg.speed.compile and device.type == "cuda"


def compile_mode(cfg: ExperimentConfig, device: torch.device, ctx: DistContext) -> str:
    """speed.compile_mode, with auto resolved: CUDA graphs (reduce-overhead) in a single training process on CUDA,
    where a small model's step is bound by kernel launches; the default mode under DDP, whose gradient hooks run
    between the graphs, and on the CPU."""
    if cfg.speed.compile_mode != "auto":
        return cfg.speed.compile_mode
    return "reduce-overhead" if device.type == "cuda" and not ctx.enabled else "default"


# Prediction compiles without CUDA graphs: in eval mode TinyViT (like LeViT and EfficientFormer) caches its attention
# biases in the module, and a replay would reuse the memory of the cached tensor the previous call stored there.
PREDICTION_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class GraphSteps(nn.Module):
    """A model compiled with CUDA graphs, each call a new step of torch's CUDA graph trees
    (torch.compiler.cudagraph_mark_step_begin). A replay reuses the memory of the previous call's outputs, so they
    are cloned (the logits: a few numbers an image) for whoever keeps them past the next call."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(torch.Tensor, torch.clone, self.compiled(*args, **kwargs))


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile with static shapes (dynamic=False: the trainer's batches are full and the predictor pads its
    last one, so one graph serves every call and nothing recompiles), behind GraphSteps when `mode` uses CUDA
    graphs."""
    compiled = torch.compile(model, mode=mode, dynamic=False)
    return GraphSteps(compiled) if mode in PREDICTION_MODES else compiled  # the modes with CUDA graphs


def is_compiled(model: nn.Module) -> bool:
    return isinstance(model, (GraphSteps, torch._dynamo.eval_frame.OptimizedModule))


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
        mode = compile_mode(cfg, device, ctx)
        return compile_model(train_model, mode), compile_model(model, PREDICTION_MODES.get(mode, mode))
    return train_model, model


def compile_line(name: str, step_seconds: float, predict_seconds: float | None) -> str:
    """What compiling cost a fold: its first training step and its first prediction pass, compilation included."""
    predicted = f", the first prediction pass {predict_seconds:.1f}s" if predict_seconds is not None else ""
    return f"{name}: compiled: the first training step took {step_seconds:.1f}s{predicted} (compilation included)"
