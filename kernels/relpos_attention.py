"""Flash attention with BEiT's relative position bias gathered inside the kernel.

    out = softmax(q k^T * scale + bias) v,   bias[h, i, j] = table[index[i, j], h]   (or a dense (H, N, N) bias)

Forward: one program per (query block, batch * head); online softmax over key blocks; the bias
tile is gathered from the (T, H) table through the (N, N) index (no (H, N, N) or (B, H, N, N)
tensor is built); writes out and the row logsumexp (fp32). Backward (FlashAttention-2 style):
delta = rowsum(dout * out); a key-block kernel accumulates dk, dv and adds the bias gradient
dS = P * (dP - delta) of its tiles into ONE fp32 (H, N, N) buffer with atomics (the reduction over
the batch happens inside the kernel: never a (B, H, N, N) tensor); a query-block kernel makes dq.
The table gradient is then the (H, N, N) buffer scattered through the index (T x H, tiny).

Shapes: q, k, v (B, H, N, Dh), any strides with a contiguous last dim (so views of the packed
qkv projection need no copy); N any size (197, 50, 577: blocks are masked); Dh <= 128 (80 is
padded to 128 inside the kernel). fp16 / bf16 / fp32; arithmetic and softmax statistics in fp32.
`relpos_attention_qkv` takes the packed (B, N, 3*D) projection and returns (B, N, D) directly,
with its gradient in one (B, N, 3*D) buffer: no split, no transpose copies.
Cards measured: none yet; correctness checked under TRITON_INTERPRET=1 in fp32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["relpos_attention", "relpos_attention_qkv", "relpos_attention_ref", "RelposAttentionFunction"]

BIAS_NONE, BIAS_TABLE, BIAS_DENSE = 0, 1, 2


# -- kernels ---------------------------------------------------------------------------------------------------------
@triton.jit
def _bias_tile(table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N, stride_table_t, stride_bias_h,
               BIAS_MODE: tl.constexpr):
    valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
    if BIAS_MODE == 1:
        idx = tl.load(index_ptr + offs_m[:, None] * N + offs_n[None, :], mask=valid, other=0)
        return tl.load(table_ptr + idx.to(tl.int64) * stride_table_t + h, mask=valid, other=0.0).to(tl.float32)
    else:
        return tl.load(bias_ptr + h * stride_bias_h + offs_m[:, None] * N + offs_n[None, :], mask=valid,
                       other=0.0).to(tl.float32)


@triton.jit
def _load_rows(ptr, b, h, offs_rows, offs_d, stride_b, stride_h, stride_n, N, HEAD_DIM: tl.constexpr):
    """A (rows, BLOCK_D) tile of one (batch, head) of a (B, H, N, Dh)-strided tensor, zero outside."""
    mask = (offs_rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(ptr + b * stride_b + h * stride_h + offs_rows[:, None] * stride_n + offs_d[None, :], mask=mask,
                   other=0.0)


@triton.jit
def _scores(q, k, table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N, scale, stride_table_t, stride_bias_h,
            BIAS_MODE: tl.constexpr):
    """S = Q K^T * scale + bias for one (query block, key block) tile, fp32."""
    s = tl.dot(q, tl.trans(k)) * scale
    if BIAS_MODE != 0:
        s += _bias_tile(table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N, stride_table_t, stride_bias_h,
                        BIAS_MODE)
    return s


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N, scale,
                       stride_table_t, stride_bias_h, BIAS_MODE: tl.constexpr):
    """Backward recompute of one (query block, key block) tile: P = exp(S - lse) and
    dS = P * (dO V^T - delta), S = Q K^T * scale + bias; zero outside the N x N square."""
    s = _scores(q, k, table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N, scale, stride_table_t, stride_bias_h,
                BIAS_MODE)
    valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return p, ds


@triton.jit
def _relpos_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, index_ptr, bias_ptr, o_ptr, lse_ptr,
    H, N, scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_table_t, stride_bias_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS_MODE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(q_ptr, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, N, HEAD_DIM)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, N, HEAD_DIM)
        v = _load_rows(v_ptr, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, N, HEAD_DIM)
        s = _scores(q, k, table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N, scale, stride_table_t,
                    stride_bias_h, BIAS_MODE)
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    m_ok = offs_m < N
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log(l_i), mask=m_ok)


# Backward for one key block (per batch * head), looping over query blocks:
#   P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P * (dP - delta),
#   dK += dS^T Q * scale, dBias[h] += dS (atomic: the batch reduces into one (H, N, N) fp32 buffer)
@triton.jit
def _relpos_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, table_ptr, index_ptr, bias_ptr,
    dk_ptr, dv_ptr, dbias_ptr,
    H, N, scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_table_t, stride_bias_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS_MODE: tl.constexpr, WANT_DBIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = _load_rows(k_ptr, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, N, HEAD_DIM)
    v = _load_rows(v_ptr, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, N, HEAD_DIM)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q = _load_rows(q_ptr, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, N, HEAD_DIM)
        do = _load_rows(do_ptr, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, N, HEAD_DIM)
        lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N,
                                   scale, stride_table_t, stride_bias_h, BIAS_MODE)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        if WANT_DBIAS:
            tl.atomic_add(dbias_ptr + h * N * N + offs_m[:, None] * N + offs_n[None, :], ds,
                          mask=m_ok[:, None] & (offs_n < N)[None, :])
    tl.store(dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


# Backward for one query block: dQ = sum over key blocks of dS K * scale.
@triton.jit
def _relpos_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, table_ptr, index_ptr, bias_ptr, dq_ptr,
    H, N, scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_table_t, stride_bias_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS_MODE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    qo_ok = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = _load_rows(q_ptr, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, N, HEAD_DIM)
    do = _load_rows(do_ptr, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, N, HEAD_DIM)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, N, HEAD_DIM)
        v = _load_rows(v_ptr, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, N, HEAD_DIM)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, table_ptr, index_ptr, bias_ptr, h, offs_m, offs_n, N,
                                   scale, stride_table_t, stride_bias_h, BIAS_MODE)
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=qo_ok)


# -- launchers -------------------------------------------------------------------------------------------------------
def _blocks(head_dim: int, device: torch.device) -> Tuple[int, int, int, int]:
    BLOCK_D = max(16, triton.next_power_of_2(head_dim))
    if device.type == "cuda":
        BLOCK_M, BLOCK_N = (128, 64) if BLOCK_D <= 64 else (64, 64)
        return BLOCK_D, BLOCK_M, BLOCK_N, 4 if BLOCK_D <= 64 else 8
    return BLOCK_D, 32, 32, 4  # the interpreter: small tiles


def _bias_args(table, index, dense, ref):
    if table is not None:
        return BIAS_TABLE, table, index.to(torch.int32).contiguous(), ref, table.stride(0), 0
    if dense is not None:
        dense = dense.contiguous()
        return BIAS_DENSE, ref, ref, dense, 0, dense.stride(0)
    return BIAS_NONE, ref, ref, ref, 0, 0


def _s(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def relpos_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: Optional[torch.Tensor], index: Optional[torch.Tensor],
    dense: Optional[torch.Tensor], scale: float, out: torch.Tensor,
) -> torch.Tensor:
    """Writes `out` (B, H, N, Dh view, any strides, contiguous last dim); returns lse (B*H, N) fp32."""
    B, H, N, Dh = q.shape
    BLOCK_D, BLOCK_M, BLOCK_N, warps = _blocks(Dh, q.device)
    mode, tab, idx, bias, s_tab, s_bias = _bias_args(table, index, dense, q)
    lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N, BLOCK_M), B * H)
    _relpos_attn_fwd_kernel[grid](
        q, k, v, tab, idx, bias, out, lse, H, N, scale, *_s(q), *_s(k), *_s(v), *_s(out), s_tab, s_bias,
        HEAD_DIM=Dh, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BIAS_MODE=mode, num_warps=warps,
    )
    return lse


def relpos_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    table: Optional[torch.Tensor], index: Optional[torch.Tensor], dense: Optional[torch.Tensor], scale: float,
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, want_dbias: bool,
) -> Optional[torch.Tensor]:
    """Writes dq, dk, dv (views like q, k, v); returns the bias gradient as fp32 (H, N, N) if wanted."""
    B, H, N, Dh = q.shape
    BLOCK_D, BLOCK_M, BLOCK_N, warps = _blocks(Dh, q.device)
    mode, tab, idx, bias, s_tab, s_bias = _bias_args(table, index, dense, q)
    delta = (do.float() * o.float()).sum(-1).reshape(B * H, N)
    dbias = torch.zeros((H, N, N), device=q.device, dtype=torch.float32) if want_dbias else lse
    _relpos_attn_bwd_dkdv_kernel[(triton.cdiv(N, BLOCK_N), B * H)](
        q, k, v, do, lse, delta, tab, idx, bias, dk, dv, dbias, H, N, scale,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv), s_tab, s_bias,
        HEAD_DIM=Dh, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BIAS_MODE=mode, WANT_DBIAS=want_dbias,
        num_warps=max(warps, 8) if q.is_cuda else warps,  # two fp32 accumulators + the dS tile
    )
    _relpos_attn_bwd_dq_kernel[(triton.cdiv(N, BLOCK_M), B * H)](
        q, k, v, do, lse, delta, tab, idx, bias, dq, H, N, scale,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq), s_tab, s_bias,
        HEAD_DIM=Dh, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BIAS_MODE=mode,
        num_warps=max(warps, 8) if q.is_cuda else warps,
    )
    return dbias if want_dbias else None


def _table_grad(dbias: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    H = dbias.shape[0]
    grad = torch.zeros((rows, H), device=dbias.device, dtype=torch.float32)
    return grad.index_add_(0, index.reshape(-1).long(), dbias.permute(1, 2, 0).reshape(-1, H))


# -- custom ops ------------------------------------------------------------------------------------------------------
def _split(qkv: torch.Tensor, H: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3*D) -> three (B, H, N, Dh) strided views (no copy)."""
    B, N, three_d = qkv.shape
    return qkv.view(B, N, 3, H, three_d // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("beit_fast::relpos_attention_fwd", mutates_args=())
def _fwd_op(
    qkv: torch.Tensor, num_heads: int, table: Optional[torch.Tensor], index: Optional[torch.Tensor],
    dense: Optional[torch.Tensor], scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    B, N, three_d = qkv.shape
    D = three_d // 3
    q, k, v = _split(qkv.contiguous(), num_heads)
    out = torch.empty((B, N, D), device=qkv.device, dtype=qkv.dtype)
    o = out.view(B, N, num_heads, D // num_heads).transpose(1, 2)
    lse = relpos_attention_fwd(q, k, v, table, index, dense, scale, o)
    return out, lse


@_fwd_op.register_fake
def _(qkv, num_heads, table, index, dense, scale):
    B, N, three_d = qkv.shape
    return qkv.new_empty((B, N, three_d // 3)), qkv.new_empty((B * num_heads, N), dtype=torch.float32)


@torch.library.custom_op("beit_fast::relpos_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
    table: Optional[torch.Tensor], index: Optional[torch.Tensor], dense: Optional[torch.Tensor], scale: float,
    want_dbias: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    B, N, three_d = qkv.shape
    D, H = three_d // 3, num_heads
    qkv = qkv.contiguous()
    q, k, v = _split(qkv, H)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = _split(dqkv, H)
    as_bhnd = lambda t: t.contiguous().view(B, N, H, D // H).transpose(1, 2)  # noqa: E731
    dbias = relpos_attention_bwd(as_bhnd(dout), q, k, v, as_bhnd(out), lse, table, index, dense, scale,
                                 dq, dk, dv, want_dbias)
    return dqkv, dbias if dbias is not None else qkv.new_empty((0,), dtype=torch.float32)


@_bwd_op.register_fake
def _(dout, qkv, out, lse, num_heads, table, index, dense, scale, want_dbias):
    N = qkv.shape[1]
    shape = (num_heads, N, N) if want_dbias else (0,)
    return torch.empty_like(qkv), qkv.new_empty(shape, dtype=torch.float32)


# -- autograd --------------------------------------------------------------------------------------------------------
class RelposAttentionFunction(torch.autograd.Function):
    """On the packed projection: qkv (B, N, 3*D) -> out (B, N, D); d qkv comes back as one buffer."""

    @staticmethod
    def forward(ctx, qkv, num_heads, table, index, dense, scale):
        out, lse = torch.ops.beit_fast.relpos_attention_fwd(qkv, num_heads, table, index, dense, scale)
        ctx.save_for_backward(qkv, out, lse, table, index, dense)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, table, index, dense = ctx.saved_tensors
        want_table = table is not None and ctx.needs_input_grad[2]
        want_dense = dense is not None and ctx.needs_input_grad[4]
        dqkv, dbias = torch.ops.beit_fast.relpos_attention_bwd(
            dout, qkv, out, lse, ctx.num_heads, table, index, dense, ctx.scale, want_table or want_dense
        )
        dtable = _table_grad(dbias, index, table.shape[0]).to(table.dtype) if want_table else None
        ddense = dbias.to(dense.dtype) if want_dense else None
        return dqkv, None, dtable, None, ddense, None


# -- public ----------------------------------------------------------------------------------------------------------
def _check(q, k, v, bias_table, bias_index, bias):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (B, H, N, Dh) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, N, Dh = q.shape
    if Dh > 128:
        raise ValueError(f"head_dim {Dh} > 128 is not supported by this kernel")
    if bias_table is not None and bias is not None:
        raise ValueError("give a bias table (+ index) or a dense bias, not both")
    if bias_table is not None:
        if bias_index is None or tuple(bias_index.shape) != (N, N):
            raise ValueError(f"bias_index must be ({N}, {N}), got "
                             f"{None if bias_index is None else tuple(bias_index.shape)}")
        if bias_table.dim() != 2 or bias_table.shape[1] != H:
            raise ValueError(f"bias_table must be (T, {H}), got {tuple(bias_table.shape)}")
    if bias is not None and tuple(bias.shape) not in ((H, N, N), (1, H, N, N)):
        raise ValueError(f"dense bias must be ({H}, {N}, {N}), got {tuple(bias.shape)}")


def relpos_attention_qkv(
    qkv: torch.Tensor, num_heads: int, bias_table: Optional[torch.Tensor] = None,
    bias_index: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention on the packed qkv projection (B, N, 3*D) -> (B, N, D) (heads already merged)."""
    B, N, three_d = qkv.shape
    if three_d % (3 * num_heads):
        raise ValueError(f"qkv last dim {three_d} is not 3 * num_heads * head_dim for num_heads={num_heads}")
    Dh = three_d // (3 * num_heads)
    fake = qkv.new_empty((1, num_heads, N, Dh))
    _check(fake, fake, fake, bias_table, bias_index, bias)
    if torch.is_autocast_enabled(qkv.device.type):
        qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
    dense = bias.reshape(num_heads, N, N) if bias is not None else None
    scale = Dh**-0.5 if scale is None else float(scale)
    return RelposAttentionFunction.apply(qkv, num_heads, bias_table, bias_index, dense, scale)


def relpos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor] = None,
    bias_index: Optional[torch.Tensor] = None, scale: Optional[float] = None, bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q, k, v (B, H, N, Dh); bias from `bias_table` (T, H) through
    `bias_index` (N, N), or a dense `bias` (H, N, N). Returns (B, H, N, Dh)."""
    _check(q, k, v, bias_table, bias_index, bias)
    B, H, N, Dh = q.shape
    qkv = torch.stack((q, k, v), dim=0).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * Dh)
    out = relpos_attention_qkv(qkv, H, bias_table, bias_index, bias, scale)
    return out.view(B, N, H, Dh).transpose(1, 2)


def relpos_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor] = None,
    bias_index: Optional[torch.Tensor] = None, scale: Optional[float] = None, bias: Optional[torch.Tensor] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain torch: gather the table, matmul, softmax, matmul (`upcast`: in fp32)."""
    B, H, N, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias_table is not None:
        attn = attn + bias_table[bias_index.reshape(-1)].view(N, N, H).permute(2, 0, 1).to(attn.dtype)
    if bias is not None:
        attn = attn + bias.reshape(H, N, N).to(attn.dtype)
    return attn.softmax(-1) @ v
