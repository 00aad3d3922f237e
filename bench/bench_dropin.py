"""Drop-in speed (issue 15): the BEiT models people already have, unpatched against `beit_fast.patch`ed, in this
process on this card, bf16 autocast, batch 128, eager (nothing compiled).

- timm `beit_base_patch16_224` training step (`peers.timm_finetune`: timm's model with drop path 0.1, bf16 autocast
  forward, `SoftTargetCrossEntropy` on fp32 logits against a fixed mixup-style soft target, AdamW (fused) on timm's
  layer-decay groups); unpatched = timm's fused attention (SDPA with the relative position table as `attn_mask`).
  Target: patched >= 1.3x.
- transformers `BeitForMaskedImageModeling` pretraining step (`peers.hf_mim`: the pt22k layout - shared relative
  position bias, layer scale, no absolute positions - SDPA attention, its head on all 196 rows; 75 blockwise-masked
  patches per image, labels = the masked patches' token ids, fused AdamW); patched = the Triton attention + the head on
  the masked rows only. Target: patched >= 1.6x.

Both models are built from the same seed (same weights); before timing, the patched model - the Triton kernel asked
for by name, fp32, TF32 off - must give the unpatched model's fp32 output (logits / loss, rel err <= 1e-4), and the
timed patched step must resolve its attention to "triton" (the row's note says so). Rows: median ms per step,
img/s, peak memory; `speedup_of_ours` on the unpatched row = unpatched ms / patched ms.
`BEIT_BENCH_SMOKE=1`: the tiny preset at batch 2 on the CPU (the Triton attention through the interpreter when
TRITON_INTERPRET=1); code paths only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from bench_e2e import (
    BENCH,
    BF16,
    CFG,
    FT_ATTN,
    FT_CLASSES,
    FT_LR,
    FT_TIMM_SHAPES,
    _ft_inputs,
    _inputs,
    _no_failures,
    _time,
)
from benchutil import AVAILABLE, DEVICE

import beit_fast
from beit_fast.dropin import _HFMaskedImageModeling, _Patched

pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason="drop-in benchmarks need a CUDA device (or BEIT_BENCH_SMOKE=1 for a CPU smoke run)"
)

PARITY_RTOL = 1e-4
ATTENTION = "auto" if DEVICE == "cuda" else FT_ATTN  # auto must pick the kernel on CUDA (checked by _backend)


def _backend(model: torch.nn.Module) -> str:
    """The attention the timed patched step runs (train mode, grad on, the step's autocast); on CUDA it must be the
    Triton kernel, or the row would not measure it."""
    attn = next(m for m in model.modules() if isinstance(m, _Patched) and not isinstance(m, _HFMaskedImageModeling))
    probe = torch.empty(1, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
        backend = attn._beit_fast_backend(probe, CFG.head_dim, True, 0.0) or "the library's own"
    if DEVICE == "cuda" and backend != "triton":
        raise AssertionError(f"the patched step resolves attention backend {backend!r}, not 'triton'")
    return f"attention {backend}"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _parity(build, call) -> float:
    """Same weights, fp32, TF32 off: rel err of the patched model (Triton attention by name) against the unpatched."""
    torch.manual_seed(0)
    ref, _ = build()
    model = beit_fast.patch(copy.deepcopy(ref), attention="triton" if DEVICE == "cuda" else FT_ATTN)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            torch.manual_seed(1)  # drop path draws: the same in both
            a = call(model)
            torch.manual_seed(1)
            b = call(ref)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return _rel_err(a, b)


def _patched(build):
    def make():
        model, step = build()
        beit_fast.patch(model, attention=ATTENTION)  # in place: the step closes over this very module
        return model, step

    return make


def _seeded(build):
    def make():
        torch.manual_seed(0)  # both rows start from the same weights
        return build()

    return make


def _check_parity(record, what: str, err: float) -> None:
    if not err <= PARITY_RTOL:
        record(bench=f"{BENCH} {what}", impl="parity: patched vs unpatched, fp32", ms=float("nan"),
               note=f"rel err {err:.2e} > {PARITY_RTOL}: not timed")
    assert err <= PARITY_RTOL, f"patched output differs from the unpatched model's: rel err {err:.3e}"


def test_dropin_timm_step(record):
    from peers import timm_finetune

    what = "drop-in: timm beit_base_patch16_224 training step"

    def build():
        return timm_finetune(FT_CLASSES, DEVICE, BF16, FT_LR, **FT_TIMM_SHAPES)

    pixels = _ft_inputs(1)[0][:8]
    err = _parity(build, lambda m: m.eval()(pixels))
    _check_parity(record, what, err)
    results: dict = {}
    ours = "timm + beit_fast.patch (eager)"
    _time(ours, _seeded(_patched(build)), results, record, what, inputs=_ft_inputs,
          describe=lambda m: f"{_backend(m)}; fp32 logits vs unpatched: rel err {err:.1e}")
    _time("timm unpatched (eager)", _seeded(build), results, record, what, ours, inputs=_ft_inputs,
          describe=lambda m: f"timm fused_attn (SDPA) {m.blocks[0].attn.fused_attn}")
    _no_failures(results)


def test_dropin_transformers_mim_step(record):
    from peers import hf_mim

    what = "drop-in: transformers BeitForMaskedImageModeling step"

    def build():
        return hf_mim(CFG, DEVICE, BF16)

    pixels, mask, tokens, _ = _inputs()
    n = min(pixels.shape[0], 8)
    err = _parity(build, lambda m: m.train()(pixels[:n], bool_masked_pos=mask[:n], labels=tokens[:n][mask[:n]]).loss)
    _check_parity(record, what, err)
    results: dict = {}
    ours = "transformers + beit_fast.patch (eager)"
    _time(ours, _seeded(_patched(build)), results, record, what,
          describe=lambda m: f"{_backend(m)}; MIM head on the masked rows; fp32 loss vs unpatched: rel err {err:.1e}")
    _time("transformers unpatched (SDPA, eager)", _seeded(build), results, record, what, ours,
          describe=lambda m: f"attn_implementation {m.config._attn_implementation}; head on all rows")
    _no_failures(results)
