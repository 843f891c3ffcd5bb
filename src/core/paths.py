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
