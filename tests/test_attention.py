"""Relative-position-bias attention: the Triton kernel against the reference, the dispatcher, the model.

CPU: Triton interpreter (TRITON_INTERPRET=1 from conftest), fp32, small B. GPU (`gpu` marker): bf16 with
the 2x-torch-error rule against a float64 reference.
"""

import pytest
import torch

from beit_fast import BeitConfig, BeitForMaskedImageModeling, BlockwiseMaskGenerator
from beit_fast.attention import AttentionCase, available_backends, not_supported_reasons, select_backend
from beit_fast.kernels.relpos_attention import relpos_attention, relpos_attention_qkv, relpos_attention_ref
from beit_fast.model import relative_position_index
from helpers import perturb, rel_err

TOL = 1e-5


def _table_and_index(N, H, g):
    """BEiT's table for an N = h*w + 1 token grid, else a random index into a table of the same form."""
    side = int(round((N - 1) ** 0.5))
    if side * side + 1 == N:
        index = relative_position_index((side, side))
        rows = (2 * side - 1) ** 2 + 3
    else:
        rows = 50
        index = torch.randint(0, rows, (N, N), generator=g)
    return torch.randn(rows, H, generator=g), index


@pytest.mark.parametrize(
    "B,H,N,Dh", [(2, 2, 37, 32), (1, 3, 50, 64), (1, 2, 197, 64), (2, 1, 17, 80), (1, 1, 10, 128), (1, 1, 577, 64)]
)
def test_table_bias_matches_ref(B, H, N, Dh):
    g = torch.Generator().manual_seed(N * 7 + Dh)
    q, k, v = (torch.randn(B, H, N, Dh, generator=g).requires_grad_() for _ in range(3))
    table, index = _table_and_index(N, H, g)
    table.requires_grad_()
    out = relpos_attention(q, k, v, table, index)
    ref = relpos_attention_ref(q, k, v, table, index)
    assert out.shape == (B, H, N, Dh) and rel_err(out, ref) <= TOL
    do = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [q, k, v, table], do)
    want = torch.autograd.grad(ref, [q, k, v, table], do)
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), got, want):
        assert rel_err(a, b) <= TOL, name


def test_dense_bias_and_no_bias_and_scale():
    g = torch.Generator().manual_seed(0)
    B, H, N, Dh = 2, 2, 23, 32
    q, k, v = (torch.randn(B, H, N, Dh, generator=g).requires_grad_() for _ in range(3))
    dense = torch.randn(H, N, N, generator=g).requires_grad_()
    for bias, scale in ((dense, None), (None, 0.3)):
        out = relpos_attention(q, k, v, bias=bias, scale=scale)
        ref = relpos_attention_ref(q, k, v, bias=bias, scale=scale)
        assert rel_err(out, ref) <= TOL
        ins = [q, k, v] + ([dense] if bias is not None else [])
        do = torch.randn(out.shape, generator=g)
        for a, b in zip(torch.autograd.grad(out, ins, do), torch.autograd.grad(ref, ins, do)):
            assert rel_err(a, b) <= TOL


def test_packed_qkv_entry_point():
    g = torch.Generator().manual_seed(1)
    B, N, H, Dh = 2, 17, 2, 32
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g).requires_grad_()
    table, index = _table_and_index(N, H, g)
    out = relpos_attention_qkv(qkv, H, table, index)
    q, k, v = qkv.view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    ref = relpos_attention_ref(q, k, v, table, index).transpose(1, 2).reshape(B, N, H * Dh)
    assert out.shape == (B, N, H * Dh) and rel_err(out, ref) <= TOL
    do = torch.randn(out.shape, generator=g)
    (a,) = torch.autograd.grad(out, [qkv], do)
    (b,) = torch.autograd.grad(ref, [qkv], do)
    assert rel_err(a, b) <= TOL


def test_bad_arguments():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="bias_index"):
        relpos_attention(q, q, q, torch.randn(7, 2), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="bias_table"):
        relpos_attention(q, q, q, torch.randn(7, 3), torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim"):
        relpos_attention(*(torch.randn(1, 1, 4, 160) for _ in range(3)))
    with pytest.raises(ValueError, match="not both"):
        relpos_attention(q, q, q, torch.randn(7, 2), torch.zeros(5, 5, dtype=torch.long), bias=torch.zeros(2, 5, 5))


# -- dispatcher ------------------------------------------------------------------------------------------------------
def test_dispatcher_reasons_and_auto(monkeypatch):
    cpu = AttentionCase(device_type="cpu", dtype=torch.float32, head_dim=64, bias_requires_grad=True)
    # "auto" never picks the interpreter; by name it runs (tests set TRITON_INTERPRET=1).
    assert select_backend("auto", cpu) == "sdpa"
    assert select_backend("triton", cpu) == "triton"
    assert not_supported_reasons("triton", cpu, auto=True)
    assert "xformers has no CPU kernels" in not_supported_reasons("xformers", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not_supported_reasons("triton", AttentionCase("cpu", torch.float32, 160, True))  # head_dim > 128
    assert not_supported_reasons("triton", AttentionCase("cpu", torch.float32, 64, True, dropout_p=0.1))
    info = available_backends("cpu")
    assert set(info) == {"triton", "xformers", "sdpa", "math"} and info["math"] == []
    with pytest.raises(ValueError, match="unknown attention backend"):
        not_supported_reasons("flash", cpu)


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared_bias", "per_layer_bias"])
def test_model_triton_backend_equals_math(per_layer):
    cfg = BeitConfig.from_preset("tiny", depth=2, use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=not per_layer,
                                 attn_backend="math", drop_path_rate=0.0, fused_kernels=False)
    torch.manual_seed(0)
    a = BeitForMaskedImageModeling(cfg)
    perturb(a, 3)
    b = BeitForMaskedImageModeling(cfg.replace(attn_backend="triton"))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    mask = BlockwiseMaskGenerator(8, 24, min_num_patches=4, seed=0).batch(2)
    tok = torch.randint(0, 512, (2, 64))
    grads = []
    for m in (a, b):
        out = m(x, mask, tok)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (la, ga), (lb, gb) = grads
    assert b.attention_backend(x) == "triton" and a.attention_backend(x) == "math"
    assert rel_err(lb, la) <= TOL
    for n in ga:
        assert rel_err(gb[n], ga[n]) <= TOL, n
    table = "blocks.1.attn.relative_position_bias_table" if per_layer else "rel_pos_bias.relative_position_bias_table"
    assert float(gb[table].abs().max()) > 0


# -- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("N,Dh", [(197, 64), (50, 80), (577, 64)])
def test_gpu_bf16_error_rule(N, Dh):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H = 8, 12
    q, k, v = (torch.randn(B, H, N, Dh, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(3))
    side = int(round((N - 1) ** 0.5))
    index = relative_position_index((side, side)).cuda()
    table = (torch.randn((2 * side - 1) ** 2 + 3, H, device="cuda", generator=g)).requires_grad_()
    do = torch.randn(B, H, N, Dh, device="cuda", generator=g).bfloat16()
    ins = [q, k, v, table]

    def run(fn, *args):
        out = fn(*args)
        return (out, *torch.autograd.grad(out, ins, do.to(out.dtype)))

    kern = run(relpos_attention, q, k, v, table, index)
    torch_bf16 = run(relpos_attention_ref, q, k, v, table, index)
    exact = run(lambda *a: relpos_attention_ref(*(t.double() for t in a[:3]), a[3].double(), a[4]), q, k, v, table,
                index)
    for name, kk, tt, ee in zip(("out", "dq", "dk", "dv", "dtable"), kern, torch_bf16, exact):
        ek = float((kk.double() - ee.double()).abs().max())
        et = float((tt.double() - ee.double()).abs().max())
        assert ek <= 2 * et + 1e-3 * float(ee.abs().max()), (name, ek, et)
