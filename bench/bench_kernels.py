"""MIM kernels against what users run instead, at BEiT-B shapes, bf16, fwd+bwd (CUDA only).

Shapes: B=128 images, N=196 patches, D=768, 75 masked per image (M=9600), V=8192.
Peers in the same process: torch eager, torch.compile of the same eager code, and for the
linear + cross-entropy Liger's `LigerFusedLinearCrossEntropyLoss` and Apple's `cut_cross_entropy`
(`impl="cce"`, no bias) where they import (carry their pure-Python wheels to a GPU machine;
see bench/gpu_suite.sh). Every peer's result is checked against the float32 reference before it
is timed. Reported: median ms (CUDA events), TFLOP/s or GB/s, peak extra memory (GB), and the
ratio to ours.

    python -m pytest bench/bench_kernels.py -q -s      # or bench/gpu_suite.sh
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchutil import AVAILABLE, DEVICE, SMOKE, compile_fn, median_ms, peak_extra_gb, sync

pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason="kernel benchmarks need a CUDA device (or BEIT_BENCH_SMOKE=1 for a CPU smoke run)"
)

if SMOKE:  # tiny shapes through the Triton interpreter: exercises the code, measures nothing
    B, N, D, K, V, DT = 4, 16, 64, 6, 512, torch.float32
else:
    B, N, D, K, V, DT = 128, 196, 768, 75, 8192, torch.bfloat16
GRID = int(N**0.5)
M = B * K


def _fwd_bwd(fn, inputs):
    def run():
        out = fn()
        loss = out[0] if isinstance(out, tuple) else out
        if loss.dim():
            loss = loss.float().square().mean()  # a scalar that touches every output element
        grads = torch.autograd.grad(loss, inputs)
        return loss, grads

    return run


def _time(run):
    return median_ms(run), peak_extra_gb(run)


def _gen():
    return torch.Generator(device=DEVICE).manual_seed(0)


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# -- fused linear + cross-entropy ------------------------------------------------------------------------------------
def _peers_flce(bias: bool):
    from beit_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    peers = {"beit-fast": lambda h, w, b, t: fused_linear_cross_entropy(h, w, b, t)[0]}

    def eager(h, w, b, t):
        return F.cross_entropy(F.linear(h, w, b).float(), t)

    peers["torch eager"] = eager
    peers["torch.compile"] = compile_fn(eager)
    skipped = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        peers["Liger 0.8.x"] = lambda h, w, b, t: liger(w, h, t, b)
    except Exception as exc:  # not installed, or its Triton does not build here
        skipped["Liger"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    if not bias:
        try:
            from cut_cross_entropy import linear_cross_entropy

            peers["CCE (cce)"] = lambda h, w, b, t: linear_cross_entropy(h, w, t, impl="cce")
        except Exception as exc:
            skipped["CCE"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    return peers, skipped


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_bench_fused_linear_cross_entropy(bias, record, benchmark):
    g = _gen()
    h = torch.randn(M, D, device=DEVICE, generator=g, dtype=DT).requires_grad_()
    w = (torch.randn(V, D, device=DEVICE, generator=g) * 0.02).to(DT).requires_grad_()
    b = (torch.randn(V, device=DEVICE, generator=g) * 0.02).to(DT).requires_grad_() if bias else None
    t = torch.randint(0, V, (M,), device=DEVICE, generator=g)
    inputs = [h, w] + ([b] if bias else [])
    ref = F.cross_entropy(F.linear(h.float(), w.float(), b.float() if bias else None), t)
    ref_g = torch.autograd.grad(ref, inputs)
    peers, skipped = _peers_flce(bias)
    flop = 3 * 2.0 * M * V * D
    results = {}
    bench_name = "linear+CE fwd+bwd" + ("" if bias else " (no bias)")
    for name, fn in peers.items():
        run = _fwd_bwd(lambda fn=fn: fn(h, w, b, t), inputs)
        loss, grads = run()
        errors = [_rel(loss, ref)] + [_rel(gg, rr) for gg, rr in zip(grads, ref_g)]
        if errors[0] >= 1e-2 or max(errors[1:]) >= 5e-2:
            # Ours must be right; a peer that is not is reported (and not timed) instead of ending the run.
            assert name != "beit-fast", errors
            record(bench=bench_name, impl=name, ms=float("nan"), note=f"wrong result, not timed: rel errors {errors}")
            continue
        ms, mem = _time(run)
        results[name] = ms
        record(bench=bench_name, impl=name, ms=ms, time_vs_ours=ms / results["beit-fast"], tflops=flop / ms / 1e9,
               peak_extra_gb=mem)
    for name, why in skipped.items():
        record(bench=bench_name, impl=name, ms=float("nan"), note=f"not importable: {why}")
    ours = results["beit-fast"]
    for name, ms in results.items():
        print(f"{name:>14}: {ms:.3f} ms  ({ms / ours:.2f}x ours)")
    run = _fwd_bwd(lambda: peers["beit-fast"](h, w, b, t), inputs)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3 if SMOKE else 10, warmup_rounds=1)


# -- masked_embed ----------------------------------------------------------------------------------------------------
def test_bench_masked_embed(record, benchmark):
    from beit_fast.kernels.masked_embed import masked_embed
    from beit_fast.masking import BlockwiseMaskGenerator

    g = _gen()
    x = torch.randn(B, N, D, device=DEVICE, generator=g, dtype=DT).requires_grad_()
    mask = BlockwiseMaskGenerator(GRID, K, min_num_patches=min(16, K), seed=0).batch(B).to(DEVICE)
    tok = torch.randn(D, device=DEVICE, generator=g, dtype=DT).requires_grad_()
    cls = torch.randn(D, device=DEVICE, generator=g, dtype=DT).requires_grad_()
    pos = torch.randn(N + 1, D, device=DEVICE, generator=g, dtype=DT).requires_grad_()
    inputs = [x, tok, cls, pos]

    def eager(x, mask, tok, cls, pos):  # the unilm way
        w = mask.unsqueeze(-1).type_as(x)
        y = x * (1 - w) + tok.view(1, 1, D) * w
        return torch.cat((cls.view(1, 1, D).expand(B, 1, D), y), dim=1) + pos

    peers = {"beit-fast": masked_embed, "torch eager": eager, "torch.compile": compile_fn(eager)}
    # Each input read once, each output written once: fwd x + out, bwd dout + dx (small vectors ignored).
    nbytes = 2 * (B * N * D + B * (N + 1) * D) * x.element_size()
    ref = eager(x.float(), mask, tok.float(), cls.float(), pos.float())
    results = {}
    for name, fn in peers.items():
        run = _fwd_bwd(lambda fn=fn: fn(x, mask, tok, cls, pos), inputs)
        out = fn(x, mask, tok, cls, pos)
        assert _rel(out, ref) < 1e-2, name
        ms, mem = _time(run)
        results[name] = ms
        record(bench="masked_embed fwd+bwd", impl=name, ms=ms, time_vs_ours=ms / results["beit-fast"],
               gb_per_s=nbytes / ms / 1e6, peak_extra_gb=mem)
    run = _fwd_bwd(lambda: masked_embed(x, mask, tok, cls, pos), inputs)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3 if SMOKE else 10, warmup_rounds=1)


# -- gather_masked_layer_norm ----------------------------------------------------------------------------------------
def test_bench_gather_masked_layer_norm(record, benchmark):
    from beit_fast.kernels.gather_layer_norm import gather_masked_layer_norm
    from beit_fast.masking import BlockwiseMaskGenerator

    g = _gen()
    hidden = torch.randn(B, N + 1, D, device=DEVICE, generator=g, dtype=DT).requires_grad_()
    mask = BlockwiseMaskGenerator(GRID, K, min_num_patches=min(16, K), seed=0).batch(B).to(DEVICE)
    w = (1 + 0.1 * torch.randn(D, device=DEVICE, generator=g)).to(DT).requires_grad_()
    b = (0.1 * torch.randn(D, device=DEVICE, generator=g)).to(DT).requires_grad_()
    inputs = [hidden, w, b]

    def eager(hidden, mask, w, b):
        return F.layer_norm(hidden[:, 1:][mask], (D,), w, b, 1e-6)

    def ours(hidden, mask, w, b):
        return gather_masked_layer_norm(hidden, mask, w, b, 1e-6, num_masked_per_image=K)

    peers = {"beit-fast": ours, "torch eager": eager, "torch.compile": compile_fn(eager)}
    # fwd: read M rows, write M rows; bwd: read dy and the M rows, write the whole (B, N+1, D) gradient.
    nbytes = (4 * M * D + B * (N + 1) * D) * hidden.element_size()
    ref = eager(hidden.float(), mask, w.float(), b.float())
    results = {}
    for name, fn in peers.items():
        run = _fwd_bwd(lambda fn=fn: fn(hidden, mask, w, b), inputs)
        assert _rel(fn(hidden, mask, w, b), ref) < 2e-2, name
        ms, mem = _time(run)
        results[name] = ms
        record(bench="gather+LayerNorm fwd+bwd", impl=name, ms=ms, time_vs_ours=ms / results["beit-fast"],
               gb_per_s=nbytes / ms / 1e6, peak_extra_gb=mem)
    run = _fwd_bwd(lambda: ours(hidden, mask, w, b), inputs)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3 if SMOKE else 10, warmup_rounds=1)


def test_bench_copy_ceiling(record):
    """The card's device-to-device copy bandwidth (bytes read + written), the roofline for the two
    memory-bound kernels: their target is >= 80% of it."""
    src = torch.empty((2 if SMOKE else 512) * 2**20, device=DEVICE, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    record(bench="copy ceiling", impl="torch copy_", ms=ms, gb_per_s=2 * src.numel() / ms / 1e6)
