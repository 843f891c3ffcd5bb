"""Shared fixtures: a tiny demo dataset and one finished tiny experiment, made once per test session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from src.cli import main as cli_main
from src.data.competition import load_competition_data
from src.demo.dataset import generate_demo_dataset
from src.core.errors import UserError

# Small enough for a 2-core CPU: 6 artists, tiny images, one epoch at 48 px, batch 8. No DataLoader workers: on
# images this small their start-up costs more than they save, and they never change a result (the tests that are
# about workers, and the resume test, set train.num_workers=2).
TINY_RUN = ["--profile", "demo", "input.img_size=48", "train.epochs=1", "train.batch_size=8",
            "inference.batch_size=32", "train.num_workers=0"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    generate_demo_dataset(root, seed=0, scale=0.02, min_per_artist=6, n_artists=6, min_side=64, max_side=112)
    return root


@pytest.fixture
def data_copy(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_root, tmp_path / "data"))


def rewrite(path: Path, edit) -> None:
    """Edit a CSV of a data copy through pandas."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df).to_csv(path, index=False)


def load_error(root: Path) -> str:
    """The message loading `root` stops with; it must be one line."""
    with pytest.raises(UserError) as info:
        load_competition_data(root)
    message = str(info.value)
    assert "\n" not in message
    return message


def assert_picture(path: Path, min_width: int = 400, min_height: int = 250) -> None:
    """A PNG that decodes to a picture of at least this size with something drawn on it (not one flat colour)."""
    import cv2
    import numpy as np

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode as an image"
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, f"{path} is only {width}x{height}"
    colours = len(np.unique(image.reshape(-1, 3)[:: max(1, width * height // 20000)], axis=0))
    assert image.std() > 5 and colours > 20, f"{path} is (nearly) blank: {colours} colours"


def run_cli(*args: str) -> int:
    return cli_main([str(a) for a in args])


@pytest.fixture(scope="session")
def finished_run(tiny_root, tmp_path_factory):
    """exp00 on the tiny data, all 5 folds, in the demo profile."""
    work = tmp_path_factory.mktemp("run")
    outputs, submissions = work / "outputs", work / "submissions"
    code = run_cli("run", "exp00", "--data", tiny_root, "--outputs", outputs, "--submissions", submissions,
                   *TINY_RUN)
    assert code == 0
    return {"root": tiny_root, "outputs": outputs, "submissions": submissions, "exp": outputs / "exp00"}


def resolved(cfg, data):
    """`cfg` with its 'auto' values measured from `data`, as a run resolves them."""
    from src.pipeline.resolve import resolve_with_data

    return resolve_with_data(cfg, None, data, say=lambda _: None).cfg
