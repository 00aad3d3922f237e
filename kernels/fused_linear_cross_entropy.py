"""Fused linear + softmax cross-entropy over the visual-token vocabulary, on masked rows only.

    loss = reduce_k( logsumexp(z_k) - z_k[target_k] ),  z = hidden @ weight.T + bias
    num_correct = #{k : argmax(z_k) == target_k}        (first maximum, as torch.argmax)

Shapes: hidden (M, D), weight (V, D), bias (V,) or None, target (M,) int64. Returns
(loss: 0-d fp32, num_correct: 0-d int64, no gradient).

How: the rows are processed in chunks of C rows (C * V logits at most `chunk_bytes`, 64 MiB by
default), so the (M, V) logits never exist at full size. Per chunk:
  1. z_c = hidden_c @ weight.T + bias           (cuBLAS GEMM, compute dtype = hidden's)
  2. one Triton program per row: online max / sum-exp / argmax / target logit in fp32,
     then, when gradients are needed, overwrite z_c IN PLACE with
     dz = (softmax(z) - onehot(target)) * scale   (scale = 1/M for "mean")
  3. d hidden_c = dz @ weight (cuBLAS), d weight += dz.T @ hidden_c and d bias += sum(dz)
     accumulated in fp32.
The gradients are thus computed during the forward (the loss is a scalar, so the backward only
multiplies them by the incoming grad); no logits are recomputed. Arithmetic: 3 GEMMs of
2*M*V*D (the floor of any implementation) plus one read and one write of each logits chunk.

Targets out of [0, V) raise ValueError: at once on the CPU, through a deferred device flag on a
GPU (`beit_fast.kernels.check_deferred`, no host sync here); the kernel never reads out of
bounds for them. reduction: "mean" or "sum" ("none" would need the per-row grads in the
backward, which this design does not keep).
Cards measured: none yet; correctness checked under TRITON_INTERPRET=1 in fp32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import defer_check

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy_fwd",
]

CHUNK_BYTES = 64 * 2**20


# -- kernel ----------------------------------------------------------------------------------------------------------
# Per row r of a logits chunk z (fp32 statistics):
#   m = max_v z[v], s = sum_v exp(z[v] - m), lse = m + log(s)       (online over V blocks)
#   loss[r] = lse - z[target], correct[r] = (first argmax == target)
#   if WRITE_GRAD: z[v] <- (exp(z[v] - lse) - [v == target]) * scale   (second sweep, in place)
@triton.jit
def _ce_rows_kernel(
    z_ptr, target_ptr, loss_ptr, correct_ptr,
    V, stride_z_row, scale,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z_row
    target = tl.load(target_ptr + row).to(tl.int32)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    z_target = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        block_max = tl.max(z, axis=0)
        block_arg = tl.argmax(z, axis=0).to(tl.int32)
        better = block_max > best  # strict: ties keep the earlier (first) index
        best_idx = tl.where(better, v0 + block_arg, best_idx)
        best = tl.maximum(best, block_max)
        m_new = tl.maximum(m, block_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_target += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, lse - z_target)
    tl.store(correct_ptr + row, (best_idx == target).to(tl.int32))
    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=ok)


# -- launcher --------------------------------------------------------------------------------------------------------
_MM_OUT_DTYPE_OK: Optional[bool] = None


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) += a @ b, with fp32 accumulation across calls even for bf16/fp16 a, b."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda and _MM_OUT_DTYPE_OK is not False:
        try:  # torch >= 2.9 on CUDA: half-precision GEMM with an fp32 output, no rounding per chunk
            out = torch.addmm(acc, a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE_OK = True
            return out
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE_OK = False
    return acc.add_(torch.mm(a, b))


def _chunk_rows(M: int, V: int, elem: int, chunk_bytes: int) -> int:
    return max(1, min(M, chunk_bytes // max(1, V * elem)))


def fused_linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, scale: float,
    compute_grad: bool, chunk_bytes: int = CHUNK_BYTES,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss (fp32 0-d, already scaled), num_correct (int64 0-d), and when `compute_grad`:
    d hidden (M, D) in hidden's dtype, d weight (V, D) fp32, d bias (V,) fp32 (else empty tensors),
    all for an incoming gradient of 1."""
    M, D = hidden.shape
    V = weight.shape[0]
    dtype = hidden.dtype
    dev = hidden.device
    hidden = hidden.contiguous()
    w = weight.to(dtype).contiguous()
    b = bias.to(dtype) if bias is not None else None
    target = target.contiguous()
    loss_rows = torch.empty((M,), device=dev, dtype=torch.float32)
    correct = torch.empty((M,), device=dev, dtype=torch.int32)
    dh, dw, db = (hidden.new_empty((0,)) for _ in range(3))  # distinct: custom-op outputs may not alias
    if compute_grad:
        dh = torch.empty_like(hidden)
        dw = torch.zeros((V, D), device=dev, dtype=torch.float32)
        db = torch.zeros((V,), device=dev, dtype=torch.float32)
    C = _chunk_rows(M, V, hidden.element_size(), chunk_bytes)
    z = torch.empty((C, V), device=dev, dtype=dtype) if M else None
    BLOCK_V = min(triton.next_power_of_2(V), 8192)
    for r0 in range(0, M, C):
        r1 = min(M, r0 + C)
        h_c = hidden[r0:r1]
        z_c = z[: r1 - r0]
        if b is not None:
            torch.addmm(b, h_c, w.t(), out=z_c)
        else:
            torch.mm(h_c, w.t(), out=z_c)
        _ce_rows_kernel[(r1 - r0,)](
            z_c, target[r0:r1], loss_rows[r0:r1], correct[r0:r1],
            V, z_c.stride(0), scale,
            WRITE_GRAD=compute_grad, BLOCK_V=BLOCK_V, num_warps=16 if BLOCK_V >= 4096 else 8,
        )
        if compute_grad:
            torch.mm(z_c, w, out=dh[r0:r1])
            dw = _accumulate_mm(dw, z_c.t(), h_c)
            if b is not None:
                db += z_c.sum(0, dtype=torch.float32)
    loss = loss_rows.sum() * scale
    return loss, correct.sum(dtype=torch.int64), dh, dw, db


# -- custom op -------------------------------------------------------------------------------------------------------
@torch.library.custom_op("beit_fast::fused_linear_cross_entropy_fwd", mutates_args=())
def _flce_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, scale: float,
    compute_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return fused_linear_cross_entropy_fwd(hidden, weight, bias, target, scale, compute_grad)


@_flce_op.register_fake
def _(hidden, weight, bias, target, scale, compute_grad):
    M, D = hidden.shape
    V = weight.shape[0]
    f32 = torch.float32
    loss = hidden.new_empty((), dtype=f32)
    nc = hidden.new_empty((), dtype=torch.int64)
    if not compute_grad:
        e = hidden.new_empty((0,))
        return loss, nc, e, e.clone(), e.clone()
    return loss, nc, torch.empty_like(hidden), hidden.new_empty((V, D), dtype=f32), hidden.new_empty((V,), dtype=f32)


# -- autograd --------------------------------------------------------------------------------------------------------
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, scale):
        compute_grad = any(ctx.needs_input_grad[:3])
        loss, num_correct, dh, dw, db = torch.ops.beit_fast.fused_linear_cross_entropy_fwd(
            hidden, weight, bias, target, scale, compute_grad
        )
        ctx.mark_non_differentiable(num_correct)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss, num_correct

    @staticmethod
    def backward(ctx, g_loss, g_correct):
        dh, dw, db = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        g = g_loss.to(torch.float32)
        d_hidden = (dh * g).to(h_dtype) if ctx.needs_input_grad[0] else None
        d_weight = (dw * g).to(w_dtype) if ctx.needs_input_grad[1] else None
        d_bias = (db * g).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return d_hidden, d_weight, d_bias, None, None


# -- public ----------------------------------------------------------------------------------------------------------
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    reduction: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, num_correct) of softmax cross-entropy of `hidden @ weight.T + bias` against `target`.

    Under autocast, hidden is cast to the autocast dtype (the GEMMs run in it, as F.linear would);
    weight and bias keep their dtype and receive fp32-accumulated gradients."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (M, D) and weight (V, D) expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    M, V = hidden.shape[0], weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be ({V},), got {tuple(bias.shape)}")
    if tuple(target.shape) != (M,) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of shape ({M},), got {target.dtype} {tuple(target.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if M == 0:
        raise ValueError("no rows: the cross-entropy of an empty set of masked patches is undefined")
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    target = target.long()
    defer_check(
        ((target < 0) | (target >= V)).any(),
        lambda: f"target ids out of range: min {int(target.min())}, max {int(target.max())}, vocab size {V}",
    )
    scale = 1.0 / M if reduction == "mean" else 1.0
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, target, scale)


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    reduction: str = "mean", upcast: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: F.linear, then F.cross_entropy on fp32 logits (`upcast`: the linear in fp32 too)."""
    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = bias.float() if bias is not None else None
    logits = torch.nn.functional.linear(hidden, weight, bias)
    loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction=reduction)
    with torch.no_grad():
        num_correct = (logits.argmax(-1) == target).sum()
    return loss, num_correct


def flops(M: int, D: int, V: int, backward: bool = True) -> float:
    """Matmul FLOPs of forward (+ backward): 2*M*V*D each GEMM."""
    return 2.0 * M * V * D * (3 if backward else 1)

