"""Attention with BEiT's relative position bias: fwd and fwd+bwd (bias gradient included), bf16.

Shapes: BEiT-B (B=128, H=12, N=197, Dh=64), BEiT-L (H=16), 384px (N=577, B=32), and head_dim 128 at both N.
`BEIT_BENCH_QUICK=1` (the GPU suite's quick part): BEiT-B, 384px and Dh=128 at 384px, no inductor-compiled peer.
Peers in the same process: SDPA memory-efficient (the only PyTorch kernel with a float bias
gradient), SDPA math, xformers when its kernels load, and FlexAttention with a `score_mod`
reading the table when it compiles (BEiT-B shape only, to bound compile time). Each is fed the
way a user would: the table gathered into an (H, N, N) bias every call (its gradient flows back
to the table). Correctness is checked against the fp32 reference before timing. Reported: median
ms, TFLOP/s (forward 4*B*H*N^2*Dh; backward 2.5x that, the FlashAttention convention), peak extra
memory, time relative to ours.
"""

from __future__ import annotations

import pytest
import torch
from benchutil import AVAILABLE, DEVICE, NO_COMPILE, NO_COMPILE_NOTE, QUICK, SMOKE, median_ms, peak_extra_gb

pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason="attention benchmarks need a CUDA device (or BEIT_BENCH_SMOKE=1 for a CPU smoke run)"
)

DT = torch.float32 if SMOKE else torch.bfloat16
SHAPES = {"BEiT-B": (128, 12, 197, 64), "BEiT-L": (128, 16, 197, 64), "384px": (32, 12, 577, 64),
          "Dh128": (128, 8, 197, 128), "Dh128 384px": (32, 8, 577, 128)}
if QUICK:
    SHAPES = {k: SHAPES[k] for k in ("BEiT-B", "384px", "Dh128 384px")}
if SMOKE:
    SHAPES = {"smoke": (1, 2, 37, 32)}


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _gathered(table, index):
    n = index.shape[0]
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


def _peers(shape: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from beit_fast.attention import _probe_xformers
    from beit_fast.kernels.relpos_attention import relpos_attention

    def sdpa(backend):
        def run(q, k, v, table, index):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=_gathered(table, index).to(q.dtype)[None])

        return run

    peers = {
        "beit-fast triton": lambda q, k, v, table, index: relpos_attention(q, k, v, table, index),
        "SDPA mem-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "SDPA math": sdpa(SDPBackend.MATH),
    }
    skipped = {}
    if DEVICE == "cuda" and not _probe_xformers():
        import xformers.ops as xops

        def xf(q, k, v, table, index):
            B, H, N, _ = q.shape
            pad = (N + 7) // 8 * 8
            full = q.new_zeros((B, H, N, pad))
            full[..., :N] = _gathered(table, index).to(q.dtype)
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_bias=full[..., :N])
            return out.transpose(1, 2)

        peers["xformers"] = xf
    else:
        skipped["xformers"] = _probe_xformers()[0] if DEVICE == "cuda" else "no CUDA device"
    try:
        if shape not in ("BEiT-B", "smoke"):  # one compile, at the shape of ANCHORS.md (compiles eat the time budget)
            raise RuntimeError("measured at the BEiT-B shape only")
        if NO_COMPILE:
            raise RuntimeError(NO_COMPILE_NOTE)
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False, backend="aot_eager" if SMOKE else "inductor")

        def fa(q, k, v, table, index):
            def score_mod(score, b, h, qi, kv):
                return score + table[index[qi, kv], h].to(score.dtype)

            return flex(q, k, v, score_mod=score_mod)

        peers["FlexAttention (score_mod)"] = fa
    except Exception as exc:
        skipped["FlexAttention (score_mod)"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return peers, skipped


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_relpos_attention(shape, record):
    from beit_fast.model import relative_position_index

    B, H, N, Dh = SHAPES[shape]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, Dh, device=DEVICE, generator=g).to(DT).requires_grad_() for _ in range(3))
    side = int(round((N - 1) ** 0.5))
    index = relative_position_index((side, side)).to(DEVICE)
    table = (0.5 * torch.randn((2 * side - 1) ** 2 + 3, H, device=DEVICE, generator=g)).requires_grad_()
    do = torch.randn(B, H, N, Dh, device=DEVICE, generator=g).to(DT)
    inputs = [q, k, v, table]
    ref = _gathered(table.float(), index)
    ref_out = torch.softmax((q.float() * Dh**-0.5) @ k.float().transpose(-1, -2) + ref, -1) @ v.float()
    ref_g = torch.autograd.grad(ref_out, inputs, do.float())
    flops_fwd = 4.0 * B * H * N * N * Dh
    peers, skipped = _peers(shape)
    results = {}
    for name, fn in peers.items():
        try:
            out = fn(q, k, v, table, index)
            grads = torch.autograd.grad(out, inputs, do)
        except Exception as exc:  # e.g. FlexAttention's backward failing to compile (ANCHORS.md)
            assert not name.startswith("beit-fast"), exc
            record(bench=f"attention {shape}", impl=name, ms_fwd=float("nan"),
                   note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        errs = [_rel(out, ref_out)] + [_rel(a, b) for a, b in zip(grads, ref_g)]
        if max(errs) > (1e-4 if SMOKE else 5e-2):
            assert not name.startswith("beit-fast"), errs
            record(bench=f"attention {shape}", impl=name, ms_fwd=float("nan"), note=f"wrong result: {errs}")
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, k, v, table, index)

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(q, k, v, table, index), inputs, do)

        ms_f, ms_fb = median_ms(fwd), median_ms(fwd_bwd)
        results[name] = (ms_f, ms_fb)
        base_f, base_fb = results["beit-fast triton"]
        record(bench=f"attention {shape}", impl=name, ms_fwd=ms_f, ms_fwd_bwd=ms_fb,
               fwd_vs_ours=ms_f / base_f, fwd_bwd_vs_ours=ms_fb / base_fb,
               tflops_fwd=flops_fwd / ms_f / 1e9, tflops_fwd_bwd=3.5 * flops_fwd / ms_fb / 1e9,
               peak_extra_gb=peak_extra_gb(fwd_bwd))
    for name, why in skipped.items():
        record(bench=f"attention {shape}", impl=name, ms_fwd=float("nan"), note=f"not available: {why}")
