"""The one way this repository deletes what it wrote. `remove_output` refuses, with one line and nothing deleted, a
path that is not strictly inside the root it is given (after symbolic links are resolved), a symbolic link, and
anything it does not recognise by its shape as something a command writes: a fold folder or a file in one, an
experiment's published oof.csv / test_probs.csv or TensorBoard folder, a submission, an export bundle, or the
temporary file or folder of an atomic write. Whatever a name or an option says, it cannot delete a repository, a
data folder or an experiment it was not asked about."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError
from .files import TEMPORARY, size_text, writer_gone
from .layout import FOLD_FOLDER, ExperimentDir, is_experiment_folder, is_export_bundle

SUBMISSION_HEADER = b"id,artist"


def _is_submission(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return path.suffix == ".csv" and handle.readline().strip() == SUBMISSION_HEADER
    except OSError:
        return False


def recognised(path: Path) -> Optional[str]:
    """What `path` is, if it is something a command writes and may delete again; None otherwise."""
    name, parent = path.name, path.parent
    if TEMPORARY.fullmatch(name):
        return "the temporary file of an interrupted write"
    if is_experiment_folder(parent):
        if FOLD_FOLDER.fullmatch(name) and path.is_dir():
            return "a fold folder"
        if name in (ExperimentDir(parent).oof.name, ExperimentDir(parent).test_probs.name) and path.is_file():
            return "a published result"
    if FOLD_FOLDER.fullmatch(parent.name) and is_experiment_folder(parent.parent) and path.is_file():
        return "a fold's file"
    if parent.name == ExperimentDir(parent).tensorboard.name and is_experiment_folder(parent.parent) \
            and path.is_dir():
        return "a TensorBoard folder"
    if is_export_bundle(path):
        return "an export bundle"
    if path.is_file() and _is_submission(path):
        return "a submission"
    return None


def remove_output(root: Path, path: Path) -> None:
    """Delete `path` (a file or a folder tree) if it is recognised and strictly inside `root`; a path that does not
    exist is nothing to do."""
    if not os.path.lexists(path):
        return
    if Path(path).is_symlink():
        raise UserError(f"refusing to delete {path}: it is a symbolic link (to {os.readlink(path)}); remove it by hand "
                        "if it should go")
    base, target = Path(root).resolve(), Path(path).resolve()
    if target == base or not target.is_relative_to(base):
        raise UserError(f"refusing to delete {path}: it is not inside {root}")
    if recognised(target) is None:
        raise UserError(f"refusing to delete {path}: not a fold folder, result, bundle or temporary file this "
                        "repository writes; remove it by hand if it should go")
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()


def remove_stale_temporaries(folder: Path, any_writer: bool = False, log: Callable[[str], None] = print) -> int:
    """Remove the temporary files and folders of atomic writes in `folder` (not below) whose writer has ended: a
    process of this machine that no longer runs, or, with `any_writer` (the caller holds the lock every writer into
    `folder` holds), every one. Returns the bytes freed."""
    if not folder.is_dir():
        return 0
    freed = 0
    for path in sorted(folder.iterdir()):
        if not TEMPORARY.fullmatch(path.name) or not (any_writer or writer_gone(path.name)):
            continue
        size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.is_dir() \
            else path.stat().st_size
        remove_output(folder, path)
        freed += size
        log(f"removed {path}, left by a write that was interrupted ({size_text(size)})")
    return freed
