"""Visual tokenization: 128 images at 112px -> 14x14 token ids, with the DALL-E dVAE architecture.

All rows share one set of weights (random, biases with some spread; or a trained tokenizer file from
$BEIT_BENCH_TOKENIZER) and one batch of images, in the same process:
- our fp32 reference (`DalleTokenizer(fast=False)`; TF32 off, so it is the agreement baseline);
- ours, `DalleTokenizer(fast=True)`: the prepared bf16 channels_last body (post-gains and biases
  folded, residual adds in the conv_4 GEMMs, cudnn.benchmark) with the Triton split-vocabulary head,
  in a CUDA graph; the same with the cuBLAS + argmax head; without the graph; with an fp16 body;
- same weights as plain nn.Conv2d under bf16 autocast, channels_last, + torch argmax;
- the `dall_e` package's Encoder (fp16 convs, output conv in fp32, then argmax: what BEiT's
  reference code runs). Its import or a runtime failure is a recorded row with the error, never
  fatal: the other rows still run (as does any other row's failure).
Each row checks its tokens against the fp32 reference before it is timed (token agreement; random
weights have far more near-ties than trained ones) and reports median ms, img/s, peak extra memory
and the time relative to the first of ours and to the `dall_e` package (target: <= 0.45x).
`BEIT_BENCH_SMOKE=1` (CPU, tiny widths, Triton interpreter) runs the fast encoder's arithmetic in fp32
(`_FastEncoder`, both heads) instead of the CUDA-only rows: a check of the code paths, not a measurement.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Callable, Dict

import pytest
import torch
from benchutil import DEVICE, SMOKE, median_ms, peak_extra_gb

pytestmark = pytest.mark.skipif(
    DEVICE != "cuda" and not SMOKE,
    reason="tokenizer benchmarks need a CUDA device (or BEIT_BENCH_SMOKE=1 for a CPU smoke run)",
)

if SMOKE:
    B, SIZE, KW = 2, 16, dict(n_hid=16, n_blk_per_group=1, vocab_size=64)
else:
    B, SIZE, KW = 128, 112, dict(n_hid=256, n_blk_per_group=2, vocab_size=8192)


@contextlib.contextmanager
def _no_tf32():
    """The fp32 reference in IEEE fp32: cuDNN convs default to TF32 on Ampere and later."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _encoder():
    from beit_fast.tokenizer import DalleEncoder, load_dalle_encoder

    path = os.environ.get("BEIT_BENCH_TOKENIZER")
    if path and not SMOKE:
        return load_dalle_encoder(path), f"trained weights from {path}"
    torch.manual_seed(0)
    enc = DalleEncoder(**KW).eval().requires_grad_(False)
    with torch.no_grad():  # random weights with some spread in the biases, like a trained net's
        for p in enc.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.02)
    return enc, "random weights"


def _peers(enc, images) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a no-argument tokenize; a peer that cannot be built is a callable that raises its error."""
    from beit_fast.tokenizer import DalleTokenizer, _FastEncoder, map_pixels

    peers: Dict[str, Callable[[], torch.Tensor]] = {}
    if SMOKE:
        fe = _FastEncoder(enc, torch.float32, DEVICE)
        for head in ("triton", "torch"):
            peers[f"beit-fast _FastEncoder fp32 (smoke), head={head}"] = lambda h=head: fe.tokens(images, h)
    else:
        variants = [("bf16, triton head, CUDA graph", dict()),
                    ("bf16, cuBLAS+argmax head, CUDA graph", dict(head="torch")),
                    ("bf16, triton head, eager", dict(cuda_graph=False)),
                    ("fp16 body, triton head, CUDA graph", dict(fast_dtype=torch.float16))]
        for label, kw in variants:
            tok = DalleTokenizer(copy.deepcopy(enc), image_size=SIZE, fast=True, **kw)
            peers[f"beit-fast ({label})"] = lambda t=tok: t.tokenize(images)

        plain = copy.deepcopy(enc).to(memory_format=torch.channels_last)

        def conv_bf16():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                x = map_pixels(images).contiguous(memory_format=torch.channels_last)
                return plain(x).argmax(1).flatten(1)

        peers["nn.Conv2d bf16 autocast channels_last + argmax"] = conv_bf16
    try:
        import dall_e

        small = KW["n_hid"] < 64 or KW["vocab_size"] < 512  # below the package's attrs validators
        with contextlib.ExitStack() as stack:
            if small:
                import attr

                stack.enter_context(attr.validators.disabled())
            pkg = dall_e.Encoder(n_hid=enc.n_hid, n_blk_per_group=enc.n_blk_per_group, vocab_size=enc.vocab_size,
                                 device=torch.device(DEVICE), requires_grad=False,
                                 use_mixed_precision=DEVICE == "cuda")
        sd = {k.replace(".weight", ".w").replace(".bias", ".b"): v for k, v in enc.state_dict().items()}
        pkg.load_state_dict(sd)

        def package():
            with torch.no_grad():
                return pkg(map_pixels(images)).argmax(1).flatten(1)

        peers["dall_e package Encoder (fp16)"] = package
    except Exception as exc:  # not importable, or it does not build on this torch: a row, not a failure
        why = _error(exc)

        def unavailable():
            raise RuntimeError(f"not available: {why}")

        peers["dall_e package Encoder (fp16)"] = unavailable
    return peers


def test_bench_tokenizer(record):
    from beit_fast.tokenizer import DalleTokenizer

    enc, weights = _encoder()
    enc = enc.to(DEVICE)
    torch.manual_seed(1)
    images = torch.rand(B, 3, SIZE, SIZE, device=DEVICE)
    bench = f"tokenizer {B}x{SIZE}px ({weights})"
    reference = DalleTokenizer(copy.deepcopy(enc), image_size=SIZE, fast=False)

    def ref_tokens():
        with _no_tf32():
            return reference.tokenize(images)

    exact = ref_tokens()
    peers = {"beit-fast fp32 reference (fast=False, no TF32)": ref_tokens, **_peers(enc, images)}
    times: Dict[str, float] = {}
    for name, fn in peers.items():
        try:
            tokens = fn()  # correctness before timing (and the warm-up: cuDNN algorithms, graph capture)
            agreement = float((tokens.to(exact.device) == exact).float().mean())
            ms = median_ms(fn, warmup=3, iters=20)
            peak = peak_extra_gb(fn)
        except Exception as exc:
            record(bench=bench, impl=name, ms=float("nan"), error=_error(exc))
            continue
        times[name] = ms
        ours = next((t for n, t in times.items() if n.startswith("beit-fast (") or "smoke" in n), float("nan"))
        record(bench=bench, impl=name, ms=ms, img_per_s=B / ms * 1e3, time_vs_ours=ms / ours,
               token_agreement_vs_fp32=agreement, peak_extra_gb=peak)
    package = times.get("dall_e package Encoder (fp16)")
    for name, ms in times.items():
        if package and name.startswith("beit-fast ("):
            record(bench=bench, impl=f"{name} / dall_e package", ratio=ms / package, target="<= 0.45 (stretch 0.33)")
    if SMOKE:
        assert any("smoke" in n for n in times), f"no smoke row ran: {list(times)}"
