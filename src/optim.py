"""Optimisers (Adam, AdamW, SGD, optionally wrapped in SAM) and learning-rate schedules.

Schedules are stepped once per training iteration. The warm-restart schedule and SAM are written here
because no maintained library implements them faithfully: torch's CosineAnnealingWarmRestarts has no
repeated warm-up and no decay of the peak, and SAM is not in torch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn

from .config import OptimizerConfig, SchedulerConfig


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimisation (Foret et al., 2021) around any base optimiser.

    Each step takes two forward-backward passes: the first gradient moves the weights to the nearby
    worst case w + rho * g / ||g||; the gradient there updates the original weights through the base
    optimiser. At rho = 0 this is exactly the base optimiser (with twice the compute). The second pass only
    measures a gradient: BatchNorm's running statistics are left as the first pass, at the real weights, made them.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(kwargs))
        self.rho = rho
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _ascend(self) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2) if grads else torch.tensor(0.0)
        scale = self.rho / (norm + 1e-12)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                offset = p.grad * scale.to(p)
                p.add_(offset)
                self.state[p]["sam_offset"] = offset

    @torch.no_grad()
    def _descend(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "sam_offset" in self.state[p]:
                    p.sub_(self.state[p].pop("sam_offset"))
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor],  # type: ignore[override]
             model: nn.Module | None = None) -> torch.Tensor:
        """`closure` zeroes the gradients, runs `model` forward and backward, and returns the loss. Returns the
        loss at the original weights."""
        loss = closure()
        self._ascend()
        with running_statistics_kept(model):
            closure()
        self._descend()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)


@contextlib.contextmanager
def running_statistics_kept(model: nn.Module | None) -> Iterator[None]:
    """The running mean, variance and batch count of every BatchNorm layer of `model` (SyncBatchNorm and timm's
    BatchNormAct included) restored on exit to what they were on entry."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats] if model is not None else []
    kept = [[buffer.clone() for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, (mean, var, count) in zip(layers, kept):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(count)


def build_optimizer(cfg: OptimizerConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """Adam and AdamW use their fused kernels on CUDA: one kernel for all parameters instead of several per
    parameter."""
    fused = device.type == "cuda"
    base, kwargs = {
        "adam": (torch.optim.Adam, dict(lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)),
        "adamw": (torch.optim.AdamW, dict(lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)),
        "sgd": (torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)),
    }[cfg.name]
    if cfg.sam_rho is not None:
        return SAM(params, base, rho=cfg.sam_rho, **kwargs)
    return base(params, **kwargs)


def cycle_start(cycle: int, cycle_steps: float, cycle_mult: float) -> int:
    """The first iteration of cycle `cycle` (0-based): cycles last cycle_steps * cycle_mult**i iterations, rounded
    where they start, so fractional lengths still add up."""
    length = cycle_steps * cycle if cycle_mult == 1 else cycle_steps * (cycle_mult ** cycle - 1) / (cycle_mult - 1)
    return round(length)


def warm_restart_lr(step: int, cycle_steps: float, cycle_mult: float, warmup_steps: int, peak: float,
                    gamma: float, floor: float) -> float:
    """Cosine annealing with warm restarts and a linear warm-up repeated at every restart.

    Cycle i lasts cycle_steps * cycle_mult**i iterations and peaks at peak * gamma**i. Within a cycle,
    at iteration t: warm-up floor -> peak over the first warmup_steps iterations, then a cosine from the
    peak down to the floor at the cycle's end.
    """
    cycle = 0
    while step >= cycle_start(cycle + 1, cycle_steps, cycle_mult):
        cycle += 1
    start = cycle_start(cycle, cycle_steps, cycle_mult)
    length = max(1, cycle_start(cycle + 1, cycle_steps, cycle_mult) - start)
    t = step - start
    top = peak * gamma ** cycle
    if t < warmup_steps:
        return floor + (top - floor) * t / warmup_steps
    progress = (t - warmup_steps) / max(1, length - warmup_steps)
    return floor + (top - floor) * (1 + math.cos(math.pi * progress)) / 2


def fitted_cycle_steps(total_steps: int, cycle_steps: float, cycle_mult: float) -> float:
    """The first cycle's length nearest to cycle_steps for which a whole number of cycles (1 or more) lasts exactly
    total_steps iterations."""
    def first_cycle(cycles: int) -> float:
        grown = cycles if cycle_mult == 1 else (cycle_mult ** cycles - 1) / (cycle_mult - 1)
        return total_steps / grown

    candidates = [first_cycle(n) for n in range(1, max(2, math.ceil(total_steps / max(cycle_steps, 1e-9))) + 2)]
    return min(candidates, key=lambda length: abs(length - cycle_steps))


def _cycle_steps(cfg: SchedulerConfig, steps_per_epoch: int, epochs: int) -> float:
    if cfg.name == "cosine":
        return max(1.0, epochs * steps_per_epoch)
    configured = max(1.0, cfg.cycle_epochs * steps_per_epoch)
    return fitted_cycle_steps(epochs * steps_per_epoch, configured, cfg.cycle_mult) if cfg.fit_cycles else configured


def schedule_note(cfg: SchedulerConfig, peak: float, steps_per_epoch: int, epochs: int) -> str | None:
    """One line when the warm-restart schedule ends mid-cycle at the last epoch, else None."""
    if cfg.name != "cosine_warm_restarts":
        return None
    total = epochs * steps_per_epoch
    cycle_steps = _cycle_steps(cfg, steps_per_epoch, epochs)
    cycle = 0
    while cycle_start(cycle + 1, cycle_steps, cfg.cycle_mult) < total:
        cycle += 1
    if cycle_start(cycle + 1, cycle_steps, cfg.cycle_mult) == total:
        return None
    warmup = min(cfg.warmup_steps, max(1, round(cycle_steps)) - 1)
    last = warm_restart_lr(total - 1, cycle_steps, cfg.cycle_mult, warmup, peak, cfg.gamma, cfg.min_lr)
    return (f"the warm-restart schedule ends mid-cycle at lr {last:.1e}, above its floor {cfg.min_lr:.1e} "
            f"({epochs} epochs, cycles of {cfg.cycle_epochs:g}); scheduler.fit_cycles=true fits whole cycles to "
            "the budget")


def early_stop_note(cfg: SchedulerConfig, epochs: int, patience: int) -> str | None:
    """One line when early stopping can end a run before a schedule that is tied to train.epochs (one cosine cycle,
    or warm restarts fitted to the budget) reaches its floor, else None."""
    tied = cfg.name == "cosine" or (cfg.name == "cosine_warm_restarts" and cfg.fit_cycles)
    if not tied or not patience or patience >= epochs:
        return None
    return (f"early stopping (train.patience {patience}) can end this run from epoch {patience + 1} on, but the "
            f"{'cosine' if cfg.name == 'cosine' else 'fitted warm-restart'} schedule reaches its floor only at epoch "
            f"{epochs} (train.epochs); set train.patience=0 to run it to its end, or train.epochs to a budget the run "
            "will reach")


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """'constant' keeps the optimiser's learning rate; 'cosine_warm_restarts' follows warm_restart_lr
    with the optimiser's lr as the first peak, its cycles fitted to the epochs when scheduler.fit_cycles; 'cosine'
    is its single cycle over all the epochs."""
    if cfg.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    peak = optimizer.param_groups[0]["lr"]
    cycle_steps = _cycle_steps(cfg, steps_per_epoch, epochs)
    warmup = min(cfg.warmup_steps, max(1, round(cycle_steps)) - 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warm_restart_lr(
        step, cycle_steps, cfg.cycle_mult, warmup, peak, cfg.gamma, cfg.min_lr) / peak)
