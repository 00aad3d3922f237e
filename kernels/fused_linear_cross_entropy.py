"""Fused linear + softmax cross-entropy over the visual-token vocabulary, on masked rows only.

    loss = reduce_k( logsumexp(z_k) - z_k[target_k] ),  z = hidden @ weight.T + bias
    num_correct = #{k : argmax(z_k) == target_k}        (first maximum, as torch.argmax)

Shapes: hidden (M, D), weight (V, D), bias (V,) or None, target (M,) int64. Returns
(loss: 0-d fp32, num_correct: 0-d int64, no gradient).

How: the rows are processed in balanced chunks of C rows: with C_max = `chunk_bytes` / (V * elem)
(64 MiB by default), C = ceil(M / ceil(M / C_max)) rounded up to a multiple of the GEMM tile (128),
so 9600 rows make 3 x 3200, not 4096/4096/1408. The (M, V) logits never exist at full size. Per chunk:
  1. z_c = hidden_c @ weight.T + bias           (cuBLAS GEMM, compute dtype = hidden's)
  2. a Triton row kernel, persistent programs of several rows each, fp32 statistics: max, sum-exp,
     first argmax, target logit; when gradients are needed it overwrites z_c IN PLACE with the
     UNSCALED logit gradient dz = softmax(z) - onehot(target) (values in [-1, 1]: no fp16 underflow)
     and adds dz's column sums to its own row of a (programs, V) fp32 partial d bias (no atomics).
     V <= 8192 (BLOCK_V >= V): one pass, the row is read once and written once. Larger V: two
     sweeps over (4, 2048) tiles (statistics, then gradient).
  3. d hidden_c = dz @ weight and d weight += dz.T @ hidden_c, both written straight into fp32
     buffers (torch's out_dtype GEMM on CUDA for bf16/fp16: dW accumulates in place, no per-chunk
     temporary; elsewhere an fp32 addmm_ or a half GEMM added in fp32).
The gradients are thus computed during the forward (the loss is a scalar, so the backward only
multiplies them by grad_output * (1/M for "mean"), in fp32, then casts); no logits are recomputed.
Arithmetic: 3 GEMMs of 2*M*V*D (the floor of any implementation) plus one read and one write of
each logits chunk. Extra memory at M=9600, D=768, V=8192 bf16: logits chunk 52.4 MB (dz in place)
+ fp32 d hidden 29.5 MB + fp32 d weight 25.2 MB + partial d bias 8.7 MB = 0.116 GB.

Targets out of [0, V) raise ValueError: at once on the CPU, through a deferred device flag on a
GPU (`beit_fast.kernels.check_deferred`, no host sync here); the kernel never reads out of
bounds for them. reduction: "mean" or "sum" ("none" would need the per-row grads in the
backward, which this design does not keep).
Cards measured: none yet (no GPU has run this version); correctness checked under
TRITON_INTERPRET=1 in fp32; sm_90 compile checked ahead of time (no spills).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import SM_COUNT, defer_check

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy_fwd",
]

CHUNK_BYTES = 64 * 2**20
GEMM_TILE_ROWS = 128
SINGLE_PASS_MAX_V = 8192  # one row in registers: 8192 fp32 over 8 warps = 32 per thread (+ the d bias partial)
# Persistent row programs: 2 per SM at the single-pass kernel's register use (one wave), and the row count of the
# partial d bias buffer (264 x V fp32).
ROW_PROGRAMS = 2 * SM_COUNT
LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jit code may only read constexpr globals


# -- kernels ---------------------------------------------------------------------------------------------------------
# Per row r of a logits chunk z (fp32 statistics), with e = exp(z - max):
#   loss[r] = max + log(sum e) - z[target],  correct[r] = (first argmax == target)
#   if WRITE_GRAD: z[v] <- e[v] / sum e - [v == target]       (in place, unscaled)
#   if HAS_DB:     db_part[program] += that gradient row       (each program owns its partial row)
@triton.jit
def _flce_rows_fwd_kernel(
    z_ptr, target_ptr, loss_ptr, correct_ptr, db_part_ptr,
    n_rows, V, stride_z_row,
    WRITE_GRAD: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    col_ok = cols < V
    db_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for i in range(0, tl.cdiv(n_rows - pid, nprog)):  # the grid never exceeds n_rows
        row = pid + i * nprog
        z_row = z_ptr + row.to(tl.int64) * stride_z_row
        target = tl.load(target_ptr + row).to(tl.int32)
        z = tl.load(z_row + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
        m = tl.max(z, axis=0)
        arg = tl.argmax(z, axis=0)  # ties: the lowest index, as torch.argmax
        e = tl.exp2((z - m) * LOG2E)  # padding: exp2(-inf) = 0
        s = tl.sum(e, axis=0)
        is_t = cols == target
        z_t = tl.sum(tl.where(is_t, z, 0.0), axis=0)
        tl.store(loss_ptr + row, m + tl.log(s) - z_t)
        tl.store(correct_ptr + row, (arg == target).to(tl.int32))
        if WRITE_GRAD:
            dz = e * (1.0 / s) - tl.where(is_t, 1.0, 0.0)
            tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=col_ok)
            if HAS_DB:
                db_acc += dz
    if HAS_DB:
        part = db_part_ptr + pid * V + cols
        tl.store(part, tl.load(part, mask=col_ok, other=0.0) + db_acc, mask=col_ok)


# The same for rows that do not fit one block: (BLOCK_R, BLOCK_V) tiles, an online max / sum-exp /
# argmax sweep, then a gradient sweep that re-reads the tile.
@triton.jit
def _flce_rows_blocked_fwd_kernel(
    z_ptr, target_ptr, loss_ptr, correct_ptr, db_part_ptr,
    n_rows, V, stride_z_row,
    WRITE_GRAD: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_V)
    for r0 in range(pid * BLOCK_R, n_rows, nprog * BLOCK_R):
        rows = r0 + r_off
        row_ok = rows < n_rows
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z_row
        target = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_R,), dtype=tl.float32)
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_R,), dtype=tl.int32)
        z_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + c_off
            ok = row_ok[:, None] & (cols < V)[None, :]
            # Padding rows read 0 (finite statistics); their results are never stored.
            z = tl.load(z_rows + cols[None, :], mask=ok, other=float("-inf"))
            z = tl.where(row_ok[:, None], z.to(tl.float32), 0.0)
            block_max = tl.max(z, axis=1)
            block_arg = tl.argmax(z, axis=1).to(tl.int32)
            best_idx = tl.where(block_max > best, v0 + block_arg, best_idx)  # strict: ties keep the first
            best = tl.maximum(best, block_max)
            m_new = tl.maximum(m, block_max)
            s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new[:, None]) * LOG2E), axis=1)
            m = m_new
            z_t += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        lse = m + tl.log(s)
        tl.store(loss_ptr + rows, lse - z_t, mask=row_ok)
        tl.store(correct_ptr + rows, (best_idx == target).to(tl.int32), mask=row_ok)
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + c_off
                col_ok = cols < V
                ok = row_ok[:, None] & col_ok[None, :]
                z = tl.load(z_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                dz = tl.exp2((z - lse[:, None]) * LOG2E) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
                dz = tl.where(ok, dz, 0.0)
                tl.store(z_rows + cols[None, :], dz.to(z_ptr.dtype.element_ty), mask=ok)
                if HAS_DB:
                    part = db_part_ptr + pid * V + cols
                    tl.store(part, tl.load(part, mask=col_ok, other=0.0) + tl.sum(dz, axis=0), mask=col_ok)


# -- launcher --------------------------------------------------------------------------------------------------------
# torch's fp32-output half GEMMs (CUDA, torch >= 2.9), per op (some versions take an fp32 addmm input, some do
# not); an op is dropped for the process when it fails on real tensors.
_OUT_DTYPE_GEMM: Dict[str, bool] = {"mm": True, "addmm": True}


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _mm_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (fp32) = a @ b, or += when `accumulate`, accumulated in fp32 even for bf16/fp16 a, b; in place."""
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    op = "addmm" if accumulate else "mm"
    if a.is_cuda and _OUT_DTYPE_GEMM[op]:
        try:  # the GEMM writes fp32 itself: no rounding of the product, no temporary
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError):
            if not _is_fake(a):
                _OUT_DTYPE_GEMM[op] = False
    prod = torch.mm(a, b)  # older torch: one half-precision temporary per chunk
    if accumulate:
        out.add_(prod)
    else:
        out.copy_(prod)


def _chunk_rows(M: int, V: int, elem: int, chunk_bytes: int) -> int:
    """Rows per chunk: balanced (equal chunks, not full ones and a small tail), a multiple of the GEMM tile
    where that stays within the byte budget."""
    c_max = max(1, min(M, chunk_bytes // max(1, V * elem)))
    c = triton.cdiv(M, triton.cdiv(M, c_max))
    tiled = triton.cdiv(c, GEMM_TILE_ROWS) * GEMM_TILE_ROWS
    return min(M, tiled) if tiled <= c_max else c


def _row_config(V: int) -> Tuple[bool, int, int, int]:
    """-> (single_pass, BLOCK_R, BLOCK_V, num_warps) of the row kernel."""
    if V <= SINGLE_PASS_MAX_V:
        BLOCK_V = triton.next_power_of_2(V)
        return True, 1, BLOCK_V, 8 if BLOCK_V >= 4096 else 4
    return False, 4, 2048, 8


def fused_linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, scale: float,
    compute_grad: bool, chunk_bytes: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss (fp32 0-d, already scaled), num_correct (int64 0-d), and when `compute_grad` the UNSCALED
    gradients of sum_k loss_k (the caller multiplies by scale * grad_output): d hidden (M, D), d weight (V, D),
    d bias (V,), all fp32 (d bias empty without a bias); else empty tensors."""
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
    f32 = torch.float32
    dh, dw, db = (hidden.new_empty((0,), dtype=f32) for _ in range(3))  # distinct: custom-op outputs may not alias
    C = _chunk_rows(M, V, hidden.element_size(), CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    single, BLOCK_R, BLOCK_V, num_warps = _row_config(V)
    nprog_max = max(1, min(ROW_PROGRAMS, triton.cdiv(C, BLOCK_R)))
    has_db = compute_grad and b is not None
    db_part = dw  # placeholder pointer when there is no bias gradient (never dereferenced)
    if compute_grad:
        dh = torch.empty((M, D), device=dev, dtype=f32)
        dw = torch.zeros((V, D), device=dev, dtype=f32)
        if has_db:
            db_part = torch.zeros((nprog_max, V), device=dev, dtype=f32)
    z = torch.empty((C, V), device=dev, dtype=dtype) if M else None
    for r0 in range(0, M, C):
        r1 = min(M, r0 + C)
        h_c = hidden[r0:r1]
        z_c = z[: r1 - r0]
        if b is not None:
            torch.addmm(b, h_c, w.t(), out=z_c)
        else:
            torch.mm(h_c, w.t(), out=z_c)
        nprog = max(1, min(nprog_max, triton.cdiv(r1 - r0, BLOCK_R)))
        args = (z_c, target[r0:r1], loss_rows[r0:r1], correct[r0:r1], db_part, r1 - r0, V, z_c.stride(0))
        if single:
            _flce_rows_fwd_kernel[(nprog,)](
                *args, WRITE_GRAD=compute_grad, HAS_DB=has_db, BLOCK_V=BLOCK_V, num_warps=num_warps,
            )
        else:
            _flce_rows_blocked_fwd_kernel[(nprog,)](
                *args, WRITE_GRAD=compute_grad, HAS_DB=has_db, BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V,
                num_warps=num_warps,
            )
        if compute_grad:
            _mm_fp32(dh[r0:r1], z_c, w, accumulate=False)
            _mm_fp32(dw, z_c.t(), h_c, accumulate=True)
    if has_db:
        db = db_part.sum(0)
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
    e = hidden.new_empty((0,), dtype=f32)
    if not compute_grad:
        return loss, nc, e, e.clone(), e.clone()
    db = hidden.new_empty((V,), dtype=f32) if bias is not None else e.clone()
    return loss, nc, hidden.new_empty((M, D), dtype=f32), hidden.new_empty((V, D), dtype=f32), db


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
        ctx.scale = scale
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss, num_correct

    @staticmethod
    def backward(ctx, g_loss, g_correct):
        dh, dw, db = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # 1/M and the incoming gradient (a loss scale under fp16) meet the fp32 gradients here, once:
        # nothing small was ever rounded to half precision before this product.
        g = g_loss.to(torch.float32) * ctx.scale
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

