"""Flash attention (FlashAttention-2 style) with BEiT's relative position bias and its gradient, deterministic.

    out = softmax(q k^T * scale + bias) v,   bias[h, i, j] = table[index[i, j], h]   (or a dense (H, N, N) bias)

The bias reaches the kernels as ONE dense, padded (H, P, P) tensor (P = N rounded up to a multiple of 128),
built once per forward by `relpos_bias_padded` (a gather of the (T, H) table, so the table gradient is one
deterministic scatter through autograd of that gather): in pretraining every layer shares it, with per-layer
tables each layer builds its own. Key columns >= N hold -inf, query rows >= N hold 0: the padding masks the key
tail, so every bias tile is read with vectorised, unmasked loads and the kernels need no column mask. The fp32
padded bias is cast once per call to the compute dtype (the table gradient then accumulates across layers in fp32).

Forward: one program per (query block, batch * head); online softmax over key blocks in base 2 (log2(e) folded
into the scale); writes out and the row logsumexp (fp32, base 2).
Backward, no atomics anywhere (two identical calls give bitwise-equal gradients):
- `_relpos_attn_bwd_delta_kernel`: delta = rowsum(dO * O) in fp32.
- `_relpos_attn_bwd_dkdv_kernel`: one program per (key block, head, batch group); for each batch item of its group it
  loops over query blocks computing S^T = K Q^T directly: P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T,
  dS^T = P^T * (dP^T - delta), dK += dS^T Q * scale; the bias gradient dS^T is summed over the group's batch items
  into an fp32 partial that only this program touches (read-modify-write, fixed order), then the partials of the
  groups are summed by one torch reduction.
- `_relpos_attn_bwd_dq_kernel`: one program per (query block, batch * head) over key blocks: dQ = sum dS K * scale.
Tiles: the loop over the other side's blocks runs full blocks unmasked, then one tail block of the smallest power of
two >= 16 covering the rest; the programs likewise (a second launch of 16-row programs for the rest): N=197 with
64-wide blocks computes 208 x 208 scores, not 256 x 256. Fwd / dq grids are one flat axis (no 65535 limit on B*H).
A dense bias may hold -inf (a mask); a row that is -inf everywhere gives NaN, as softmax does.

Shapes: q, k, v (B, H, N, Dh), any strides with a contiguous last dim (views of the packed qkv projection need no
copy); Dh <= 128 (non-powers of two such as 80 are padded inside the kernel). fp16 / bf16 compute with fp32
statistics; fp32 inputs use IEEE fp32 dots (`input_precision="ieee"`, not TF32).
`relpos_attention_qkv` takes the packed (B, N, 3*D) projection and returns (B, N, D) directly, with its gradient in
one (B, N, 3*D) buffer.
Cards measured: none yet (checked under TRITON_INTERPRET=1 in fp32 and by the static sm_90 report on Triton 3.6
and 3.8: no spills, no atomics, <= 88 KB shared memory in every shipped bf16 config).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import SM_COUNT

__all__ = [
    "relpos_attention",
    "relpos_attention_qkv",
    "relpos_attention_ref",
    "relpos_bias_padded",
    "pad_bias",
    "padded_len",
    "RelposAttentionFunction",
    "RelposAttentionQKVFunction",
]

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # jit functions read module globals only as constexprs
PAD = 128  # the bias is padded to a multiple of the largest block, so no tile ever reads past it
_TARGET_PROGRAMS = 2 * SM_COUNT  # how many dk/dv programs the batch grouping aims for


# -- kernels ---------------------------------------------------------------------------------------------------------
@triton.jit
def _rows_tile(ptr, rows, offs_d, stride_n, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """A (rows, BLOCK_D) tile of one (batch, head); rows >= N (MASKED) and columns >= HEAD_DIM read as zero."""
    ptrs = ptr + rows[:, None] * stride_n + offs_d[None, :]
    if MASKED:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=(rows < N)[:, None], other=0.0)
        return tl.load(ptrs, mask=(rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _cols_tile(ptr, rows, offs_d, stride_n, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """The same tile read transposed, (BLOCK_D, rows): the operand layout a dot wants, without a register transpose."""
    ptrs = ptr + offs_d[:, None] + rows[None, :] * stride_n
    if MASKED:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=(rows < N)[None, :], other=0.0)
        return tl.load(ptrs, mask=(rows < N)[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)


@triton.jit
def _store_rows(ptr, val, rows, offs_d, stride_n, N, HEAD_DIM: tl.constexpr):
    tl.store(ptr + rows[:, None] * stride_n + offs_d[None, :], val.to(ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _scores(q, k_t, bias_base, offs_m, offs_n, N, qk_scale, stride_bias_m, HAS_BIAS: tl.constexpr,
            MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """S = (Q K^T * scale + bias) * log2(e) for one (query block, key block) tile, fp32; key columns >= N are -inf
    (the bias padding holds them; without a bias, a `where` in the tail block)."""
    s = tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:
        s += tl.load(bias_base + offs_m[:, None] * stride_bias_m + offs_n[None, :]).to(tl.float32) * _LOG2E
    elif MASKED:
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, offs_d, start, stop, N, qk_scale,
               stride_kn, stride_vn, stride_bias_m,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_t = _cols_tile(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM, BLOCK_D, MASKED)
        s = _scores(q, k_t, bias_base, offs_m, offs_n, N, qk_scale, stride_bias_m, HAS_BIAS, MASKED, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with every key so far at -inf (a mask in a dense bias): subtract 0, not -inf (no exp2(-inf + inf))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _rows_tile(v_base, offs_n, offs_d, stride_vn, N, HEAD_DIM, BLOCK_D, MASKED)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _relpos_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, lse_ptr,
    H, N, N_FULL, ROW0, ROW_PROGRAMS, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_bias_h, stride_bias_m,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one flat grid axis (a second one stops at 65535 = B*H); the row blocks of one (batch, head) run adjacent, so
    # they share its K and V in L2
    pid_m = tl.program_id(0) % ROW_PROGRAMS
    pid_bh = tl.program_id(0) // ROW_PROGRAMS
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _rows_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, N, HEAD_DIM, BLOCK_D, True)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + h * stride_bias_h
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, offs_d, 0, N_FULL, N, qk_scale,
                               stride_kn, stride_vn, stride_bias_m, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_BIAS, False,
                               DOT_PREC)
    if TAIL_N > 0:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, offs_d, N_FULL,
                                   N_FULL + TAIL_N, N, qk_scale, stride_kn, stride_vn, stride_bias_m, HEAD_DIM,
                                   BLOCK_D, TAIL_N, HAS_BIAS, True, DOT_PREC)
    acc = acc / l_i[:, None]
    _store_rows(o_ptr + b * stride_ob + h * stride_oh, acc, offs_m, offs_d, stride_on, N, HEAD_DIM)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)


@triton.jit
def _relpos_attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, H, N, ROW_PROGRAMS,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b*h, i] = sum_d dO[i, d] * O[i, d] in fp32 (the D term of the softmax backward)."""
    # one flat grid axis (a second one stops at 65535 = B*H); the row blocks of one (batch, head) run adjacent, so
    # they share its K and V in L2
    pid_m = tl.program_id(0) % ROW_PROGRAMS
    pid_bh = tl.program_id(0) // ROW_PROGRAMS
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _rows_tile(o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_on, N, HEAD_DIM, BLOCK_D, True)
    do = _rows_tile(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, N, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


# Backward for one key block of one head, over the batch items of one group and all query blocks (scores transposed,
# S^T = K Q^T, so P^T and dS^T come out in the layout the dV and dK dots want):
#   P^T = exp2(S^T * log2e - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q * scale,
#   dbias_partial[group, h, n, m] = sum over the group's batch items of dS^T (fp32, this program's rows only).
@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, dbias_base, offs_n, offs_d,
                start, stop, N, qk_scale, stride_qn, stride_don, stride_bias_m, stride_dbias_n, first,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                WANT_DBIAS: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_t = _cols_tile(q_base, offs_m, offs_d, stride_qn, N, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:  # lse = +inf on query rows >= N makes their P^T column exactly 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < N, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < N, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, q_t, input_precision=DOT_PREC) * qk_scale
        if HAS_BIAS:
            s_t += tl.load(bias_base + offs_m[None, :] * stride_bias_m + offs_n[:, None]).to(tl.float32) * _LOG2E
        p_t = tl.math.exp2(s_t - lse[None, :])
        do = _rows_tile(do_base, offs_m, offs_d, stride_don, N, HEAD_DIM, BLOCK_D, MASKED)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PREC)
        if WANT_DBIAS:
            ptrs = dbias_base + offs_n[:, None] * stride_dbias_n + offs_m[None, :]
            if first:
                tl.store(ptrs, ds_t)
            else:
                tl.store(ptrs, tl.load(ptrs) + ds_t)
    return dk, dv


@triton.jit
def _relpos_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, dk_ptr, dv_ptr, dbias_ptr,
    B, H, N, N_FULL, ROW0, qk_scale, scale, batch_per_group,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_bias_h, stride_bias_m, stride_dbias_g, stride_dbias_h, stride_dbias_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_M: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_DBIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    offs_n = ROW0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    bias_base = bias_ptr + h * stride_bias_h
    dbias_base = dbias_ptr + g.to(tl.int64) * stride_dbias_g + h * stride_dbias_h
    b_start = g.to(tl.int64) * batch_per_group
    for i in range(0, tl.minimum(batch_per_group, B - b_start)):
        b = b_start + i
        bh = b * H + h
        k = _rows_tile(k_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, N, HEAD_DIM, BLOCK_D, True)
        v = _rows_tile(v_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, N, HEAD_DIM, BLOCK_D, True)
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        first = i == 0
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr + bh * N, delta_ptr + bh * N, bias_base,
                             dbias_base, offs_n, offs_d, 0, N_FULL, N, qk_scale, stride_qn, stride_don,
                             stride_bias_m, stride_dbias_n, first, HEAD_DIM, BLOCK_D, BLOCK_M, HAS_BIAS, WANT_DBIAS,
                             False, DOT_PREC)
        if TAIL_M > 0:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr + bh * N, delta_ptr + bh * N, bias_base,
                                 dbias_base, offs_n, offs_d, N_FULL, N_FULL + TAIL_M, N, qk_scale, stride_qn,
                                 stride_don, stride_bias_m, stride_dbias_n, first, HEAD_DIM, BLOCK_D, TAIL_M,
                                 HAS_BIAS, WANT_DBIAS, True, DOT_PREC)
        _store_rows(dk_ptr + b * stride_dkb + h * stride_dkh, dk * scale, offs_n, offs_d, stride_dkn, N, HEAD_DIM)
        _store_rows(dv_ptr + b * stride_dvb + h * stride_dvh, dv, offs_n, offs_d, stride_dvn, N, HEAD_DIM)


# Backward for one query block of one (batch, head), over key blocks: dQ = sum dS K * scale (no atomics: the program
# owns its rows of dQ).
@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, bias_base, offs_m, offs_d, start, stop, N, qk_scale,
              stride_kn, stride_vn, stride_bias_m,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
              MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_t = _cols_tile(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM, BLOCK_D, MASKED)
        v_t = _cols_tile(v_base, offs_n, offs_d, stride_vn, N, HEAD_DIM, BLOCK_D, MASKED)
        s = _scores(q, k_t, bias_base, offs_m, offs_n, N, qk_scale, stride_bias_m, HAS_BIAS, MASKED, DOT_PREC)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PREC)
    return dq


@triton.jit
def _relpos_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, dq_ptr,
    H, N, N_FULL, ROW0, ROW_PROGRAMS, qk_scale, scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_bias_h, stride_bias_m,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one flat grid axis (a second one stops at 65535 = B*H); the row blocks of one (batch, head) run adjacent, so
    # they share its K and V in L2
    pid_m = tl.program_id(0) % ROW_PROGRAMS
    pid_bh = tl.program_id(0) // ROW_PROGRAMS
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    q = _rows_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, N, HEAD_DIM, BLOCK_D, True)
    do = _rows_tile(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, N, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + h * stride_bias_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, bias_base, offs_m, offs_d, 0, N_FULL, N, qk_scale,
                   stride_kn, stride_vn, stride_bias_m, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_BIAS, False, DOT_PREC)
    if TAIL_N > 0:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, bias_base, offs_m, offs_d, N_FULL, N_FULL + TAIL_N, N,
                       qk_scale, stride_kn, stride_vn, stride_bias_m, HEAD_DIM, BLOCK_D, TAIL_N, HAS_BIAS, True,
                       DOT_PREC)
    _store_rows(dq_ptr + b * stride_dqb + h * stride_dqh, dq * scale, offs_m, offs_d, stride_dqn, N, HEAD_DIM)


# -- launchers -------------------------------------------------------------------------------------------------------
def padded_len(n: int) -> int:
    """The padded side P of the dense bias for N tokens (a multiple of the largest block)."""
    return triton.cdiv(n, PAD) * PAD


def _tail(n: int, block: int) -> Tuple[int, int]:
    """(end of the full blocks, width of the one tail block: a power of two >= 16 covering the rest, 0 if none)."""
    full = n // block * block
    rest = n - full
    return full, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def _program_blocks(n: int, block: int) -> List[Tuple[int, int, int]]:
    """The launches that cover n rows with programs of `block` rows: (first row, programs, rows per program). The rest
    after the full blocks gets its own launch of the smallest power-of-two block >= 16 that covers it (N=197 with 64:
    3 x 64 + one 16-row program, 208 rows computed instead of 256). Blocks under 64 rows waste at most 16 rows as they
    are: one launch (their 16-row tails spill on Triton 3.6 at a few configs)."""
    full, tail = _tail(n, block)
    if tail == 0:
        return [(0, full // block, block)]
    if tail >= block or block < 64:
        return [(0, full // block + 1, block)]
    return ([(0, full // block, block)] if full else []) + [(full, 1, tail)]


def _warps(warps: int, rows: int) -> int:
    """The forward's 16-row tail program gets at most 4 warps (8 spill there at head_dim 128; the backward kernels'
    tails do not, and 4 would: bench/sm90_report.py on Triton 3.6 and 3.8)."""
    return min(warps, 4) if rows <= 16 else warps


def _configs(head_dim: int, on_gpu: bool, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, warps, stages) per kernel, chosen with the static sm_90 report (bench/sm90_report.py): no
    spills, 8 warps where 4 spill. IEEE fp32 has no tensor-core path, so it gets small tiles. The interpreter: tiles
    that make the CPU tests cross full blocks, loop tails and program tails (64-row programs, 32-wide loops)."""
    bd = max(16, triton.next_power_of_2(head_dim))
    if not on_gpu:
        return dict(BLOCK_D=bd, fwd=(64, 32, 4, 1), dkdv=(32, 64, 4, 1), dq=(64, 32, 4, 1))
    if dtype == torch.float32:  # FMA dots: small tiles or the accumulators spill
        if bd <= 64:
            return dict(BLOCK_D=bd, fwd=(32, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(32, 16, 4, 1))
        # dk/dv at head_dim 128: 8 warps spill without the bias terms, 4 spill with them
        return dict(BLOCK_D=bd, fwd=(16, 16, 4, 1), dkdv=(16, 16, 8, 1), dkdv_no_bias=(16, 16, 4, 1),
                    dq=(16, 16, 8, 1))
    if bd <= 64:
        return dict(BLOCK_D=bd, fwd=(64, 64, 4, 3), dkdv=(32, 64, 8, 2), dq=(64, 64, 8, 2))
    return dict(BLOCK_D=bd, fwd=(64, 64, 8, 2), dkdv=(64, 32, 8, 2), dq=(64, 64, 8, 1))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" only matters for fp32 operands


def _s(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _bias_launch_args(bias: Optional[torch.Tensor], like: torch.Tensor):
    if bias is None:
        return like, 0, 0
    return bias, bias.stride(0), bias.stride(1)


def relpos_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float, out: torch.Tensor,
) -> torch.Tensor:
    """Writes `out` ((B, H, N, Dh) view, any strides, contiguous last dim) from q, k, v and the padded bias in the
    compute dtype (or None); returns the row logsumexp, base 2, as (B*H, N) fp32."""
    B, H, N, Dh = q.shape
    cfg = _configs(Dh, q.is_cuda, q.dtype)
    block_m, block_n, warps, stages = cfg["fwd"]
    n_full, tail = _tail(N, block_n)
    bias_t, s_bh, s_bm = _bias_launch_args(bias, q)
    lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
    for row0, programs, rows in _program_blocks(N, block_m):
        _relpos_attn_fwd_kernel[(B * H * programs,)](
            q, k, v, bias_t, out, lse, H, N, n_full, row0, programs, scale * LOG2E, *_s(q), *_s(k), *_s(v),
            *_s(out), s_bh, s_bm, HEAD_DIM=Dh, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=rows, BLOCK_N=block_n, TAIL_N=tail,
            HAS_BIAS=bias is not None, DOT_PREC=_dot_precision(q.dtype), num_warps=_warps(warps, rows),
            num_stages=stages,
        )
    return lse


def _batch_groups(B: int, key_blocks: int, H: int, want_dbias: bool, on_gpu: bool) -> Tuple[int, int]:
    """(batch items per group, groups) for the dk/dv grid. Each group has its own fp32 partial of the bias gradient,
    so fewer groups = less memory; enough groups to fill the GPU. Without a bias gradient: one item per group."""
    if not want_dbias:  # one item per program, as long as the grid's axis 2 (at most 65535) allows
        groups = min(B, 65535)
    elif on_gpu:
        groups = min(B, max(1, triton.cdiv(_TARGET_PROGRAMS, key_blocks * H)))
    else:
        groups = min(B, 2)
    per = triton.cdiv(B, groups)
    return per, triton.cdiv(B, per)


def relpos_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    bias: Optional[torch.Tensor], scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    want_dbias: bool,
) -> Optional[torch.Tensor]:
    """Writes dq, dk, dv (views like q, k, v); returns the bias gradient as fp32 (H, P, P) (zero outside N x N) when
    `want_dbias` (needs the padded `bias`)."""
    B, H, N, Dh = q.shape
    on_gpu = q.is_cuda
    cfg = _configs(Dh, on_gpu, q.dtype)
    bd, prec = cfg["BLOCK_D"], _dot_precision(q.dtype)
    bias_t, s_bh, s_bm = _bias_launch_args(bias, q)
    has_bias = bias is not None
    want_dbias = want_dbias and has_bias

    delta = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
    row_blocks = triton.cdiv(N, 64)
    _relpos_attn_bwd_delta_kernel[(B * H * row_blocks,)](
        o, do, delta, H, N, row_blocks, *_s(o), *_s(do), HEAD_DIM=Dh, BLOCK_D=bd, BLOCK_M=64, num_warps=4,
    )

    block_m, block_n, warps, stages = cfg["dkdv"] if has_bias else cfg.get("dkdv_no_bias", cfg["dkdv"])
    key_blocks = triton.cdiv(N, block_n)
    per, groups = _batch_groups(B, key_blocks, H, want_dbias, on_gpu)
    m_full, tail_m = _tail(N, block_m)
    P = padded_len(N)
    partial = torch.empty((groups, H, P, P) if want_dbias else (1,), device=q.device, dtype=torch.float32)
    s_pg, s_ph, s_pn = (partial.stride(0), partial.stride(1), partial.stride(2)) if want_dbias else (0, 0, 0)
    for key0, programs, keys in _program_blocks(N, block_n):
        _relpos_attn_bwd_dkdv_kernel[(programs, H, groups)](
            q, k, v, do, lse, delta, bias_t, dk, dv, partial, B, H, N, m_full, key0, scale * LOG2E, scale, per,
            *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv), s_bh, s_bm, s_pg, s_ph, s_pn,
            HEAD_DIM=Dh, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=keys, TAIL_M=tail_m, HAS_BIAS=has_bias,
            WANT_DBIAS=want_dbias, DOT_PREC=prec, num_warps=warps, num_stages=stages,
        )

    block_m, block_n, warps, stages = cfg["dq"]
    n_full, tail_n = _tail(N, block_n)
    for row0, programs, rows in _program_blocks(N, block_m):
        _relpos_attn_bwd_dq_kernel[(B * H * programs,)](
            q, k, v, do, lse, delta, bias_t, dq, H, N, n_full, row0, programs, scale * LOG2E, scale,
            *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq), s_bh, s_bm,
            HEAD_DIM=Dh, BLOCK_D=bd, BLOCK_M=rows, BLOCK_N=block_n, TAIL_N=tail_n, HAS_BIAS=has_bias,
            DOT_PREC=prec, num_warps=warps, num_stages=stages,
        )
    if not want_dbias:
        return None
    # the partial is stored transposed ([n, m]: the dk/dv program's rows) and written only where its loops reach:
    # its N x N corner goes into a zero (H, P, P) gradient, contiguous as the fake impl says
    dbias = partial.new_zeros((H, P, P))
    dbias[:, :N, :N] = (partial[:, :, :N, :N].sum(0) if groups > 1 else partial[0, :, :N, :N]).transpose(1, 2)
    return dbias


# -- custom ops (torch.compile sees two opaque ops per direction, never the Triton launches) -------------------------
def _as_bhnd(t: torch.Tensor) -> torch.Tensor:
    """(B, N, H, Dh) -> the (B, H, N, Dh) view the kernels take."""
    return t.transpose(1, 2)


def _split(qkv: torch.Tensor, H: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3*D) -> three (B, H, N, Dh) strided views (no copy)."""
    B, N, three_d = qkv.shape
    return qkv.view(B, N, 3, H, three_d // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("beit_fast::relpos_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    B, H, N, Dh = q.shape
    out = torch.empty((B, N, H, Dh), device=q.device, dtype=q.dtype)
    lse = relpos_attention_fwd(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), bias,
                               scale, _as_bhnd(out))
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, bias, scale):
    B, H, N, Dh = q.shape
    return q.new_empty((B, N, H, Dh)), q.new_empty((B * H, N), dtype=torch.float32)


def _bwd_common(dout, q, k, v, out, lse, bias, scale, want_dbias, dq, dk, dv) -> torch.Tensor:
    dbias = relpos_attention_bwd(_as_bhnd(_last_dim_contiguous(dout)), q, k, v, _as_bhnd(out), lse, bias, scale,
                                 dq, dk, dv, want_dbias)
    return dbias if dbias is not None else q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("beit_fast::relpos_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    bias: Optional[torch.Tensor], scale: float, want_dbias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dbias = _bwd_common(dout, q, k, v, out, lse, bias, scale, want_dbias, dq, dk, dv)
    return dq, dk, dv, dbias


def _dbias_shape(q_shape, want_dbias):
    _, H, N, _ = q_shape
    return (H, padded_len(N), padded_len(N)) if want_dbias else (0,)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, bias, scale, want_dbias):
    shape = _dbias_shape(q.shape, want_dbias and bias is not None)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), q.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("beit_fast::relpos_attention_qkv_bwd", mutates_args=())
def _bwd_qkv_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
    bias: Optional[torch.Tensor], scale: float, want_dbias: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    qkv = _last_dim_contiguous(qkv)
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    dbias = _bwd_common(dout, *_split(qkv, num_heads), out, lse, bias, scale, want_dbias, *_split(dqkv, num_heads))
    return dqkv, dbias


@_bwd_qkv_op.register_fake
def _(dout, qkv, out, lse, num_heads, bias, scale, want_dbias):
    B, N, three_d = qkv.shape
    q_shape = (B, num_heads, N, three_d // (3 * num_heads))
    return qkv.new_empty(qkv.shape), qkv.new_empty(_dbias_shape(q_shape, want_dbias and bias is not None),
                                                   dtype=torch.float32)


# -- autograd --------------------------------------------------------------------------------------------------------
def _compute_bias(bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The padded bias in the compute dtype, as the kernels read it (the fp32 original keeps the gradient)."""
    return None if bias is None else bias.to(dtype).contiguous()


class RelposAttentionFunction(torch.autograd.Function):
    """q, k, v (B, H, N, Dh) strided, padded bias (H, P, P) or None -> out (B, H, N, Dh) (a view of (B, N, H, Dh))."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        cbias = _compute_bias(bias, q.dtype)
        out, lse = torch.ops.beit_fast.relpos_attention_fwd(q, k, v, cbias, scale)
        ctx.save_for_backward(q, k, v, out, lse, cbias)
        ctx.scale, ctx.bias_dtype = scale, None if bias is None else bias.dtype
        return _as_bhnd(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cbias = ctx.saved_tensors
        want = cbias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = torch.ops.beit_fast.relpos_attention_bwd(
            dout.transpose(1, 2), q, k, v, out, lse, cbias, ctx.scale, want)
        return dq, dk, dv, dbias.to(ctx.bias_dtype) if want else None, None


class RelposAttentionQKVFunction(torch.autograd.Function):
    """On the packed projection: qkv (B, N, 3*D) -> out (B, N, D); d qkv comes back as one buffer."""

    @staticmethod
    def forward(ctx, qkv, num_heads, bias, scale):
        cbias = _compute_bias(bias, qkv.dtype)
        qkv = _last_dim_contiguous(qkv)
        out, lse = torch.ops.beit_fast.relpos_attention_fwd(*_split(qkv, num_heads), cbias, scale)
        ctx.save_for_backward(qkv, out, lse, cbias)
        ctx.num_heads, ctx.scale, ctx.bias_dtype = num_heads, scale, None if bias is None else bias.dtype
        B, N, three_d = qkv.shape
        return out.view(B, N, three_d // 3)

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, cbias = ctx.saved_tensors
        want = cbias is not None and ctx.needs_input_grad[2]
        dqkv, dbias = torch.ops.beit_fast.relpos_attention_qkv_bwd(
            dout.view(out.shape), qkv, out, lse, ctx.num_heads, cbias, ctx.scale, want)
        return dqkv, None, dbias.to(ctx.bias_dtype) if want else None, None


# -- public ----------------------------------------------------------------------------------------------------------
def relpos_bias_padded(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The dense, padded bias (H, P, P) from the (T, H) table and the (N, N) index, in the table's dtype: key columns
    >= N are -inf, query rows >= N are 0. Build it once per forward (shared by every layer that uses this table);
    its gradient reaches the table through autograd of the gather (one deterministic scatter)."""
    if index.dim() != 2 or index.shape[0] != index.shape[1]:
        raise ValueError(f"bias_index must be square (N, N), got {tuple(index.shape)}")
    if table.dim() != 2:
        raise ValueError(f"bias_table must be (T, H), got {tuple(table.shape)}")
    n = index.shape[0]
    dense = table[index.reshape(-1)].view(n, n, table.shape[1]).permute(2, 0, 1)
    return pad_bias(dense)


def pad_bias(bias: torch.Tensor) -> torch.Tensor:
    """Pad a dense (H, N, N) bias to the kernels' (H, P, P) layout (autograd flows back to `bias`)."""
    n = bias.shape[-1]
    p = padded_len(n)
    if p == n:  # N a multiple of 128: nothing to mask
        return bias.contiguous()
    return F.pad(F.pad(bias, (0, p - n), value=float("-inf")), (0, 0, 0, p - n))


def _check(q, k, v, bias_table, bias_index, bias, padded_bias=None):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (B, H, N, Dh) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, N, Dh = q.shape
    if Dh > 128:
        raise ValueError(f"head_dim {Dh} > 128 is not supported by this kernel")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16, bfloat16, float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    given = sum(x is not None for x in (bias_table, bias, padded_bias))
    if given > 1:
        raise ValueError("give a bias table (+ index), a dense bias or a padded bias, not both")
    if bias_table is not None:
        if bias_index is None or tuple(bias_index.shape) != (N, N):
            raise ValueError(f"bias_index must be ({N}, {N}), got "
                             f"{None if bias_index is None else tuple(bias_index.shape)}")
        if bias_table.dim() != 2 or bias_table.shape[1] != H:
            raise ValueError(f"bias_table must be (T, {H}), got {tuple(bias_table.shape)}")
    if bias is not None and tuple(bias.shape) not in ((H, N, N), (1, H, N, N)):
        raise ValueError(f"dense bias must be ({H}, {N}, {N}), got {tuple(bias.shape)}")
    P = padded_len(N)
    if padded_bias is not None and tuple(padded_bias.shape) != (H, P, P):
        raise ValueError(f"padded bias must be ({H}, {P}, {P}) (relpos_bias_padded / pad_bias), got "
                         f"{tuple(padded_bias.shape)}")


def _padded(H, N, bias_table, bias_index, bias, padded_bias):
    if padded_bias is not None:
        return padded_bias
    if bias_table is not None:
        return relpos_bias_padded(bias_table, bias_index)
    if bias is not None:
        return pad_bias(bias.reshape(H, N, N))
    return None


def relpos_attention_qkv(
    qkv: torch.Tensor, num_heads: int, bias_table: Optional[torch.Tensor] = None,
    bias_index: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    padded_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention on the packed qkv projection (B, N, 3*D) -> (B, N, D) (heads already merged). The bias: a table +
    index, a dense (H, N, N) `bias`, or `padded_bias` from `relpos_bias_padded` (build it once, share it by layers)."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, N, 3*D), got {tuple(qkv.shape)}")
    B, N, three_d = qkv.shape
    if three_d % (3 * num_heads):
        raise ValueError(f"qkv last dim {three_d} is not 3 * num_heads * head_dim for num_heads={num_heads}")
    Dh = three_d // (3 * num_heads)
    if torch.is_autocast_enabled(qkv.device.type):
        qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
    fake = qkv.new_empty((1, num_heads, N, Dh))
    _check(fake, fake, fake, bias_table, bias_index, bias, padded_bias)
    scale = Dh**-0.5 if scale is None else float(scale)
    padded = _padded(num_heads, N, bias_table, bias_index, bias, padded_bias)
    return RelposAttentionQKVFunction.apply(qkv, num_heads, padded, scale)


def relpos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor] = None,
    bias_index: Optional[torch.Tensor] = None, scale: Optional[float] = None, bias: Optional[torch.Tensor] = None,
    padded_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q, k, v (B, H, N, Dh), taken with their strides as given (no copy when the
    last dim is contiguous); bias from `bias_table` (T, H) through `bias_index` (N, N), a dense `bias` (H, N, N), or a
    `padded_bias` from `relpos_bias_padded`. Returns (B, H, N, Dh) (a transposed view of a (B, N, H, Dh) buffer)."""
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    _check(q, k, v, bias_table, bias_index, bias, padded_bias)
    B, H, N, Dh = q.shape
    scale = Dh**-0.5 if scale is None else float(scale)
    padded = _padded(H, N, bias_table, bias_index, bias, padded_bias)
    return RelposAttentionFunction.apply(q, k, v, padded, scale)


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

