"""The wall time users care about: one fold and all folds of a rung, projected from `bench`'s measured rates (the
trainer's epoch with the config's switches, prediction without TTA, the seconds compiling took) and the work a
fold does on a data set: its training images every epoch, its validation images (crops) every epoch, the test set
once. Folds run one after another here; `--gpus 0,0` runs two at a time (docs/performance.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.schema import ExperimentConfig

# The competition's data (Dacon 236006), for the projection beside the data at hand.
COMPETITION_TRAIN, COMPETITION_TEST = 5911, 12670
ASSUMED_EPOCHS = 30  # a fold of an early-stopped rung, as the published ladder's (stopped at epoch 22 and later)


@dataclass(frozen=True)
class FoldWork:
    """Images one fold of a rung trains on every epoch, validates on every epoch, and predicts once."""
    train: int
    validation: int
    test: int

    @classmethod
    def of(cls, cfg: ExperimentConfig, paintings: int, test: int) -> FoldWork:
        held_out = math.ceil(paintings / cfg.data.n_folds)
        crops = cfg.validation.crops_per_image if cfg.validation.mode == "crops" else 1
        steps = (paintings - held_out) // cfg.train.batch_size  # the training loader drops the last batch
        return cls(steps * cfg.train.batch_size, held_out * crops, test)


def projected_epochs(cfg: ExperimentConfig, epochs: int | None) -> tuple[int, str]:
    """The epochs a fold is projected at, and where the number comes from."""
    if epochs is not None:
        return epochs, "--epochs"
    if cfg.train.patience and cfg.train.epochs > ASSUMED_EPOCHS:
        return ASSUMED_EPOCHS, f"early stopping decides; {ASSUMED_EPOCHS} assumed, --epochs N for another number"
    return cfg.train.epochs, "train.epochs" + (", or fewer by early stopping" if cfg.train.patience else "")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def projection_lines(cfg: ExperimentConfig, paintings: int, test: int, train_rate: float, predict_rate: float,
                     compile_seconds: float, epochs: int | None = None) -> list[str]:
    """A Markdown table: an epoch, one fold and cfg.data.n_folds folds on the data at hand and on the competition's."""
    count, source = projected_epochs(cfg, epochs)
    folds = cfg.data.n_folds
    rows = [f"projected wall time of {cfg.name} at {count} epochs ({source}), batch {cfg.train.batch_size}: training "
            f"{train_rate:,.1f} images/s, prediction {predict_rate:,.1f} images/s, compiling {compile_seconds:.0f}s a "
            f"fold", "", f"| data | images a fold (train / validation / test) | an epoch | one fold | {folds} folds, "
            "one after another |", "|---|---|---:|---:|---:|"]
    for name, n_train, n_test in (("at hand", paintings, test), ("the competition's", COMPETITION_TRAIN,
                                                                 COMPETITION_TEST)):
        work = FoldWork.of(cfg, n_train, n_test)
        epoch = work.train / train_rate + work.validation / predict_rate
        fold = count * epoch + work.test / predict_rate + compile_seconds
        rows.append(f"| {name}: {n_train:,} paintings, {n_test:,} test images | {work.train:,} / {work.validation:,}"
                    f" / {work.test:,} | {epoch:,.0f}s | {hours(fold)} | {hours(folds * fold)} |")
    return rows
