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


def _assert_grads_match(out, ref, ins, do=None, names=("dq", "dk", "dv", "dtable")):
    """Every gradient of `out` within TOL of the reference's (`do`: the output gradient; None for scalars)."""
    for name, a, b in zip(names, torch.autograd.grad(out, ins, do), torch.autograd.grad(ref, ins, do)):
        assert rel_err(a, b) <= TOL, name


def _table_and_index(N, H, g, grid=None):
    """BEiT's table for an N = h*w + 1 token grid (`grid`, or square), else a random index into a table."""
    side = int(round((N - 1) ** 0.5))
    if grid is None and side * side + 1 == N:
        grid = (side, side)
    if grid is not None:
        assert grid[0] * grid[1] + 1 == N
        index = relative_position_index(grid)
        rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    else:
        rows = 50
        index = torch.randint(0, rows, (N, N), generator=g)
    return torch.randn(rows, H, generator=g), index


@pytest.mark.parametrize(
    "B,H,N,Dh,grid",
    [(2, 2, 37, 32, None), (1, 3, 50, 64, None), (1, 2, 197, 64, None), (2, 1, 17, 80, None), (1, 1, 10, 128, None),
     (1, 1, 577, 64, None), (3, 2, 29, 32, (4, 7)), (5, 1, 16, 16, None)],
)
def test_table_bias_matches_ref(B, H, N, Dh, grid):
    """Outputs and every gradient incl. the table's; N around block edges (16 = one full block of the tail width),
    a 4x7 grid, odd batch sizes (the dk/dv programs group the batch)."""
    g = torch.Generator().manual_seed(N * 7 + Dh)
    q, k, v = (torch.randn(B, H, N, Dh, generator=g).requires_grad_() for _ in range(3))
    table, index = _table_and_index(N, H, g, grid)
    table.requires_grad_()
    out = relpos_attention(q, k, v, table, index)
    ref = relpos_attention_ref(q, k, v, table, index)
    assert out.shape == (B, H, N, Dh) and rel_err(out, ref) <= TOL
    _assert_grads_match(out, ref, [q, k, v, table], torch.randn(out.shape, generator=g))


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


def test_strided_qkv_taken_as_given_and_padded_bias_shared():
    """q, k, v as (B, N, H, Dh) buffers seen through transposes: no stack / copy of them before the kernel; one
    padded bias built once serves two calls, its gradient reaching the table through the gather."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from beit_fast.kernels.relpos_attention import relpos_bias_padded

    g = torch.Generator().manual_seed(3)
    B, N, H, Dh = 2, 26, 2, 32
    q, k, v = (torch.randn(B, N, H, Dh, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    table, index = _table_and_index(N, H, g)
    table.requires_grad_()

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    padded = relpos_bias_padded(table, index)
    with Ops() as ops:
        out = relpos_attention(q, k, v, padded_bias=padded)
    assert not [op for op in ops.seen if any(c in op for c in ("stack", "cat", "clone", "copy"))], ops.seen
    out2 = relpos_attention(q * 0.5, k, v, padded_bias=padded)
    ref = relpos_attention_ref(q, k, v, table, index)
    ref2 = relpos_attention_ref(q * 0.5, k, v, table, index)
    assert rel_err(out, ref) <= TOL and rel_err(out2, ref2) <= TOL
    do, do2 = torch.randn(out.shape, generator=g), torch.randn(out.shape, generator=g)
    _assert_grads_match((out * do).sum() + (out2 * do2).sum(), (ref * do).sum() + (ref2 * do2).sum(), [q, k, v, table])


def test_dense_bias_masking_whole_key_blocks():
    """A dense bias may be a mask: rows whose first key blocks are all -inf stay finite and match the reference."""
    g = torch.Generator().manual_seed(4)
    B, H, N, Dh = 1, 2, 50, 16
    q, k, v = (torch.randn(B, H, N, Dh, generator=g).requires_grad_() for _ in range(3))
    dense = torch.randn(H, N, N, generator=g)
    dense[:, :5, :40] = float("-inf")  # past the first 32-wide key block for rows 0-4
    out = relpos_attention(q, k, v, bias=dense)
    ref = relpos_attention_ref(q, k, v, bias=dense)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= TOL
    _assert_grads_match(out, ref, [q, k, v], torch.randn(out.shape, generator=g))


@pytest.mark.parametrize("N", [128, 20])
def test_custom_ops_pass_opcheck(N):
    """The fake impls match the real ops (shapes AND strides: torch.compile trusts them), also when N is a multiple
    of 128 and the bias needs no padding."""
    from beit_fast.kernels.relpos_attention import pad_bias

    g = torch.Generator().manual_seed(N)
    q, k, v, dout = (torch.randn(1, 2, N, 16, generator=g) for _ in range(4))
    padded = pad_bias(torch.randn(2, N, N, generator=g))
    out, lse = torch.ops.beit_fast.relpos_attention_fwd(q, k, v, padded, 0.25)
    torch.library.opcheck(torch.ops.beit_fast.relpos_attention_fwd.default, (q, k, v, padded, 0.25))
    torch.library.opcheck(torch.ops.beit_fast.relpos_attention_bwd.default,
                          (dout.transpose(1, 2).contiguous(), q, k, v, out, lse, padded, 0.25, True))
    qkv = torch.randn(1, N, 96, generator=g)
    torch.library.opcheck(torch.ops.beit_fast.relpos_attention_qkv_bwd.default,
                          (dout.transpose(1, 2).contiguous(), qkv, out, lse, 2, padded, 0.25, True))


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
    with pytest.raises(ValueError, match="padded bias must be"):
        relpos_attention(q, q, q, padded_bias=torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        relpos_attention(q.double(), q.double(), q.double())


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
    cuda32 = AttentionCase(device_type="cuda", dtype=torch.float32, head_dim=64, bias_requires_grad=True)
    assert any("float32 on a GPU" in r for r in not_supported_reasons("triton", cuda32, auto=True))
    assert not not_supported_reasons("triton", cuda32)  # by name it runs (IEEE fp32)
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
def _gpu_inputs(B, H, N, Dh, seed, dtype=torch.bfloat16):
    """q, k, v, do in `dtype` and BEiT's fp32 table + index for an N = side^2 + 1 grid, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, Dh, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3))
    side = int(round((N - 1) ** 0.5))
    index = relative_position_index((side, side)).cuda()
    table = torch.randn((2 * side - 1) ** 2 + 3, H, device="cuda", generator=g).requires_grad_()
    do = torch.randn(B, H, N, Dh, device="cuda", generator=g).to(dtype)
    return q, k, v, table, index, do


@pytest.mark.gpu
@pytest.mark.parametrize("N,Dh,H", [(197, 64, 12), (50, 80, 12), (577, 64, 12), (197, 128, 8), (577, 128, 4)])
def test_gpu_bf16_error_rule(N, Dh, H):
    q, k, v, table, index, do = _gpu_inputs(8, H, N, Dh, 0)

    def run(fn, ins):
        out = fn(*ins, index)
        return (out, *torch.autograd.grad(out, ins, do.to(out.dtype)))

    kern = run(relpos_attention, [q, k, v, table])
    torch_bf16 = run(relpos_attention_ref, [q, k, v, table])
    # float64 leaves: the exact gradients are not rounded back to bf16 on their way to the inputs
    exact = run(relpos_attention_ref, [t.detach().double().requires_grad_() for t in (q, k, v, table)])
    for name, kk, tt, ee in zip(("out", "dq", "dk", "dv", "dtable"), kern, torch_bf16, exact):
        ek = float((kk.double() - ee.double()).abs().max())
        et = float((tt.double() - ee.double()).abs().max())
        assert ek <= 2 * et + 1e-3 * float(ee.abs().max()), (name, ek, et)


@pytest.mark.gpu
@pytest.mark.parametrize("N,Dh,H", [(197, 64, 12), (577, 128, 4)])
def test_gpu_backward_is_deterministic(N, Dh, H):
    """No atomics: two identical backward calls give bitwise-equal gradients, the table's included."""
    q, k, v, table, index, do = _gpu_inputs(32, H, N, Dh, 1)
    runs = [torch.autograd.grad(relpos_attention(q, k, v, table, index), [q, k, v, table], do) for _ in range(2)]
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), *runs):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_fp32_is_ieee_not_tf32():
    """fp32 inputs: the kernel's dots are IEEE fp32 (TF32 would be ~1e-3 off)."""
    q, k, v, table, index, do = _gpu_inputs(4, 4, 197, 64, 2, torch.float32)
    out = relpos_attention(q, k, v, table, index)
    ref = relpos_attention_ref(*(t.double() for t in (q, k, v)), table.double(), index)
    assert rel_err(out, ref) <= 1e-5
    got = torch.autograd.grad(out, [q, k, v, table], do)
    want = torch.autograd.grad(ref, [q, k, v, table], do.double())
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), got, want):
        assert rel_err(a, b) <= 1e-4, name


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared_bias", "per_layer_bias"])
def test_model_triton_backend_compiles_without_graph_breaks(per_layer):
    """torch.compile(fullgraph=True) sees the kernel as custom ops (fake impls give the shapes); same loss and
    gradients as eager, the table's included."""
    cfg = BeitConfig.from_preset("tiny", depth=1, use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=not per_layer,
                                 attn_backend="triton", drop_path_rate=0.0, fused_kernels=True)
    torch.manual_seed(0)
    m = BeitForMaskedImageModeling(cfg)
    perturb(m, 5)
    x = torch.randn(2, 3, 64, 64)
    mask = BlockwiseMaskGenerator(8, 24, min_num_patches=4, seed=0).batch(2)
    tok = torch.randint(0, 512, (2, 64))

    def loss_of():
        return m(x, mask, tok, num_masked_per_image=24).loss

    def grads(loss):
        return torch.autograd.grad(loss, list(m.parameters()))

    loss_eager = loss_of()
    loss_compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")()  # fullgraph: any break raises
    assert rel_err(loss_compiled, loss_eager) <= TOL
    for (name, _), a, b in zip(m.named_parameters(), grads(loss_compiled), grads(loss_eager)):
        assert rel_err(a, b) <= TOL, name
