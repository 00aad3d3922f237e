"""Attention with BEiT's relative position bias, behind one dispatcher.

Every backend computes `softmax(q k^T * scale + bias) v` for the packed qkv projection
(B, N, 3*D) and returns (B, N, D) with the heads merged. The bias is BEiT's learned relative
position bias, given as a `RelPosBias`: the (T, H) table and its (N, N) index (the Triton kernel
gathers inside the kernel), and, for the other backends, the dense (H, N, N) gather computed once
per forward and shared by every layer. The table's layout lives here too (`relative_position_index`,
`RelativePositionBias`), next to the code that reads it, so the model and the checkpoint converters share it
without importing each other.

A backend declares what it supports through `not_supported_reasons(backend, case)`; `"auto"`
takes the first one in `AUTO_ORDER` with no reasons; an explicitly requested backend that cannot
run raises with its reasons (`beit-fast info` prints them).

Backends:
- `triton`: `beit_fast.kernels.relpos_attention` - FlashAttention-2-style kernels reading the padded
  dense bias (built once per forward, shared by the layers), the bias gradient reduced without
  atomics (deterministic). On the CPU it runs only through the Triton interpreter, and only when
  asked for by name ("auto" never picks the interpreter); "auto" leaves float32 on a GPU to SDPA
  (the kernel's fp32 path is IEEE fp32 on CUDA cores: exact, not fast).
- `xformers`: `memory_efficient_attention` with a tensor bias, only when its CUDA kernels really
  load (probed once with a tiny call, the answer cached).
- `sdpa`: `F.scaled_dot_product_attention` with the bias as `attn_mask`; on CUDA the
  memory-efficient kernel is pinned when the bias needs a gradient (the only one that gives it).
- `math`: the reference, plain matmul + softmax in the input dtype (what unilm runs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AttentionCase",
    "RelPosBias",
    "RelativePositionBias",
    "attention_heads",
    "attention_probs",
    "attention_qkv",
    "available_backends",
    "not_supported_reasons",
    "relative_position_index",
    "select_backend",
]

AUTO_ORDER = ("triton", "xformers", "sdpa", "math")


def relative_position_index(grid: Tuple[int, int]) -> torch.Tensor:
    """(N+1, N+1) int64 index into the (2h-1)(2w-1)+3 row table, N = h*w, cls first.

    Patch i at (hi, wi) to patch j at (hj, wj): (hi-hj+h-1)*(2w-1) + (wi-wj+w-1);
    cls->patch = T-3, patch->cls = T-2, cls->cls = T-1 (T = table rows).
    """
    h, w = grid
    num_rows = (2 * h - 1) * (2 * w - 1) + 3
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (h - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    index = torch.empty((h * w + 1, h * w + 1), dtype=torch.long)
    index[1:, 1:] = dy * (2 * w - 1) + dx
    index[0, :] = num_rows - 3
    index[:, 0] = num_rows - 2
    index[0, 0] = num_rows - 1
    return index


class RelativePositionBias(nn.Module):
    """A (T, H) learned table gathered into an (H, N+1, N+1) attention bias."""

    def __init__(self, grid: Tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.grid = grid
        num_rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rows, num_heads))
        # Derived from the grid, so not saved: converters check a checkpoint's index against it.
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()


class RelPosBias(NamedTuple):
    """table (T, H) and index (N, N): bias[h, i, j] = table[index[i, j], h]. Built once per forward and shared by
    the layers that use the same table: `dense` is that gather as (H, N, N) for the SDPA / xformers / math backends,
    `padded` the Triton kernel's (H, P, P) layout (`beit_fast.kernels.relpos_attention.relpos_bias_padded`).
    A bias that arrives already dense (a library's attention mask, `beit_fast.dropin`) has no table:
    `RelPosBias.from_dense(bias)`."""

    table: Optional[torch.Tensor]
    index: Optional[torch.Tensor]
    dense: Optional[torch.Tensor] = None
    padded: Optional[torch.Tensor] = None

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "RelPosBias":
        """A dense (H, N, N) bias (or (1, H, N, N)) without its table."""
        return cls(None, None, dense=dense.reshape(dense.shape[-3:]))

    def materialise(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()

    def for_backend(self, backend: str) -> "RelPosBias":
        """This bias with the one form `backend` reads computed (once, here)."""
        if backend == "triton":
            if self.padded is not None:
                return self
            from beit_fast.kernels.relpos_attention import pad_bias, relpos_bias_padded

            if self.table is None:
                return self._replace(padded=pad_bias(self.dense))
            return self._replace(padded=relpos_bias_padded(self.table, self.index))
        return self if self.dense is not None else self._replace(dense=self.materialise())


@dataclass(frozen=True)
class AttentionCase:
    """What a backend needs to know to accept a call."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    bias_requires_grad: bool
    dropout_p: float = 0.0


def _heads(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed projection (B, N, 3*D) as three (B, H, N, Dh) views (no copy)."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge(out: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dh) -> (B, N, H*Dh), heads merged."""
    B, H, N, Dh = out.shape
    return out.transpose(1, 2).reshape(B, N, H * Dh)


def _probs(q: torch.Tensor, k: torch.Tensor, bias: Optional[RelPosBias], scale: float) -> torch.Tensor:
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.materialise()
    return attn.softmax(dim=-1)


def attention_probs(qkv: torch.Tensor, num_heads: int, bias: Optional[RelPosBias], scale: float) -> torch.Tensor:
    """The attention matrix softmax(q k^T * scale + bias) of the packed projection: (B, N, 3*D) -> (B, H, N, N)
    (the `math` backend's; self-attention maps read it)."""
    q, k, _ = _heads(qkv, num_heads)
    return _probs(q, k, bias, scale)


def _math(q, k, v, bias, scale, dropout_p, training):
    attn = _probs(q, k, bias, scale)
    if dropout_p > 0 and training:
        attn = F.dropout(attn, p=dropout_p)
    return _merge(attn @ v)


def _sdpa(q, k, v, bias, scale, dropout_p, training):
    mask = bias.materialise().to(q.dtype).unsqueeze(0) if bias is not None else None
    ctx = contextlib.nullcontext()
    if q.is_cuda and mask is not None and mask.requires_grad and torch.is_grad_enabled():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    with ctx:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0,
                                             scale=scale)
    return _merge(out)


def _triton(q, k, v, bias, scale, dropout_p, training):
    from beit_fast.kernels.relpos_attention import relpos_attention

    padded = bias.for_backend("triton").padded if bias is not None else None
    return _merge(relpos_attention(q, k, v, scale=scale, padded_bias=padded))  # a view: the kernel writes (B, N, H, Dh)


def _xformers(q, k, v, bias, scale, dropout_p, training):
    import xformers.ops as xops

    B, H, N, Dh = q.shape
    attn_bias = None
    if bias is not None:
        # xformers wants the bias' last dim padded to a multiple of 8 (then sliced back).
        pad = (N + 7) // 8 * 8
        full = q.new_zeros((B, H, N, pad))
        full[..., :N] = bias.materialise().to(q.dtype)
        attn_bias = full[..., :N]
    # (B, N, H, Dh): xformers' layout
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias,
                                          p=dropout_p if training else 0.0, scale=scale)
    return out.reshape(B, N, H * Dh)


def _reasons_math(case: AttentionCase, auto: bool) -> List[str]:
    return []


def _reasons_sdpa(case: AttentionCase, auto: bool) -> List[str]:
    if case.device_type == "cuda" and case.bias_requires_grad and case.dtype == torch.float64:
        return ["the memory-efficient SDPA kernel (the only one with a bias gradient) has no float64"]
    return []


def _reasons_triton(case: AttentionCase, auto: bool) -> List[str]:
    from beit_fast.kernels import interpreting, triton_reasons

    reasons = list(triton_reasons(case.device_type))
    if case.device_type == "cpu" and interpreting() and auto:
        reasons.append("on the CPU the Triton interpreter is for tests; ask for attn_backend='triton' by name")
    if case.device_type == "cpu" and interpreting() and case.dtype == torch.bfloat16:
        reasons.append("bf16 dots give wrong results in the Triton interpreter (fp32 / fp16 only there)")
    if case.head_dim > 128:
        reasons.append(f"head_dim {case.head_dim} > 128")
    if case.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {case.dtype} (fp16, bf16 and fp32 only)")
    if case.dtype == torch.float32 and case.device_type == "cuda" and auto:
        reasons.append("float32 on a GPU: the kernel computes IEEE fp32 without tensor cores; auto leaves fp32 to "
                       "SDPA (ask for attn_backend='triton' by name to run it)")
    if case.dropout_p > 0:
        reasons.append("attention dropout is not implemented in the kernel")
    return reasons


_XFORMERS_PROBE: Optional[List[str]] = None


def _probe_xformers() -> List[str]:
    """Import xformers and run one tiny biased attention on CUDA: its kernels often do not load
    against another torch build (ANCHORS.md), and only a real call says so."""
    global _XFORMERS_PROBE
    if _XFORMERS_PROBE is None:
        try:
            import xformers.ops as xops

            if not torch.cuda.is_available():
                _XFORMERS_PROBE = ["no CUDA device (xformers has no CPU kernels)"]
            else:
                x = torch.zeros(1, 8, 1, 16, device="cuda", dtype=torch.float16)
                b = torch.zeros(1, 1, 8, 8, device="cuda", dtype=torch.float16)
                xops.memory_efficient_attention(x, x, x, attn_bias=b)
                _XFORMERS_PROBE = []
        except Exception as exc:  # ImportError, missing operators, CUDA errors
            _XFORMERS_PROBE = [f"xformers does not run here: {type(exc).__name__}: {exc}".splitlines()[0][:200]]
    return _XFORMERS_PROBE


def _reasons_xformers(case: AttentionCase, auto: bool) -> List[str]:
    if case.device_type != "cuda":
        return ["xformers has no CPU kernels"]
    reasons = list(_probe_xformers())
    if case.dtype == torch.float64:
        reasons.append("no float64")
    return reasons


_REASONS: Dict[str, Callable[[AttentionCase, bool], List[str]]] = {
    "triton": _reasons_triton,
    "xformers": _reasons_xformers,
    "sdpa": _reasons_sdpa,
    "math": _reasons_math,
}
_IMPLS = {"triton": _triton, "xformers": _xformers, "sdpa": _sdpa, "math": _math}


def not_supported_reasons(backend: str, case: AttentionCase, auto: bool = False) -> List[str]:
    """Why `backend` cannot run `case` (empty list: it can)."""
    if backend not in _REASONS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {('auto',) + AUTO_ORDER}")
    return _REASONS[backend](case, auto)


def select_backend(requested: str, case: AttentionCase) -> str:
    """Resolve `requested` ("auto" or a backend name) for `case`; raises if an explicit one cannot run."""
    if requested == "auto":
        for name in AUTO_ORDER:
            if not not_supported_reasons(name, case, auto=True):
                return name
        raise RuntimeError("no attention backend supports this case")  # math supports everything
    reasons = not_supported_reasons(requested, case)
    if reasons:
        raise RuntimeError(f"attention backend {requested!r} cannot run here: " + "; ".join(reasons))
    return requested


def available_backends(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> Dict[str, List[str]]:
    """For `beit-fast info`: every backend with its reasons not to run under "auto" on (device_type, dtype)."""
    case = AttentionCase(device_type=device_type, dtype=dtype, head_dim=64, bias_requires_grad=True)
    return {name: not_supported_reasons(name, case, auto=True) for name in AUTO_ORDER}


def attention_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[RelPosBias],
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Run a RESOLVED backend (see `select_backend`) on q, k, v (B, H, N, Dh), any strides with a contiguous last dim
    (views of separate q / k / v projections, as transformers makes them): -> (B, N, H*Dh), heads merged."""
    return _IMPLS[backend](q, k, v, bias, scale, dropout_p, training)


def attention_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    bias: Optional[RelPosBias],
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Run a RESOLVED backend (see `select_backend`) on the packed projection: (B, N, 3*D) -> (B, N, D)."""
    if backend == "triton":  # the packed kernel: its backward writes d(qkv) as one buffer, no split copies
        from beit_fast.kernels.relpos_attention import relpos_attention_qkv

        padded = bias.for_backend("triton").padded if bias is not None else None
        return relpos_attention_qkv(qkv, num_heads, scale=scale, padded_bias=padded)
    return attention_heads(*_heads(qkv, num_heads), bias, scale, backend, dropout_p, training)
