"""Atomic writes: every output goes to a temporary name in the same folder and is renamed into place,
so a killed run never leaves a truncated file that a later step would trust.

A temporary name says who wrote it: `.NAME.HOST-PID.RANDOM8.tmp` (a folder being built, such as an export's, is
named alike), so a later run can tell the leftovers of a killed writer from a write in progress
(src/core/removal.py removes them). A full disk or an exhausted quota stops with one line naming the folder, the
bytes the file needs and the bytes free, instead of a traceback; the file it replaces is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from .errors import DISK_FULL, DISK_FULL_REMEDY, UserError, disk_full_in

_UMASK = os.umask(0)
os.umask(_UMASK)
TEMP_SUFFIX = ".tmp"
# .NAME.HOST-PID.RANDOM8.tmp (HOST-PID missing in the names of earlier versions); RANDOM8: tempfile's 8 characters.
TEMPORARY = re.compile(r"\.(?P<target>.+?)\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp")


def this_host() -> str:
    """The machine's name as temporary names carry it (letters, digits and _)."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def temporary_prefix(name: str) -> str:
    return f".{name}.{this_host()}-{os.getpid()}."


def writer_gone(name: str) -> Optional[bool]:
    """Whether the process that made the temporary file or folder `name` has ended: True or False for a writer on
    this machine, None when it cannot be told (another machine's, or a name of an earlier version)."""
    match = TEMPORARY.fullmatch(name)
    if match is None or match["pid"] is None or match["host"] != this_host():
        return None
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def size_text(count: float) -> str:
    """A size as a person reads it: bytes below a MiB, MiB from there."""
    return f"{count / 2 ** 20:,.1f} MiB" if count >= 2 ** 20 else f"{int(count):,} bytes"


def disk_full_error(error: OSError, path: Path, needed: Optional[int], written: int) -> UserError:
    """The one line for a write that ran out of space (ENOSPC) or quota (EDQUOT)."""
    folder = path.parent
    try:
        free = f"{size_text(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"about {size_text(needed)}" if needed else f"more than the {size_text(written)} written when it stopped"
    return UserError(f"{DISK_FULL[error.errno]} writing {path}: the file needs {need}, and {folder} has {free}; "
                     f"{DISK_FULL_REMEDY}")


@contextmanager
def atomic_path(path: str | os.PathLike, needed: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure delete it. `needed`, the
    size the file will have when known, goes into the message when the disk is full."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as error:  # noqa: BLE001 - torch.save ends a failed write with a RuntimeError of its own
        full = disk_full_in(error)
        if full is None:
            raise
        written = tmp_path.stat().st_size if tmp_path is not None and tmp_path.exists() else 0
        raise disk_full_error(full, path, needed, written) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def temporary_folder(parent: Path, name: str) -> Path:
    """A new folder beside the `name` it will become, named like a temporary file (a folder built, then renamed)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=temporary_prefix(name), suffix=TEMP_SUFFIX, dir=parent))


def write_csv(df, path: str | os.PathLike, **kwargs) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


def write_text(text: str, path: str | os.PathLike) -> None:
    write_bytes(text.encode("utf-8"), path)


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def write_yaml(data: Any, path: str | os.PathLike) -> None:
    write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), path)


def write_json(data: Any, path: str | os.PathLike) -> None:
    write_text(json.dumps(data, indent=2, sort_keys=True), path)


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a checkpoint's nested dicts and lists: about the size torch.save writes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a Python file, so that a full disk surfaces as the OSError (ENOSPC) of its write rather
    than only the C++ writer's 'iostream error'."""
    import torch

    with atomic_path(path, needed=_tensor_bytes(obj)) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def missing_file_reason(path: Path) -> str:
    """Why `path` is not a file that can be read, as the end of a sentence about it: 'is not found', or a symbolic
    link that loops or leads nowhere, a folder, a file that cannot be read."""
    try:
        is_folder = path.is_dir()
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "is not found"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        return f"cannot be read ({error.strerror})"
    return "is a folder, not a file" if is_folder else "is not a regular file"
