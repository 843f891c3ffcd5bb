"""What a command starts from: the data root (the built-in demo data, made on first use, when inputs/ holds no
competition data), the profile (the CPU demo profile without CUDA), and the run's config resolved in one step: the
parent chain, the profile and the overrides, then the values the data decides ('auto': the crop-mimic scale and the
validation crop area, measured once from the train and test image sizes)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.config import resolve_config, result_fingerprint
from ..core.errors import UserError
from ..core.files import missing_file_reason
from ..core.redact import redact
from ..core.paths import DEMO_ROOT, INPUTS
from ..core.schema import ExperimentConfig
from ..data.competition import DEMO_MARKER, CompetitionData, load_competition_data
from ..data.geometry import CropGeometry, measure_test_geometry, resolve_for_data, unresolved

Log = Callable[[str], None]


def log(message: str) -> None:
    """A line of a command's output, passwords in URLs hidden (a library's message may quote one)."""
    print(redact(message), flush=True)


def quiet(_: str) -> None:
    """The log of DDP ranks other than 0: rank 0 speaks for all."""


def banner_lines(lines: list[str]) -> list[str]:
    rule = "=" * 100
    return [rule, *(f"  {line}" for line in lines), rule]


def banner(lines: list[str], say: Log = log) -> None:
    say("\n".join(banner_lines(lines)))


def ensure_demo_data(root: Path, seed: int, scale: float, reason: str) -> None:
    from ..demo.dataset import generate_demo_dataset

    ready = (root / DEMO_MARKER).is_file()
    action = (f"using the built-in procedural demo dataset in {root}." if ready else
              f"generating the built-in procedural demo dataset in {root} (seed {seed}, counts scaled by {scale}; "
              "no downloads).")
    banner([f"DEMO DATA: {reason}", action,
            "Put the competition files in inputs/ (see README) to train on the real data."])
    if ready:
        return
    started = time.time()
    generate_demo_dataset(root, seed=seed, scale=scale)
    log(f"demo data ready in {time.time() - started:.0f}s")


def resolve_data_root(data_arg: Optional[str]) -> Path:
    """--data DIR if given; else inputs/ when it holds train.csv; else the demo dataset (made on first use)."""
    if data_arg:
        root = Path(data_arg)
        if not (root / "train.csv").is_file():
            reason = missing_file_reason(root / "train.csv")
            found = "no train.csv there" if reason == "is not found" else f"its train.csv {reason}"
            raise UserError(f"--data {root}: {found}; put the competition files in it or leave out --data to use "
                            "the demo data")
        return root
    if (INPUTS / "train.csv").is_file():
        return INPUTS
    ensure_demo_data(DEMO_ROOT, seed=0, scale=0.1, reason="inputs/ holds no competition data (inputs/train.csv "
                     "is missing),")
    return DEMO_ROOT


def choose_profile(requested: str) -> Optional[str]:
    """'auto': the demo profile without CUDA, none with it; 'none': none; else the named profile. A GPU that torch
    cannot use stops 'auto' and 'none' with what to install (the run would train on the CPU: the demo profile on
    the user's data, or the full one for days); a profile named on purpose (--profile demo) is the user's choice."""
    if requested not in ("auto", "none"):
        return requested
    import torch

    from ..core.runtime import gpu_problem

    problem = gpu_problem()
    if problem:
        raise UserError(problem)
    if requested == "none":
        return None
    return None if torch.cuda.is_available() else "demo"


def resolve_announced(name: str, profile_arg: str, overrides: list[str], say: Log = log
                      ) -> tuple[ExperimentConfig, Optional[str]]:
    """The config of `name` under the profile and the overrides (its 'auto' values still open); a banner lists
    what the profile changed. Returns (config, profile)."""
    profile = choose_profile(profile_arg)
    cfg, profile_changes = resolve_config(name, profile, overrides)
    if profile:
        reason = "no CUDA device: " if profile_arg == "auto" else ""
        changes = [f"{key}: {before} -> {after}" for key, (before, after) in profile_changes.items()]
        banner([f"{reason}using the '{profile}' profile (configs/profiles/{profile}.yaml), which changed:", *changes,
                "Run on a GPU (or pass --profile none) for the experiment as published."], say)
    return cfg, profile


@dataclass
class RunConfig:
    """A run's config with every value set, the data it was resolved with, and the measured test geometry (None
    when no value was left to the data)."""
    cfg: ExperimentConfig
    profile: Optional[str]
    data: CompetitionData
    geometry: Optional[CropGeometry] = None

    def record(self, **more: Any) -> dict[str, Any]:
        """Provenance for the run's config.yaml: profile, geometry and whatever the caller adds."""
        measured = {"test_geometry": self.geometry.summary()} if self.geometry else {}
        return {"profile": self.profile, **measured, **more}

    def fingerprint(self, outputs: Path) -> str:
        """The run's result fingerprint: its config, its data (style-transfer images included) and the identity of
        every finished run a technique of it learns from (found under `outputs`)."""
        from ..training.techniques import sources  # torch and timm: only when a run is fingerprinted

        return result_fingerprint(self.cfg, self.data.fingerprint(with_style=True), sources(self.cfg, outputs))

    def explicit_overrides(self) -> list[str]:
        """key=value arguments that give another process the values the data decided, so it measures nothing."""
        return [f"augment.mimic_scale={self.cfg.augment.mimic_scale}",
                f"validation.crop_area=[{','.join(str(share) for share in self.cfg.validation.crop_area)}]"]

    def for_config(self, cfg: ExperimentConfig) -> "RunConfig":
        """Another config (a tuning trial's) on the same data, its 'auto' values from the same measurement."""
        geometry = self.geometry or measure_test_geometry(self.data.train, self.data.test)
        return RunConfig(resolve_for_data(cfg, geometry), self.profile, self.data, geometry)


def resolve_run(name: str, profile_arg: str, overrides: list[str], data_arg: Optional[str],
                say: Log = log) -> RunConfig:
    """The one step that resolves a run: config, profile, data, and the 'auto' values measured from the data."""
    cfg, profile = resolve_announced(name, profile_arg, overrides, say)
    root = resolve_data_root(data_arg)
    data = load_competition_data(root, cfg.data.label_fixes, log=say, style_transfer=cfg.data.style_transfer)
    say(f"data: {root} ({'demo' if data.is_demo else 'competition'}): {len(data.train)} train images, "
        f"{len(data.test)} test images, {len(data.classes)} artists")
    return resolve_with_data(cfg, profile, data, say)


def resolve_with_data(cfg: ExperimentConfig, profile: Optional[str], data: CompetitionData,
                      say: Log = log) -> RunConfig:
    """`cfg` with its 'auto' values measured from `data` (nothing is measured when none is left open)."""
    if not unresolved(cfg):
        return RunConfig(cfg, profile, data)
    geometry = measure_test_geometry(data.train, data.test)
    say(geometry.summary())
    return RunConfig(resolve_for_data(cfg, geometry), profile, data, geometry)
