"""The 2026 backbones (EVA-02, CLIP and DINOv2 ViTs, ConvNeXt) and their fine-tuning recipe, on random-init tiny
variants of each family: layer-wise lr decay against timm's definition through a schedule and a resume, any input
size for the ViT family, stochastic depth, gradient checkpointing, the pretrained config's normalisation and the
offline weights route; each family trains a fold end to end at a size other than its native one, with an EMA."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from src.core.config import resolve_config
from src.core.errors import UserError
from src.core.layout import FoldDir
from src.core.schema import ModelConfig
from src.data.competition import load_competition_data
from src.data.folds import shared_folds
from src.data.geometry import validation_set
from src.model.networks import build_backbone, build_model, normalisation
from src.tools.gpucheck import check_fold_predictions, fresh_predictor
from src.training.loop import build_training

from .conftest import TINY_RUN, resolved, run_cli

CPU = torch.device("cpu")
EVA = "eva02_tiny_patch14_224"


def eva_layer(name: str, depth: int) -> int:
    """Layer of a parameter of the ArtistClassifier around an EVA-02 (or any ViT) in timm's layer-decay scheme:
    0 for the patch embedding, position embedding and class token, i + 1 for block i, depth + 1 (the top) for the
    final norm and our head."""
    block = re.match(r"backbone\.blocks\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    top = name.startswith("head.") or name.startswith(("backbone.norm", "backbone.fc_norm"))
    return depth + 1 if top else 0


def lr_of_every_parameter(run) -> dict[str, float]:
    by_id = {id(p): group["lr"] for group in run.optimizer.param_groups for p in group["params"]}
    return {name: by_id[id(p)] for name, p in run.model.named_parameters()}


def test_layer_decay_follows_timms_definition_through_the_schedule_and_after_resume(tiny_root):
    """Every parameter trains at schedule(t) x decay^(top - layer), with no weight decay on 1-D parameters and the
    position embedding; a resumed optimiser and schedule (as last.pt restores them) go on exactly."""
    cfg, _ = resolve_config("exp22", "demo", [f"model.backbone={EVA}", "model.pretrained=false", "input.img_size=56",
                                              "train.batch_size=8", "train.num_workers=0", "scheduler.warmup_steps=2"])
    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg = resolved(cfg, data)
    run = build_training(cfg, data.train, len(data.classes), CPU)
    depth, decay = len(run.model.backbone.blocks), cfg.optimizer.layer_decay
    steps = len(run.loader) * cfg.train.epochs
    schedule = [run.scheduler.lr_lambdas[0](t) * cfg.optimizer.lr for t in range(steps)]
    assert max(schedule) == pytest.approx(cfg.optimizer.lr) and schedule[-1] < 0.01 * cfg.optimizer.lr

    def check(run, step: int) -> None:
        for name, lr in lr_of_every_parameter(run).items():
            expected = schedule[step] * decay ** (depth + 1 - eva_layer(name, depth))
            assert lr == pytest.approx(expected, rel=1e-9, abs=1e-15), (name, step)

    for group in run.optimizer.param_groups:
        names = {n for n, p in run.model.named_parameters() if any(p is q for q in group["params"])}
        no_decay = {n for n in names if n.endswith(("bias", "pos_embed", "cls_token")) or ".norm" in n
                    or n.startswith("backbone.norm") or "head.0." in n}
        assert (group["weight_decay"] == 0) == bool(no_decay), names
    for step in range(steps // 2):
        check(run, step)
        run.optimizer.step()
        run.scheduler.step()
    saved = run.optimizer.state_dict(), run.scheduler.state_dict()
    resumed = build_training(cfg, data.train, len(data.classes), CPU)
    resumed.optimizer.load_state_dict(saved[0])
    resumed.scheduler.load_state_dict(saved[1])
    for step in range(steps // 2, steps):
        check(resumed, step)
        resumed.optimizer.step()
        resumed.scheduler.step()


def test_a_vit_is_built_at_the_runs_input_size_and_refuses_a_size_its_patches_cannot_tile():
    cfg = ModelConfig(backbone=EVA, pretrained=False, drop_path_rate=0.1)
    backbone = build_backbone(cfg, img_size=112)
    assert backbone(torch.randn(1, 3, 112, 112)).shape == (1, backbone.num_features)
    assert backbone.pos_embed.shape[1] == 1 + (112 // 14) ** 2
    assert max(getattr(block.drop_path1, "drop_prob", 0.0) for block in backbone.blocks) == pytest.approx(0.1)
    with pytest.raises(UserError, match=r"input.img_size 100: eva02_tiny_patch14_224 cuts its input into 14x14 "
                                        r"patches, so the size must be a multiple of 14; the nearest sizes that "
                                        r"work are 98 and 112$"):
        build_backbone(cfg, img_size=100)
    assert build_backbone(ModelConfig(backbone="convnext_atto", pretrained=False), img_size=100) is not None


def test_mean_and_std_come_from_each_backbones_pretrained_config():
    clip = build_backbone(ModelConfig(backbone="vit_base_patch16_clip_384.laion2b_ft_in12k_in1k", pretrained=False),
                          img_size=384)
    assert normalisation(clip) == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    dino = build_backbone(ModelConfig(backbone="vit_small_patch14_dinov2.lvd142m", pretrained=False), img_size=112)
    assert normalisation(dino) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_an_offline_weights_file_loads_into_a_vit_at_another_size(tmp_path):
    """model.weights: PATH (a state dict saved at the weights' native 224 px) for a run at 112 px: the blocks load
    as saved, the position embedding is resampled to the 8x8 grid."""
    import timm

    torch.manual_seed(0)
    saved = timm.create_model(EVA, pretrained=False)
    path = tmp_path / "eva02_tiny.pth"
    torch.save(saved.state_dict(), path)
    backbone = build_backbone(ModelConfig(backbone=EVA, pretrained=True, weights=str(path)), img_size=112)
    torch.testing.assert_close(backbone.blocks[3].attn.qkv.weight, saved.blocks[3].attn.qkv.weight)
    assert backbone.pos_embed.shape == (1, 1 + 64, saved.pos_embed.shape[-1])
    with pytest.raises(UserError, match="model.weights: .* not found"):
        build_backbone(ModelConfig(backbone=EVA, pretrained=True, weights=str(tmp_path / "missing.pth")), 112)


def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=EVA, pretrained=False)
    images, labels = torch.randn(2, 3, 56, 56), torch.tensor([0, 1])
    plain, checkpointed = build_model(cfg, 3, 56), build_model(cfg, 3, 56)
    checkpointed.load_state_dict(plain.state_dict())
    from src.training.loop import enable_grad_checkpointing

    enable_grad_checkpointing(checkpointed.backbone, EVA)
    calls = {"plain": 0, "checkpointed": 0}
    for key, model in (("plain", plain), ("checkpointed", checkpointed)):
        block = model.backbone.blocks[0]

        def counted(*args, forward=block.forward, key=key, **kwargs):
            calls[key] += 1
            return forward(*args, **kwargs)

        block.forward = counted
        torch.nn.functional.cross_entropy(model.train()(images), labels).backward()
    assert calls == {"plain": 1, "checkpointed": 2}, "the checkpointed block runs again in the backward pass"
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(UserError, match="speed.grad_checkpointing: timm's dla34 does not support"):
        enable_grad_checkpointing(build_backbone(ModelConfig(backbone="dla34", pretrained=False)), "dla34")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [EVA, "vit_tiny_patch16_224", "convnext_atto"])
def test_each_family_trains_a_fold_at_another_size_with_an_ema(backbone, tiny_root, tmp_path):
    """exp22's recipe (layer decay, drop path, EMA) on a tiny EVA-02, a ViT (the CLIP and DINOv2 architecture) and a
    ConvNeXt, at 112 px instead of their native 224: valid fold files, equal to a fresh model loaded from best.pt."""
    size = "input.img_size=112"
    overrides = [f"model.backbone={backbone}", "model.pretrained=false", size, "train.ema_epochs=null",
                 "train.ema_decay=0.5"]
    assert run_cli("run", "exp22", "--data", tiny_root, "--outputs", tmp_path / "outputs", "--submissions",
                   tmp_path / "submissions", *TINY_RUN, *overrides, "train.folds=[0]") == 0
    cfg, _ = resolve_config("exp22", "demo", [*TINY_RUN[2:], *overrides])
    data = load_competition_data(tiny_root, log=lambda _: None)
    cfg = resolved(cfg, data)
    folds = shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, tmp_path / "outputs" / "folds")
    fold_dir = FoldDir(tmp_path / "outputs" / "exp22" / "fold0")
    validation = validation_set(cfg, data.train[(folds["fold"] == 0).to_numpy()])
    predictor = fresh_predictor(cfg, len(data.classes), CPU, fold_dir.best, data.classes)
    check = check_fold_predictions(predictor, data, fold_dir, validation, epochs=1)
    assert check.passed, check.detail
    probs = np.loadtxt(fold_dir.test_probs, delimiter=",", skiprows=1, usecols=range(1, len(data.classes) + 1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_clips_norm_pre_trains_with_the_stem_under_layer_decay():
    """CLIP's ViTs have a LayerNorm right after the patch embedding (timm's norm_pre, CLIP's ln_pre); FT-CLIP trains
    it with layer 0. timm's '^norm' matcher would put it at the top, at the head's lr (5e-5, not 1e-7, in exp23)."""
    import timm
    from torch import nn

    from src.core.schema import OptimizerConfig
    from src.training.optim import parameter_groups

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                              pre_norm=True)  # the CLIP layout: class token, norm_pre, blocks, norm
            self.head = nn.Sequential(nn.Linear(192, 5))

    model = Classifier()
    groups = parameter_groups(model, OptimizerConfig(name="adamw", lr=5e-5, weight_decay=0.05, layer_decay=0.6))
    scale = {name: group["lr_scale"] for group in groups for name, p in model.named_parameters()
             if any(p is q for q in group["params"])}
    stem = scale["backbone.patch_embed.proj.weight"]
    assert stem == pytest.approx(0.6 ** 12) and scale["backbone.cls_token"] == stem
    assert scale["backbone.norm_pre.weight"] == stem and scale["backbone.norm_pre.bias"] == stem
    assert scale["backbone.norm.weight"] == 1.0 and scale["head.0.weight"] == 1.0
    assert "group_matcher" not in vars(model.backbone), "timm's own matcher is back once the groups are made"
