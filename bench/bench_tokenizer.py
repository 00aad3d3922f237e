"""Visual tokenization: 128 images at 112px -> 14x14 token ids, with the DALL-E dVAE architecture.

Peers in the same process, same random weights: the `dall_e` package's Encoder (fp16 convs, output
conv in fp32, then argmax: what BEiT's reference code runs) when it imports (carry its wheel, see
bench/gpu_suite.sh), and the same weights as plain nn.Conv2d under bf16 autocast with channels_last
plus a torch argmax (our fast path without the fused head). Ours: `DalleTokenizer(fast=True)`: bf16
channels_last body + the fused ReLU/1x1-conv/argmax Triton head. Reported: median ms, img/s, peak
extra memory, time relative to ours, and the token agreement of each against the fp32 reference
(random weights: near-ties are far more common than with trained weights).
"""

from __future__ import annotations

import pytest
import torch
from benchutil import AVAILABLE, DEVICE, SMOKE, median_ms, peak_extra_gb

pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason="tokenizer benchmarks need a CUDA device (or BEIT_BENCH_SMOKE=1 for a CPU smoke run)"
)

if SMOKE:
    B, SIZE, KW = 2, 16, dict(n_hid=16, n_blk_per_group=1, vocab_size=64)
else:
    B, SIZE, KW = 128, 112, dict(n_hid=256, n_blk_per_group=2, vocab_size=8192)


def test_bench_tokenizer(record):
    from beit_fast.tokenizer import DalleEncoder, DalleTokenizer, map_pixels

    torch.manual_seed(0)
    enc = DalleEncoder(**KW)
    with torch.no_grad():  # random weights with some spread in the biases, like a trained net's
        for p in enc.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.02)
    images = torch.rand(B, 3, SIZE, SIZE, device=DEVICE)
    ref_tok = DalleTokenizer(enc.to(DEVICE), image_size=SIZE, fast=False)
    exact = ref_tok.tokenize(images)
    peers = {}
    fast = DalleTokenizer(DalleEncoder(**KW).to(DEVICE), image_size=SIZE, fast=not SMOKE)
    fast.encoder.load_state_dict(enc.state_dict())
    peers["beit-fast (bf16, channels_last, fused head)"] = lambda: fast.tokenize(images)
    if DEVICE == "cuda":
        plain = DalleEncoder(**KW).to(DEVICE).to(memory_format=torch.channels_last).eval()
        plain.load_state_dict(enc.state_dict())

        def conv_bf16():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                x = map_pixels(images).contiguous(memory_format=torch.channels_last)
                return plain(x).argmax(1).flatten(1)

        peers["nn.Conv2d bf16 channels_last + argmax"] = conv_bf16
    skipped = {}
    try:
        import dall_e

        pkg = dall_e.Encoder(n_hid=KW["n_hid"], n_blk_per_group=KW["n_blk_per_group"], vocab_size=KW["vocab_size"],
                             device=torch.device(DEVICE), requires_grad=False, use_mixed_precision=DEVICE == "cuda")
        sd = {k.replace(".weight", ".w").replace(".bias", ".b"): v for k, v in enc.state_dict().items()}
        pkg.load_state_dict(sd)

        def package():
            with torch.no_grad():
                return pkg(map_pixels(images)).argmax(1).flatten(1)

        peers["dall_e package Encoder"] = package
    except Exception as exc:
        skipped["dall_e package Encoder"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    results = {}
    for name, fn in peers.items():
        tokens = fn()
        agreement = float((tokens.to(exact.device) == exact).float().mean())
        ms = median_ms(fn, warmup=3, iters=10 if SMOKE else 20)
        results[name] = ms
        first = next(iter(results.values()))
        record(bench=f"tokenizer {B}x{SIZE}px", impl=name, ms=ms, img_per_s=B / ms * 1e3, time_vs_ours=ms / first,
               token_agreement_vs_fp32=agreement, peak_extra_gb=peak_extra_gb(fn))
    for name, why in skipped.items():
        record(bench=f"tokenizer {B}x{SIZE}px", impl=name, ms=float("nan"), note=f"not importable: {why}")
