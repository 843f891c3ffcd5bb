"""A run killed with SIGKILL part-way through a fold resumes and ends exactly where an uninterrupted run does:
exp11 (random crops and the strong augmentation set, warm restarts, the class-balancing sampler, focal loss,
CutMix, validation crops) with an EMA of the weights and two DataLoader workers. While it runs, a second run of the
same fold is refused; the kill releases its lock."""
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
               "train.cutmix_prob=1.0", "train.ema_decay=0.99", "train.keep_checkpoints=true"]
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
    os.kill(process.pid, signal.SIGSTOP)  # mid-fold, holding the fold's lock
    capsys.readouterr()
    assert run_cli(*run_args(tiny_root, killed)) == 2  # a second run of the same fold meanwhile
    refusal = capsys.readouterr().err.strip().splitlines()
    assert len(refusal) == 1 and f"training exp11 fold 0 is in progress in process {process.pid} " in refusal[0]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (fold / "done.json").exists(), "the kill came too late to interrupt the fold"
    assert torch.load(fold / "last.pt", weights_only=True)["epoch"] == 1

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


def test_resume_on_a_machine_that_sees_fewer_gpus_restores_what_fits(monkeypatch):
    """last.pt saved by a plain run on a 4-GPU box, resumed by a --gpus child that sees one GPU: the stream of the
    GPU it trains on is restored, the others are named in one line, nothing raises."""
    from src.training.loop import capture_rng, restore_rng

    def set_all(states):
        if len(states) > 1:
            raise IndexError("list index out of range")  # what torch does for GPUs it does not see

    restored, lines = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((8,), i, dtype=torch.uint8)
                                                                  for i in range(4)])
    state = capture_rng()
    restore_rng(state, lines.append)
    assert [device for device, _ in restored] == [0] and torch.equal(restored[0][1], state["cuda"][0])
    assert len(lines) == 1 and "4 GPUs" in lines[0] and "sees 1" in lines[0] and "1 to 3" in lines[0]


def _another_process_takes(path: Path) -> bool:
    """Whether a second process gets the lock at `path` at once."""
    probe = ("import fcntl, sys\nwith open(sys.argv[1], 'a+') as handle:\n    try:\n"
             "        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    except OSError:\n        sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0


def test_a_lock_taken_again_by_its_holder_stays_held_until_the_outer_hold_ends(tmp_path):
    """POSIX record locks belong to the process, and closing any handle of the file drops them all: the MLflow tracker
    takes the tracking lock again while creating a fold's parent run, which used to leave the rest of its critical
    section unlocked (two parent runs under --gpus)."""
    from src.pipeline.locks import held_elsewhere, locked

    path = tmp_path / ".locks" / "tracking.lock"
    with locked(path, "tracking", wait=True):
        with locked(path, "tracking", wait=True):
            assert not _another_process_takes(path)
        assert held_elsewhere(path) is None  # our own hold, and asking does not drop it
        assert not _another_process_takes(path), "the inner release dropped the outer hold"
    assert _another_process_takes(path)
