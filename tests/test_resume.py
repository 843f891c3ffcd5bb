"""A run killed with SIGKILL part-way through a fold resumes and ends exactly where an uninterrupted run does:
exp11 (random crops and the strong augmentation set, warm restarts, the class-balancing sampler, focal loss,
CutMix, validation crops) with an EMA of the weights and two DataLoader workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from .conftest import TINY_RUN, run_cli

REPO = Path(__file__).resolve().parent.parent
RANDOM_RUNG = [*TINY_RUN, "train.epochs=3", "train.patience=0", "train.folds=[0]", "train.num_workers=2",
               "train.cutmix_prob=1.0", "train.ema_decay=0.99"]
TIMING = ["seconds", "train_images_per_s", "data_wait_share"]


def run_args(root, work: Path) -> list[str]:
    return ["run", "exp11", "--data", str(root), "--outputs", str(work / "outputs"),
            "--submissions", str(work / "submissions"), *RANDOM_RUNG]


@pytest.mark.slow
def test_sigkill_mid_fold_then_rerun_equals_an_uninterrupted_run(tiny_root, tmp_path, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run_cli(*run_args(tiny_root, reference)) == 0

    fold = killed / "outputs" / "exp11" / "fold0"
    process = subprocess.Popen([sys.executable, "-m", "src.cli", *run_args(tiny_root, killed)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (fold / "history.csv").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (fold / "done.json").exists(), "the kill came too late to interrupt the fold"
    assert torch.load(fold / "last.pt", weights_only=True)["epoch"] == 1

    capsys.readouterr()
    assert run_cli(*run_args(tiny_root, killed)) == 0
    assert "fold 0: resuming after epoch 1" in capsys.readouterr().out
    expected = reference / "outputs" / "exp11" / "fold0"
    for name in ("val_probs.csv", "test_probs.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(fold / name), pd.read_csv(expected / name), check_exact=True)
    history = pd.read_csv(fold / "history.csv")
    pd.testing.assert_frame_equal(history.drop(columns=TIMING), pd.read_csv(expected / "history.csv")
                                  .drop(columns=TIMING), check_exact=True)
    lrs = history["lr"].tolist()  # at each epoch's start: 2-epoch cycles, so epoch 3 restarts at the floor
    assert lrs[0] < lrs[1] and lrs[2] < lrs[1] and lrs[2] == pytest.approx(5e-6), lrs
    for name, weights in (("best.pt", "model"), ("best.pt", "raw_model"), ("last.pt", "model"), ("last.pt", "ema")):
        resumed, uninterrupted = (torch.load(d / name, weights_only=True)[weights] for d in (fold, expected))
        assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted), (name, weights)
