"""Locks that keep two runs of one experiment from writing the same files at once (a second terminal, a SLURM
requeue while the old job still runs): one per fold while it trains, one while an experiment publishes.

They are POSIX record locks (fcntl.lockf), which the operating system releases when their process ends, however it
ends, so a run killed with SIGKILL leaves nothing to clean up and its rerun resumes. Unlike flock they are not
inherited by forked children: DataLoader workers, which outlive a killed parent by a few seconds, do not keep the
lock. The lock file holds who took it last.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from ..core.errors import UserError
from ..core.layout import ExperimentDir


def holder() -> str:
    return f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})"


@contextlib.contextmanager
def locked(path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock at `path` for the duration. Taken already: wait for it (`wait`), or stop with one line naming
    the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            handle.seek(0)
            raise UserError(f"{what} is in progress in {handle.read().strip() or 'another process'} (lock {path}); "
                            "wait for it to end or stop it, then rerun") from None
        handle.seek(0)
        handle.truncate()
        handle.write(holder())
        handle.flush()
        yield


def ensure_unlocked(out_dir: Path) -> None:
    """Stop with one line if any of an experiment's locks is held (before --restart deletes its folder)."""
    for path in ExperimentDir(out_dir).locks():
        with locked(path, f"{out_dir.name}: {path.stem}"):
            pass
