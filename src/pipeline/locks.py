"""Locks that keep two runs of one experiment from writing the same files at once (a second terminal, a SLURM
requeue while the old job still runs): one per fold, held by a run from before it writes anything into the experiment
until it ends; one while an experiment's config.yaml is written; one while it publishes.

They are POSIX record locks (fcntl.lockf), which the operating system releases when their process ends, however it
ends, so a run killed with SIGKILL leaves nothing to clean up and its rerun resumes. Unlike flock they are not
inherited by forked children: DataLoader workers, which outlive a killed parent by a few seconds, do not keep the
lock. The lock file holds who took it last.

A process that holds a lock and asks for it again (the MLflow tracker creates a fold's parent run under the lock it
already holds) gets it at once and keeps it: closing any handle of the file would drop every lock the process has on
it, so a lock taken again opens no second handle.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional

from ..core.errors import UserError
from ..core.redact import redact

_HELD: dict[Path, int] = {}  # the locks this process holds, by resolved path: how many times each is taken


def holder() -> str:
    """Who takes a lock: the process, the machine and its command line (passwords in URLs hidden)."""
    return f"process {os.getpid()} on {socket.gethostname()} ({redact(' '.join(sys.argv))[:200]})"


@contextlib.contextmanager
def locked(path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock at `path` for the duration. Taken already: wait for it (`wait`), or stop with one line naming
    the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
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
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]


def held_elsewhere(path: Path) -> Optional[str]:
    """Who holds the lock at `path` when another process does (what its file says), else None. Never for a lock this
    process holds (closing any handle of a file would drop every lock the process has on it)."""
    if not path.is_file() or path.resolve() in _HELD:
        return None
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            return handle.read().strip() or "another process"
    return None
