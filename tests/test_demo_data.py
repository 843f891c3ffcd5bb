"""The procedural demo dataset: layout, counts, determinism, crop geometry and style separation."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from src.cli import main
from src.data.competition import DEMO_MARKER
from src.demo.dataset import demo_counts, generate_demo_dataset
from src.demo.styles import ARTIST_COUNTS
from src.core.errors import UserError

SMALL = dict(scale=0.02, min_per_artist=4, n_artists=6, min_side=128, max_side=192)
CSV_FILES = ("train.csv", "test.csv", "sample_submission.csv", "solution.csv", "test_crops.csv", "artists_info.csv")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two roots from seed 0 and one from seed 1, all with the small settings."""
    base = tmp_path_factory.mktemp("demo")
    return {name: generate_demo_dataset(base / name, seed=seed, **SMALL)
            for name, seed in (("a", 0), ("b", 0), ("other_seed", 1))}


@pytest.fixture(scope="module")
def root(roots):
    return roots["a"]


def read(root, name):
    return pd.read_csv(root / name, dtype=str, keep_default_na=False)


def decode(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} does not decode"
    return image


def test_artist_table():
    assert len(ARTIST_COUNTS) == 50 and sum(ARTIST_COUNTS.values()) == 5911
    assert list(ARTIST_COUNTS)[:2] == ["Vincent van Gogh", "Edgar Degas"]
    assert ARTIST_COUNTS["Albrecht Du rer"] == 220 and list(ARTIST_COUNTS)[-1] == "Jackson Pollock"


def test_layout_and_file_consistency(root):
    train, test = read(root, "train.csv"), read(root, "test.csv")
    sample, solution = read(root, "sample_submission.csv"), read(root, "solution.csv")
    info = read(root, "artists_info.csv")
    assert list(train.columns) == ["id", "img_path", "artist"]
    assert list(test.columns) == ["id", "img_path"]
    assert list(sample.columns) == list(solution.columns) == ["id", "artist"]
    assert list(info.columns) == ["name", "years", "genre", "nationality"]

    assert list(train["id"]) == [str(i) for i in range(len(train))]
    assert list(train["img_path"]) == [f"./train/{i:04d}.jpg" for i in range(len(train))]
    assert list(test["id"]) == [f"TEST_{i:05d}" for i in range(len(test))]
    assert list(test["img_path"]) == [f"./test/{i}.jpg" for i in test["id"]]
    assert list(sample["id"]) == list(solution["id"]) == list(test["id"])
    assert set(sample["artist"]) == {"Vincent van Gogh"}
    assert set(solution["artist"]) <= set(train["artist"])
    assert list(info["name"]) == list(ARTIST_COUNTS)[:SMALL["n_artists"]]
    assert "," in info.set_index("name").at["Paul Gauguin", "genre"]  # quoted in the file, read back whole

    manifest = json.loads((root / DEMO_MARKER).read_text())
    assert manifest["params"] == dict(seed=0, crops_per_test_painting=2, test_fraction=0.25, **SMALL)
    assert (manifest["train_images"], manifest["test_images"]) == (len(train), len(test))
    for path in list(train["img_path"]) + list(test["img_path"]):
        decode(root / path)


def test_counts_per_artist(root):
    expected = {name: max(4, round(count * 0.02)) for name, count in list(ARTIST_COUNTS.items())[:6]}
    assert read(root, "train.csv")["artist"].value_counts().to_dict() == expected
    held_out = {name: max(1, round(n * 0.25)) for name, n in expected.items()}
    assert demo_counts(6, 0.02, 4, 0.25) == {name: (expected[name], held_out[name]) for name in expected}
    assert read(root, "solution.csv")["artist"].value_counts().to_dict() == {n: 2 * k for n, k in held_out.items()}


def test_orders_are_shuffled(root):
    train_artists = list(read(root, "train.csv")["artist"])
    test_artists = list(read(root, "solution.csv")["artist"])
    assert train_artists != sorted(train_artists, key=list(ARTIST_COUNTS).index)
    assert test_artists != sorted(test_artists, key=list(ARTIST_COUNTS).index)


def test_test_crops_cover_about_a_quarter_of_held_out_paintings(root):
    crops = pd.read_csv(root / "test_crops.csv", keep_default_na=False)
    assert list(crops["id"]) == list(read(root, "test.csv")["id"])
    fraction = crops["width"] * crops["height"] / (crops["painting_width"] * crops["painting_height"])
    assert fraction.between(0.15, 0.35).all() and abs(fraction.mean() - 0.25) < 0.04
    assert (crops["x"] >= 0).all() and (crops["x"] + crops["width"] <= crops["painting_width"]).all()
    assert (crops["y"] >= 0).all() and (crops["y"] + crops["height"] <= crops["painting_height"]).all()
    assert (crops.groupby("painting").size() == 2).all()
    assert crops["x"].nunique() > len(crops) // 2  # positions vary
    for row in crops.itertuples():
        assert decode(root / "test" / f"{row.id}.jpg").shape[:2] == (row.height, row.width)


def test_sizes_and_aspect_ratios_vary(root):
    shapes = [decode(root / path).shape[:2] for path in read(root, "train.csv")["img_path"]]
    long_sides = np.array([max(shape) for shape in shapes])
    aspects = np.array([w / h for h, w in shapes])
    assert long_sides.min() >= 128 and long_sides.max() <= 192 and len(set(long_sides)) > 10
    assert aspects.min() < 0.85 and aspects.max() > 1.2
    assert 0.55 <= aspects.min() and aspects.max() <= 1.65


def test_some_paintings_are_greyscale(root):
    train = read(root, "train.csv")
    greyscale = train["img_path"].map(lambda path: decode(root / path).ndim == 2)
    assert greyscale[train["artist"] == "Albrecht Du rer"].any()
    assert not greyscale[train["artist"] == "Vincent van Gogh"].any()


def test_same_seed_is_byte_identical_and_other_seed_differs(roots):
    a, b, other = roots["a"], roots["b"], roots["other_seed"]
    for name in (*CSV_FILES, DEMO_MARKER):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for path in ["./train/0000.jpg", "./train/0007.jpg", "./test/TEST_00003.jpg"]:
        assert np.array_equal(decode(a / path), decode(b / path)), path
    assert (a / "train.csv").read_bytes() != (other / "train.csv").read_bytes()
    # The same artist's first train painting under another seed (its train id differs by seed).
    first_of = {name: read(data_root, "train.csv").drop_duplicates("artist").set_index("artist")["img_path"]
                for name, data_root in (("a", a), ("other", other))}
    for artist in first_of["a"].index:
        image_a, image_other = decode(a / first_of["a"][artist]), decode(other / first_of["other"][artist])
        assert image_a.shape != image_other.shape or not np.array_equal(image_a, image_other), artist


def texture_features(path) -> np.ndarray:
    """Mean and spread of each channel, a gradient-orientation histogram and the mean gradient strength."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR).astype(np.float32)
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    magnitude, orientation = np.hypot(gx, gy), np.arctan2(gy, gx) % np.pi
    bins = np.minimum((orientation / np.pi * 8).astype(int), 7)
    histogram = np.bincount(bins.ravel(), magnitude.ravel(), minlength=8)
    return np.concatenate([image.mean((0, 1)), image.std((0, 1)), histogram / histogram.sum(), [magnitude.mean()]])


def test_artists_are_separable_by_simple_statistics(root):
    """Nearest artist centroid on colour and texture statistics: far above chance (1/6) on train
    (leave-one-out) and on the test crops, so the artist is recognisable from local texture."""
    train, solution = read(root, "train.csv"), read(root, "solution.csv")
    features = np.stack([texture_features(root / path) for path in train["img_path"]])
    crop_features = np.stack([texture_features(root / "test" / f"{i}.jpg") for i in solution["id"]])
    mean, std = features.mean(0), features.std(0) + 1e-6
    features, crop_features = (features - mean) / std, (crop_features - mean) / std
    labels, names = train["artist"].to_numpy(), sorted(set(train["artist"]))

    def nearest_centroid(samples, exclude=None):
        predictions = []
        for i, sample in enumerate(samples):
            centroids = [features[(labels == name) & (np.arange(len(features)) != (i if exclude else -1))].mean(0)
                         for name in names]
            predictions.append(names[int(np.argmin([((sample - c) ** 2).sum() for c in centroids]))])
        return np.array(predictions)

    assert (nearest_centroid(features, exclude=True) == labels).mean() >= 0.7
    assert (nearest_centroid(crop_features) == solution["artist"].to_numpy()).mean() >= 0.5


def test_existing_complete_root_is_returned_untouched(root):
    before = {name: (root / name).stat().st_mtime_ns for name in ("train.csv", DEMO_MARKER, "train/0000.jpg")}
    assert generate_demo_dataset(root, seed=0, **SMALL) == root
    assert {name: (root / name).stat().st_mtime_ns for name in before} == before


def test_other_arguments_replace_a_previous_demo_without_stale_images(tmp_path):
    tiny = dict(min_per_artist=3, min_side=64, max_side=96)
    generate_demo_dataset(tmp_path, n_artists=3, scale=0.01, **tiny)
    generate_demo_dataset(tmp_path, n_artists=2, scale=0.01, **tiny)
    train, test = read(tmp_path, "train.csv"), read(tmp_path, "test.csv")
    assert set(train["artist"]) == set(list(ARTIST_COUNTS)[:2])
    assert len(list((tmp_path / "train").glob("*.jpg"))) == len(train)
    assert len(list((tmp_path / "test").glob("*.jpg"))) == len(test)
    assert json.loads((tmp_path / DEMO_MARKER).read_text())["params"]["n_artists"] == 2


def test_refuses_to_overwrite_real_competition_data(tmp_path):
    (tmp_path / "train.csv").write_text("id,img_path,artist\n0,./train/0000.jpg,Rembrandt\n")
    with pytest.raises(UserError, match="not demo data"):
        generate_demo_dataset(tmp_path, n_artists=2, scale=0.01)
    assert not (tmp_path / DEMO_MARKER).exists()


@pytest.mark.parametrize("bad", [dict(n_artists=0), dict(n_artists=51), dict(scale=0.0),
                                 dict(min_side=200, max_side=100), dict(crops_per_test_painting=0)])
def test_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, **bad)


@pytest.mark.slow
def test_command_line_prints_one_summary_line(tmp_path, capsys):
    main(["demo-data", "--root", str(tmp_path / "cli"), "--seed", "3", "--scale", "0.01", "--n-artists", "2",
          "--min-per-artist", "3", "--min-side", "64", "--max-side", "96"])  # bash run.sh demo-data ...
    lines = capsys.readouterr().out.strip().splitlines()
    n_train = sum(train for train, _ in demo_counts(2, 0.01, 3).values())
    assert len(lines) == 1 and f"{n_train} train images" in lines[0] and "2 artists" in lines[0]
    assert (tmp_path / "cli" / DEMO_MARKER).is_file()
