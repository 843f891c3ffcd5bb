"""The memory estimate's training step on the CPU, computed as a GPU would compute it: CUDA's autocast casting
rules and CUDA's choice of attention kernel, where the CPU's differ.

Run on a GPU the estimator agreed with the measured peaks within 4%, but the CPU gave other batches (TinyViT-21M-384:
348 on 139.8 GiB, a GPU run 543). Two differences between the devices account for it:
- attention: F.scaled_dot_product_attention with a learnable bias (TinyViT's attention biases) runs the math
  kernel on the CPU, which keeps every attention matrix for the backward pass; a GPU of compute capability 8.0 and
  up runs the memory-efficient kernel, which keeps its output and a log-sum-exp. Without a mask a GPU runs flash
  attention (and the CPU its own flash kernel). Here the call goes to the kernel CUDA would choose (its FakeTensor
  shapes and its backward are device-independent).
- autocast: CUDA computes layer_norm, softmax and the other ops of its float32 list in float32 (and keeps the
  float32 copies for the backward pass), which the CPU's autocast leaves in bfloat16; and it runs a few matrix
  products in low precision that the CPU's does not (einsum, mv, addmv, addr, chain_matmul, multi_dot). The lists
  are PyTorch's, as its AMP documentation gives them ("CUDA Ops that can autocast to float32 / float16").
With both, the CPU estimate of TinyViT-21M-384 at batch 16 is 3.83 GiB and its largest batch on 139.8 GiB 543, what
the same estimator gave on an H200 (measured there: 3.97 GiB at batch 16, 118.97 GiB at 543). Not emulated: the
ops of the CPU's own float32 list that CUDA leaves alone (3-D pooling, reflection and replication padding, linear
algebra, FFTs), which the ladder's backbones do not use on their activations.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode

# PyTorch's AMP documentation, "CUDA Ops that can autocast to float32" (the ones the CPU's autocast leaves alone).
CUDA_FLOAT32 = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "cosh", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "layer_norm", "log", "log_softmax", "log10", "log1p", "log2", "norm", "normalize",
    "pdist", "pow", "prod", "reciprocal", "rsqrt", "sinh", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "cosine_similarity", "cross_entropy", "binary_cross_entropy_with_logits"})
# "CUDA Ops that can autocast to float16" that the CPU's autocast does not cast.
CUDA_LOW_PRECISION = frozenset({"einsum", "mv", "addmv", "addr", "chain_matmul", "multi_dot"})
FLASH_HEAD_DIM = 256  # flash attention's largest head dimension on compute capability 8.0 and up
MASK_ALIGNMENT = 16  # the memory-efficient kernel reads its bias with rows padded to this many elements


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    return value


def cuda_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False) -> torch.Tensor:
    """scaled_dot_product_attention through the kernel a GPU of compute capability 8.0 and up picks: flash attention
    for half-precision inputs without a mask, the memory-efficient kernel otherwise."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    query, key, value = (tensor.to(dtype) for tensor in (query, key, value))
    with torch.autocast("cpu", enabled=False):
        if attn_mask is None and dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= FLASH_HEAD_DIM:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                     scale=scale)[0]
        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=dtype).masked_fill(~attn_mask, float("-inf"))
            length = attn_mask.shape[-1]
            padding = -length % MASK_ALIGNMENT
            bias = F.pad(attn_mask.to(dtype), (0, padding))[..., :length] if padding else attn_mask.to(dtype)
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, query.requires_grad, dropout_p, is_causal, scale=scale)[0]


class CudaRules(TorchFunctionMode):
    """While active, torch functions follow CUDA's autocast lists and attention kernels (the module text)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is F.scaled_dot_product_attention and not kwargs.get("enable_gqa"):
            return cuda_attention(*args, **kwargs)
        if torch.is_autocast_enabled("cpu") and name in CUDA_FLOAT32 | CUDA_LOW_PRECISION:
            dtype = torch.float32 if name in CUDA_FLOAT32 else torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return func(*_cast(args, dtype), **_cast(kwargs, dtype))
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_rules() -> Iterator[None]:
    """CudaRules for everything run inside, the recomputation of checkpointed blocks included (a torch function mode
    does not reach it: it enters through torch.utils.checkpoint's context_fn)."""
    original = torch.utils.checkpoint.checkpoint

    @functools.wraps(original)
    def checkpoint(function, *args, **kwargs):
        return original(function, *args, context_fn=lambda: (contextlib.nullcontext(), CudaRules()), **kwargs)

    torch.utils.checkpoint.checkpoint = checkpoint
    try:
        with CudaRules():
            yield
    finally:
        torch.utils.checkpoint.checkpoint = original
