"""Frozen-feature baselines: the pooled features of a frozen pretrained timm backbone, cached on disk, and a
scikit-learn classifier (logistic regression, k-NN or a small MLP) fitted per fold on them.

A fold writes the same val_probs.csv, test_probs.csv and done.json as a fine-tuned fold, so the OOF, the
submission and the ablation table treat a frozen-feature experiment like any other.

The cache holds one .npz per (backbone, weights, input size and normalisation, image list): the image list is
keyed by every file's path, size and modification time, so a changed image is embedded again and the features
of one data root are shared by every frozen-feature config and by the few-shot evaluator.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..core.errors import UserError
from ..core.files import atomic_path, write_csv
from ..core.layout import FoldDir
from ..core.metrics import scores
from ..core.runtime import worker_count
from ..core.schema import ExperimentConfig, FrozenConfig
from ..data.competition import CompetitionData
from ..data.device_input import DeviceBatches, InputStage
from ..data.geometry import ValidationSet, validation_set
from ..data.loader import ImageDataset, make_loader
from ..data.transforms import build_eval_transform
from ..inference.probabilities import predict_features, probs_frame
from ..model.networks import build_backbone, normalisation

FEATURE_DIR = "features"


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(cfg: ExperimentConfig, paths: Sequence[str], cache_dir: Path, test: bool,
               boxes: np.ndarray | None = None) -> Path:
    """Where the features of these images (or of these crops of them) under this backbone and input pipeline are
    cached."""
    model, size = cfg.model, cfg.input.img_size
    view = {"backbone": model.backbone, "weights": model.weights, "pretrained": model.pretrained, "size": size,
            "mean": cfg.input.mean, "std": cfg.input.std, "test": test, "crop": cfg.augment.crop,
            "mimic_scale": cfg.augment.mimic_scale}
    if boxes is not None:
        view["boxes"] = _digest(np.round(boxes, 6).tolist())
    images = [(path, (stat := os.stat(path)).st_size, stat.st_mtime_ns) for path in paths]
    return cache_dir / f"{model.backbone}_{size}px_{_digest(view)}_{_digest(images)}.npz"


def embed_images(cfg: ExperimentConfig, paths: Sequence[str], cache_dir: Path, device: torch.device,
                 test: bool = False, log: Callable[[str], None] = print,
                 boxes: np.ndarray | None = None) -> np.ndarray:
    """Pooled features (n_images x num_features, float32) of the frozen backbone, from the cache when there.
    Images go through the evaluation pipeline: train images as validation images, test=True as test crops; with
    `boxes`, those crops of the images, resized like the test crops."""
    if not cfg.model.pretrained:
        raise UserError("frozen features need a pretrained backbone: set model.pretrained=true "
                        "(random features are no baseline)")
    path = cache_path(cfg, paths, cache_dir, test, boxes)
    if path.is_file():
        with np.load(path) as cached:
            if len(cached["features"]) == len(paths):
                log(f"features: {len(paths)} images from {path}")
                return cached["features"]
    backbone = build_backbone(cfg.model, cfg.input.img_size).to(device)
    mean, std = normalisation(backbone, cfg.input.mean, cfg.input.std)
    loader = make_loader(ImageDataset(paths, None, build_eval_transform(cfg, test=test), boxes=boxes),
                         cfg.inference.batch_size, worker_count(cfg.train.num_workers, device), device, train=False)
    features = predict_features(backbone, DeviceBatches(loader, device, InputStage(mean, std)), cfg.train.amp,
                                cfg.train.amp_dtype, desc=f"features {cfg.model.backbone}",
                                progress_seconds=cfg.tracking.progress_seconds)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, features=features)
    log(f"features: embedded {len(paths)} images with frozen {cfg.model.backbone} at {cfg.input.img_size}px "
        f"({features.shape[1]} features each) -> {path}")
    return features


def build_classifier(cfg: FrozenConfig, seed: int):
    """A scikit-learn pipeline on L2-normalised features (the cosine geometry of the few-shot prototypes);
    the linear model and the MLP also get standardised inputs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if cfg.classifier == "knn":
        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=cfg.knn_k, weights=cfg.knn_weights))
    if cfg.classifier == "logreg":
        model = LogisticRegression(C=cfg.logreg_c, max_iter=2000)
    else:
        model = MLPClassifier(hidden_layer_sizes=(cfg.mlp_hidden,), alpha=cfg.mlp_alpha,
                              max_iter=cfg.mlp_max_iter, random_state=seed)
    return make_pipeline(Normalizer(), StandardScaler(), model)


def class_probabilities(classifier, features: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba spread over all classes (a class absent from the fitted rows gets probability 0)."""
    probs = np.zeros((len(features), n_classes))
    probs[:, classifier.classes_] = classifier.predict_proba(features)
    return probs


class FrozenFeatureFolds:
    """Fits one fold's classifier at a time on the other folds' features; the features of the train and test
    images are computed (or read from the cache) once, on the first fold that needs them."""

    def __init__(self, cfg: ExperimentConfig, data: CompetitionData, cache_dir: Path, device: torch.device,
                 log: Callable[[str], None] = print):
        if cfg.frozen is None:
            raise ValueError("FrozenFeatureFolds needs a config with a frozen: section")
        if data.style is not None:
            raise UserError(f"{cfg.name}: frozen-feature experiments do not use style-transfer images; "
                            "set data.style_transfer=false")
        self.cfg, self.data, self.cache_dir, self.device, self.log = cfg, data, cache_dir, device, log

    @cached_property
    def train_features(self) -> np.ndarray:
        return embed_images(self.cfg, self.data.train["path"].tolist(), self.cache_dir, self.device, log=self.log)

    @cached_property
    def validation(self) -> ValidationSet:
        return validation_set(self.cfg, self.data.train)

    @cached_property
    def validation_features(self) -> np.ndarray:
        """The features of every validation row: the train images themselves, or their validation crops."""
        if not self.validation.are_crops:
            return self.train_features
        return embed_images(self.cfg, self.validation.paths, self.cache_dir, self.device, test=True, log=self.log,
                            boxes=self.validation.boxes)

    @cached_property
    def test_features(self) -> np.ndarray:
        return embed_images(self.cfg, self.data.test["path"].tolist(), self.cache_dir, self.device, test=True,
                            log=self.log)

    def fit_fold(self, folds: pd.DataFrame, fold: int, fold_dir: FoldDir, fingerprint: str) -> float:
        """Fit on the other folds, write val_probs.csv, test_probs.csv and done.json; return the val macro F1."""
        cfg, data = self.cfg, self.data
        is_val = (folds["fold"] == fold).to_numpy()
        labels = data.train["label"].to_numpy()
        classifier = build_classifier(cfg.frozen, seed=cfg.seed + fold)
        classifier.fit(self.train_features[~is_val], labels[~is_val])
        n_classes = len(data.classes)
        validation = self.validation
        is_val_row = np.isin(validation.ids, data.train["id"][is_val])
        val_probs = class_probabilities(classifier, self.validation_features[is_val_row], n_classes)
        test_probs = class_probabilities(classifier, self.test_features, n_classes)
        write_csv(probs_frame(validation.ids[is_val_row], val_probs, data.classes, crops=validation.crops[is_val_row]),
                  fold_dir.val_probs)
        write_csv(probs_frame(data.test["id"], test_probs, data.classes), fold_dir.test_probs)
        val = scores(validation.labels[is_val_row], val_probs)
        fold_dir.write_done(fingerprint, {"fold": fold, "classifier": cfg.frozen.classifier,
                                          "best_macro_f1": val["macro_f1"]})
        self.log(f"{cfg.name} fold {fold}: {cfg.frozen.classifier} on frozen {cfg.model.backbone} features, "
                 f"{int((~is_val).sum())} train / {int(is_val.sum())} val images: val macro F1 {val['macro_f1']:.4f}"
                 f"  acc {val['accuracy']:.4f}")
        return val["macro_f1"]
