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
from pathlib import Path
from typing import Any, Optional, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from .errors import UserError, quoted
from .names import check_name
from .paths import CONFIG_DIR, REPO
from .requirements import CORE, groups, installed_version
from .schema import NEUTRAL, NEVER, RESULT, ExperimentConfig


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


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, found {type(data).__name__}")
    return data


def fields_by_key(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A section's fields by the key a config file writes (the alias where there is one, e.g. pseudo.from)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def section_model(field: FieldInfo) -> Optional[type[BaseModel]]:
    """The section a field holds (Optional[Model] too), or None for a plain value."""
    return next((t for t in (field.annotation, *get_args(field.annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)), None)


def _check_keys(data: dict, model: type[BaseModel], source: str, prefix: str = "") -> None:
    """Reject keys the schema does not define, naming the file and the full dotted key."""
    fields = fields_by_key(model)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = fields.get(key)
        if field is None:
            raise UserError(f"{source}: unknown config key '{dotted}' (known here: {', '.join(fields)}); fix or "
                            "remove it")
        section = section_model(field)
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
    """configs/NAME.yaml."""
    path = config_dir / f"{check_name(name, 'experiment')}.yaml"
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
    if parent is not None:
        check_name(parent, f"{path}: parent")
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
        message = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{source}: '{where}': {message} (got {quoted(err.get('input'))}); fix the config") from None


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


def _declarations(model: type[BaseModel], key: str) -> tuple[list[dict], bool]:
    """The result declarations (schema.not_result, schema.result_neutral) of the fields a flat key passes through,
    outermost first, and whether the key is a field itself (not inside a plain dict value such as data.label_fixes)."""
    found, section = [], model
    for part in key.split("."):
        field = fields_by_key(section).get(part) if section is not None else None
        if field is None:
            return found, False
        found.append(field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {})
        section = section_model(field)
    return found, True


def result_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flat settings that can change what a fold learns: every key but those declared not_result (or inside a
    section declared so). Trackers log these as the run's hyperparameters."""
    return {key: value for key, value in flatten(cfg.model_dump(mode="json")).items()
            if not any(declared.get(RESULT) == NEVER for declared in _declarations(type(cfg), key)[0])}


def _at_neutral(cfg: ExperimentConfig, key: str, value: Any) -> bool:
    declared, is_field = _declarations(type(cfg), key)
    return is_field and declared[-1].get(RESULT) == NEUTRAL and value == to_jsonable_python(declared[-1][NEUTRAL])


def result_fingerprint(cfg: ExperimentConfig, data_fingerprint: str,
                       sources: Optional[dict[str, str]] = None) -> str:
    """Hash of every setting that changes what a fold learns, plus the data and the identity of every finished run
    a technique learns from (`sources`: {'pseudo.from': that run's result fingerprint, ...}): a finished fold is
    reused only while this matches. Each field declares in the schema whether it counts: not_result fields never do,
    result_neutral ones not at their neutral value, so a new key at its default leaves every fingerprint alone."""
    everything = result_settings(cfg)
    unused = {key for key in everything for prefix, applies in DEPENDENT_KEYS
              if key.startswith(prefix) and not applies(everything)}
    flat = {k: v for k, v in everything.items() if k not in unused and not _at_neutral(cfg, k, v)}
    changes = sorted(name for name, applies in BEHAVIOUR_CHANGES.items() if applies(everything))
    payload = json.dumps({"config": flat, "data": data_fingerprint, **({"changes": changes} if changes else {}),
                          **({"sources": sources} if sources else {})}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_info() -> dict[str, Any]:
    """Provenance saved beside the resolved config: git commit and the versions of the core packages."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else "unknown"
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"

    versions = {requirement.name: installed_version(requirement.name) or "not installed"
                for requirement in groups()[CORE]}
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": git("status", "--porcelain") not in ("", "unknown"),
            "packages": versions}
