"""Optimisers: Adam, AdamW or SGD, optionally wrapped in SAM, which is written here because torch has none."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..core.schema import OptimizerConfig


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimisation (Foret et al., 2021) around any base optimiser.

    Each step takes two forward-backward passes: the first gradient moves the weights to the nearby
    worst case w + rho * g / ||g||; the gradient there updates the original weights through the base
    optimiser. At rho = 0 this is exactly the base optimiser (with twice the compute). The second pass only
    measures a gradient: BatchNorm's running statistics are left as the first pass, at the real weights, made them.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(kwargs))
        self.rho = rho
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _ascend(self) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2) if grads else torch.tensor(0.0)
        scale = self.rho / (norm + 1e-12)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                offset = p.grad * scale.to(p)
                p.add_(offset)
                self.state[p]["sam_offset"] = offset

    @torch.no_grad()
    def _descend(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "sam_offset" in self.state[p]:
                    p.sub_(self.state[p].pop("sam_offset"))
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor],  # type: ignore[override]
             model: nn.Module | None = None) -> torch.Tensor:
        """`closure` zeroes the gradients, runs `model` forward and backward, and returns the loss. Returns the
        loss at the original weights."""
        loss = closure()
        self._ascend()
        with running_statistics_kept(model):
            closure()
        self._descend()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)


@contextlib.contextmanager
def running_statistics_kept(model: nn.Module | None) -> Iterator[None]:
    """The running mean, variance and batch count of every BatchNorm layer of `model` (SyncBatchNorm and timm's
    BatchNormAct included) restored on exit to what they were on entry."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats] if model is not None else []
    kept = [[buffer.clone() for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, (mean, var, count) in zip(layers, kept):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def norm_pre_in_stem(backbone: nn.Module) -> Iterator[None]:
    """timm's ViT group matcher sends every name starting with 'norm' to the top layer, CLIP's `norm_pre` (the
    LayerNorm right after the patch embedding, ln_pre) with the final `norm`: under layer decay it would train at the
    head's lr. FT-CLIP trains it with the patch embedding, layer 0; so does this matcher, for as long as it is open."""
    matcher = backbone.group_matcher(coarse=False) if hasattr(backbone, "group_matcher") else None
    has_norm_pre = any(name.startswith("norm_pre.") for name, _ in backbone.named_parameters())
    if not (has_norm_pre and isinstance(matcher, dict) and isinstance(matcher.get("stem"), str)):
        yield
        return
    stem = {**matcher, "stem": matcher["stem"] + "|^norm_pre"}
    backbone.group_matcher = lambda coarse=False: stem if not coarse else matcher
    try:
        yield
    finally:
        del backbone.group_matcher


def parameter_groups(model: nn.Module, cfg: OptimizerConfig):
    """What the optimiser trains: every parameter at optimizer.lr, or with optimizer.layer_decay timm's layer-wise
    groups of the backbone (param_groups_layer_decay: the backbone's group_matcher numbers its layers, layer i of L
    gets lr_scale decay^(L - 1 - i); 1-D parameters and the backbone's no_weight_decay() names get no weight decay)
    plus the head at lr_scale 1, as the top of timm's own models is. Each group's lr is optimizer.lr x its scale;
    the schedule moves them all in proportion."""
    if cfg.layer_decay is None:
        return model.parameters()
    from timm.optim._param_groups import param_groups_layer_decay

    backbone = model.backbone
    skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    with norm_pre_in_stem(backbone):
        groups = param_groups_layer_decay(backbone, weight_decay=cfg.weight_decay, no_weight_decay_list=skip,
                                          layer_decay=cfg.layer_decay)
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups += [{"params": [p for p in head if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
               {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0}]
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    return [group for group in groups if group["params"]]


def build_optimizer(cfg: OptimizerConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """Adam and AdamW use their fused kernels on CUDA: one kernel for all parameters instead of several per
    parameter."""
    fused = device.type == "cuda"
    base, kwargs = {
        "adam": (torch.optim.Adam, dict(lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)),
        "adamw": (torch.optim.AdamW, dict(lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)),
        "sgd": (torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)),
    }[cfg.name]
    if cfg.sam_rho is not None:
        return SAM(params, base, rho=cfg.sam_rho, **kwargs)
    return base(params, **kwargs)
