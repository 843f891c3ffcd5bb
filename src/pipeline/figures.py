"""An experiment's pictures, as PNGs written atomically with matplotlib's Agg backend (no display needed): the
training curves of its folds, its confusion matrix and its per-class F1."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..core.files import atomic_path
from ..core.layout import ExperimentDir


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path


def plot_training_curves(out_dir: Path) -> Optional[Path]:
    """Loss, validation macro F1 and learning rate per epoch, one colour per fold (from fold*/history.csv);
    None for experiments without epochs (frozen features, TTA, ensembles)."""
    histories = {fold: pd.read_csv(path) for fold, path in ExperimentDir(out_dir).fold_histories().items()}
    if not histories:
        return None
    plt = pyplot()
    fig, (loss_ax, f1_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for fold, history in histories.items():
        colour = f"C{fold}"
        loss_ax.plot(history["epoch"], history["train_loss"], color=colour, label=f"fold {fold} train")
        loss_ax.plot(history["epoch"], history["val_loss"], color=colour, linestyle="--", label=f"fold {fold} val")
        f1_ax.plot(history["epoch"], history["val_macro_f1"], color=colour, marker="o", label=f"fold {fold}")
        lr_ax.plot(history["epoch"], history["lr"], color=colour, marker=".", label=f"fold {fold}")
    loss_ax.set_title("loss (solid: train, dashed: validation)")
    f1_ax.set_title("validation macro F1")
    lr_ax.set_title("learning rate at the start of the epoch")
    lr_ax.set_yscale("log")
    for ax in (loss_ax, f1_ax, lr_ax):
        ax.set_xlabel("epoch")
    f1_ax.legend(fontsize=7)
    fig.suptitle(out_dir.name)
    fig.tight_layout()
    return save_png(fig, out_dir / "training_curves.png")


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(14, 12))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return save_png(fig, path)


def plot_per_class_f1(report: pd.DataFrame, title: str, path: Path) -> Path:
    """Horizontal bars of F1 per artist, worst at the bottom, with the support beside each bar."""
    plt = pyplot()
    report = report.sort_values("f1")
    fig, ax = plt.subplots(figsize=(8, max(4, 0.2 * len(report))))
    ax.barh(report["artist"], report["f1"], color="tab:green")
    for y, (f1, support) in enumerate(zip(report["f1"], report["support"])):
        ax.text(f1 + 0.01, y, f"n={support}", va="center", fontsize=6)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("OOF F1")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return save_png(fig, path)
