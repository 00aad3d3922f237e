"""The visual tokenizer's head fused with its argmax: tokens = argmax_v( relu(features) . W[v] + b[v] ).

The DALL-E encoder ends with ReLU -> 1x1 conv (2048 -> 8192) -> argmax over the vocabulary. As
separate ops that writes (B, 8192, 14, 14) logits (and reads them back for the argmax); here
each program takes a block of pixels and a slice of the vocabulary, runs the GEMM over the
slice's vocabulary blocks with the ReLU applied on load, and keeps only a running (max, argmax)
per pixel. Logits never exist in memory.

Split vocabulary: at 14x14 positions a batch has few pixel blocks (B=128: 196 blocks of 128
pixels, 1.5 waves on 132 SMs), so the vocabulary is cut into `splits` slices across a second
grid axis; each (pixel block, slice) program writes its partial (max, argmax) to a small
(splits, P) fp32/int32 scratch and `_head_argmax_reduce_kernel` picks the winner per pixel.
The launcher chooses `splits` from the shapes (fewest slices that fill whole waves). Ties go to
the first index, as torch.argmax: strict `>` across vocabulary blocks and slices, and
`tl.argmax`'s left tie-break within a block.

Shapes: features (B, C, h, w) (any strides: NCHW or channels_last); weight (V, C) or (V, C, 1, 1);
bias (V,) or None. Returns (B, h*w) int64. fp16 / bf16 / fp32 inputs, fp32 accumulation (fp32
inputs run `tl.dot` as TF32 on a GPU). The GEMM runs in the weight's dtype when it is fp16 or bf16
(the features are cast on load: the tokenizer pairs bf16 features with fp16 weights), in the
features' dtype when the weight is fp32. No gradient (tokenization only). NaN logits are not
handled as torch.argmax does (it returns the first NaN's index).
Limits: P = B*h*w and V below 2**31 (pixel and vocabulary indices are int32; memory offsets int64).
Cards measured: none yet (no GPU has run this code); correctness checked under TRITON_INTERPRET=1
in fp32; sm_90 compiled ahead of time (Triton 3.8, see `head_argmax_config`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import SM_COUNT

__all__ = ["tokenizer_head_argmax", "tokenizer_head_argmax_ref", "head_argmax_config"]

# Streaming multiprocessors the split heuristic fills (H100 SXM / H200). A constant, not a device query:
# the launcher's choice must follow from shapes alone (FakeTensor launches, no host calls).
_MAX_SPLITS = 8


@triton.jit
def _head_argmax_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_max_ptr, part_idx_ptr,
    P, HW, C, V, V_PER_SPLIT,
    stride_x_b, stride_x_c, stride_x_p, stride_w_v, stride_w_c,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_s = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    img = (offs_p // HW).to(tl.int64)
    pix = (offs_p % HW).to(tl.int64)
    x_row = x_ptr + img * stride_x_b + pix * stride_x_p
    v_begin = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)
    best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_P,), tl.int32) + v_begin  # a slice of -inf logits still names one of its own
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        acc = tl.zeros((BLOCK_P, BLOCK_V), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C
            x = tl.load(x_row[:, None] + offs_k[None, :] * stride_x_c, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.maximum(x, 0.0)  # the encoder's output ReLU, applied on load
            w = tl.load(w_ptr + offs_v.to(tl.int64)[None, :] * stride_w_v + offs_k[:, None] * stride_w_c,
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
    if SPLIT:
        part = pid_s.to(tl.int64) * P + offs_p
        tl.store(part_max_ptr + part, best, mask=p_ok)
        tl.store(part_idx_ptr + part, best_idx, mask=p_ok)
    else:
        tl.store(out_ptr + offs_p, best_idx.to(tl.int64), mask=p_ok)


@triton.jit
def _head_argmax_reduce_kernel(part_max_ptr, part_idx_ptr, out_ptr, P, SPLITS, BLOCK_P: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    max_ptrs = part_max_ptr + offs_p
    idx_ptrs = part_idx_ptr + offs_p
    best = tl.load(max_ptrs, mask=p_ok, other=0.0)
    best_idx = tl.load(idx_ptrs, mask=p_ok, other=0)
    for _ in range(1, SPLITS):
        max_ptrs += P  # pointer arithmetic is 64-bit: no int32 overflow at splits * P
        idx_ptrs += P
        m = tl.load(max_ptrs, mask=p_ok, other=0.0)
        i = tl.load(idx_ptrs, mask=p_ok, other=0)
        better = m > best  # slices are in vocabulary order: an equal later slice keeps the earlier index
        best_idx = tl.where(better, i, best_idx)
        best = tl.maximum(best, m)
    tl.store(out_ptr + offs_p, best_idx.to(tl.int64), mask=p_ok)


def head_argmax_config(P: int, V: int, is_cuda: bool, splits: Optional[int] = None, fp32: bool = False) -> dict:
    """The launch configuration for P pixels and a vocabulary of V: blocks, warps, stages, and the vocabulary
    split (`splits` forces it; it is clamped so that every slice holds at least one vocabulary block)."""
    if is_cuda:
        # 128x128 fp32 accumulator over 8 warps (64 registers a thread). Ahead-of-time sm_90 compile (Triton 3.8,
        # bf16 or fp16): 189 registers, no spills, 80 KB shared memory, wgmma (HGMMA), cp.async loads. fp32
        # operands: K tiles of 32 in 2 stages (64 x 3 stages spills with NCHW features: bench/sm90_report.py).
        cfg = dict(BLOCK_P=128, BLOCK_V=128, BLOCK_K=32 if fp32 else 64, num_warps=8, num_stages=2 if fp32 else 3)
    else:
        cfg = dict(BLOCK_P=16, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=1)
    p_blocks, v_blocks = triton.cdiv(P, cfg["BLOCK_P"]), triton.cdiv(V, cfg["BLOCK_V"])
    if splits is None:
        splits, best = 1, 0.0
        # Fewest slices that fill whole waves (a ragged last wave idles SMs); each slice keeps >= 4 vocabulary
        # blocks so that the partial results stay small against the GEMM work.
        for s in range(1, min(_MAX_SPLITS, max(1, v_blocks // 4)) + 1):
            programs = p_blocks * s
            fill = programs / (triton.cdiv(programs, SM_COUNT) * SM_COUNT)
            if fill > best + 0.05:
                splits, best = s, fill
        if not is_cuda:
            splits = 1
    splits = max(1, min(int(splits), v_blocks))
    v_per_split = triton.cdiv(v_blocks, splits) * cfg["BLOCK_V"]
    cfg.update(splits=triton.cdiv(V, v_per_split), v_per_split=v_per_split)
    return cfg


def tokenizer_head_argmax(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """argmax over V of relu(features) (B, C, h, w) through a 1x1 conv (V, C[, 1, 1]) -> (B, h*w) int64.

    `splits`: vocabulary slices across programs (None: chosen from the shapes; tests force it)."""
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
    if weight.dtype == torch.float32:
        weight = weight.to(features.dtype)  # else the GEMM runs in the weight's 16-bit dtype (features cast on load)
    # Pixels of one image must be one stride apart in h*w order (NCHW and channels_last both are).
    if features.stride(2) != w * features.stride(3):
        features = features.contiguous()
    P = B * h * w
    out = torch.empty((B, h * w), device=features.device, dtype=torch.int64)
    cfg = head_argmax_config(P, V, features.is_cuda, splits, fp32=weight.dtype == torch.float32)
    split = cfg["splits"] > 1
    if split:
        part_max = torch.empty((cfg["splits"], P), device=features.device, dtype=torch.float32)
        part_idx = torch.empty((cfg["splits"], P), device=features.device, dtype=torch.int32)
    else:
        part_max, part_idx = out, out  # unused (SPLIT=False)
    _head_argmax_fwd_kernel[(triton.cdiv(P, cfg["BLOCK_P"]), cfg["splits"])](
        features, weight, bias if bias is not None else weight, out, part_max, part_idx,
        P, h * w, C, V, cfg["v_per_split"],
        features.stride(0), features.stride(1), features.stride(3), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, SPLIT=split,
        BLOCK_P=cfg["BLOCK_P"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        block = 256 if features.is_cuda else 64
        _head_argmax_reduce_kernel[(triton.cdiv(P, block),)](part_max, part_idx, out, P, cfg["splits"],
                                                             BLOCK_P=block, num_warps=4)
    return out


def tokenizer_head_argmax_ref(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain torch: relu, 1x1 conv, argmax over the vocabulary."""
    V = weight.shape[0]
    logits = torch.nn.functional.conv2d(features.relu(), weight.reshape(V, -1, 1, 1).to(features.dtype),
                                        bias.to(features.dtype) if bias is not None else None)
    return logits.argmax(1).flatten(1)
