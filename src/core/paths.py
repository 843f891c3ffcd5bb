"""Where the repository keeps things: its root and the folders every command reads or writes by default."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
CONFIG_DIR = REPO / "configs"
PROFILE_DIR = CONFIG_DIR / "profiles"
TUNE_DIR = CONFIG_DIR / "tune"
ENSEMBLE_DIR = REPO / "ensemble"
INPUTS = REPO / "inputs"
DEMO_ROOT = INPUTS / "demo"
OUTPUTS = REPO / "outputs"
SUBMISSIONS = REPO / "submissions"
# Folders directly under OUTPUTS that belong to no experiment (the shared folds, the image cache, exports, tuning
# studies, frozen features and the tools' figures): no experiment, ensemble or TTA run may be named like one.
SHARED_OUTPUT_FOLDERS = ("folds", "cache", "export", "tune", "features", "fewshot", "gpucheck", "bench", "eda")
