"""`explain`: the decoded PNG holds, cell by cell, each picture with its Grad-CAM blended in, for the artist its fold
model predicts; the Grad-CAM is its definition on the backbone's last feature map; ViTs get theirs on the patch grid."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import timm
import torch

from src.core.layout import ExperimentDir, read_saved
from src.data.competition import load_competition_data
from src.data.folds import shared_folds
from src.inference.predictor import Predictor
from src.model.networks import ArtistClassifier
from src.tools.explain import CAPTION, CELL, COLUMNS, FeatureMapClassifier, cell, choose_rows, explain_images, \
    grad_cam, token_grid

from .conftest import run_cli

CPU = torch.device("cpu")


@pytest.mark.slow
def test_explain_writes_a_grid_of_heat_maps_of_the_predicted_artists(finished_run, tmp_path):
    """Test crops explained by fold 0 of the finished tiny exp00: every cell of the decoded PNG is the crop with its
    heat map (not the plain crop) and a caption; the predicted artist is fold 0's prediction of the crop (its
    test_probs.csv), the true one the demo's solution."""
    outputs, root = finished_run["outputs"], finished_run["root"]
    out = tmp_path / "explain.png"
    assert run_cli("explain", "exp00", "--data", root, "--outputs", outputs, "--test", "--images", 6,
                   "--out", out) == 0
    png = cv2.cvtColor(cv2.imread(str(out), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert png.shape == (2 * (CELL + CAPTION), COLUMNS * CELL, 3)

    data = load_competition_data(root, log=lambda _: None)
    folds = shared_folds(data, 5, 42, outputs / "folds")
    rows = choose_rows(data, folds, 6, None, True, 0)
    pictures = explain_images(outputs, "exp00", data, rows, CPU, log=lambda _: None)
    fold0 = pd.read_csv(ExperimentDir(finished_run["exp"]).fold(0).test_probs, dtype={"id": str}).set_index("id")
    truth = pd.read_csv(root / "solution.csv", dtype=str).set_index("id")["artist"]
    for index, picture in enumerate(pictures):
        top, left = index // COLUMNS * (CELL + CAPTION), index % COLUMNS * CELL
        drawn = png[top:top + CELL + CAPTION, left:left + CELL]
        np.testing.assert_array_equal(drawn, cell(picture))
        plain = cv2.resize((picture.image * 255).round().astype(np.uint8), (CELL, CELL),
                           interpolation=cv2.INTER_CUBIC)
        assert np.abs(drawn[:CELL].astype(int) - plain).mean() > 10  # the heat map is blended in
        assert drawn[CELL:].std() > 5  # a caption is written
        expected = fold0.loc[picture.image_id, data.classes].to_numpy(float)
        assert picture.predicted == data.classes[int(expected.argmax())]
        assert picture.probability == pytest.approx(expected.max(), abs=1e-4)
        assert picture.true == truth[picture.image_id] and picture.fold == 0
        assert 0 <= picture.heat.min() and picture.heat.max() <= 1
    assert any(picture.heat.std() > 0.01 for picture in pictures)  # at 48 px the map is 2 x 2: some are all 0
    assert (png[CELL + CAPTION:, 2 * CELL:] == 255).all()  # the second row's two empty cells stay white


@pytest.mark.slow
def test_grad_cam_is_its_definition_on_the_last_feature_map_of_the_fold_model(finished_run):
    """cam = ReLU(sum_c a_c A_c), a_c the mean over the map of d y_k / d A_c, A the backbone's last feature map and k
    the predicted artist, scaled to 0-1 and resized to the input: what explain draws for a painting."""
    data = load_competition_data(finished_run["root"], log=lambda _: None)
    predictor = Predictor.for_checkpoints(read_saved(finished_run["exp"]).experiment, len(data.classes), CPU)
    predictor.load(ExperimentDir(finished_run["exp"]).fold(1).best, data.classes)
    dataset = predictor.dataset(data.train["path"].head(3).tolist(), test=True)
    images = predictor.inputs(torch.stack([dataset[i][0] for i in range(3)]), 0)  # uint8 normalised, as predicting
    network = predictor.network.eval()
    predicted = network(images).argmax(dim=1).tolist()
    heats = grad_cam(network, images, predicted)
    for image, k, heat in zip(images, predicted, heats):
        features = network.backbone.forward_features(image[None]).detach().requires_grad_()
        score = network.head(network.backbone.forward_head(features))[0, k]
        weights = torch.autograd.grad(score, features)[0].mean(dim=(2, 3))[0]
        cam = torch.relu((weights[:, None, None] * features[0]).sum(dim=0)).detach().numpy()
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
        expected = cv2.resize(cam, images.shape[-2:][::-1])
        np.testing.assert_allclose(heat, expected, atol=1e-4)


def test_a_vit_is_explained_on_its_patch_grid():
    """For a ViT the map comes from the patch tokens of the last block's input, laid on the 7 x 7 grid of a 112 px
    input with 16 px patches: a token's heat covers its own patch (the class token is left out)."""
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=112)
    network = ArtistClassifier(backbone, 4).eval()
    reshape = token_grid(backbone)
    tokens = torch.arange(50, dtype=torch.float32).view(1, 50, 1).expand(1, 50, 3)
    grid = reshape(tokens)
    assert grid.shape == (1, 3, 7, 7) and grid[0, 0, 0, 0] == 1 and grid[0, 0, 6, 6] == 49
    heat = grad_cam(network, torch.randn(2, 3, 112, 112), [0, 3])
    assert heat.shape == (2, 112, 112) and np.isfinite(heat).all()
    assert token_grid(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)) is None
    model = FeatureMapClassifier(network)
    images = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(model(images), network(images))
