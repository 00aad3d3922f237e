"""Triton MIM kernels against their plain-torch references: outputs and every gradient.

On the CPU they run under TRITON_INTERPRET=1 (set by conftest.py) in fp32 on small grids; the
`gpu` tests run in bf16 / fp16 on CUDA with the rule of STYLE.md: the kernel's error against a
float64 reference is at most 2x the same-dtype torch error plus a small atol.
"""

import importlib

import pytest
import torch

from beit_fast import BeitConfig, BeitForMaskedImageModeling, BlockwiseMaskGenerator
from beit_fast.kernels import _common, check_deferred
from beit_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from beit_fast.kernels.gather_layer_norm import (
    gather_masked_layer_norm,
    gather_masked_layer_norm_ref,
    masked_row_index,
)
from beit_fast.kernels.masked_embed import masked_embed, masked_embed_ref
from helpers import rel_err

# The module itself (the package attribute of that name is the function).
flce_mod = importlib.import_module("beit_fast.kernels.fused_linear_cross_entropy")
gln_mod = importlib.import_module("beit_fast.kernels.gather_layer_norm")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def _mask(B, N, p=0.4, gen=None, exact=None):
    if exact is None:
        return torch.rand(B, N, generator=gen) < p
    m = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        m[b, torch.randperm(N, generator=gen)[:exact]] = True
    return m


def _grads(out, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, g)


# -- masked_embed ----------------------------------------------------------------------------------------------------
# (37, 5, 200): more images than one backward batch step (32) and D over two 128-column blocks, the last partial.
@pytest.mark.parametrize(
    "B,N,D,pos",
    [(3, 13, 96, True), (2, 50, 192, False), (2, 7, 768, True), (1, 1, 96, False), (37, 5, 200, True)],
)
def test_masked_embed_matches_ref(B, N, D, pos):
    g = torch.Generator().manual_seed(B * 1000 + N + D)
    x = torch.randn(B, N, D, generator=g).requires_grad_()
    mask = _mask(B, N, gen=g)
    tok, cls = torch.randn(D, generator=g).requires_grad_(), torch.randn(D, generator=g).requires_grad_()
    pe = torch.randn(N + 1, D, generator=g).requires_grad_() if pos else None
    out = masked_embed(x, mask, tok, cls, pe)
    ref = masked_embed_ref(x, mask, tok, cls, pe)
    assert out.shape == (B, N + 1, D) and out.dtype == ref.dtype
    assert rel_err(out, ref) <= TOL
    dout = torch.randn(out.shape, generator=g)
    got = _grads(out, [x, tok, cls, pe], dout)
    for a, b in zip(got, _grads(ref, [x, tok, cls, pe], dout)):
        assert rel_err(a, b) <= TOL
    assert torch.count_nonzero(got[0][mask]) == 0  # masked rows get no gradient


def test_masked_embed_edge_masks_and_promotion():
    x = torch.randn(2, 5, 96, dtype=torch.float16)
    tok, cls = torch.randn(96), torch.randn(96)
    for mask in (torch.zeros(2, 5, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)):
        out = masked_embed(x, mask, tok, cls)
        ref = masked_embed_ref(x, mask, tok, cls)
        assert out.dtype == torch.float32 == ref.dtype  # fp16 x with fp32 tokens promotes, as in torch
        assert rel_err(out, ref) <= TOL
    with pytest.raises(ValueError, match="bool"):
        masked_embed(x, torch.zeros(2, 5, dtype=torch.uint8), tok, cls)
    with pytest.raises(ValueError, match="mask_token"):
        masked_embed(x, torch.zeros(2, 5, dtype=torch.bool), torch.randn(95), cls)
    with pytest.raises(ValueError, match="pos_embed"):
        masked_embed(x, torch.zeros(2, 5, dtype=torch.bool), tok, cls, torch.randn(5, 96))


# -- gather_masked_layer_norm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,N,D,K", [(3, 13, 96, None), (2, 50, 192, 19), (2, 11, 768, None), (4, 9, 100, 3)])
def test_gather_layer_norm_matches_ref(B, N, D, K):
    g = torch.Generator().manual_seed(B + N + D)
    h = (torch.randn(B, N + 1, D, generator=g) * 3 + 1).requires_grad_()
    mask = _mask(B, N, gen=g, exact=K)
    w = torch.randn(D, generator=g).requires_grad_()
    b = torch.randn(D, generator=g).requires_grad_()
    out = gather_masked_layer_norm(h, mask, w, b, 1e-6, num_masked_per_image=K)
    ref = gather_masked_layer_norm_ref(h, mask, w, b, 1e-6)
    assert out.shape == ref.shape == (int(mask.sum()), D)
    assert rel_err(out, ref) <= TOL
    dy = torch.randn(out.shape, generator=g)
    got, want = _grads(out, [h, w, b], dy), _grads(ref, [h, w, b], dy)
    for a, c in zip(got, want):
        assert rel_err(a, c) <= TOL
    dh = got[0]
    keep = torch.ones(B, N + 1, dtype=torch.bool)
    keep[:, 1:] = ~mask
    assert torch.count_nonzero(dh[keep]) == 0  # cls and unmasked rows stay zero


@pytest.mark.parametrize("B,N,D,K,progs", [(3, 13, 96, 5, 2), (2, 7, 100, 0, None), (2, 7, 100, 7, 3)])
def test_gather_layer_norm_backward_writes_every_row(monkeypatch, B, N, D, K, progs):
    """The backward writes each row of dhidden exactly (no zero-fill first): its buffer starts as NaN here, so a
    row it skipped would show. K=0 (no masked row) and K=N (every patch row) are the edges; `progs` makes each
    persistent program loop over several row tiles."""
    if progs:
        monkeypatch.setattr(gln_mod, "BWD_PROGRAMS", progs)
    empty_like = torch.empty_like
    monkeypatch.setattr(gln_mod.torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    g = torch.Generator().manual_seed(B * N + D + K)
    h = (torch.randn(B, N + 1, D, generator=g) * 2 - 1).requires_grad_()
    mask = _mask(B, N, gen=g, exact=K)
    w, b = torch.randn(D, generator=g).requires_grad_(), torch.randn(D, generator=g).requires_grad_()
    out = gather_masked_layer_norm(h, mask, w, b, 1e-6, num_masked_per_image=K)
    ref = gather_masked_layer_norm_ref(h, mask, w, b, 1e-6)
    assert out.shape == ref.shape == (B * K, D) and (K == 0 or rel_err(out, ref) <= TOL)
    dy = torch.randn(out.shape, generator=g)
    got, want = _grads(out, [h, w, b], dy), _grads(ref, [h, w, b], dy)
    for a, c in zip(got, want):
        assert torch.isfinite(a).all() and (rel_err(a, c) <= TOL if K else torch.count_nonzero(a) == 0)


def test_masked_row_index_order_and_promise():
    g = torch.Generator().manual_seed(0)
    mask = _mask(5, 17, gen=g, exact=6)
    rows = masked_row_index(mask, 6)
    assert torch.equal(rows, masked_row_index(mask))  # sort path == nonzero path
    x = torch.arange(5 * 18).view(5, 18)
    assert torch.equal(x.view(-1)[rows], x[:, 1:][mask])  # row-major mask order
    with pytest.raises(ValueError, match="num_masked_per_image=5"):
        masked_row_index(mask, 5)  # broken promise: checked at once on the CPU


# -- fused_linear_cross_entropy --------------------------------------------------------------------------------------
# M prime / odd, V not a power of two; "single": None = the launcher's choice (one pass for V <= 8192),
# an int patches SINGLE_PASS_MAX_V so that V takes the blocked two-sweep kernel; "progs" patches the persistent
# program count so that each program loops over several rows (and its d bias partial accumulates across rows
# and chunks); "chunk" patches the chunk byte budget so that the rows run in several balanced chunks.
@pytest.mark.parametrize(
    "M,D,V,bias,reduction,chunk,single,progs",
    [(37, 96, 1000, True, "mean", None, None, None), (5, 192, 8192, False, "sum", None, None, None),
     (23, 768, 1000, True, "mean", 20000, None, 3), (11, 96, 8192, True, "mean", 70000, None, None),
     (1, 192, 1000, False, "mean", None, None, None), (41, 64, 1000, True, "sum", 24000, 256, 2),
     (29, 64, 777, False, "mean", None, 256, 3), (13, 64, 8193, True, "mean", None, None, None),
     (31, 64, 777, True, "sum", None, None, 4)],
)
def test_flce_matches_ref(monkeypatch, M, D, V, bias, reduction, chunk, single, progs):
    if chunk:  # several row chunks (the 20000-byte budget holds 5 rows of V=1000 fp32)
        monkeypatch.setattr(flce_mod, "CHUNK_BYTES", chunk)
        assert flce_mod._chunk_rows(M, V, 4, chunk) < M
    if single:
        monkeypatch.setattr(flce_mod, "SINGLE_PASS_MAX_V", single)
    if progs:
        monkeypatch.setattr(flce_mod, "ROW_PROGRAMS", progs)
    assert flce_mod._row_config(V)[0] == (V <= (single or 8192))
    g = torch.Generator().manual_seed(M + D + V)
    h = torch.randn(M, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, V, (M,), generator=g)
    # Plant the answer in a few rows so num_correct is not trivially 0.
    with torch.no_grad():
        h[: M // 2] = w[t[: M // 2]] * 40
    loss, nc = fused_linear_cross_entropy(h, w, b, t, reduction)
    loss_r, nc_r = fused_linear_cross_entropy_ref(h, w, b, t, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, loss_r) <= TOL and int(nc) == int(nc_r)
    assert M < 2 or int(nc) > 0
    assert not nc.requires_grad
    got = _grads(loss * 1.7, [h, w, b], None)
    want = _grads(loss_r * 1.7, [h, w, b], None)
    for a, c in zip(got, want):
        assert a.dtype == c.dtype and rel_err(a, c) <= TOL


def test_flce_balanced_chunks():
    # BEiT-B: 9600 rows of V=8192 bf16 in a 64 MiB budget (4096 rows) -> 3 equal chunks, not 4096/4096/1408.
    assert flce_mod._chunk_rows(9600, 8192, 2, flce_mod.CHUNK_BYTES) == 3200
    for M in (9601, 4097, 12289, 131, 4096, 7):
        C = flce_mod._chunk_rows(M, 8192, 2, flce_mod.CHUNK_BYTES)
        n = -(-M // C)
        assert C <= 4096 and n == -(-M // 4096), (M, C)  # no more chunks than the budget needs
        assert M - (n - 1) * C > C // 2 or n == 1 or C % 128 == 0, (M, C)  # no small tail unless tile-rounded
    assert flce_mod._chunk_rows(23, 1000, 4, 20000) == 5  # below one GEMM tile: not rounded up


def test_flce_ties_argmax_first_like_torch():
    h, w = torch.zeros(4, 8), torch.zeros(5, 8)  # every logit equal: argmax is index 0
    t = torch.tensor([0, 1, 4, 0])
    ours, ref = fused_linear_cross_entropy(h, w, None, t)[1], fused_linear_cross_entropy_ref(h, w, None, t)[1]
    assert int(ours) == int(ref) == 2
    # Ties across V blocks: the maximum at 3 and 900 (V=1000 spans one block; V=9000 spans two at 8192).
    for V, hi in ((1000, 900), (9000, 8500)):
        b = torch.zeros(V)
        b[3] = b[hi] = 5.0
        h1, w1 = torch.zeros(2, 4), torch.zeros(V, 4)
        t1 = torch.tensor([3, hi])
        assert int(fused_linear_cross_entropy(h1, w1, b, t1)[1]) == 1


def test_flce_bad_input():
    h, w = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_cross_entropy(h, w, None, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_cross_entropy(h, w, None, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, None, torch.tensor([0, 1, 1]), reduction="none")
    with pytest.raises(ValueError, match="target"):
        fused_linear_cross_entropy(h, w, None, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(h, w, torch.zeros(4), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="no rows"):
        fused_linear_cross_entropy(h[:0], w, None, torch.zeros(0, dtype=torch.long))


def test_flce_no_grad_and_partial_grads():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(9, 96, generator=g), torch.randn(1000, 96, generator=g)
    t = torch.randint(0, 1000, (9,), generator=g)
    with torch.no_grad():
        loss, nc = fused_linear_cross_entropy(h, w, None, t)
    assert rel_err(loss, fused_linear_cross_entropy_ref(h, w, None, t)[0]) <= TOL
    wr = w.clone().requires_grad_()  # only the weight needs a gradient
    (dw,) = torch.autograd.grad(fused_linear_cross_entropy(h, wr, None, t)[0], [wr])
    (dw_r,) = torch.autograd.grad(fused_linear_cross_entropy_ref(h, wr, None, t)[0], [wr])
    assert rel_err(dw, dw_r) <= TOL


def test_deferred_checks_report_once_and_clear(monkeypatch):
    # On a GPU the flags wait in _PENDING; emulate two pending flags and one sync.
    monkeypatch.setattr(_common, "_PENDING", [(torch.tensor(False), "fine"), (torch.tensor(True), "token ids bad")])
    with pytest.raises(ValueError, match="token ids bad") as err:
        check_deferred()
    assert "fine" not in str(err.value)
    assert _common._PENDING == []
    check_deferred()  # nothing pending: no-op


# -- the model with fused_kernels True / False ----------------------------------------------------------------------
@pytest.mark.parametrize("pos,promise", [(False, True), (True, False)])
def test_model_fused_equals_reference(pos, promise):
    torch.manual_seed(0)
    cfg = BeitConfig.from_preset("tiny", depth=2, use_abs_pos_emb=pos, drop_path_rate=0.0)
    m = BeitForMaskedImageModeling(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(3, 3, 64, 64)
    mask = BlockwiseMaskGenerator(8, 26, min_num_patches=4, seed=0).batch(3)
    tok = torch.randint(0, 512, (3, 64))
    runs = {}
    for fused in (False, True):
        m.config.fused_kernels = fused
        out = m(x, mask, tok, return_logits=True, num_masked_per_image=26 if (fused and promise) else None)
        m.zero_grad()
        out.loss.backward()
        runs[fused] = (out, {n: p.grad.clone() for n, p in m.named_parameters()})
    (a, ga), (b, gb) = runs[False], runs[True]
    assert rel_err(b.loss, a.loss) <= TOL and rel_err(b.logits, a.logits) <= TOL
    assert float(a.accuracy) == float(b.accuracy) and a.num_masked == b.num_masked == 78
    for n in ga:
        assert rel_err(gb[n], ga[n]) <= TOL, n


def test_model_fused_switch_semantics(monkeypatch):
    cfg = BeitConfig.from_preset("tiny", depth=1, fused_kernels=True)
    m = BeitForMaskedImageModeling(cfg)
    x = torch.randn(2, 3, 64, 64)
    mask = BlockwiseMaskGenerator(8, 26, min_num_patches=4, seed=0).batch(2)
    tok = torch.randint(0, 512, (2, 64))
    uneven = mask.clone()
    uneven[0, (~uneven[0]).nonzero()[0]] = True
    with pytest.raises(ValueError, match="same number of masked patches"):
        m(x, uneven, tok)
    with pytest.raises(ValueError, match="num_masked_per_image=25"):
        m(x, mask, tok, num_masked_per_image=25)  # broken promise, caught at once on the CPU
    bad_tok = tok.clone()
    bad_tok[mask] = 512
    with pytest.raises(ValueError, match="out of range"):
        m(x, mask, bad_tok, num_masked_per_image=26)
    m.config.fused_kernels = "auto"
    assert m(x, uneven, tok).num_masked == 53  # "auto" falls back to the reference for unequal counts
    # Without the interpreter on a CPU, an explicit True cannot run and says why; "auto" uses the reference.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m.config.fused_kernels = True
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        m(x, mask, tok)
    m.config.fused_kernels = "auto"
    assert torch.isfinite(m(x, mask, tok).loss)


def test_model_fused_compiles_without_graph_breaks():
    torch.manual_seed(0)
    cfg = BeitConfig.from_preset("tiny", depth=1, drop_path_rate=0.0, fused_kernels=True)
    m = BeitForMaskedImageModeling(cfg)
    x = torch.randn(2, 3, 64, 64)
    mask = BlockwiseMaskGenerator(8, 26, min_num_patches=4, seed=0).batch(2)
    tok = torch.randint(0, 512, (2, 64))

    def step(x, mask, tok):
        out = m(x, mask, tok, num_masked_per_image=26)
        return out.loss, out.accuracy

    eager = step(x, mask, tok)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: any break raises
    loss, acc = compiled(x, mask, tok)
    loss.backward()
    assert rel_err(loss, eager[0]) <= TOL and float(acc) == float(eager[1])
    assert m.lm_head.weight.grad is not None and torch.isfinite(m.lm_head.weight.grad).all()


# -- GPU: bf16 / fp16 against float64, 2x the same-dtype torch error ------------------------------------------------
def _err(a, ref64):
    return float((a.double() - ref64).abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_flce_error_rule(dtype):
    """BEiT-B head (9600 x 768 x 8192, 3 chunks): loss and every gradient against a float64 reference, at most 2x
    torch's own half-precision error; fp16 gradients must not underflow (torch's do: (softmax - onehot) / M
    is ~1e-8, below fp16's smallest subnormal); peak extra memory <= 0.17 GB."""
    g = torch.Generator(device="cuda").manual_seed(0)
    M, D, V = 9600, 768, 8192
    h = torch.randn(M, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
    b = (torch.randn(V, device="cuda", generator=g) * 0.1).to(dtype).requires_grad_()
    t = torch.randint(0, V, (M,), device="cuda", generator=g)
    leaves64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    loss64 = torch.nn.functional.cross_entropy(torch.nn.functional.linear(*leaves64), t)
    ref = (loss64, *torch.autograd.grad(loss64, leaves64))
    outs = {}
    for name, fn in (("kernel", fused_linear_cross_entropy), ("torch", fused_linear_cross_entropy_ref)):
        loss, _ = fn(h, w, b, t)
        outs[name] = (loss, *torch.autograd.grad(loss, [h, w, b]))
    for i, what in enumerate(("loss", "dh", "dw", "db")):
        r = ref[i].double()
        k, tt = _err(outs["kernel"][i], r), _err(outs["torch"][i], r)
        scale = float(r.abs().max())
        assert outs["kernel"][i].dtype == outs["torch"][i].dtype, what
        assert k <= 2 * tt + (1e-6 if i == 0 else 1e-3) * scale, (what, k, tt)
        assert k <= 1e-2 * scale, (what, k, scale)  # no underflow: a few half-precision ulps of the largest value
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = fused_linear_cross_entropy(h, w, b, t)
    torch.autograd.grad(loss, [h, w, b])
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 0.17e9


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gather_ln_and_masked_embed_error_rule(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, D = 64, 196, 768
    mask = BlockwiseMaskGenerator(14, 75, seed=0).batch(B).cuda()
    h = torch.randn(B, N + 1, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(B * 75, D, device="cuda", generator=g).to(dtype)
    res = {}
    for name, fn in (("kernel", lambda *a: gather_masked_layer_norm(*a, num_masked_per_image=75)),
                     ("torch", gather_masked_layer_norm_ref)):
        y = fn(h, mask, w, b)
        res[name] = (y, *torch.autograd.grad(y, [h, w, b], dy))
    y64 = gather_masked_layer_norm_ref(h.double(), mask, w.double(), b.double())
    ref = (y64, *torch.autograd.grad(y64, [h, w, b], dy.double()))
    for i in range(4):
        k, tt = _err(res["kernel"][i], ref[i].double()), _err(res["torch"][i], ref[i].double())
        assert k <= 2 * tt + 1e-3 * float(ref[i].abs().max()), (i, k, tt)

    x = torch.randn(B, N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    tok = torch.randn(D, device="cuda", generator=g).to(dtype).requires_grad_()
    cls = torch.randn(D, device="cuda", generator=g).to(dtype).requires_grad_()
    pe = torch.randn(N + 1, D, device="cuda", generator=g).to(dtype).requires_grad_()
    dout = torch.randn(B, N + 1, D, device="cuda", generator=g).to(dtype)
    got = masked_embed(x, mask, tok, cls, pe)
    want = masked_embed_ref(x, mask, tok, cls, pe)
    w64 = masked_embed_ref(x.double(), mask, tok.double(), cls.double(), pe.double())
    gk = torch.autograd.grad(got, [x, tok, cls, pe], dout)
    gt = torch.autograd.grad(want, [x, tok, cls, pe], dout)
    g64 = torch.autograd.grad(w64, [x, tok, cls, pe], dout.double())
    for a, c, r in zip((got, *gk), (want, *gt), (w64, *g64)):
        assert _err(a, r.double()) <= 2 * _err(c, r.double()) + 1e-3 * float(r.abs().max())


def test_package_exports_functions_not_submodules():
    import beit_fast.kernels as K
    from beit_fast.kernels import (
        fused_linear_cross_entropy as f1,
        gather_masked_layer_norm as f2,
        masked_embed as f3,
        relpos_attention as f4,
        tokenizer_head_argmax as f5,
    )

    for fn in (f1, f2, f3, f4, f5, K.masked_embed, K.fused_linear_cross_entropy):
        assert callable(fn) and not isinstance(fn, type(K)), fn


def test_gather_layer_norm_without_bias_and_strict_pos_embed_shape():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 11, 96, generator=g).requires_grad_()
    mask, w = _mask(2, 10, gen=g), torch.randn(96, generator=g).requires_grad_()
    out, ref = gather_masked_layer_norm(h, mask, w, None), gather_masked_layer_norm_ref(h, mask, w, None)
    assert rel_err(out, ref) <= TOL
    dy = torch.randn(out.shape, generator=g)
    for a, b in zip(_grads(out, [h, w], dy), _grads(ref, [h, w], dy)):
        assert rel_err(a, b) <= TOL
    x, m = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    assert masked_embed(x, m, torch.zeros(8), torch.zeros(8), torch.randn(1, 6, 8)).shape == (2, 6, 8)
    with pytest.raises(ValueError, match="pos_embed"):
        masked_embed(x, m, torch.zeros(8), torch.zeros(8), torch.randn(8, 6))  # transposed: refused, not reread
