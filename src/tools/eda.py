"""`bash run.sh eda`: pictures of a data root (class counts, image sizes, greyscale share, near-duplicate pairs side
by side) and the tables behind them, written to OUTPUTS/eda.

Near-duplicates are found with a perceptual hash (pHash, as imagehash.phash defines it): the image in greyscale,
shrunk to 32x32, its 8x8 lowest-frequency DCT coefficients, one bit each (above their median or not). Resizing
and JPEG re-encoding barely change those 64 bits, while different pictures differ in about half of them, so
pairs within a small Hamming distance are near-duplicates. (A difference hash, dHash, was tried first: on the
demo's dark, low-contrast textures its bits flip under re-encoding, copies reached distance 15 while different
paintings came within 3.)
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from ..core.files import write_csv
from ..data.competition import CompetitionData
from ..data.geometry import measure_test_geometry
from ..data.images import read_image
from ..pipeline.figures import pyplot, save_png

# Of 64 bits. On the demo data a resized (x0.6), re-encoded (JPEG 70) copy stays within 4 of its source and no two
# different images come closer than 12; on real photos (foolbox's ImageNet samples) within 2 against 18.
DUPLICATE_DISTANCE = 8
GREY_TOLERANCE = 12  # an image is greyscale when 99% of its pixels have channels within this many levels



def phash(image: np.ndarray) -> np.uint64:
    """64-bit perceptual hash of an RGB or greyscale uint8 image."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    low = cv2.dct(cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32))[:8, :8]
    return np.packbits((low > np.median(low)).ravel()).view(">u8")[0].astype(np.uint64)


def _distance_blocks(hashes: np.ndarray, chunk: int = 1024):
    """(first row, distances of rows first.. first+chunk to every hash) with the pairs j <= i set to 65, so each
    pair counts once and never an image with itself; memory stays at chunk x len(hashes)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    columns = np.arange(len(hashes))
    for first in range(0, len(hashes), chunk):
        rows = columns[first:first + chunk]
        distance = np.bitwise_count(hashes[rows, None] ^ hashes[None, :])
        distance[columns[None, :] <= rows[:, None]] = 65
        yield first, distance


def _pair_frame(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    i, j, distance = (np.concatenate(column).astype(int) if parts else np.zeros(0, int) for column in zip(*parts))
    pairs = pd.DataFrame({"i": i, "j": j, "distance": distance})
    return pairs.sort_values(["distance", "i", "j"], kind="stable").reset_index(drop=True)


def hash_pairs(hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Every pair (i < j) whose hashes differ in at most max_distance bits: columns i, j, distance, closest first."""
    parts = []
    for first, distance in _distance_blocks(hashes):
        i, j = np.nonzero(distance <= max_distance)
        parts.append((first + i, j, distance[i, j]))
    return _pair_frame(parts)


def closest_pairs(hashes: np.ndarray, count: int) -> pd.DataFrame:
    """The `count` pairs with the smallest distances (columns i, j, distance), however far apart."""
    parts = []
    for first, distance in _distance_blocks(hashes):
        flat = distance.ravel()
        best = np.argpartition(flat, min(count, flat.size - 1))[:count]
        best = best[flat[best] <= 64]
        i, j = np.unravel_index(best, distance.shape)
        parts.append((first + i, j, flat[best]))
    return _pair_frame(parts).head(count)


def image_stats(path: str) -> dict:
    """Size (from the header), greyscale flag and pHash of one image (large ones decoded at half size, which is
    plenty for a 32x32 hash and a greyscale check, and twice as fast)."""
    with Image.open(path) as header:
        width, height, mode = header.width, header.height, header.mode
    image = read_image(path, reduce=2 if min(width, height) >= 256 else 1)
    spread = image.max(axis=2).astype(np.int16) - image.min(axis=2)
    greyscale = mode in ("1", "L", "LA", "I", "I;16") or bool(np.percentile(spread, 99) <= GREY_TOLERANCE)
    return {"width": width, "height": height, "greyscale": greyscale, "phash": phash(image)}


def scan_images(data: CompetitionData) -> pd.DataFrame:
    """One row per train and test image: split, id, artist (train), path, width, height, greyscale, phash."""
    frames = [data.train.assign(split="train")[["split", "id", "artist", "path"]],
              data.test.assign(split="test", artist="")[["split", "id", "artist", "path"]]]
    images = pd.concat(frames, ignore_index=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        stats = pd.DataFrame(list(pool.map(image_stats, images["path"])))
    return pd.concat([images, stats], axis=1)


# ----- EDA pictures -----

def plot_class_counts(images: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    counts = images.loc[images["split"] == "train", "artist"].value_counts().sort_values()
    fig, ax = plt.subplots(figsize=(8, max(4, 0.2 * len(counts))))
    ax.barh(counts.index, counts.to_numpy(), color="tab:blue")
    ax.set_xlabel("train images")
    ax.set_title(f"train images per artist ({counts.sum()} images, {len(counts)} artists, "
                 f"largest/smallest {counts.max() / counts.min():.0f}x)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def plot_image_sizes(images: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
        part = images[images["split"] == split]
        ax.scatter(part["width"], part["height"], s=6, alpha=0.4, color=colour,
                   label=f"{split} ({len(part)}; median {int(part['width'].median())}x{int(part['height'].median())})")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("image sizes")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def plot_greyscale_share(images: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    train = images[images["split"] == "train"]
    share = train.groupby("artist")["greyscale"].mean().sort_values()
    shown = share[share > 0] if (share > 0).any() else share.tail(10)
    fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(shown) + 1)))
    ax.barh(shown.index, shown.to_numpy(), color="tab:gray")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the artist's train images that are greyscale")
    test_share = images.loc[images["split"] == "test", "greyscale"].mean()
    ax.set_title(f"greyscale images: train {train['greyscale'].mean():.1%}, test {test_share:.1%} "
                 f"(artists with any shown)")
    fig.tight_layout()
    return save_png(fig, path)


def plot_duplicate_pairs(images: pd.DataFrame, pairs: pd.DataFrame, path: Path, threshold: int) -> Path:
    """Pairs of images side by side with their pHash distance and whether it counts as a near-duplicate."""
    plt = pyplot()
    fig, axes = plt.subplots(len(pairs), 2, figsize=(7, 3.2 * len(pairs)), squeeze=False)
    for (left, right), pair in zip(axes, pairs.itertuples(index=False)):
        verdict = "near-duplicate" if pair.distance <= threshold else "not a duplicate"
        for ax, index in ((left, pair.i), (right, pair.j)):
            image = images.iloc[int(index)]
            ax.imshow(read_image(image["path"]))
            ax.set_title(f"{image['split']} {image['id']} {image['artist']} ({image['width']}x{image['height']})",
                         fontsize=8)
            ax.axis("off")
        left.text(1.1, -0.04, f"pHash distance {pair.distance} of 64 bits: {verdict}", transform=left.transAxes,
                  ha="center", va="top", fontsize=9, color="black" if pair.distance <= threshold else "dimgray")
    fig.suptitle(f"closest pHash pairs (near-duplicate at distance <= {threshold} of 64 bits)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / len(pairs) / 3.2))
    return save_png(fig, path, dpi=80)


def eda(data: CompetitionData, out_dir: Path, threshold: int = DUPLICATE_DISTANCE, show: int = 6,
        log: Callable[[str], None] = print) -> list[Path]:
    """Scan every train and test image once, then write the EDA pictures and tables to out_dir. The pair picture
    shows the closest `show` pairs: the near-duplicates first, then (if fewer) the closest pairs beyond the
    threshold, marked as not duplicates, so it also shows what the threshold rejects."""
    images = scan_images(data)
    hashes = images["phash"].to_numpy()
    duplicates = hash_pairs(hashes, threshold)
    named = duplicates.assign(**{f"{side}_{column}": images[column].to_numpy()[duplicates[side]]
                                 for side in ("i", "j") for column in ("split", "id", "artist")})
    write_csv(images.assign(phash=[f"{h:016x}" for h in images["phash"]]).drop(columns="path"),
              out_dir / "images.csv")
    write_csv(named.drop(columns=["i", "j"]), out_dir / "near_duplicates.csv")
    written = [plot_class_counts(images, out_dir / "class_counts.png"),
               plot_image_sizes(images, out_dir / "image_sizes.png"),
               plot_greyscale_share(images, out_dir / "greyscale.png")]
    closest = closest_pairs(hashes, max(show, min(len(duplicates), 12)))
    if len(closest):
        written.append(plot_duplicate_pairs(images, closest, out_dir / "near_duplicates.png", threshold))
    log(f"eda: {len(images)} images ({(images['split'] == 'train').sum()} train); greyscale "
        f"{images['greyscale'].mean():.1%}; {len(duplicates)} near-duplicate pairs at pHash distance <= "
        f"{threshold}")
    log(f"eda: {measure_test_geometry(data.train, data.test).summary()}")
    return written + [out_dir / "images.csv", out_dir / "near_duplicates.csv"]


def command_eda(args: argparse.Namespace) -> None:
    from ..data.competition import load_competition_data
    from ..pipeline.resolve import log, resolve_data_root

    data = load_competition_data(resolve_data_root(args.data), log=log)
    threshold = DUPLICATE_DISTANCE if args.threshold is None else args.threshold
    for path in eda(data, Path(args.out) if args.out else Path(args.outputs) / "eda", threshold, log=log):
        log(f"wrote {path}")
