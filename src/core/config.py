"""Experiment configs: YAML files that name a parent and hold only their changes, resolved into one typed,
validated `ExperimentConfig` (src/core/schema.py); the result fingerprint that decides whether a finished fold is
reused; the provenance saved beside a run's config.

Resolution order (later wins): the parent chain from the root (exp00) down to the experiment, then a
profile (configs/profiles/NAME.yaml, e.g. the CPU demo profile), then `key=value` overrides from the
command line. Unknown keys are errors that name the file and the key.
"""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, get_args

import yaml
from pydantic import BaseModel, ValidationError

from .errors import UserError
from .paths import CONFIG_DIR, REPO
from .schema import ExperimentConfig

# Keys that do not change what a fold learns: a finished fold stays valid when only these differ.
NON_RESULT_KEYS = ("name", "parent", "description", "train.folds", "train.num_workers", "train.keep_checkpoints",
                   "inference.batch_size",
                   "speed.channels_last", "speed.compile", "speed.cudnn_benchmark", "speed.grad_checkpointing",
                   "speed.pin_memory",
                   "speed.persistent_workers", "speed.cache_dir", "speed.compile_mode", "tracking.progress_seconds",
                   "tracking.tensorboard", "tracking.wandb",
                   "tracking.wandb_project", "tracking.wandb_mode", "tracking.mlflow", "tracking.mlflow_uri",
                   "tracking.mlflow_experiment")
# Keys added after results existed, with the value at which they change nothing: at that value they stay out of
# the fingerprint, so folds finished before the key existed remain valid.
NEUTRAL_VALUES = {"augment.single": "none", "frozen": None, "speed.image_cache": "none", "train.sync_batchnorm": True,
                  "validation.mode": "whole", "augment.hflip": False, "train.ema_decay": None,
                  "scheduler.fit_cycles": False, "model.drop_path_rate": None, "optimizer.layer_decay": None,
                  "train.ema_epochs": None, "scheduler.warmup_epochs": None, "speed.train_cache": "short_side",
                  "speed.gpu_augment": False}


def _ema_on(flat: dict) -> bool:
    return flat["train.ema_decay"] is not None or flat["train.ema_epochs"] is not None


# Settings whose behaviour changed after folds were trained with them: a config they apply to gets another
# fingerprint, so such a fold trains again instead of being reused. Name of the change -> does it apply (flat config).
BEHAVIOUR_CHANGES = {
    "crop-mimic squashes the painting to a square": lambda flat: flat["augment.crop"] == "mimic",
    "focal loss of the smoothed cross entropy": lambda flat: flat["loss.name"] == "focal"
    and flat["loss.label_smoothing"] > 0,
    "SAM moves BatchNorm statistics once a step": lambda flat: flat["optimizer.sam_rho"] is not None,
    "the EMA validates with fresh eval-mode caches": _ema_on,
    "the EMA's warm-up is the mean of the steps so far": lambda flat: _ema_on(flat) and flat["train.ema_warmup"],
}

# Keys that only matter when the flat config meets a condition: (key prefix, the condition).
DEPENDENT_KEYS = (("validation.", lambda flat: flat["validation.mode"] == "crops"),
                  ("augment.rrc_", lambda flat: flat["augment.crop"] == "rrc"),
                  ("train.ema_warmup", _ema_on),
                  ("scheduler.warmup_steps", lambda flat: flat["scheduler.warmup_epochs"] is None),
                  ("speed.train_cache",
                   lambda flat: flat["speed.image_cache"] != "none" and flat["augment.crop"] != "rrc"),
                  ("speed.gpu_augment", lambda flat: flat["augment.strong"] or flat["augment.extra_colour"]))
PACKAGES_RECORDED = ("torch", "torchvision", "timm", "albumentations", "ttach", "numpy", "pandas",
                     "scikit-learn", "opencv-python-headless", "pillow", "pydantic", "kornia")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, found {type(data).__name__}")
    return data


def _check_keys(data: dict, model: type[BaseModel], source: str, prefix: str = "") -> None:
    """Reject keys the schema does not define, naming the file and the full dotted key."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            known = ", ".join(model.model_fields)
            raise UserError(f"{source}: unknown config key '{dotted}' (known here: {known}); fix or remove it")
        section = next((t for t in (field.annotation, *get_args(field.annotation))  # Optional[Model] too
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None and isinstance(value, dict):
            _check_keys(value, section, source, prefix=f"{dotted}.")


def deep_merge(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiment_path(name: str, config_dir: Path = CONFIG_DIR) -> Path:
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in config_dir.glob("*.yaml"))
        raise UserError(f"no experiment '{name}': {path} does not exist (known: {', '.join(known)})")
    return path


def _parent_dir(parent: str, config_dir: Path) -> Path:
    """Where a parent is read from: the child's folder, else the shipped configs/ (a tuned config written to a
    folder of its own still builds on the experiment it was tuned from)."""
    return config_dir if (config_dir / f"{parent}.yaml").is_file() else CONFIG_DIR


def _resolve_chain(name: str, config_dir: Path, seen: tuple[str, ...] = ()) -> dict:
    if name in seen:
        raise UserError(f"configs: parent cycle {' -> '.join(seen + (name,))}; fix the 'parent' keys")
    path = experiment_path(name, config_dir)
    data = _read_yaml(path)
    _check_keys(data, ExperimentConfig, str(path))
    if "name" in data:
        raise UserError(f"{path}: remove the 'name' key; an experiment is named after its file")
    parent = data.get("parent")
    base = _resolve_chain(parent, _parent_dir(parent, config_dir), seen + (name,)) if parent else {}
    merged = deep_merge(base, data)
    merged["name"] = name
    merged["parent"] = parent
    merged["description"] = data.get("description", "")
    return merged


def parent_chain(name: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The experiments `name` is resolved from, the root first and `name` last."""
    chain = [name]
    while (parent := _read_yaml(experiment_path(chain[-1], config_dir)).get("parent")) is not None:
        if parent in chain:
            raise UserError(f"configs: parent cycle {' -> '.join(reversed([*chain, parent]))}; fix the 'parent' keys")
        chain.append(parent)
        config_dir = _parent_dir(parent, config_dir)
    return chain[::-1]


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['train.epochs=3', 'model.backbone=resnet18'] into a nested dict; values parse as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected key=value, e.g. train.epochs=3")
        value = yaml.safe_load(raw) if raw else None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _validate(data: dict, source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{source}: '{where}': {err['msg']} (got {err.get('input')!r}); fix the config") from None


def resolve_config(name: str, profile: Optional[str] = None, overrides: Optional[list[str]] = None,
                   config_dir: Path = CONFIG_DIR, override_source: str = "command-line override"
                   ) -> tuple[ExperimentConfig, dict[str, tuple[Any, Any]]]:
    """Resolve an experiment; also return what the profile changed, as {dotted key: (before, after)}. An unknown key
    among the overrides is named as coming from `override_source` (e.g. a tuning space file)."""
    data = _resolve_chain(name, config_dir)
    profile_changes: dict[str, tuple[Any, Any]] = {}
    if profile:
        profile_path = config_dir / "profiles" / f"{profile}.yaml"
        if not profile_path.is_file():
            known = sorted(p.stem for p in (config_dir / "profiles").glob("*.yaml"))
            raise UserError(f"no profile '{profile}': {profile_path} does not exist (known: {', '.join(known)})")
        profile_data = _read_yaml(profile_path)
        _check_keys(profile_data, ExperimentConfig, str(profile_path))
        before = flatten(_validate(data, f"configs/{name}.yaml (resolved)").model_dump(mode="json"))
        data = deep_merge(data, profile_data)
        after = flatten(_validate(data, f"{profile_path} on configs/{name}.yaml").model_dump(mode="json"))
        profile_changes = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    if overrides:
        override_data = parse_overrides(overrides)
        _check_keys(override_data, ExperimentConfig, override_source)
        data = deep_merge(data, override_data)
    return _validate(data, f"configs/{name}.yaml (resolved)"), profile_changes


def result_fingerprint(cfg: ExperimentConfig, data_fingerprint: str) -> str:
    """Hash of every setting that changes what a fold learns, plus the data: a finished fold is reused
    only while this matches."""
    everything = flatten(cfg.model_dump(mode="json"))
    unused = {key for key in everything for prefix, applies in DEPENDENT_KEYS
              if key.startswith(prefix) and not applies(everything)}
    flat = {k: v for k, v in everything.items() if k not in NON_RESULT_KEYS and k not in unused
            and not (k in NEUTRAL_VALUES and v == NEUTRAL_VALUES[k])}
    changes = sorted(name for name, applies in BEHAVIOUR_CHANGES.items() if applies(everything))
    payload = json.dumps({"config": flat, "data": data_fingerprint, **({"changes": changes} if changes else {})},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_info() -> dict[str, Any]:
    """Provenance saved beside the resolved config: git commit and package versions."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else "unknown"
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"

    versions = {}
    for package in PACKAGES_RECORDED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": git("status", "--porcelain") not in ("", "unknown"),
            "packages": versions}
