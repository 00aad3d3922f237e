"""Masked-token embedding: prepend cls, replace masked patch rows by the mask token, add position.

    out[b, 0]     = cls_token + pos_embed[0]
    out[b, 1 + n] = (mask_token if bool_masked_pos[b, n] else x[b, n]) + pos_embed[1 + n]

One read of x (masked rows are not read at all) and one write of out, instead of the
reference's blend (`x * (1 - w) + mask_token * w`), cat and add passes.

Shapes: x (B, N, D); bool_masked_pos (B, N) bool; mask_token (D,); cls_token (D,);
pos_embed (N+1, D) or None. Output (B, N+1, D) in the promoted dtype of the inputs (as the
reference: under autocast a bf16 x with fp32 tokens gives fp32), arithmetic in fp32.
Backward: dx (zero on masked rows), d mask_token (sum over masked rows), d cls_token,
d pos_embed (sums over the batch), reduced in fp32 without atomics (deterministic).
Cards measured: none yet (no GPU in the session that wrote it); correctness checked under
TRITON_INTERPRET=1 in fp32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["masked_embed", "masked_embed_ref", "MaskedEmbedFunction", "masked_embed_fwd", "masked_embed_bwd"]


# -- kernels ---------------------------------------------------------------------------------------------------------
@triton.jit
def _masked_embed_fwd_kernel(
    x_ptr, mask_ptr, mask_token_ptr, cls_ptr, pos_ptr, out_ptr,
    total_rows, N, D,
    stride_x_b, stride_x_n, stride_mask_b, stride_pos_n, stride_out_b, stride_out_n,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < total_rows
    col_ok = cols < D
    b = (rows // (N + 1)).to(tl.int64)
    t = rows % (N + 1)
    is_patch = t > 0
    n = tl.where(is_patch, t - 1, 0).to(tl.int64)
    m = tl.load(mask_ptr + b * stride_mask_b + n, mask=row_ok & is_patch, other=0) != 0
    take_x = row_ok & is_patch & (m == 0)
    x = tl.load(
        x_ptr + b[:, None] * stride_x_b + n[:, None] * stride_x_n + cols[None, :],
        mask=take_x[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)
    tok = tl.load(mask_token_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    val = tl.where(m[:, None], tok[None, :], x)
    val = tl.where(is_patch[:, None], val, cls[None, :])
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        val += tl.load(pos_ptr + t[:, None].to(tl.int64) * stride_pos_n + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
    out_offs = b[:, None] * stride_out_b + t[:, None].to(tl.int64) * stride_out_n + cols[None, :]
    tl.store(out_ptr + out_offs, val.to(out_ptr.dtype.element_ty), mask=ok)


# Backward, for token position t (one program per (t, D-block), looping over the batch):
#   dpos[t]      = sum_b dout[b, t]                    (t = 0 is also d cls_token)
#   dx[b, t-1]   = dout[b, t] * (1 - mask[b, t-1])     (t > 0)
#   dtok_part[t] = sum_b dout[b, t] * mask[b, t-1]     (t > 0; summed over t by the launcher)
@triton.jit
def _masked_embed_bwd_kernel(
    dout_ptr, mask_ptr, dx_ptr, dpos_ptr, dtok_part_ptr,
    B, D,
    stride_dout_b, stride_dout_n, stride_mask_b, stride_dx_b, stride_dx_n,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    is_patch = t > 0
    n = tl.maximum(t - 1, 0).to(tl.int64)
    acc_pos = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_tok = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        b_ok = bs < B
        bs64 = bs.to(tl.int64)
        ok = b_ok[:, None] & col_ok[None, :]
        g = tl.load(dout_ptr + bs64[:, None] * stride_dout_b + t * stride_dout_n + cols[None, :], mask=ok, other=0.0)
        g = g.to(tl.float32)
        acc_pos += tl.sum(g, axis=0)
        m = tl.load(mask_ptr + bs64 * stride_mask_b + n, mask=b_ok & is_patch, other=0) != 0
        acc_tok += tl.sum(tl.where(m[:, None], g, 0.0), axis=0)
        dx = tl.where(m[:, None], 0.0, g)
        tl.store(dx_ptr + bs64[:, None] * stride_dx_b + n * stride_dx_n + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=ok & is_patch)
    tl.store(dpos_ptr + t * D + cols, acc_pos, mask=col_ok)
    tl.store(dtok_part_ptr + t * D + cols, acc_tok, mask=col_ok)


# -- launchers -------------------------------------------------------------------------------------------------------
def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 1024)


def masked_embed_fwd(
    x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor],
) -> torch.Tensor:
    B, N, D = x.shape
    x = x.contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8)
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), cls_token.dtype)
    if pos_embed is not None:
        dtype = torch.promote_types(dtype, pos_embed.dtype)
        pos_embed = pos_embed.contiguous()
    out = torch.empty((B, N + 1, D), device=x.device, dtype=dtype)
    BLOCK_D = _block_d(D)
    BLOCK_R = max(1, min(16, 4096 // BLOCK_D))
    total = B * (N + 1)
    grid = (triton.cdiv(total, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _masked_embed_fwd_kernel[grid](
        x, mask_u8, mask_token.contiguous(), cls_token.contiguous(), pos_embed if pos_embed is not None else x, out,
        total, N, D,
        x.stride(0), x.stride(1), mask_u8.stride(0), pos_embed.stride(0) if pos_embed is not None else 0,
        out.stride(0), out.stride(1),
        HAS_POS=pos_embed is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    return out


def masked_embed_bwd(dout: torch.Tensor, mask: torch.Tensor, x_dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """-> dx (B, N, D) in x_dtype, d mask_token (D,) fp32, d cls_token (D,) fp32, d pos_embed (N+1, D) fp32."""
    B, N1, D = dout.shape
    dout = dout.contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8)
    dx = torch.empty((B, N1 - 1, D), device=dout.device, dtype=x_dtype)
    dpos = torch.empty((N1, D), device=dout.device, dtype=torch.float32)
    dtok_part = torch.empty((N1, D), device=dout.device, dtype=torch.float32)
    # Narrow D blocks: only N+1 token positions to spread over the card, so split D into many programs.
    # 128 columns (256 B in bf16, whole cache lines) x 32 images per step over 8 warps: BEiT-B gets 197 x 6 = 1182
    # programs, ~3 full waves at the sm_90 compile's occupancy (3 per SM), where 256 columns over 4 warps gave
    # 591 (1.1 waves: a nearly empty second wave).
    BLOCK_D = min(triton.next_power_of_2(D), 128)
    BLOCK_B = max(1, min(32, 4096 // BLOCK_D))
    grid = (N1, triton.cdiv(D, BLOCK_D))
    _masked_embed_bwd_kernel[grid](
        dout, mask_u8, dx, dpos, dtok_part,
        B, D,
        dout.stride(0), dout.stride(1), mask_u8.stride(0), dx.stride(0), dx.stride(1),
        BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D,
        num_warps=8,
    )
    return dx, dtok_part.sum(0), dpos[0].clone(), dpos


# -- custom ops (opaque to torch.compile: a compiled model calls the kernels) ---------------------------------------
@torch.library.custom_op("beit_fast::masked_embed_fwd", mutates_args=())
def _masked_embed_fwd_op(
    x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor],
) -> torch.Tensor:
    return masked_embed_fwd(x, mask, mask_token, cls_token, pos_embed)


@_masked_embed_fwd_op.register_fake
def _(x, mask, mask_token, cls_token, pos_embed):
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), cls_token.dtype)
    if pos_embed is not None:
        dtype = torch.promote_types(dtype, pos_embed.dtype)
    B, N, D = x.shape
    return x.new_empty((B, N + 1, D), dtype=dtype)


@torch.library.custom_op("beit_fast::masked_embed_bwd", mutates_args=())
def _masked_embed_bwd_op(
    dout: torch.Tensor, mask: torch.Tensor, x_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_embed_bwd(dout, mask, x_dtype)


@_masked_embed_bwd_op.register_fake
def _(dout, mask, x_dtype):
    B, N1, D = dout.shape
    f32 = torch.float32
    return (dout.new_empty((B, N1 - 1, D), dtype=x_dtype), dout.new_empty((D,), dtype=f32),
            dout.new_empty((D,), dtype=f32), dout.new_empty((N1, D), dtype=f32))


# -- autograd --------------------------------------------------------------------------------------------------------
class MaskedEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, mask_token, cls_token, pos_embed):
        ctx.save_for_backward(mask)
        ctx.x_dtype = x.dtype
        ctx.dtypes = (mask_token.dtype, cls_token.dtype, pos_embed.dtype if pos_embed is not None else None)
        return torch.ops.beit_fast.masked_embed_fwd(x, mask, mask_token, cls_token, pos_embed)

    @staticmethod
    def backward(ctx, dout):
        (mask,) = ctx.saved_tensors
        dx, dtok, dcls, dpos = torch.ops.beit_fast.masked_embed_bwd(dout, mask, ctx.x_dtype)
        tok_dtype, cls_dtype, pos_dtype = ctx.dtypes
        return (dx, None, dtok.to(tok_dtype), dcls.to(cls_dtype),
                dpos.to(pos_dtype) if pos_dtype is not None else None)


# -- public ----------------------------------------------------------------------------------------------------------
def _check(x, mask, mask_token, cls_token, pos_embed) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
        raise ValueError(f"bool_masked_pos must be torch.bool of shape {(B, N)}, got {mask.dtype} {tuple(mask.shape)}")
    for name, t in (("mask_token", mask_token), ("cls_token", cls_token)):
        if t.numel() != D or t.shape[-1] != D:
            raise ValueError(f"{name} must have {D} elements, got shape {tuple(t.shape)}")
    if pos_embed is not None and tuple(pos_embed.shape) not in ((N + 1, D), (1, N + 1, D)):
        raise ValueError(f"pos_embed must be ({N + 1}, {D}) or (1, {N + 1}, {D}), got {tuple(pos_embed.shape)}")
    devices = {t.device for t in (x, mask, mask_token, cls_token) + ((pos_embed,) if pos_embed is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def masked_embed(
    x: torch.Tensor, bool_masked_pos: torch.Tensor, mask_token: torch.Tensor, cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused masked embedding (see the module docstring). Shapes as `masked_embed_ref`."""
    _check(x, bool_masked_pos, mask_token, cls_token, pos_embed)
    D = x.shape[-1]
    pos = pos_embed.reshape(-1, D) if pos_embed is not None else None
    return MaskedEmbedFunction.apply(x, bool_masked_pos, mask_token.reshape(D), cls_token.reshape(D), pos)


def masked_embed_ref(
    x: torch.Tensor, bool_masked_pos: torch.Tensor, mask_token: torch.Tensor, cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None, upcast: bool = False,
) -> torch.Tensor:
    """Plain torch: torch.where replacement, cat, add (`upcast`: compute in fp32)."""
    B, N, D = x.shape
    if upcast:
        x, mask_token, cls_token = x.float(), mask_token.float(), cls_token.float()
        pos_embed = pos_embed.float() if pos_embed is not None else None
    tok = mask_token.reshape(1, 1, D)
    out = torch.where(bool_masked_pos.unsqueeze(-1), tok.to(torch.promote_types(x.dtype, tok.dtype)), x)
    out = torch.cat((cls_token.reshape(1, 1, D).expand(B, 1, D).to(out.dtype), out), dim=1)
    out = out.to(torch.promote_types(out.dtype, cls_token.dtype))
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, N + 1, D)
    return out
