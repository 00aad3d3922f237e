"""Masked-row gather + LayerNorm: the MIM head's `norm(x[:, 1:][bool_masked_pos])` in one pass.

    y[k] = LayerNorm(hidden[b_k, 1 + n_k]) * weight + bias,  k over masked (b, n) in row-major order

Shapes: hidden (B, N+1, D), cls row first; bool_masked_pos (B, N) bool; weight, bias (D,).
Output (M, D), M = number of masked patches, in the promoted dtype of hidden and weight (as
torch's layer_norm); mean and rstd kept in fp32. Backward: a tiny kernel tags each hidden row with
its masked index (k + 1, 0 for cls / unmasked rows; a 4-byte-per-row memset, not a zero-fill of the
(B, N+1, D) gradient), then persistent programs sweep EVERY hidden row once, writing dx for masked
rows and zeros for the others (each gradient byte written once), and reduce d weight / d bias in fp32
(per-program partial rows, then one sum: deterministic, no atomics).

Host synchronisation: the masked-row indices need the mask's nonzero positions. With
`num_masked_per_image=K` (every image has exactly K masked patches, as
`BlockwiseMaskGenerator` guarantees) they come from a stable sort of each mask row - no sync;
the equal-count promise is verified by a deferred device-side check
(`beit_fast.kernels.check_deferred`). Without it, `nonzero` is used (one sync), correct for any
mask. D up to 16384 (one row in one block).
Cards measured: none yet (no GPU has run this version); correctness checked under TRITON_INTERPRET=1
in fp32; sm_90 compile checked ahead of time (no spills).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import SM_COUNT, defer_check

__all__ = [
    "gather_masked_layer_norm",
    "gather_masked_layer_norm_ref",
    "GatherMaskedLayerNormFunction",
    "masked_row_index",
    "gather_masked_layer_norm_fwd",
    "gather_masked_layer_norm_bwd",
]

MAX_D = 16384
# Persistent backward programs: a fixed count (no device query, so launchers also run on fake tensors), enough
# for 2 per SM, few enough that the (programs, D) partial sums stay small.
BWD_PROGRAMS = 2 * SM_COUNT


# -- kernels ---------------------------------------------------------------------------------------------------------
@triton.jit
def _gather_ln_fwd_kernel(
    x_ptr, rows_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, D, eps,
    stride_x_row, stride_y_row,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    k_ok = ks < M
    col_ok = cols < D
    ok = k_ok[:, None] & col_ok[None, :]
    rows = tl.load(rows_ptr + ks, mask=k_ok, other=0).to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + ks[:, None].to(tl.int64) * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + ks, mean, mask=k_ok)
    tl.store(rstd_ptr + ks, rstd, mask=k_ok)


# Row tags for the backward: tag[rows[k]] = k + 1 over a zeroed (B*(N+1),) int32 buffer.
@triton.jit
def _gather_ln_row_tag_kernel(rows_ptr, tag_ptr, M, BLOCK: tl.constexpr):
    ks = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = ks < M
    rows = tl.load(rows_ptr + ks, mask=ok, other=0)
    tl.store(tag_ptr + rows, ks + 1, mask=ok)


# Backward over every hidden row r (k = tag[r] - 1; k < 0: cls or unmasked row, dx = 0), with
# xhat = (x - mean) * rstd and g = weight * dy:
#   dx    = rstd * (g - mean(g) - xhat * mean(g * xhat))     -> dhidden[r]
#   dw   += dy * xhat,  db += dy                             -> per-program partials, summed by the launcher
@triton.jit
def _gather_ln_bwd_kernel(
    x_ptr, tag_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    R, D,
    stride_x_row, stride_dy_row, stride_dx_row,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, R, nprog * BLOCK_M):
        rs = start + tl.arange(0, BLOCK_M)
        r_ok = rs < R
        k = tl.load(tag_ptr + rs, mask=r_ok, other=0) - 1
        is_m = k >= 0
        k64 = tl.maximum(k, 0).to(tl.int64)
        rs64 = rs.to(tl.int64)
        ld = is_m[:, None] & col_ok[None, :]  # unmasked rows read nothing and compute exact zeros
        x = tl.load(x_ptr + rs64[:, None] * stride_x_row + cols[None, :], mask=ld, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + k64[:, None] * stride_dy_row + cols[None, :], mask=ld, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + k64, mask=is_m, other=0.0)
        rstd = tl.load(rstd_ptr + k64, mask=is_m, other=0.0)
        xhat = tl.where(ld, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rs64[:, None] * stride_dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & col_ok[None, :])
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(dw_part_ptr + pid * D + cols, dw_acc, mask=col_ok)
    tl.store(db_part_ptr + pid * D + cols, db_acc, mask=col_ok)


# -- launchers -------------------------------------------------------------------------------------------------------
def _blocks(D: int) -> Tuple[int, int]:
    BLOCK_D = triton.next_power_of_2(D)
    return max(1, min(16, 8192 // BLOCK_D)), BLOCK_D


def gather_masked_layer_norm_fwd(
    hidden: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows: (M,) int64 indices into hidden viewed as (B*(N+1), D). -> y (M, D), mean (M,), rstd (M,) fp32."""
    D = hidden.shape[-1]
    x = hidden.contiguous().view(-1, D)
    M = rows.shape[0]
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    y = torch.empty((M, D), device=hidden.device, dtype=dtype)
    mean = torch.empty((M,), device=hidden.device, dtype=torch.float32)
    rstd = torch.empty((M,), device=hidden.device, dtype=torch.float32)
    if M == 0:
        return y, mean, rstd
    BLOCK_M, BLOCK_D = _blocks(D)
    _gather_ln_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
        x, rows, weight.contiguous(), bias.contiguous(), y, mean, rstd,
        M, D, eps,
        x.stride(0), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK_M * BLOCK_D >= 8192 else 4,
    )
    return y, mean, rstd


def gather_masked_layer_norm_bwd(
    dy: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dhidden (zero outside the masked rows), d weight (D,) fp32, d bias (D,) fp32."""
    D = hidden.shape[-1]
    x = hidden.contiguous().view(-1, D)
    dy = dy.contiguous()
    R = x.shape[0]
    M = rows.shape[0]
    dx = torch.empty_like(x)  # every row is written by the kernel
    tag = torch.zeros((R,), device=hidden.device, dtype=torch.int32)
    if M > 0:
        _gather_ln_row_tag_kernel[(triton.cdiv(M, 1024),)](rows, tag, M, BLOCK=1024, num_warps=4)
    BLOCK_M, BLOCK_D = _blocks(D)
    # Half the forward's rows per tile: 4 x 1024 over 8 warps stays under 128 registers (2 programs per SM).
    BLOCK_M = max(1, BLOCK_M // 2)
    nprog = max(1, min(triton.cdiv(R, BLOCK_M), BWD_PROGRAMS))
    dw_part = torch.empty((nprog, D), device=hidden.device, dtype=torch.float32)
    db_part = torch.empty((nprog, D), device=hidden.device, dtype=torch.float32)
    _gather_ln_bwd_kernel[(nprog,)](
        x, tag, weight.contiguous(), dy, mean, rstd, dx, dw_part, db_part,
        R, D,
        x.stride(0), dy.stride(0), dx.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK_M * BLOCK_D >= 4096 else 4,
    )
    return dx.view(hidden.shape), dw_part.sum(0), db_part.sum(0)


# -- custom ops ------------------------------------------------------------------------------------------------------
@torch.library.custom_op("beit_fast::gather_masked_layer_norm_fwd", mutates_args=())
def _fwd_op(
    hidden: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gather_masked_layer_norm_fwd(hidden, rows, weight, bias, eps)


@_fwd_op.register_fake
def _(hidden, rows, weight, bias, eps):
    M, D = rows.shape[0], hidden.shape[-1]
    f32 = torch.float32
    return (hidden.new_empty((M, D), dtype=torch.promote_types(hidden.dtype, weight.dtype)),
            hidden.new_empty((M,), dtype=f32), hidden.new_empty((M,), dtype=f32))


@torch.library.custom_op("beit_fast::gather_masked_layer_norm_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gather_masked_layer_norm_bwd(dy, hidden, rows, mean, rstd, weight)


@_bwd_op.register_fake
def _(dy, hidden, rows, mean, rstd, weight):
    D = hidden.shape[-1]
    return (torch.empty_like(hidden), hidden.new_empty((D,), dtype=torch.float32),
            hidden.new_empty((D,), dtype=torch.float32))


# -- autograd --------------------------------------------------------------------------------------------------------
class GatherMaskedLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, rows, weight, bias, eps):
        y, mean, rstd = torch.ops.beit_fast.gather_masked_layer_norm_fwd(hidden, rows, weight, bias, eps)
        ctx.save_for_backward(hidden, rows, mean, rstd, weight)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        hidden, rows, mean, rstd, weight = ctx.saved_tensors
        dx, dw, db = torch.ops.beit_fast.gather_masked_layer_norm_bwd(dy, hidden, rows, mean, rstd, weight)
        return dx, None, dw.to(weight.dtype), db.to(ctx.bias_dtype), None


# -- public ----------------------------------------------------------------------------------------------------------
def masked_row_index(bool_masked_pos: torch.Tensor, num_masked_per_image: Optional[int] = None) -> torch.Tensor:
    """(M,) int64 indices of the masked patch rows in hidden viewed as (B*(N+1), D), row-major mask order.

    With `num_masked_per_image=K` no host sync (stable sort of each mask row); the promise that every
    row has exactly K True is checked on the device (deferred). Without it: nonzero (one sync)."""
    B, N = bool_masked_pos.shape
    if num_masked_per_image is None:
        flat = bool_masked_pos.reshape(-1).nonzero().squeeze(1)
        return flat + flat // N + 1
    K = int(num_masked_per_image)
    if not 0 <= K <= N:
        raise ValueError(f"num_masked_per_image={K} outside [0, {N}]")
    counts = bool_masked_pos.sum(1)
    defer_check(
        (counts != K).any(),
        lambda: f"num_masked_per_image={K} promised, but the images have {sorted(set(counts.tolist()))} masked patches",
    )
    # False (0) sorts before True (1) for ~mask, and the sort is stable: masked positions come first, ascending.
    order = torch.sort((~bool_masked_pos).to(torch.uint8), dim=1, stable=True).indices[:, :K]
    base = torch.arange(B, device=bool_masked_pos.device).unsqueeze(1) * (N + 1) + 1
    return (order + base).reshape(-1)


def gather_masked_layer_norm(
    hidden: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    num_masked_per_image: Optional[int] = None,
) -> torch.Tensor:
    """LayerNorm of the masked patch rows of hidden (B, N+1, D) -> (M, D), order of hidden[:, 1:][mask]."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, N+1, D), got {tuple(hidden.shape)}")
    B, N1, D = hidden.shape
    if bool_masked_pos.dtype != torch.bool or tuple(bool_masked_pos.shape) != (B, N1 - 1):
        raise ValueError(
            f"bool_masked_pos must be torch.bool of shape {(B, N1 - 1)}, got {bool_masked_pos.dtype} "
            f"{tuple(bool_masked_pos.shape)}"
        )
    if bias is None:  # as F.layer_norm: no shift (a zero bias whose gradient is dropped)
        bias = torch.zeros_like(weight)
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(f"weight and bias must be ({D},), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if D > MAX_D:
        raise ValueError(f"D={D} is larger than this kernel's limit {MAX_D}")
    rows = masked_row_index(bool_masked_pos, num_masked_per_image)
    return GatherMaskedLayerNormFunction.apply(hidden, rows, weight, bias, float(eps))


def gather_masked_layer_norm_ref(
    hidden: torch.Tensor, bool_masked_pos: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    eps: float = 1e-6, upcast: bool = False,
) -> torch.Tensor:
    """Plain torch: boolean-index gather, then F.layer_norm (`upcast`: in fp32)."""
    x = hidden[:, 1:][bool_masked_pos]
    if upcast:
        x, weight, bias = x.float(), weight.float(), bias.float()
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
