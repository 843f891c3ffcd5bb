"""`bash run.sh explain EXP [--images N | --ids ID ...] [--test] [--fold K]`: what a finished experiment's models
look at, as a PNG grid of paintings or test crops, each with its predicted and true artist and a heat map.

A training painting is predicted by the fold model that held it out (it never saw the painting), resized whole to the
input; a test crop by fold K's model (0 unless --fold), resized whole as the test is predicted. The heat map is
Grad-CAM (Selvaraju et al.) of the predicted artist, from the grad-cam package (jacobgil/pytorch-grad-cam): for CNNs
and TinyViT on the backbone's last feature map; for ViTs (a grid of patch tokens) on the input of the last block's
attention, the patch tokens laid back on their grid (grad-cam's recipe for vision transformers).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.errors import UserError
from ..core.files import write_bytes
from ..core.layout import ExperimentDir, read_saved
from ..core.runtime import select_device
from ..data.competition import CompetitionData, load_competition_data
from ..data.folds import shared_folds
from ..data.image_cache import cache_for
from ..inference.predictor import Predictor

CELL = 224  # pixels a picture of the grid is drawn at
CAPTION = 58  # pixels of text under each picture: the predicted and true artist, the image's id
COLUMNS = 4


@dataclass
class Explained:
    """One picture of the grid: what the model saw (RGB, 0-1), its Grad-CAM (0-1, same size), what it predicted."""
    image_id: str
    image: np.ndarray
    heat: np.ndarray
    predicted: str
    probability: float
    true: Optional[str]
    fold: int


class FeatureMapClassifier(nn.Module):
    """The classifier with its backbone's last feature map passed through `features` (an identity), a layer for
    Grad-CAM to read: images -> forward_features -> features -> forward_head -> head, the network's own forward."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.features = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.network.backbone
        return self.network.head(backbone.forward_head(self.features(backbone.forward_features(images))))


def token_grid(backbone: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """For a ViT (patch tokens after prefix tokens), grad-cam's reshape_transform: (B, tokens, C) -> (B, C, h, w) of
    the patch grid; None for a backbone whose features are a map already (CNNs, TinyViT)."""
    prefix = getattr(backbone, "num_prefix_tokens", None)
    if prefix is None or not hasattr(backbone, "blocks"):
        return None
    height, width = backbone.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, prefix:].reshape(len(tokens), height, width, -1).permute(0, 3, 1, 2)

    return reshape


def grad_cam(network: nn.Module, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM of `classes` (one per image) for a batch, (B, H, W) in 0-1, from the grad-cam package."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = FeatureMapClassifier(network).eval()
    reshape = token_grid(network.backbone)
    layer = network.backbone.blocks[-1].norm1 if reshape is not None else model.features
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])


def overlay(explained: Explained) -> np.ndarray:
    """The picture with its heat map blended in (grad-cam's show_cam_on_image, jet colours), RGB uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(explained.image.astype(np.float32), explained.heat, use_rgb=True, image_weight=0.55)


def cell(explained: Explained) -> np.ndarray:
    """One cell of the grid: the overlay at CELL x CELL, under it the predicted artist and its probability (green
    when right, red when wrong), the true artist and the image's id. RGB uint8."""
    picture = cv2.resize(overlay(explained), (CELL, CELL), interpolation=cv2.INTER_CUBIC)
    caption = np.full((CAPTION, CELL, 3), 255, np.uint8)
    right = explained.true is None or explained.true == explained.predicted
    colour = (0, 110, 0) if right else (190, 0, 0)
    lines = [(f"{explained.predicted} {explained.probability:.0%}", colour),
             (f"true: {explained.true or '?'}", (60, 60, 60)), (explained.image_id, (120, 120, 120))]
    for row, (text, rgb) in enumerate(lines):
        cv2.putText(caption, text[:32], (4, 15 + 17 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.42, rgb, 1, cv2.LINE_AA)
    return np.concatenate([picture, caption])


def grid(pictures: list[Explained], columns: int = COLUMNS) -> np.ndarray:
    """The cells in rows of `columns`, white where a row is short. RGB uint8."""
    cells = [cell(picture) for picture in pictures]
    blank = np.full_like(cells[0], 255)
    cells += [blank] * (-len(cells) % columns)
    return np.concatenate([np.concatenate(cells[i:i + columns], axis=1) for i in range(0, len(cells), columns)])


def explain_images(outputs: Path, name: str, data: CompetitionData, rows: pd.DataFrame, device: torch.device,
                   log: Callable[[str], None] = print) -> list[Explained]:
    """Every row (id, path, true artist or None, fold) explained by that fold's best.pt of experiment `name`."""
    saved = read_saved(outputs / name)
    cfg = saved.fine_tuned("explain")
    predictor = Predictor.for_checkpoints(cfg, len(data.classes), device, cache=cache_for(cfg, outputs))
    explained = []
    for fold, group in rows.groupby("fold", sort=True):
        checkpoint = ExperimentDir(outputs / saved.source).fold(int(fold)).best
        if not checkpoint.is_file():
            raise UserError(f"{checkpoint} not found; finish {saved.source}'s fold {fold} first")
        predictor.load(checkpoint, data.classes)
        dataset = predictor.dataset(group["path"].tolist(), test=True)
        pixels = torch.stack([dataset[i][0] for i in range(len(dataset))])  # uint8, as the workers hand them over
        images = predictor.inputs(pixels.to(device), 0)  # normalised on the device, as prediction does
        with torch.no_grad():
            probs = torch.softmax(predictor.network.eval()(images).float(), dim=1).cpu().numpy()
        heats = grad_cam(predictor.network, images, probs.argmax(axis=1).tolist())
        pictures = pixels.numpy().transpose(0, 2, 3, 1).astype(np.float32) / 255
        for row, picture, heat, prob in zip(group.itertuples(), pictures, heats, probs):
            explained.append(Explained(str(row.id), picture, heat, data.classes[int(prob.argmax())],
                                       float(prob.max()), row.true, int(fold)))
        log(f"{name} fold {fold}: explained {len(group)} images")
    order = {image_id: i for i, image_id in enumerate(rows["id"].astype(str))}
    return sorted(explained, key=lambda e: order[e.image_id])


def choose_rows(data: CompetitionData, folds: pd.DataFrame, count: int, ids: Optional[list[str]], test: bool,
                fold: int) -> pd.DataFrame:
    """id, path, true (None when unknown), fold: the named ids (train ids: paintings with their own fold; test ids:
    crops with fold `fold`), else `count` paintings of different artists (or `count` test crops), seeded."""
    truth = dict(zip(data.solution["id"], data.solution["artist"])) if data.solution is not None else {}
    paintings = data.train.assign(true=data.train["artist"], fold=folds["fold"].to_numpy())
    crops = data.test.assign(true=[truth.get(image_id) for image_id in data.test["id"]], fold=fold)
    columns = ["id", "path", "true", "fold"]
    if ids:
        known = pd.concat([paintings[columns], crops[columns]]).set_index("id")
        missing = [image_id for image_id in ids if image_id not in known.index]
        if missing:
            raise UserError(f"--ids: {missing[0]} is neither a train id nor a test id of {data.root}")
        return known.loc[ids].reset_index()
    rng = np.random.default_rng(0)
    if test:
        return crops.iloc[np.sort(rng.choice(len(crops), min(count, len(crops)), replace=False))][columns]
    by_artist = [rng.permutation(group.index.to_numpy()) for _, group in paintings.groupby("artist")]
    spread = []  # one painting of each artist, then a second of each, ...
    for round_ in range(max(len(indices) for indices in by_artist)):
        spread += [indices[round_] for indices in by_artist if round_ < len(indices)]
    return paintings.loc[spread[:count], columns]


def run_explain(outputs: Path, name: str, data: CompetitionData, count: int, ids: Optional[list[str]], test: bool,
                fold: int, out: Optional[Path], log: Callable[[str], None] = print) -> Path:
    cfg = read_saved(outputs / name).experiment
    if fold not in range(cfg.data.n_folds):
        raise UserError(f"--fold {fold}: {name} has folds 0 to {cfg.data.n_folds - 1}")
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    rows = choose_rows(data, folds, count, ids, test, fold)
    pictures = explain_images(outputs, name, data, rows, select_device(), log)
    path = out or outputs / name / ("explain_test.png" if test else "explain.png")
    picture = cv2.cvtColor(grid(pictures), cv2.COLOR_RGB2BGR)
    write_bytes(cv2.imencode(".png", picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes(), path)
    right = sum(p.predicted == p.true for p in pictures if p.true is not None)
    known = sum(p.true is not None for p in pictures)
    log(f"wrote {path}: {len(pictures)} images, {right} of {known} with a known artist predicted right")
    return path


def command_explain(args: argparse.Namespace) -> None:
    from ..pipeline.resolve import log, resolve_data_root

    outputs = Path(args.outputs)
    cfg = read_saved(outputs / args.experiment).experiment
    data = load_competition_data(resolve_data_root(args.data), cfg.data.label_fixes, log=log)
    run_explain(outputs, args.experiment, data, args.images, args.ids, args.test, args.fold,
                Path(args.out) if args.out else None, log)
