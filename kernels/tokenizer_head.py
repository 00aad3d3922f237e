"""The visual tokenizer's head fused with its argmax: tokens = argmax_v( relu(features) . W[v] + b[v] ).

The DALL-E encoder ends with ReLU -> 1x1 conv (2048 -> 8192) -> argmax over the vocabulary. As
separate ops that writes (B, 8192, 14, 14) logits (and reads them back for the argmax); here
each program takes a block of pixels, runs the GEMM over vocabulary blocks with the ReLU applied
on load, and keeps only a running (max, argmax) per pixel. Ties go to the first index, as
torch.argmax. Logits never exist in memory.

Shapes: features (B, C, h, w) (any strides: NCHW or channels_last); weight (V, C) or (V, C, 1, 1);
bias (V,) or None. Returns (B, h*w) int64. fp16 / bf16 / fp32 inputs, fp32 accumulation.
No gradient (tokenization only).
Cards measured: none yet; correctness checked under TRITON_INTERPRET=1 in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["tokenizer_head_argmax", "tokenizer_head_argmax_ref"]


@triton.jit
def _head_argmax_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    P, HW, C, V,
    stride_xb, stride_xc, stride_xp, stride_wv, stride_wc,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    img = (offs_p // HW).to(tl.int64)
    pix = (offs_p % HW).to(tl.int64)
    x_row = x_ptr + img * stride_xb + pix * stride_xp
    best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_P,), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        acc = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C
            x = tl.load(x_row[:, None] + offs_k[None, :] * stride_xc, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.maximum(x, 0.0)  # the encoder's output ReLU, applied on load
            w = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_k[:, None] * stride_wc,
                        mask=k_ok[:, None] & v_ok[None, :], other=0.0)
            acc = tl.dot(x.to(w.dtype), w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(v_ok[None, :], acc, float("-inf"))
        block_max = tl.max(acc, axis=1)
        block_arg = tl.argmax(acc, axis=1).to(tl.int32)
        better = block_max > best  # strict: an equal later block keeps the earlier index
        best_idx = tl.where(better, v0 + block_arg, best_idx)
        best = tl.maximum(best, block_max)
    tl.store(out_ptr + offs_p, best_idx.to(tl.int64), mask=p_ok)


def tokenizer_head_argmax(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """argmax over V of relu(features) (B, C, h, w) through a 1x1 conv (V, C[, 1, 1]) -> (B, h*w) int64."""
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
    B, C, h, w = features.shape
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[1] != C:
        raise ValueError(f"weight must be (V, {C}), got {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be ({V},), got {tuple(bias.shape)}")
    if torch.is_autocast_enabled(features.device.type):
        dt = torch.get_autocast_dtype(features.device.type)
        features, weight = features.to(dt), weight.to(dt)
    weight = weight.to(features.dtype)
    # Pixels of one image must be one stride apart in h*w order (NCHW and channels_last both are).
    if features.stride(2) != w * features.stride(3):
        features = features.contiguous()
    out = torch.empty((B, h * w), device=features.device, dtype=torch.int64)
    P = B * h * w
    if features.is_cuda:
        BLOCK_P, BLOCK_V, BLOCK_K, warps, stages = 128, 128, 64, 8, 3
    else:
        BLOCK_P, BLOCK_V, BLOCK_K, warps, stages = 16, 64, 32, 4, 1
    _head_argmax_kernel[(triton.cdiv(P, BLOCK_P),)](
        features, weight, bias if bias is not None else weight, out,
        P, h * w, C, V,
        features.stride(0), features.stride(1), features.stride(3), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, BLOCK_P=BLOCK_P, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K,
        num_warps=warps, num_stages=stages,
    )
    return out


def tokenizer_head_argmax_ref(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain torch: relu, 1x1 conv, argmax over the vocabulary."""
    V = weight.shape[0]
    logits = torch.nn.functional.conv2d(features.relu(), weight.reshape(V, -1, 1, 1).to(features.dtype),
                                        bias.to(features.dtype) if bias is not None else None)
    return logits.argmax(1).flatten(1)
