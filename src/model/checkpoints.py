"""Checkpoints this repository writes (best.pt, last.pt): read safely, checked against the backbone and the artists,
loaded into a model without leaving it stale caches, and cast for the offline bundle."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..core.layout import BUNDLE_MODELS, FOLD_FOLDER


def remedy(path: Path) -> str:
    """What to do about a checkpoint that cannot be used, by where it lies: a fold's (train that fold again), an
    export bundle's (export again) or another file."""
    fold, run = path.parent, path.parent.parent
    if not FOLD_FOLDER.fullmatch(fold.name):
        return "replace it with a checkpoint this repository wrote"
    if run.parent.name == BUNDLE_MODELS:
        return f"export {run.name} again (bash run.sh export {run.name})"
    return f"train the fold again: bash run.sh {run.name} train.folds=[{fold.name.removeprefix('fold')}] --restart"


def read_checkpoint(path: Path) -> dict:
    """A checkpoint this repository wrote (best.pt, last.pt): tensors and plain values only (weights_only=True),
    so a file from elsewhere can never run code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file raises any of a dozen types (RuntimeError, EOFError, IndexError...)
        first = re.split(r"\.\s", str(exc).strip(), maxsplit=1)[0][:100]  # the first sentence
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first}); {remedy(path)}") \
            from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint of this repository; "
                        f"{remedy(path)}")
    return checkpoint


def drop_eval_caches(model: nn.Module) -> None:
    """Switch `model` to training and back. timm's TinyViT (like LeViT and EfficientFormer) caches its attention
    biases in eval mode and rebuilds the cache only when switched to training, so a model whose weights changed
    since it last predicted (new weights loaded, an EMA updated in place) would predict with the old biases. The
    switch clears every such cache, also inside a torch.compile'd model (without a recompilation)."""
    training = model.training
    model.train()
    model.train(training)


def load_weights(model: nn.Module, state_dict: dict) -> None:
    """load_state_dict, then drop what the model derived from its old weights (drop_eval_caches)."""
    model.load_state_dict(state_dict)
    drop_eval_caches(model)


def load_checkpoint(model: nn.Module, path: Path, classes: list[str], backbone: str) -> dict:
    """Load best.pt or last.pt after checking that it was trained with this backbone and these artists."""
    checkpoint = read_checkpoint(path)
    if checkpoint.get("backbone") != backbone or checkpoint.get("classes") != classes:
        raise UserError(f"{path}: trained with backbone '{checkpoint.get('backbone')}' and "
                        f"{len(checkpoint.get('classes') or [])} artists, not '{backbone}' and {len(classes)}; "
                        f"use the checkpoint of this experiment and data, or {remedy(path)}")
    load_weights(model, checkpoint["model"])
    return checkpoint


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict with its floating-point tensors in `dtype` (integer buffers such as BN's counters unchanged)."""
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
