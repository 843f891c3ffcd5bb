"""Batched prediction: class probabilities (softmax in float32) or pooled backbone features for every image
of a loader."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..core.runtime import autocast, to_device
from ..model.checkpoints import drop_eval_caches


@torch.no_grad()  # on a generator, torch disables gradients only while it runs
def _outputs(model: nn.Module, loader, device: torch.device, amp: bool, amp_dtype: str, desc: str,
             channels_last: bool = False):
    """(float32 outputs, labels) per batch of the loader, in order, from the model's current weights (caches that
    eval mode derived from earlier weights are dropped first)."""
    drop_eval_caches(model)
    model.eval()
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        images = to_device(images, device, channels_last)
        with autocast(device, amp, amp_dtype):
            outputs = model(images)
        yield outputs.float(), labels


def predict_probs(model: nn.Module, loader, device: torch.device, amp: bool = True, amp_dtype: str = "auto",
                  criterion: nn.Module | None = None, desc: str = "predict",
                  channels_last: bool = False) -> tuple[np.ndarray, float | None]:
    """Probabilities in loader order, and the mean loss when a criterion is given (labels must be known). Both stay
    on the device until the last batch, so the host does not wait for the GPU after every batch."""
    probs, total_loss, seen = [], torch.zeros((), device=device), 0
    for logits, labels in _outputs(model, loader, device, amp, amp_dtype, desc, channels_last):
        if criterion is not None:
            labels = labels.to(device, non_blocking=True)
            total_loss += criterion(logits, labels) * len(logits)
            seen += len(logits)
        probs.append(torch.softmax(logits, dim=1))
    loss = float(total_loss) / seen if criterion is not None and seen else None
    return torch.cat(probs).cpu().numpy(), loss


def predict_features(backbone: nn.Module, loader, device: torch.device, amp: bool = True, amp_dtype: str = "auto",
                     desc: str = "features") -> np.ndarray:
    """The backbone's pooled features (float32) in loader order."""
    return np.concatenate([features.cpu().numpy() for features, _ in
                           _outputs(backbone, loader, device, amp, amp_dtype, desc)])


def probs_frame(ids, probs: np.ndarray, classes: list[str], crops=None) -> pd.DataFrame:
    """id, then crop (validation rows: the crop's index, -1 for a whole painting), then one column per class."""
    frame = pd.DataFrame(probs, columns=classes)
    if crops is not None:
        frame.insert(0, "crop", list(crops))
    frame.insert(0, "id", list(ids))
    return frame


def read_probs(path: Path) -> pd.DataFrame:
    """A val_probs.csv or oof.csv; files written before validation crops existed get crop -1 (whole)."""
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    if "crop" not in frame.columns:
        frame.insert(1, "crop", -1)
    return frame
