"""Learning-rate schedules, stepped once per training iteration: constant, one cosine cycle over the budget, and
cosine annealing with warm restarts. The warm-restart schedule is written here because no maintained library does it
faithfully: torch's CosineAnnealingWarmRestarts has no repeated warm-up and no decay of the peak."""
from __future__ import annotations

import math

import torch

from ..core.schema import SchedulerConfig


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


def warmup_steps(cfg: SchedulerConfig, steps_per_epoch: int, cycle_steps: float) -> int:
    """The linear warm-up in iterations: scheduler.warmup_epochs x steps an epoch when set, else warmup_steps;
    at most the cycle's length less one."""
    configured = cfg.warmup_steps if cfg.warmup_epochs is None else round(cfg.warmup_epochs * steps_per_epoch)
    return min(configured, max(1, round(cycle_steps)) - 1)


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
    warmup = warmup_steps(cfg, steps_per_epoch, cycle_steps)
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


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The optimiser's learning rate before layer-wise decay: what the schedule sets (every parameter group trains
    at it times its lr_scale)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """'constant' keeps the optimiser's learning rate; 'cosine_warm_restarts' follows warm_restart_lr
    with the optimiser's lr as the first peak, its cycles fitted to the epochs when scheduler.fit_cycles; 'cosine'
    is its single cycle over all the epochs."""
    if cfg.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    peak = base_lr(optimizer)
    cycle_steps = _cycle_steps(cfg, steps_per_epoch, epochs)
    warmup = warmup_steps(cfg, steps_per_epoch, cycle_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warm_restart_lr(
        step, cycle_steps, cfg.cycle_mult, warmup, peak, cfg.gamma, cfg.min_lr) / peak)
