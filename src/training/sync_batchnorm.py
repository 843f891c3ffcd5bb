"""SyncBatchNorm under DDP: each rank normalises over the whole step's batch, not its share of it. On GPUs torch's
SyncBatchNorm (through timm's converter); on the CPU, where torch's needs CUDA kernels, GlooSyncBatchNorm."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients of that sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for the CPU (gloo). torch's SyncBatchNorm computes its statistics with CUDA kernels only, and
    DDP refuses it on CPU modules, so on the CPU each BatchNorm layer becomes this one instead.

    In training under an initialised process group, the per-channel sum, sum of squares and count of every rank's
    batch are added up with a differentiable all-reduce, so the output, the gradients and the running statistics
    are those of one BatchNorm over the whole step's batch. Otherwise it is a plain BatchNorm. Like timm's
    SyncBatchNormAct, it applies the `drop` and `act` it took over from timm's BatchNormAct2d."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group if hasattr(self, "process_group") else None
        if self.training and dist.is_initialized() and dist.get_world_size(group) > 1:
            out = self._synced(input, group)
        else:
            out = super().forward(input)
        for name in ("drop", "act"):
            if hasattr(self, name):
                out = getattr(self, name)(out)
        return out

    def _synced(self, input: torch.Tensor, group) -> torch.Tensor:
        channels, dims = input.shape[1], [0, *range(2, input.dim())]
        shape = (1, channels) + (1,) * (input.dim() - 2)
        x = input.float()
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / channels)])
        total = _AllReduceSum.apply(local, group)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1), momentum)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def _gloo_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm layer replaced by GlooSyncBatchNorm sharing its parameters and buffers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        for name in ("drop", "act"):
            if hasattr(module, name):
                setattr(synced, name, getattr(module, name))
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _gloo_sync_batchnorm(child))
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer (timm's BatchNormAct2d included) synchronised over the ranks: torch's SyncBatchNorm
    through timm's converter on GPUs, GlooSyncBatchNorm on the CPU."""
    if device.type == "cpu":
        return _gloo_sync_batchnorm(model)
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(model)
