"""`bash run.sh export NAME`: an experiment or an ensemble as one folder (and .zip) that predicts offline with the
core packages alone, what a competitor uploads as a Kaggle dataset for a code competition's offline kernel: the
fold weights (float16 where that changes no probability by more than FP16_TOLERANCE), the configs, the code, a
predict.py, and wheels of the pure-Python core packages Kaggle's stock image lacks. The bundle is built in a
temporary folder beside it and replaces an earlier bundle only (never an experiment's folder or anything else: --out
is checked); passwords in URLs are hidden in every config it carries."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zipfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..core.config import run_info
from ..core.errors import UserError
from ..core.files import atomic_path, save_torch, temporary_folder, write_json, write_text
from ..core.layout import BUNDLE_CODE, BUNDLE_MODELS, BUNDLE_WHEELS, ExperimentDir, is_export_bundle, read_saved
from ..core.paths import REPO
from ..core.redact import redact
from ..core.removal import remove_output, remove_stale_temporaries
from ..core.runtime import select_device
from ..data.competition import TestSet, load_test_set
from ..model.checkpoints import cast_floating, read_checkpoint
from .predict import FoldModels, fold_probs, load_saved_model
from .wheels import wheel_of_installed

# Core packages Kaggle's stock image lacks (it has Colab's packages plus onnx and optuna), carried as wheels so that
# TTA works there too; without them the bundle predicts without TTA.
KAGGLE_LACKS = ("ttach",)
FP16_TOLERANCE = 1e-3  # largest change of any probability that half-precision weights may cause
FP16_CHECK_IMAGES = 64


def half_precision_change(models: FoldModels, test: TestSet, cache_dir: Path) -> float:
    """The largest change of any predicted probability (the fold average, as `predict` writes it) when the fold
    models' weights are rounded to float16, measured on up to FP16_CHECK_IMAGES test images.

    Both sides compute in float32 (autocast off), as the bundle does on an offline CPU: under a GPU's bfloat16
    autocast both would be rounded alike on the way in, and any weights would pass."""
    device = select_device()
    rows = slice(0, FP16_CHECK_IMAGES)
    models = replace(models, cfg=models.cfg.model_copy(update={
        "train": models.cfg.train.model_copy(update={"amp": False})}))
    full, _ = fold_probs(models, test, cache_dir, device, weights_dtype=torch.float32, rows=rows)
    half, _ = fold_probs(models, test, cache_dir, device, weights_dtype=torch.float16, rows=rows)
    return float(np.abs(full.astype(np.float64).mean(axis=0) - half.astype(np.float64).mean(axis=0)).max())


def _weights_only(checkpoint: Path, dtype: torch.dtype) -> dict:
    saved = read_checkpoint(checkpoint)
    return {"model": cast_floating(saved["model"], dtype), "classes": saved["classes"], "backbone": saved["backbone"],
            "epoch": saved.get("epoch"), "val_macro_f1": saved.get("val_macro_f1")}


ENTRY = '''"""Predict with the exported models, offline:

    python predict.py --data DIR [--out submission.csv] [--tta hflip|flips|d4]

DIR holds test.csv (id, img_path) and, when there is one, sample_submission.csv; or it is a folder of images.
Needs the core packages of requirements.txt; those in wheels/ (ttach, for TTA) are used from there where they are
not installed.
"""
import glob
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# A pure-Python wheel is importable as it is: after the installed packages, so an installed version comes first.
sys.path.extend(sorted(glob.glob(os.path.join(HERE, "wheels", "*.whl"))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from src.cli import main  # noqa: E402

if __name__ == "__main__":
    defaults = ["--out", "submission.csv", "--cache-dir", os.path.join(tempfile.gettempdir(), "artist-image-cache")]
    sys.exit(main(["predict", {name!r}, "--outputs", os.path.join(HERE, "models"), *defaults, *sys.argv[1:]]))
'''


def _copy(source: str, target: str) -> None:
    """A file into the bundle; a YAML config with the passwords of its URLs hidden."""
    if source.endswith(".yaml"):
        write_text(redact(Path(source).read_text(encoding="utf-8")), target)
    else:
        shutil.copy2(source, target)


def _copy_code(bundle: Path) -> None:
    for item in BUNDLE_CODE:
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, bundle / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            copy_function=_copy)
        elif source.is_file():
            _copy(str(source), str(bundle / item))


def check_target(bundle: Path) -> None:
    """The folder an export replaces must be an earlier export bundle (or not exist): never an experiment's folder,
    an outputs folder or anything else that --out happens to name."""
    if bundle.exists() and not is_export_bundle(bundle):
        raise UserError(f"export: {bundle} exists and is not an export bundle (an experiment's folder, or files "
                        "export did not write), so it is not replaced; choose another --out (default: "
                        "OUTPUTS/export)")


def _carry_wheels(folder: Path, log: Callable[[str], None]) -> None:
    for name in KAGGLE_LACKS:
        try:
            wheel = wheel_of_installed(name, folder)
        except metadata.PackageNotFoundError:
            log(f"export: {name} is not installed here, so the bundle carries no wheel of it; it predicts without "
                "TTA where it is not installed")
            continue
        log(f"export: carries {BUNDLE_WHEELS}/{wheel.name} (not on Kaggle's image; used where it is not installed)")


def _zip(folder: Path, path: Path) -> None:
    """The folder as a .zip: code and configs deflated, checkpoints stored (weights barely compress, and
    deflating them takes seconds per fold)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder),
                              compress_type=zipfile.ZIP_STORED if file.suffix in (".pt", ".whl") else
                              zipfile.ZIP_DEFLATED)


def run_export(outputs: Path, name: str, data: Optional[Path], precision: str, out_dir: Path,
               log: Callable[[str], None] = print) -> Path:
    """OUT/NAME/ (models/, code, predict.py, manifest.json) and OUT/NAME.zip. With precision 'auto' the weights are
    stored in float16 where that changes no probability by more than FP16_TOLERANCE on the test images of `data`
    (the experiment's own data root when not given), in float32 otherwise."""
    bundle = out_dir / name
    check_target(bundle)
    model = load_saved_model(outputs, name)
    data = data or Path(read_saved(outputs / model.members[0].name).run["data_root"])
    test = load_test_set(data, log=log) if precision == "auto" else None
    remove_stale_temporaries(out_dir, log=log)  # what killed exports left
    staging = temporary_folder(out_dir, name)
    manifest = {"name": name, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": run_info()["git_commit"],
                "method": model.method, "weights": model.weights, "members": {}}
    # the float16 check's decoded test images, shared by the members; outside staging, which becomes the bundle
    cache = tempfile.TemporaryDirectory(prefix="artist-export-cache-")
    try:
        for member in model.members:
            dtype, change = torch.float32, None
            if precision == "fp16":
                dtype = torch.float16
            elif precision == "auto":
                change = half_precision_change(member, test, Path(cache.name))
                dtype = torch.float16 if change <= FP16_TOLERANCE else torch.float32
            target = ExperimentDir(staging / BUNDLE_MODELS / member.name)
            target.path.mkdir(parents=True)
            _copy(str(member.config_path), str(target.config))
            for fold, checkpoint in enumerate(member.checkpoints):
                save_torch(_weights_only(checkpoint, dtype), target.fold(fold).best)
            stored = "float16" if dtype == torch.float16 else "float32"
            measured = "" if change is None else f" (float16 changes a probability by at most {change:.1e} on " \
                f"{min(len(test.images), FP16_CHECK_IMAGES)} test images; limit {FP16_TOLERANCE:g})"
            log(f"export {name}: {member.name}: {len(member.checkpoints)} fold checkpoints in {stored}{measured}")
            manifest["members"][member.name] = {"weights": stored, "max_probability_change_fp16": change,
                                                "folds": len(member.checkpoints), "tta": member.tta}
        if model.config_path is not None:  # an ensemble: its members, weights and method
            (staging / BUNDLE_MODELS / name).mkdir()
            _copy(str(model.config_path), str(ExperimentDir(staging / BUNDLE_MODELS / name).config))
        _copy_code(staging)
        _carry_wheels(staging / BUNDLE_WHEELS, log)
        write_text(ENTRY.format(name=name), staging / "predict.py")
        write_json(manifest, staging / "manifest.json")
        check_target(bundle)  # once more: something may have appeared there meanwhile
        remove_output(out_dir, bundle)
        staging.rename(bundle)
    finally:
        cache.cleanup()
        remove_output(out_dir, staging)
    _zip(bundle, out_dir / f"{name}.zip")
    size = (out_dir / f"{name}.zip").stat().st_size / 2**20
    log(f"export {name}: wrote {bundle}/ and {out_dir / f'{name}.zip'} ({size:.1f} MiB); offline: "
        f"python predict.py --data DIR --out submission.csv")
    return bundle


def command_export(args: argparse.Namespace) -> None:
    from .resolve import log

    outputs = Path(args.outputs)
    run_export(outputs, args.name, Path(args.data) if args.data else None, args.precision,
               Path(args.out) if args.out else outputs / "export", log=log)
