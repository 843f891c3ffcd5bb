"""A built-in procedural demo dataset in the competition's layout, so the whole pipeline runs (and is
tested) without the competition files and without downloads.

Train images are whole "paintings"; test images are crops of about a quarter of the area of held-out
paintings that never appear in train, as in the real competition. Each of the 50 artists paints in a
seeded style (texture family, palette, stroke length, width, direction and density), while every
painting gets its own random composition: the artist is recognisable from local texture, not from
layout, so a quarter crop still carries the signal. solution.csv holds the true artist of every test id
so that demo submissions can be scored; test_crops.csv records where each crop was cut.

Made by `bash run.sh demo-data` (or on first use by any command when inputs/ holds no competition data); the real
data loader never imports this package, it only recognises the DEMO.json this package writes.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd

from ..core.errors import UserError
from ..core.files import write_csv, write_json
from ..core.runtime import available_cores
from ..data.competition import DEMO_MARKER
from .painting import pixels, render_painting
from .styles import ARTIST_COUNTS, ARTIST_FACTS, CROP_STREAM, ORDER_STREAM, artist_style, stream_rng

FORMAT_VERSION = 1
JPEG_QUALITY = 90


def _crop_box(seed: int, artist_index: int, painting_index: int, crop_index: int,
              height: int, width: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a crop covering about a quarter of the painting, at a random position."""
    rng = stream_rng(seed, CROP_STREAM, artist_index, painting_index, crop_index)
    area = rng.uniform(0.2, 0.3)
    width_fraction = min(0.9, math.sqrt(area) * math.exp(rng.uniform(-0.15, 0.15)))
    crop_w = pixels(width * width_fraction)
    crop_h = min(height, pixels(height * area / width_fraction))
    x = int(rng.integers(0, width - crop_w + 1))
    y = int(rng.integers(0, height - crop_h + 1))
    return x, y, crop_w, crop_h


# ----------------------------------------------------------------------------------------------------
# The dataset


def demo_counts(n_artists: int = 50, scale: float = 0.1, min_per_artist: int = 6,
                test_fraction: float = 0.25) -> dict[str, tuple[int, int]]:
    """artist -> (train paintings, held-out paintings) of the demo dataset."""
    counts = {}
    for name, count in list(ARTIST_COUNTS.items())[:n_artists]:
        train = max(min_per_artist, round(count * scale))
        counts[name] = (train, max(1, round(train * test_fraction)))
    return counts


def _validate(params: dict) -> None:
    problems = [
        (not 1 <= params["n_artists"] <= len(ARTIST_COUNTS), f"n_artists must be 1..{len(ARTIST_COUNTS)}"),
        (params["seed"] < 0, "seed must be >= 0"),
        (params["scale"] <= 0, "scale must be > 0"),
        (params["min_per_artist"] < 1, "min_per_artist must be >= 1"),
        (params["crops_per_test_painting"] < 1, "crops_per_test_painting must be >= 1"),
        (params["test_fraction"] <= 0, "test_fraction must be > 0"),
        (not 32 <= params["min_side"] <= params["max_side"], "need 32 <= min_side <= max_side"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(f"generate_demo_dataset: {message}")


def _read_manifest(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / DEMO_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_previous_demo(root: Path) -> None:
    """Delete the files of an earlier demo generation, train.csv first and DEMO.json next, so that a run
    killed half-way is never taken for finished data nor for real competition data."""
    for name in ("train.csv", DEMO_MARKER, "test.csv", "sample_submission.csv", "solution.csv", "test_crops.csv",
                 "artists_info.csv"):
        (root / name).unlink(missing_ok=True)
    for pattern in ("train/[0-9]*.jpg", "test/TEST_*.jpg"):
        for path in root.glob(pattern):
            path.unlink()


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"cannot write {path}")


def generate_demo_dataset(root, seed: int = 0, scale: float = 0.1, min_per_artist: int = 6,
                          n_artists: int = 50, crops_per_test_painting: int = 2,
                          test_fraction: float = 0.25, min_side: int = 192, max_side: int = 448) -> Path:
    """Write the demo dataset under `root` and return it as a Path; returns at once when `root` already
    holds a finished demo dataset made with the same arguments.

    Files: train.csv, test.csv, sample_submission.csv, solution.csv (true artist of each test id),
    test_crops.csv (source painting and crop box of each test id), artists_info.csv, train/*.jpg,
    test/*.jpg and, written last, DEMO.json (the arguments and counts). The same arguments give
    byte-identical CSVs and identical pixels.
    """
    root = Path(root)
    params = dict(seed=int(seed), scale=float(scale), min_per_artist=int(min_per_artist), n_artists=int(n_artists),
                  crops_per_test_painting=int(crops_per_test_painting), test_fraction=float(test_fraction),
                  min_side=int(min_side), max_side=int(max_side))
    _validate(params)
    manifest = _read_manifest(root)
    if manifest is not None:
        if (manifest.get("format_version") == FORMAT_VERSION and manifest.get("params") == params
                and (root / "train.csv").is_file()):
            return root
        _remove_previous_demo(root)
    elif (root / "train.csv").is_file():
        raise UserError(f"{root}: holds a train.csv but no {DEMO_MARKER}, so it is not demo data; "
                        "refusing to overwrite it: choose another folder for the demo data")
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)

    names = list(ARTIST_COUNTS)[:n_artists]
    counts = demo_counts(n_artists, scale, min_per_artist, test_fraction)
    # Paintings are numbered per artist: train ones first, then the held-out ones.
    train_paintings = [(a, p) for a, name in enumerate(names) for p in range(counts[name][0])]
    test_crops = [(a, counts[name][0] + p, c) for a, name in enumerate(names) for p in range(counts[name][1])
                  for c in range(crops_per_test_painting)]
    train_paintings = [train_paintings[i] for i in stream_rng(seed, ORDER_STREAM, 0).permutation(len(train_paintings))]
    test_crops = [test_crops[i] for i in stream_rng(seed, ORDER_STREAM, 1).permutation(len(test_crops))]
    digits = max(4, len(str(len(train_paintings) - 1)))
    train_ids = {painting: i for i, painting in enumerate(train_paintings)}
    test_ids = {crop: f"TEST_{i:05d}" for i, crop in enumerate(test_crops)}
    crops_of: dict[tuple[int, int], list[int]] = {}
    for artist, painting, crop in test_crops:
        crops_of.setdefault((artist, painting), []).append(crop)
    styles = [artist_style(seed, a) for a in range(n_artists)]

    def make_train(painting: tuple[int, int]) -> None:
        image = render_painting(styles[painting[0]], seed, *painting, min_side, max_side)
        _write_jpeg(root / "train" / f"{train_ids[painting]:0{digits}d}.jpg", image)

    def make_test(painting: tuple[int, int]) -> list[dict]:
        image = render_painting(styles[painting[0]], seed, *painting, min_side, max_side)
        height, width = image.shape[:2]
        rows = []
        for crop in crops_of[painting]:
            x, y, w, h = _crop_box(seed, *painting, crop, height, width)
            test_id = test_ids[(*painting, crop)]
            _write_jpeg(root / "test" / f"{test_id}.jpg", image[y:y + h, x:x + w])
            rows.append(dict(id=test_id, painting=f"{painting[0]:02d}-{painting[1]:04d}", painting_width=width,
                             painting_height=height, x=x, y=y, width=w, height=h))
        return rows

    with ThreadPoolExecutor(max_workers=available_cores()) as pool:  # numpy and OpenCV release the GIL: a core each
        crop_rows = [row for rows in pool.map(make_test, sorted(crops_of)) for row in rows]
        list(pool.map(make_train, train_paintings))

    test = pd.DataFrame({"id": list(test_ids.values()),
                         "img_path": [f"./test/{test_id}.jpg" for test_id in test_ids.values()]})
    train = pd.DataFrame({"id": range(len(train_paintings)),
                          "img_path": [f"./train/{i:0{digits}d}.jpg" for i in range(len(train_paintings))],
                          "artist": [names[artist] for artist, _ in train_paintings]})
    facts = [ARTIST_FACTS[name] for name in names]
    write_csv(pd.DataFrame({"name": names, "years": [f[0] for f in facts], "genre": [f[1] for f in facts],
                            "nationality": [f[2] for f in facts]}), root / "artists_info.csv")
    write_csv(pd.DataFrame(crop_rows).set_index("id").loc[test["id"]].reset_index(), root / "test_crops.csv")
    write_csv(pd.DataFrame({"id": test["id"], "artist": names[0]}), root / "sample_submission.csv")
    write_csv(pd.DataFrame({"id": test["id"], "artist": [names[artist] for artist, _, _ in test_crops]}),
              root / "solution.csv")
    write_csv(test, root / "test.csv")
    write_csv(train, root / "train.csv")  # last of the CSVs: see _remove_previous_demo
    write_json(dict(generator="src.demo", format_version=FORMAT_VERSION, params=params, artists=n_artists,
                    train_images=len(train), test_images=len(test), held_out_paintings=len(crops_of)),
               root / DEMO_MARKER)
    return root


def summary(root: Path) -> str:
    """One line: what the demo dataset under `root` holds."""
    manifest = _read_manifest(root)
    params = manifest["params"]
    return (f"demo data in {root}: {manifest['train_images']} train images and {manifest['test_images']} test crops "
            f"of {manifest['held_out_paintings']} held-out paintings, {manifest['artists']} artists (seed "
            f"{params['seed']}, scale {params['scale']})")


def command_demo_data(args) -> None:
    """`bash run.sh demo-data`: make (or keep, when made with the same arguments) the demo dataset."""
    root = generate_demo_dataset(Path(args.root), seed=args.seed, scale=args.scale,
                                 min_per_artist=args.min_per_artist, n_artists=args.n_artists,
                                 crops_per_test_painting=args.crops_per_test_painting,
                                 test_fraction=args.test_fraction, min_side=args.min_side, max_side=args.max_side)
    print(summary(root), flush=True)
