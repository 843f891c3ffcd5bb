"""Every rung of the ladder builds its techniques; the style-transfer rung runs end to end over 5 folds in the CPU
demo profile; the ladder command runs rungs in turn."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import RandomSampler

from src.core.config import resolve_config
from src.core.paths import CONFIG_DIR
from src.data.competition import STYLE_CSV, load_competition_data, style_images_for_fold
from src.core.errors import UserError
from src.data.geometry import measure_test_geometry, resolve_for_data
from src.training.losses import FocalLoss
from src.training.optim import SAM
from src.data.sampler import image_weights
from src.training.loop import build_training

from .conftest import TINY_RUN, run_cli

LADDER = sorted(p.stem for p in CONFIG_DIR.glob("exp*.yaml"))


@pytest.fixture(scope="module")
def root_with_style_images(tiny_root, tmp_path_factory):
    """The tiny data plus real style-transfer images: two for each of the two rarest artists (tiny and few steps)."""
    root = shutil.copytree(tiny_root, tmp_path_factory.mktemp("style") / "data")
    assert run_cli("style", "--data", root, "--rarest", 2, "--per-artist", 2, "--size", 32, "--steps", 2) == 0
    return root


# What each rung adds, cumulatively along its parent chain: (technique, value) pairs checked on the objects the
# trainer builds from the resolved config.
TECHNIQUES = {
    "exp00": {},
    "exp01": {"head": "mlp"},
    "exp02": {"crop": "random", "strong": True},
    "exp03": {"schedule": "warm_restarts"},
    "exp04": {"backbone": "tiny_vit_21m_384.dist_in22k_ft_in1k"},
    "exp05": {"optimizer": torch.optim.AdamW},
    "exp06": {"cutmix": 0.5},
    "exp07": {"loss": FocalLoss},
    "exp08": {"sampler": "inverse_log_count"},
    "exp09": {"style": True},
    "exp10": {"sam": 0.05},
    "exp11": {"sampler": "inverse_log_count", "loss": FocalLoss, "cutmix": 0.5},
    "exp12": {"style": True},
    "exp13": {"extra_colour": True},
    "exp14": {"sampler": "inverse_log_count", "loss": FocalLoss, "style": True},
    "exp15": {"sampler": "inverse_log_count", "loss": FocalLoss, "extra_colour": True},
    "exp16": {"crop": "mimic"},
    "exp17": {"crop": "rrc"},
    "exp18": {"smoothing": 0.1},
    "exp19": {"ema": True},
    "exp20": {"crop": "rrc", "strong": False, "hflip": True, "smoothing": 0.1, "schedule": "cosine"},
    "exp21": {"crop": "mimic"},
    "exp22": {"backbone": "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", "ema": True, "smoothing": 0.2,
              "layer_decay": 0.8, "drop_path": 0.15, "head": "linear"},
    "exp23": {"backbone": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k", "smoothing": 0.1, "layer_decay": 0.6,
              "drop_path": 0.0},
    "exp24": {"backbone": "vit_base_patch14_dinov2.lvd142m"},
    "exp25": {"backbone": "eva02_large_patch14_448.mim_in22k_ft_in22k_in1k", "layer_decay": 0.85},
    "exp26": {"pseudo": "exp21"},
    "exp27": {"backbone": "tf_efficientnet_lite0", "distill": "ens05"},
}
BASELINE = {"head": "linear", "crop": "none", "strong": False, "schedule": "constant", "backbone": "efficientnet_b2",
            "optimizer": torch.optim.Adam, "cutmix": None, "loss": nn.CrossEntropyLoss, "sampler": "none",
            "style": False, "sam": None, "extra_colour": False, "smoothing": 0.0, "ema": False, "hflip": False,
            "layer_decay": None, "drop_path": None, "pseudo": None, "distill": None}


def expected_techniques(name: str) -> dict:
    chain = [name]
    while (parent := resolve_config(chain[-1])[0].parent) is not None:
        chain.append(parent)
    expected = dict(BASELINE)
    for rung in reversed(chain):
        expected.update(TECHNIQUES[rung])
    return expected


def transform_names(run) -> list[str]:
    return [type(t).__name__ for t in run.loader.dataset.transform.transforms]


@pytest.mark.slow
@pytest.mark.parametrize("name", LADDER)
def test_rung_builds_its_techniques(name, tiny_root):
    """Each rung's technique is in the model, loss, sampler, optimiser, schedule, CutMix and transforms that the
    trainer builds from its resolved config (demo profile: the published backbone is checked on the config)."""
    assert sorted(TECHNIQUES) == LADDER
    expected = expected_techniques(name)
    assert resolve_config(name)[0].model.backbone == expected["backbone"]
    cfg, _ = resolve_config(name, "demo", ["input.img_size=32", "train.batch_size=4", "model.pretrained=false"])
    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg = resolve_for_data(cfg, measure_test_geometry(data.train, data.test))  # mimic_scale: auto, as a run does
    run = build_training(cfg, data.train, len(data.classes), torch.device("cpu"))

    assert isinstance(run.model.head[0], nn.LayerNorm) == (expected["head"] == "mlp")
    names = transform_names(run)
    crop = {"none": "Resize", "random": "RandomCrop", "mimic": "RandomCrop", "rrc": "RandomResizedCrop"}
    assert crop[expected["crop"]] in names
    assert ("CoarseDropout" in names) == expected["strong"] and ("RandomGamma" in names) == expected["extra_colour"]
    assert ("HorizontalFlip" in names) == (expected["strong"] or expected["hflip"])
    criterion = run.objective.criterion
    assert isinstance(criterion, expected["loss"]) and criterion.label_smoothing == expected["smoothing"]
    assert (run.ema is not None) == expected["ema"]
    order = run.loader.sampler.order
    if expected["sampler"] == "none":
        assert isinstance(order, RandomSampler)
    else:
        np.testing.assert_allclose(order.weights.numpy(), image_weights(data.train["label"], expected["sampler"]))
    base = run.optimizer.base_optimizer if isinstance(run.optimizer, SAM) else run.optimizer
    assert type(base) is expected["optimizer"]
    assert (run.optimizer.rho if isinstance(run.optimizer, SAM) else None) == expected["sam"]
    assert (run.objective.cutmix.mix_prob if run.objective.cutmix else None) == expected["cutmix"]
    scales = sorted({group["lr_scale"] for group in run.optimizer.param_groups if "lr_scale" in group})
    if expected["layer_decay"] is None:
        assert not scales
    else:  # timm's layer groups: each layer's lr a factor layer_decay below the one above it, the top one at 1
        assert scales[-1] == 1.0 and len(scales) > 2
        np.testing.assert_allclose(np.array(scales[:-1]) / np.array(scales[1:]), expected["layer_decay"])
    drop = [m.drop_prob for m in run.model.modules() if type(m).__name__ == "DropPath" and m.drop_prob > 0]
    assert (max(drop) if drop else None) == (pytest.approx(expected["drop_path"], rel=0.1)
                                             if expected["drop_path"] else None)
    assert cfg.data.style_transfer == expected["style"]
    assert (cfg.pseudo.source if cfg.pseudo else None) == expected["pseudo"]
    assert (cfg.distill.source if cfg.distill else None) == expected["distill"]
    assert [term.name for term in run.objective.terms] == (["distill"] if expected["distill"] else [])
    lr = [run.scheduler.lr_lambdas[0](step) for step in range(3 * len(run.loader) * 2)]
    floor = cfg.scheduler.min_lr / cfg.optimizer.lr
    if expected["schedule"] == "constant":
        assert set(lr) == {1.0}
    elif expected["schedule"] == "cosine":  # one cycle over the demo profile's 4 epochs: up, then down to the floor
        budget = lr[:cfg.train.epochs * len(run.loader)]
        peak = int(np.argmax(budget))
        assert budget[0] == pytest.approx(floor) and budget[peak] == pytest.approx(1.0)
        assert all(a >= b for a, b in zip(budget[peak:], budget[peak + 1:])) and budget[-1] < floor + 0.01
    else:  # the demo profile's 2-epoch cycles restart twice within these 6 epochs, from the floor each time
        cycle = 2 * len(run.loader)
        restarts = [step for step in range(1, len(lr)) if lr[step] < lr[step - 1] and lr[step] == lr[0]]
        assert restarts == [cycle, 2 * cycle] and lr[0] == pytest.approx(cfg.scheduler.min_lr / cfg.optimizer.lr)


@pytest.mark.slow
def test_style_rung_end_to_end(root_with_style_images, tmp_path, capsys):
    """exp12 (sampler, focal, CutMix, style transfer) over all 5 folds: the OOF and the submission, and the fold
    rule for generated images."""
    name = "exp12"
    code = run_cli("run", name, "--data", root_with_style_images, "--outputs", tmp_path / "outputs",
                   "--submissions", tmp_path / "submissions", *TINY_RUN)
    assert code == 0
    out = tmp_path / "outputs" / name
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    train = pd.read_csv(root_with_style_images / "train.csv", dtype={"id": str})
    assert sorted(oof["id"].unique()) == sorted(train["id"])  # generated images never reach the OOF
    assert (oof.groupby("id")["crop"].apply(list) == [[0, 1, 2, 3]] * len(train)).all()
    assert (out / "test_probs.csv").is_file() and (tmp_path / "submissions" / f"{name}.csv").is_file()
    # fold k trains on the other folds' paintings plus the generated images neither of whose sources it validates
    style = pd.read_csv(root_with_style_images / STYLE_CSV, dtype=str)
    folds = pd.read_csv(next((tmp_path / "outputs" / "folds").glob("*.csv")), dtype={"id": str})
    logged = dict(re.findall(rf"{name} fold (\d): (\d+) train / \d+ val images", capsys.readouterr().out))
    dropped = 0
    for k in range(5):
        val_ids = set(folds.loc[folds["fold"] == k, "id"])
        kept = style_images_for_fold(style, val_ids)
        assert int(logged[str(k)]) == len(train) - len(val_ids) + len(kept)
        assert not (set(kept["style_source_id"]) | set(kept["content_source_id"])) & val_ids
        dropped += len(style) - len(kept)
    assert dropped >= len(style)  # each image's style source is validated by some fold, which must skip it


@pytest.mark.slow
def test_sam_rung_trains_a_fold(tiny_root, tmp_path):
    """SAM takes its own path through the loop (a closure, two forward-backward passes a step)."""
    assert run_cli("run", "exp10", "--data", tiny_root, "--outputs", tmp_path / "outputs", "--submissions",
                   tmp_path / "submissions", *TINY_RUN, "train.folds=[0]") == 0
    assert (tmp_path / "outputs" / "exp10" / "fold0" / "done.json").is_file()


@pytest.mark.slow
def test_style_rung_without_images_stops_with_instructions(tiny_root, tmp_path, capsys):
    code = run_cli("run", "exp09", "--data", tiny_root, "--outputs", tmp_path / "o", "--submissions", tmp_path / "s",
                   *TINY_RUN)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "style_transfer.csv" in err[0] and "bash run.sh style" in err[0]


@pytest.mark.slow
def test_ladder_runs_in_turn_and_reports_failures(tiny_root, tmp_path, capsys):
    code = run_cli("ladder", "exp01", "exp09", "--data", tiny_root, "--outputs", tmp_path / "o",
                   "--submissions", tmp_path / "s", *TINY_RUN)
    captured = capsys.readouterr()
    assert code == 2
    assert (tmp_path / "o" / "exp01" / "oof.csv").is_file()
    assert "1 of 2 experiments failed: exp09" in captured.err


def test_ladder_patterns_name_configs_under_configs(tmp_path):
    from src.pipeline.run import expand_experiments

    for name in ("aug_blur", "aug_hue", "exp00", "exp01", "feat01"):
        (tmp_path / f"{name}.yaml").write_text("parent: exp00\n")
    assert expand_experiments(["aug_*"], tmp_path) == ["aug_blur", "aug_hue"]
    assert expand_experiments(["exp01", "exp*", "configs/feat01.yaml"], tmp_path) == ["exp01", "exp00", "feat01"]
    with pytest.raises(UserError, match="no config .* matches 'nothing_\\*'"):
        expand_experiments(["nothing_*"], tmp_path)


@pytest.mark.slow
def test_ladder_expands_the_unexpanded_shell_glob(tiny_root, tmp_path, capsys):
    """`bash run.sh ladder aug_*` reaches the CLI as the literal 'aug_*' when nothing in the current folder matches;
    here every matched config fails fast (an unknown backbone), which shows each was run in turn."""
    code = run_cli("ladder", "aug_*", "--data", tiny_root, "--outputs", tmp_path / "o", "--submissions",
                   tmp_path / "s", *TINY_RUN, "model.backbone=no_such_net")
    err = capsys.readouterr().err
    assert code == 2 and "7 of 7 experiments failed: aug_blur" in err and "aug_saturation" in err
