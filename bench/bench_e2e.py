"""The whole pretraining step, BEiT-B/16 at 224px, batch 128, 75 masked patches per image, bf16, against the peers
of `../shared/ANCHORS.md` (bench/peers.py), all in this process on this card.

- backbone step (tokens given): forward + backward + fused AdamW. Ours runs through the training loop's own
  engine (`PlainEngine`: bf16 autocast, the finite-loss check, gradient clipping at 3.0 - work the peers skip),
  eager and under `torch.compile`; the peers are timm-composed eager and compiled, and transformers' MIM model.
- full step with the online tokenizer (112px view -> 14x14 ids with the DALL-E architecture, random weights):
  ours = `DalleTokenizer(fast=True)` + our step; the peer = the `dall_e` package Encoder (fp16) + timm-composed eager.
- ZeRO-1/2 on this one GPU (`DeepSpeedEngine`, one process) against the plain engine, when DeepSpeed imports.
- fine-tuning step (issue 12): `BeitForImageClassification` in unilm's fine-tuning layout (per-layer relative
  position tables, drop path 0.1, mean-pool + fc_norm head, 1000 classes), the Triton attention asked for by name,
  through `PlainEngine` (bf16 autocast, no clipping as unilm fine-tunes: the norm is still computed) with
  `build_optimizer(layer_decay=0.65)`; against timm's `beit_base_patch16_224` (SDPA attention with the table as
  `attn_mask`) with torch AdamW (fused on CUDA) on timm's own layer-decay groups. Both: bf16 autocast forward,
  timm's `SoftTargetCrossEntropy` on fp32 logits against a fixed mixup-style soft target (mixup itself is not
  timed), eager. Before timing: timm's weights loaded into ours give the same fp32 logits, and ours must resolve
  its attention to "triton" under the step's autocast (on CUDA; the row's note says which backend ran).
- segmentation step (issue 13): `BeitForSemanticSegmentation` in unilm's ADE20K layout (BEiT-B/16 at 512px, so
  N = 1025 tokens; per-layer tables, drop path 0.1; blocks [3, 5, 7, 11] -> multi-scale adapter -> UperNet at 768
  channels + the auxiliary FCN head; 150 classes), batch 16, as train/segment.py runs it: `PlainEngine` (bf16
  autocast, no clipping), forward with the aux logits, `segmentation_loss` (CE + 0.4 x aux CE at the labels'
  resolution, ignore 255), backward, `build_optimizer(layer_decay=0.65)`; its attention resolved by "auto" must be
  "triton" on CUDA. Against transformers' `BeitForSemanticSegmentation` (SDPA) with its own loss and fused AdamW on
  the same layer-decay groups. transformers cannot feed the last block to its pyramid (`peers.hf_out_indices`): its
  blocks are [3, 5, 7, 10], so its backward skips block 11's (estimated < 1% of the step, the decoder's convs at
  stride 4 dominate; the comparison leans its way). Before timing: ours built from the transformers model
  (`from_transformers`) gives the same fp32 logits, auxiliary logits and loss.

Correctness first: ours and timm-composed load the same weights and must give the same loss (fp32) before
anything is timed. Reported: median ms per step (CUDA events), img/s, absolute peak memory of the step, and
`speedup_of_ours` = peer ms / our ms. `BEIT_BENCH_SMOKE=1`: the tiny preset at batch 2 on the CPU (code paths only;
the fine-tuning row runs the Triton attention through the interpreter when TRITON_INTERPRET=1).
`BEIT_BENCH_QUICK=1` (the GPU suite's quick part): the backbone step of ours and timm-composed, the fine-tuning
step and the segmentation step (8 timed steps instead of 15), eager only (nothing compiled by inductor); the other
rows are recorded as not run.
"""

from __future__ import annotations

import gc

import pytest
import torch
from benchutil import AVAILABLE, DEVICE, QUICK, SMOKE, median_ms

from beit_fast import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, BeitModel
from beit_fast.kernels import triton_reasons
from beit_fast.train.engine import PlainEngine
from beit_fast.train.pretrain import build_mask_generator

pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason="end-to-end benchmarks need a CUDA device (or BEIT_BENCH_SMOKE=1 for a CPU smoke run)"
)

if SMOKE:
    CFG = BeitConfig.from_preset("tiny", depth=2)
    B, TOK = 2, dict(n_hid=16, n_blk_per_group=1, vocab_size=512)
else:
    CFG = BeitConfig.from_preset("base", drop_path_rate=0.1)
    B, TOK = 128, dict(n_hid=256, n_blk_per_group=2, vocab_size=8192)
BF16 = DEVICE == "cuda"
COMPILE_BACKEND = "aot_eager" if SMOKE else "inductor"
K = CFG.num_masking_patches
TOK_SIZE = CFG.grid_size * 8  # the dVAE downsamples 8x: 112px -> 14x14 for base
BENCH = f"e2e {'tiny' if SMOKE else 'base'} B={B} {'bf16' if BF16 else 'fp32'}"
# Fine-tuning: unilm's layout, the Triton attention by name (on the CPU only under the interpreter: the smoke run)
FT_ATTN = "triton" if DEVICE == "cuda" or not triton_reasons(DEVICE) else "auto"
FT_CFG = CFG.replace(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, drop_path_rate=0.1, attn_backend=FT_ATTN)
FT_CLASSES = 1000
FT_LR = 4e-3 * B / 1024  # unilm's base fine-tuning lr, scaled linearly (the value does not change the timing)
# timm's registered model as is at full size; the smoke run gives it our tiny shapes
FT_TIMM_SHAPES = (dict(img_size=CFG.img_size, patch_size=CFG.patch_size, embed_dim=CFG.embed_dim, depth=CFG.depth,
                       num_heads=CFG.num_heads) if SMOKE else {})


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 3, CFG.img_size, CFG.img_size, generator=g).to(DEVICE)
    mask = build_mask_generator(CFG, "block", seed=seed).batch(B).to(DEVICE)
    tokens = torch.randint(0, CFG.vocab_size, (B, CFG.num_patches), generator=g).to(DEVICE)
    tok_view = torch.rand(B, 3, TOK_SIZE, TOK_SIZE, generator=g).to(DEVICE)
    return pixels, mask, tokens, tok_view


def _ours(compile_mode: str = "", cfg: BeitConfig = CFG):
    from beit_fast.train.optim import build_optimizer

    model = BeitForMaskedImageModeling(cfg).to(DEVICE).train()
    engine = PlainEngine(model, build_optimizer(model, lr=1e-4, weight_decay=0.05), device=torch.device(DEVICE),
                         bf16=BF16, clip_grad=3.0, grad_accum=1)
    if compile_mode:
        engine._forward = torch.compile(model, backend=COMPILE_BACKEND, mode=None if SMOKE else compile_mode,
                                        dynamic=False)
    return model, _engine_step(engine)


def _engine_step(engine):
    def step(pixels, mask, tokens):
        out = engine.forward(pixels, mask, tokens, num_masked_per_image=K)
        if engine.all_finite(out.loss)[0]:
            engine.backward(out.loss)
            engine.step()
        return out.loss.detach()

    return step


def _peak_gb(fn) -> float:
    if DEVICE != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def _free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _measure(build, tokenize, inputs=None, describe=None, iters: int = 15) -> tuple:
    """(median ms, peak GB, note) of one implementation's step; its model and optimizer die with this frame.
    `inputs()`: the step's arguments (default: the MIM batch); `describe(model)`: the row's note, called after the
    build and before any step (it may assert what the timing must measure); `iters`: timed steps (after 3)."""
    if inputs is not None:
        args = inputs()
        model, step = build()

        def fn():
            return step(*args)
    else:
        pixels, mask, tokens, tok_view = _inputs()
        model, step = build()

        def fn():
            return step(pixels, mask, tokenize(tok_view) if tokenize is not None else tokens)

    note = describe(model) if describe is not None else ""
    fn()  # compile / autotune outside the timing
    return median_ms(fn, warmup=3, iters=5 if SMOKE else iters), _peak_gb(fn), note


def _time(name: str, build, results: dict, record, what: str, ours_key: str = "", tokenize=None,
          ratio: str = "speedup_of_ours", inputs=None, describe=None, bench: str = BENCH, batch: int = B,
          iters: int = 15) -> None:
    """Build one implementation, time its step, record it, free it. A failure is recorded, and the test fails at
    its end (after the other implementations ran). `inputs`, `describe`, `iters`: see `_measure`; `bench`, `batch`:
    the row's label and images per step (img/s), for a row not at the MIM batch."""
    try:
        ms, peak, note = _measure(build, tokenize, inputs, describe, iters)
    except Exception as exc:
        record(bench=f"{bench} {what}", impl=name, ms=float("nan"), note=f"{type(exc).__name__}: {exc}"[:200])
        results.setdefault("_failed", []).append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        return
    finally:
        _free()
    results[name] = ms
    row = dict(bench=f"{bench} {what}", impl=name, ms=ms, img_per_s=batch / ms * 1e3, peak_gb=peak)
    if ours_key and ours_key in results:
        row[ratio] = ms / results[ours_key]
    if note:
        row["note"] = note
    record(**row)


def _fastest(results: dict) -> str:
    timed = {k: v for k, v in results.items() if k != "_failed"}
    return min(timed, key=timed.get) if timed else ""


def _no_failures(results: dict) -> None:
    assert not results.get("_failed"), results["_failed"]


def test_e2e_parity_with_timm_composed():
    """Same weights, same batch: our MIM loss equals the timm-composed peer's (fp32)."""
    from peers import TimmComposedMIM

    torch.manual_seed(0)
    ours = BeitForMaskedImageModeling(CFG.replace(drop_path_rate=0.0)).to(DEVICE).eval()
    peer = TimmComposedMIM(CFG.replace(drop_path_rate=0.0)).to(DEVICE).eval()
    sd = ours.export_state_dict("unilm")
    head = ("lm_head", "norm.", "mask_token")
    missing, unexpected = peer.beit.load_state_dict(
        {k: v for k, v in sd.items() if not k.startswith(head) and "relative_position_index" not in k}, strict=False
    )
    assert not unexpected, unexpected
    assert all(k.startswith(("fc_norm", "head", "norm")) or "relative_position_index" in k for k in missing), missing
    with torch.no_grad():
        peer.mask_token.copy_(ours.mask_token)
        peer.norm.load_state_dict(ours.norm.state_dict())
        peer.lm_head.load_state_dict(ours.lm_head.state_dict())
    pixels, mask, tokens, _ = _inputs(1)
    n = min(B, 8)
    with torch.no_grad():
        a = ours(pixels[:n], mask[:n], tokens[:n]).loss.float()
        b = peer(pixels[:n], mask[:n], tokens[:n])[0].float()
    assert torch.allclose(a, b, rtol=2e-3), (float(a), float(b))


def test_e2e_backbone_step(record):
    from peers import hf_mim, timm_composed

    results: dict = {}
    what = "backbone step (tokens given)"
    _time("beit-fast (engine, eager)", lambda: _ours(), results, record, what)
    if QUICK:
        _time("timm-composed eager", lambda: timm_composed(CFG, DEVICE, BF16), results, record, what,
              "beit-fast (engine, eager)")
        for name in ("beit-fast (engine, torch.compile)", "timm-composed torch.compile",
                     "transformers BeitForMaskedImageModeling (sdpa)"):
            record(bench=f"{BENCH} {what}", impl=name, ms=float("nan"), note="not run in the quick suite")
        _no_failures(results)
        return
    _time("beit-fast (engine, torch.compile)", lambda: _ours("default"), results, record, what)
    ours = _fastest(results)
    _time("timm-composed eager", lambda: timm_composed(CFG, DEVICE, BF16), results, record, what, ours)
    _time("timm-composed torch.compile", lambda: timm_composed(CFG, DEVICE, BF16, COMPILE_BACKEND), results, record,
          what, ours)
    _time("transformers BeitForMaskedImageModeling (sdpa)", lambda: hf_mim(CFG, DEVICE, BF16), results, record,
          what, ours)
    _no_failures(results)


def test_e2e_pixel_target_step(record):
    """The pixel-regression ablation's step (`--target pixels`: the Linear(D, P*P*3) head + MSE in torch, no tokenizer)
    against the token-target step with the tokens given, i.e. minus the tokenizer (issue 14's target: <= 1.0)."""
    results: dict = {}
    what = "MIM target step (tokens given vs pixel regression)"
    tokens = "beit-fast tokens (engine, eager)"
    _time(tokens, lambda: _ours(), results, record, what)
    _time("beit-fast pixels (engine, eager)", lambda: _ours(cfg=CFG.replace(mim_target="pixels")), results, record,
          what, tokens, ratio="ms_over_token_step")
    _no_failures(results)


# -- fine-tuning (issue 12) -------------------------------------------------------------------------------------------
# max|ours - timm| / max|timm| of fp32 logits, TF32 off. Tighter than the MIM loss check above: a flipped, zeroed or
# head-rolled table of one layer, or its 3 cls rows zeroed, moves the logits by 6e-4..4e-3 (tiny preset); fp32 ~2e-7
FT_PARITY_RTOL = 1e-4


def _ft_inputs(seed: int = 0) -> tuple:
    """(pixels (B, 3, H, W), soft targets (B, FT_CLASSES)): mixup-style targets (each label mixed 0.7 / 0.3 with its
    batch mirror's, label smoothing 0.1) made once by timm's `mixup_target`, so no mixup runs in the timed step."""
    from timm.data.mixup import mixup_target

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 3, CFG.img_size, CFG.img_size, generator=g)
    labels = torch.randint(0, FT_CLASSES, (B,), generator=g)
    return pixels.to(DEVICE), mixup_target(labels, FT_CLASSES, lam=0.7, smoothing=0.1).to(DEVICE)


def _ours_finetune():
    from timm.loss import SoftTargetCrossEntropy

    from beit_fast.train.optim import build_optimizer

    model = BeitForImageClassification(FT_CFG, num_classes=FT_CLASSES).to(DEVICE).train()
    engine = PlainEngine(model, build_optimizer(model, lr=FT_LR, weight_decay=0.05, layer_decay=0.65),
                         device=torch.device(DEVICE), bf16=BF16, clip_grad=0.0, grad_accum=1)
    criterion = SoftTargetCrossEntropy()

    def step(pixels, soft_targets):
        # as the fine-tuning script computes it: the forward under the engine's autocast, the loss on fp32 logits
        loss = criterion(engine.forward(pixels).float(), soft_targets)
        if engine.all_finite(loss)[0]:
            engine.backward(loss)
            engine.step()
        return loss.detach()

    return model, step


def _ours_attention(model: BeitModel) -> str:
    """The backend the timed forward of `model` (a BEiT encoder: the classifier, or a segmentation backbone)
    resolves (train mode, grad on, the step's autocast); on CUDA it must be the Triton kernel, or the row would not
    measure it."""
    probe = torch.empty(1, device=DEVICE)  # attention_backend reads only its device and dtype
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
        backend = model.attention_backend(probe)
    if DEVICE == "cuda" and backend != "triton":
        raise AssertionError(f"the timed forward resolves attention backend {backend!r}, not 'triton'")
    return f"attention backend {backend}"


def _finetune_parity() -> float:
    """max|ours - timm| / max|timm| of the fp32 logits (eval: no drop path), timm's weights loaded into ours."""
    from peers import timm_beit_classifier

    torch.manual_seed(0)
    peer = timm_beit_classifier(FT_CLASSES, **FT_TIMM_SHAPES)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # timm starts the tables and q/v biases at zero and layer scale at 0.1: large noise on the tables and the
        # layer scales makes attention's bias visible in the logits, small noise on the rest makes every tensor count
        for name, p in peer.named_parameters():
            big = "relative_position_bias_table" in name or "gamma" in name
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if big else 0.02))
    ours = BeitForImageClassification(FT_CFG, num_classes=FT_CLASSES)
    ours.load_pretrained(peer.state_dict())  # strict: every key converted and used, no shape mismatch
    ours, peer = ours.to(DEVICE).eval(), peer.to(DEVICE).eval()
    pixels = _ft_inputs(1)[0][: min(B, 8)]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # cuDNN's default is TF32
    try:
        with torch.no_grad():
            a, b = ours(pixels).float(), peer(pixels).float()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return float((a - b).abs().max() / b.abs().max())


def test_e2e_finetune_step(record):
    """One fine-tuning step (issue 12's target): ours on the Triton attention against timm's beit_base_patch16_224,
    eager, after the same weights gave the same fp32 logits."""
    from peers import timm_finetune

    what = "fine-tuning step (per-layer tables, soft-target CE)"
    err = _finetune_parity()
    _free()
    if not err <= FT_PARITY_RTOL:
        record(bench=f"{BENCH} {what}", impl="parity: ours vs timm, fp32 logits", ms=float("nan"),
               note=f"rel err {err:.2e} > {FT_PARITY_RTOL}: not timed")
    assert err <= FT_PARITY_RTOL, f"fp32 logits differ from timm's: max rel err {err:.3e}"
    results: dict = {}
    ours = "beit-fast BeitForImageClassification (engine, eager)"
    _time(ours, _ours_finetune, results, record, what, inputs=_ft_inputs,
          describe=lambda m: f"{_ours_attention(m)}; fp32 logits vs timm: rel err {err:.1e}")
    _time("timm beit_base_patch16_224 eager", lambda: timm_finetune(FT_CLASSES, DEVICE, BF16, FT_LR, **FT_TIMM_SHAPES),
          results, record, what, ours, inputs=_ft_inputs,
          describe=lambda m: f"timm fused_attn (SDPA) {m.blocks[0].attn.fused_attn}; create_optimizer_v2 groups")
    _no_failures(results)



# -- segmentation (issue 13) ------------------------------------------------------------------------------------------
# unilm's ADE20K fine-tuning (SPEC section 8): BEiT-B/16 at 512px (N = 1025), 150 classes, batch 16 per GPU, lr 7e-4 at
# batch 16; "auto" attention as train/segment.py runs it (on CUDA in bf16 it must resolve to the Triton kernel; on
# the CPU only the interpreter runs it, so the smoke run asks for it by name). Smoke: the same code at img 64, width
# 64, depth 6 (depth 6, not 4: transformers can then feed the pyramid from 4 blocks, [1, 2, 3, 4] against our
# [1, 2, 3, 5]; see `peers.hf_out_indices`)
SEG_CLASSES, SEG_IGNORE = 150, 255
SEG_ATTN = "auto" if DEVICE == "cuda" else FT_ATTN
_SEG_SHAPES = dict(img_size=64, embed_dim=64, depth=6, num_heads=4) if SMOKE else dict(img_size=512)
SEG_CFG = BeitConfig.from_preset("base", **_SEG_SHAPES, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                                 drop_path_rate=0.1, attn_backend=SEG_ATTN)
SEG_B = 2 if SMOKE else 16
SEG_LR = 7e-4 * SEG_B / 16
SEG_BENCH = f"e2e {'tiny' if SMOKE else 'base'} {SEG_CFG.img_size}px B={SEG_B} {'bf16' if BF16 else 'fp32'}"
SEG_ITERS = 8 if QUICK else 15  # ~0.2-0.4 s a step on an H100 (estimate): the quick suite keeps its time limit
SEG_PARITY_RTOL = FT_PARITY_RTOL  # the same bound, on the logits and on the loss (CE + 0.4 aux CE)


def _seg_inputs(seed: int = 0) -> tuple:
    """(pixels (SEG_B, 3, S, S), labels (SEG_B, S, S) int64 in [0, SEG_CLASSES) with ~5% ignore pixels)."""
    g = torch.Generator().manual_seed(seed)
    S = SEG_CFG.img_size
    pixels = torch.randn(SEG_B, 3, S, S, generator=g)
    labels = torch.randint(0, SEG_CLASSES, (SEG_B, S, S), generator=g)
    labels[torch.rand(SEG_B, S, S, generator=g) < 0.05] = SEG_IGNORE
    return pixels.to(DEVICE), labels.to(DEVICE)


def _ours_segment():
    from beit_fast.segmentation import BeitForSemanticSegmentation, segmentation_loss
    from beit_fast.train.optim import build_optimizer

    model = BeitForSemanticSegmentation(SEG_CFG, SEG_CLASSES).to(DEVICE).train()  # UperNet at 768, aux head
    engine = PlainEngine(model, build_optimizer(model, lr=SEG_LR, weight_decay=0.05, layer_decay=0.65),
                         device=torch.device(DEVICE), bf16=BF16, clip_grad=0.0, grad_accum=1)

    def step(pixels, labels):
        # as train/segment.py's loop: the forward under the engine's autocast, the loss outside it (fp32 logits)
        logits, aux = engine.forward(pixels, return_aux=True)
        loss = segmentation_loss(logits, labels, aux, ignore_index=SEG_IGNORE, aux_weight=0.4)[0]
        if engine.all_finite(loss)[0]:
            engine.backward(loss)
            engine.step()
        return loss.detach()

    return model, step


def _seg_peer_indices() -> list:
    from peers import hf_out_indices

    from beit_fast.segmentation import default_out_indices

    return hf_out_indices(default_out_indices(SEG_CFG.depth), SEG_CFG.depth)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def _segment_parity() -> tuple:
    """({what: error}, the blocks ours read) of ours built from a transformers model by `from_transformers` (fp32,
    eval: no drop path, BatchNorm on its running statistics, TF32 off): max|ours - hf| / max|hf| of the logits and
    of the auxiliary head's logits (transformers does not return them: a forward hook takes them), and of the loss
    (CE + 0.4 aux CE at the labels' size, ignore 255: each side's own)."""
    from peers import hf_beit_segmenter

    from beit_fast.segmentation import BeitForSemanticSegmentation, segmentation_loss

    torch.manual_seed(0)
    peer = hf_beit_segmenter(SEG_CFG, SEG_CLASSES, _seg_peer_indices())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # transformers starts the tables at zero and layer scale at 0.1: large noise there makes the relative position
        # bias count in the logits, small noise on the rest makes every tensor count; running statistics off (0, 1)
        # so BatchNorm's buffers count too
        for name, p in peer.named_parameters():
            big = "relative_position_bias_table" in name or "lambda_" in name
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if big else 0.02))
        for name, buf in peer.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.mul_(torch.rand(buf.shape, generator=g) + 0.5)
    # strict load of every tensor; the Triton attention by name on CUDA (fp32: IEEE), as in the fine-tuning parity
    ours = BeitForSemanticSegmentation.from_transformers(peer, config={"attn_backend": FT_ATTN})
    blocks = list(ours.out_indices)
    ours, peer = ours.to(DEVICE).eval(), peer.to(DEVICE).eval()
    pixels, labels = (t[: min(SEG_B, 2)] for t in _seg_inputs(1))
    peer_aux = []
    hook = peer.auxiliary_head.register_forward_hook(lambda mod, args, out: peer_aux.append(out))
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # cuDNN's default is TF32
    try:
        with torch.no_grad():
            logits, aux = ours(pixels, return_aux=True)
            loss = segmentation_loss(logits, labels, aux, ignore_index=SEG_IGNORE, aux_weight=0.4)[0]
            out = peer(pixel_values=pixels, labels=labels)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        hook.remove()
    errors = {"logits": _rel_err(logits, out.logits), "aux logits": _rel_err(aux, peer_aux[0]),
              "loss": _rel_err(loss, out.loss)}
    return errors, blocks


def test_e2e_segment_step(record):
    """One segmentation training step at 512px (issue 13's target): ours (Triton attention at N = 1025) against
    transformers' BeitForSemanticSegmentation with SDPA, eager, after the same weights gave the same fp32 logits."""
    from peers import hf_segment

    what = "segmentation step (UperNet + aux, CE ignore 255)"
    peer_indices = _seg_peer_indices()
    errors, peer_blocks = _segment_parity()
    _free()
    parity = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    bad = {k: v for k, v in errors.items() if not v <= SEG_PARITY_RTOL}
    if bad:
        record(bench=f"{SEG_BENCH} {what}", impl="parity: ours vs transformers, fp32", ms=float("nan"),
               note=f"rel err {parity} (bound {SEG_PARITY_RTOL}): not timed")
    assert not bad, f"fp32 outputs differ from transformers' (max rel err > {SEG_PARITY_RTOL}): {bad}"
    results: dict = {}
    ours = "beit-fast BeitForSemanticSegmentation (engine, eager)"
    n = SEG_CFG.num_patches + 1
    _time(ours, _ours_segment, results, record, what, inputs=_seg_inputs, bench=SEG_BENCH, batch=SEG_B,
          iters=SEG_ITERS,
          describe=lambda m: f"{_ours_attention(m.backbone)} at N={n}; blocks {m.out_indices}; fp32 vs "
                             f"transformers, rel err: {parity}")
    _time("transformers BeitForSemanticSegmentation (sdpa) eager",
          lambda: hf_segment(SEG_CFG, SEG_CLASSES, peer_indices, DEVICE, BF16, SEG_LR), results, record, what, ours,
          inputs=_seg_inputs, bench=SEG_BENCH, batch=SEG_B, iters=SEG_ITERS,
          describe=lambda m: f"attn {getattr(m.config, '_attn_implementation', '?')}; out_indices {peer_indices} = "
                             f"blocks {peer_blocks} (the last one is out of its reach); AdamW on layer-decay groups")
    _no_failures(results)

def test_e2e_full_step_with_tokenizer(record):
    from peers import dalle_encoder, timm_composed

    from beit_fast.tokenizer import DalleEncoder, DalleTokenizer

    results: dict = {}
    what = "full step (online DALL-E tokenizer)"
    ours_tok = DalleTokenizer(DalleEncoder(**TOK).to(DEVICE), image_size=TOK_SIZE, fast=not SMOKE)
    _time("beit-fast (DalleTokenizer fast + engine, eager)", lambda: _ours(), results, record, what,
          tokenize=ours_tok.tokenize)
    _time("beit-fast (DalleTokenizer fast + engine, torch.compile)", lambda: _ours("default"),
          results, record, what, tokenize=ours_tok.tokenize)
    del ours_tok
    _free()
    ours = _fastest(results)
    label, peer_tok = dalle_encoder(device=DEVICE, **TOK)
    _time(f"timm-composed eager + {label}", lambda: timm_composed(CFG, DEVICE, BF16), results, record, what, ours,
          tokenize=peer_tok)
    _no_failures(results)


def test_e2e_zero_one_gpu(record):
    """ZeRO-1 and ZeRO-2 in one process against the plain engine (target: within 5%)."""
    from beit_fast.train.engine import DeepSpeedEngine, deepspeed_reasons, init_distributed_env
    from beit_fast.train.optim import build_optimizer

    what = "ZeRO on one device"
    init_distributed_env(DEVICE)
    reason = deepspeed_reasons()
    results: dict = {}
    _time("plain engine (eager)", lambda: _ours(), results, record, what)
    if reason:
        record(bench=f"{BENCH} {what}", impl="DeepSpeed ZeRO-1/2", ms=float("nan"), note=reason[:200])
        return
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)

    def build(stage):
        def make():
            model = BeitForMaskedImageModeling(CFG).to(DEVICE).train()
            engine = DeepSpeedEngine(model, build_optimizer(model, lr=1e-4, weight_decay=0.05),
                                     device=torch.device(DEVICE), bf16=BF16, clip_grad=3.0, grad_accum=1,
                                     micro_batch=B, zero_stage=stage)
            return model, _engine_step(engine)

        return make

    for stage in (1, 2):
        _time(f"DeepSpeed ZeRO-{stage} (1 process)", build(stage), results, record, what, "plain engine (eager)",
              ratio="time_vs_plain")
    _no_failures(results)
