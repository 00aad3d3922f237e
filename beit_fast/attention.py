"""Attention with BEiT's relative position bias, behind one dispatcher.

Every backend computes `softmax(q @ k^T * scale + bias) @ v` for q, k, v of shape
(B, H, N, Dh) and a float bias broadcastable to (B, H, N, N) that may need a gradient (the
relative position bias table is learned). A backend declares what it supports through
`not_supported_reasons(case)`; `"auto"` takes the first one in `AUTO_ORDER` that has no
reasons; an explicitly requested backend that cannot run raises with its reasons.

Backends:
- `math`: the reference, plain matmul + softmax in the input dtype (what unilm runs).
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` with the bias as `attn_mask`.
  On CUDA only the memory-efficient kernel takes a float bias that needs a gradient, so it
  is pinned there when the bias requires grad.
- `triton`, `xformers`: fused-bias kernels (issue 4); declared here so that `beit-fast info`
  and an explicit request can say why they do not run yet.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

__all__ = ["AttentionCase", "attention", "available_backends", "not_supported_reasons", "select_backend"]

AUTO_ORDER = ("triton", "xformers", "sdpa", "math")


@dataclass(frozen=True)
class AttentionCase:
    """What a backend needs to know to accept a call."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    bias_requires_grad: bool
    dropout_p: float = 0.0

    @classmethod
    def of(cls, q: torch.Tensor, bias: Optional[torch.Tensor], dropout_p: float = 0.0) -> "AttentionCase":
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            head_dim=q.shape[-1],
            bias_requires_grad=bool(bias is not None and bias.requires_grad and torch.is_grad_enabled()),
            dropout_p=dropout_p,
        )


def _math_attention(q, k, v, bias, scale, dropout_p, training):
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0 and training:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def _sdpa_attention(q, k, v, bias, scale, dropout_p, training):
    if bias is not None:
        bias = bias.to(q.dtype)
        if bias.dim() == 3:
            bias = bias.unsqueeze(0)
    ctx = contextlib.nullcontext()
    if q.is_cuda and bias is not None and bias.requires_grad and torch.is_grad_enabled():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    with ctx:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p if training else 0.0, scale=scale
        )


def _reasons_math(case: AttentionCase) -> List[str]:
    return []


def _reasons_sdpa(case: AttentionCase) -> List[str]:
    reasons = []
    if not hasattr(F, "scaled_dot_product_attention"):
        reasons.append("torch has no scaled_dot_product_attention")
    if case.device_type == "cuda" and case.bias_requires_grad and case.dtype == torch.float64:
        reasons.append("the memory-efficient SDPA kernel (the only one with a bias gradient) has no float64")
    return reasons


def _reasons_triton(case: AttentionCase) -> List[str]:
    return ["the Triton relative-position-bias attention kernel is not in this build yet (issue 4)"]


_XFORMERS_PROBE: Optional[List[str]] = None


def _reasons_xformers(case: AttentionCase) -> List[str]:
    global _XFORMERS_PROBE
    if _XFORMERS_PROBE is None:
        try:
            import xformers  # noqa: F401

            _XFORMERS_PROBE = ["the xformers backend is not wired in this build yet (issue 4)"]
        except Exception as exc:  # ImportError, or a broken CUDA extension raising at import
            _XFORMERS_PROBE = [f"xformers does not import: {type(exc).__name__}: {exc}".splitlines()[0]]
    reasons = list(_XFORMERS_PROBE)
    if case.device_type != "cuda":
        reasons.append("xformers has no CPU kernels")
    return reasons


_REASONS: Dict[str, Callable[[AttentionCase], List[str]]] = {
    "triton": _reasons_triton,
    "xformers": _reasons_xformers,
    "sdpa": _reasons_sdpa,
    "math": _reasons_math,
}
_IMPLS = {"sdpa": _sdpa_attention, "math": _math_attention}


def not_supported_reasons(backend: str, case: AttentionCase) -> List[str]:
    """Why `backend` cannot run `case` (empty list: it can)."""
    if backend not in _REASONS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {('auto',) + AUTO_ORDER}")
    return _REASONS[backend](case)


def select_backend(requested: str, case: AttentionCase) -> str:
    """Resolve `requested` ("auto" or a backend name) for `case`; raises if an explicit one cannot run."""
    if requested == "auto":
        for name in AUTO_ORDER:
            if not not_supported_reasons(name, case):
                return name
        raise RuntimeError("no attention backend supports this case")  # math supports everything
    reasons = not_supported_reasons(requested, case)
    if reasons:
        raise RuntimeError(f"attention backend {requested!r} cannot run here: " + "; ".join(reasons))
    return requested


def available_backends(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> Dict[str, List[str]]:
    """For `beit-fast info`: every backend with its reasons not to run on (device_type, dtype)."""
    case = AttentionCase(device_type=device_type, dtype=dtype, head_dim=64, bias_requires_grad=True)
    return {name: not_supported_reasons(name, case) for name in AUTO_ORDER}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v. q, k, v: (B, H, N, Dh); bias: (H, N, N) or (B, H, N, N) or None."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = select_backend(backend, AttentionCase.of(q, bias, dropout_p))
    return _IMPLS[name](q, k, v, bias, scale, dropout_p, training)
