"""A run killed with SIGKILL part-way through a fold resumes and ends exactly where an uninterrupted run does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from .conftest import TINY_RUN, run_cli

REPO = Path(__file__).resolve().parent.parent
TWO_EPOCHS = [*TINY_RUN, "train.epochs=2", "train.patience=0"]


def run_args(root, work: Path) -> list[str]:
    return ["run", "exp00", "--data", str(root), "--outputs", str(work / "outputs"),
            "--submissions", str(work / "submissions"), *TWO_EPOCHS]


def test_sigkill_mid_fold_then_rerun_equals_an_uninterrupted_run(tiny_root, tmp_path, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run_cli(*run_args(tiny_root, reference)) == 0

    fold1 = killed / "outputs" / "exp00" / "fold1"
    process = subprocess.Popen([sys.executable, "-m", "src.cli", *run_args(tiny_root, killed)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (fold1 / "history.csv").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (fold1 / "done.json").exists(), "the kill came too late to interrupt fold 1"
    assert torch.load(fold1 / "last.pt", weights_only=True)["epoch"] == 1

    capsys.readouterr()
    assert run_cli(*run_args(tiny_root, killed)) == 0
    log = capsys.readouterr().out
    assert "fold 0: already complete, skipped" in log and "fold 1: resuming after epoch 1" in log
    for name in ("oof.csv", "test_probs.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(killed / "outputs" / "exp00" / name),
                                      pd.read_csv(reference / "outputs" / "exp00" / name))
    pd.testing.assert_frame_equal(pd.read_csv(fold1 / "history.csv").drop(columns="seconds"),
                                  pd.read_csv(reference / "outputs" / "exp00" / "fold1" / "history.csv")
                                  .drop(columns="seconds"))
