"""Batched prediction: class probabilities (softmax in float32) or pooled backbone features for every image
of a loader."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.progress import StepProgress
from ..core.runtime import autocast
from ..data.device_input import DeviceBatches
from ..model.checkpoints import drop_eval_caches


def padded(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """`images` with zero images appended up to `size` (a compiled model's one batch shape), or as they are."""
    missing = (size or 0) - len(images)
    if missing <= 0:
        return images
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    full = torch.cat([images, images.new_zeros((missing, *images.shape[1:]))])
    return full.contiguous(memory_format=torch.channels_last) if channels_last else full


@torch.no_grad()  # on a generator, torch disables gradients only while it runs
def _outputs(model: nn.Module, batches: DeviceBatches, amp: bool, amp_dtype: str, desc: str,
             pad_to: Optional[int] = None, progress_seconds: float = 0.0):
    """(float32 outputs, labels) per batch, in order, from the model's current weights (caches that eval mode
    derived from earlier weights are dropped first). With `pad_to`, every batch reaches the model at that size."""
    drop_eval_caches(model)
    model.eval()
    progress = StepProgress(len(batches), desc, progress_seconds)
    for images, labels in batches:
        with autocast(batches.device, amp, amp_dtype):
            outputs = model(padded(images, pad_to))[:len(images)]
        progress.update(len(images), batches.waited)
        yield outputs.float(), labels
    progress.close()


def predict_probs(model: nn.Module, batches: DeviceBatches, amp: bool = True, amp_dtype: str = "auto",
                  criterion: nn.Module | None = None, desc: str = "predict", pad_to: Optional[int] = None,
                  progress_seconds: float = 0.0) -> tuple[np.ndarray, float | None]:
    """Probabilities in loader order, and the mean loss when a criterion is given (labels must be known). Both stay
    on the device until the last batch, so the host does not wait for the GPU after every batch."""
    device = batches.device
    probs, total_loss, seen = [], torch.zeros((), device=device), 0
    for logits, labels in _outputs(model, batches, amp, amp_dtype, desc, pad_to, progress_seconds):
        if criterion is not None:
            total_loss += criterion(logits, labels) * len(logits)
            seen += len(logits)
        probs.append(torch.softmax(logits, dim=1))
    loss = float(total_loss) / seen if criterion is not None and seen else None
    return torch.cat(probs).cpu().numpy(), loss


def predict_features(backbone: nn.Module, batches: DeviceBatches, amp: bool = True, amp_dtype: str = "auto",
                     desc: str = "features", progress_seconds: float = 0.0) -> np.ndarray:
    """The backbone's pooled features (float32) in loader order."""
    return np.concatenate([features.cpu().numpy() for features, _ in
                           _outputs(backbone, batches, amp, amp_dtype, desc, progress_seconds=progress_seconds)])


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
