"""The exponential moving average of the weights that validates and predicts (train.ema_decay or train.ema_epochs),
timm's ModelEmaV3 updated with the optimiser's step count.

timm's default warm-up caps step t's decay at 1 - t^(-2/3), which reaches 0.999 only at step 31,622: a 30-epoch
fine-tuning of 147 steps an epoch ends at 0.9963, so every decay above about 0.996 gave the same run. The warm-up here
is timm's at power 1, a cap of 1 - 1/t: until the average has seen 1 / (1 - decay) steps it is the plain mean of the
weights of every step so far, the soonest an average can reach its horizon without weighting the first steps (a
random head) more than the later ones. From then on it averages over the last 1 / (1 - decay) steps, as configured.
"""
from __future__ import annotations

from typing import Optional

from timm.utils import ModelEmaV3
from torch import nn

from ..core.schema import TrainConfig


def target_decay(train: TrainConfig, steps_per_epoch: int) -> Optional[float]:
    """A step's decay once warmed up: train.ema_decay, or 1 - 1 / (train.ema_epochs x steps an epoch)."""
    if train.ema_epochs is not None:
        return 1 - 1 / max(1.0, train.ema_epochs * steps_per_epoch)
    return train.ema_decay


def build_ema(model: nn.Module, train: TrainConfig, steps_per_epoch: int) -> Optional[ModelEmaV3]:
    """The EMA of `model` as the config says: step 1 copies the weights; step t's decay is then
    min(decay, 1 - 1/t) with the warm-up, the decay without."""
    decay = target_decay(train, steps_per_epoch)
    if decay is None:
        return None
    return ModelEmaV3(model, decay=decay, use_warmup=train.ema_warmup, warmup_gamma=1.0, warmup_power=1.0)


def horizon_steps(ema: ModelEmaV3) -> float:
    """The number of steps the warmed-up average spans, 1 / (1 - decay)."""
    return 1 / max(1e-12, 1 - ema.decay)


def ema_line(ema: ModelEmaV3, steps_per_epoch: int) -> str:
    """'EMA of the weights: decay 0.999 a step, an average over the last 1,000 steps (6.8 epochs), ...'."""
    horizon = horizon_steps(ema)
    warmup = ("the mean of every step's weights until then" if ema.use_warmup
              else "from the second step on, without a warm-up")
    return (f"EMA of the weights: decay {ema.decay:.6g} a step, an average over the last {horizon:,.0f} steps "
            f"({horizon / steps_per_epoch:.3g} epochs), {warmup}")


def ema_horizon_note(ema: ModelEmaV3, total_steps: int) -> Optional[str]:
    """One line when the run ends before the average has seen its horizon (it never reaches its decay), else
    None."""
    horizon = horizon_steps(ema)
    if not ema.use_warmup or horizon <= total_steps:
        return None
    return (f"the EMA averages over {horizon:,.0f} steps, more than the run's {total_steps:,}: it stays the mean of "
            f"every step's weights and ends at decay {ema.get_decay(total_steps):.6g}, not {ema.decay:.6g}; "
            "lower train.ema_decay or train.ema_epochs")
