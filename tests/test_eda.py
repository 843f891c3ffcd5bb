"""EDA pictures and the near-duplicate finder."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.tools.eda import DUPLICATE_DISTANCE, image_stats

from .conftest import assert_picture, run_cli


@pytest.mark.slow
def test_eda_pairs_an_image_with_its_resized_reencoded_copy_only(data_copy, tmp_path):
    """Two real photos and a copy of the first (60% size, JPEG quality 70) join the tiny data: exactly one pair."""
    photos = sorted((Path(importlib.util.find_spec("foolbox").origin).parent / "data").glob("imagenet_*.jpg"))
    photo = cv2.imread(str(photos[0]))
    copy = cv2.resize(photo, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(data_copy / "train" / "copy.jpg"), copy, [cv2.IMWRITE_JPEG_QUALITY, 70])
    shutil.copy(photos[0], data_copy / "train" / "photo.jpg")
    shutil.copy(photos[1], data_copy / "train" / "other.jpg")
    train = pd.read_csv(data_copy / "train.csv", dtype=str)
    artist = train.at[0, "artist"]
    added = pd.DataFrame({"id": ["9001", "9002", "9003"], "artist": artist,
                          "img_path": ["./train/photo.jpg", "./train/copy.jpg", "./train/other.jpg"]})
    pd.concat([train, added]).to_csv(data_copy / "train.csv", index=False)

    out = tmp_path / "eda"
    assert run_cli("eda", "--data", data_copy, "--out", out) == 0
    pairs = pd.read_csv(out / "near_duplicates.csv", dtype=str)
    assert len(pairs) == 1 and {pairs.at[0, "i_id"], pairs.at[0, "j_id"]} == {"9001", "9002"}
    assert int(pairs.at[0, "distance"]) <= DUPLICATE_DISTANCE
    images = pd.read_csv(out / "images.csv", dtype={"id": str}).set_index("id")
    assert len(images) == len(train) + 3 + len(pd.read_csv(data_copy / "test.csv"))
    assert images.loc["9002", "width"] == copy.shape[1] and images.loc["9002", "height"] == copy.shape[0]
    for name in ("class_counts", "image_sizes", "greyscale", "near_duplicates"):
        assert_picture(out / f"{name}.png")


def test_greyscale_flag_follows_the_pixels(tiny_root, tmp_path):
    train = pd.read_csv(tiny_root / "train.csv", dtype=str)
    colour = next(image for image in (cv2.imread(str(tiny_root / path)) for path in train["img_path"])
                  if image_stats_of(image, tmp_path / "c.jpg")["greyscale"] is False)
    grey = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    assert image_stats_of(grey, tmp_path / "g1.jpg")["greyscale"]  # one channel
    assert image_stats_of(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), tmp_path / "g3.jpg")["greyscale"]  # 3 equal ones
    tinted = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    tinted[..., 2] = np.clip(tinted[..., 2].astype(int) + 40, 0, 255)  # a sepia-like tint is colour
    assert not image_stats_of(tinted, tmp_path / "t.jpg")["greyscale"]


def image_stats_of(image, path):
    cv2.imwrite(str(path), image)
    return image_stats(str(path))
