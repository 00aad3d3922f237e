"""Checkpoint interop (SPEC section 2): unilm round trips, key checks, bias adaptation, resizing, files,
atomic saving. "base" widths (768, 12 heads, 224 px), depth 2, fp32 on CPU."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
import torch

from beit_fast import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling
from beit_fast.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    atomic_save,
    convert_state_dict,
    resize_rel_pos_bias,
    shared_to_per_layer_rel_pos_bias,
)
from beit_fast.model import relative_position_index
from helpers import spec_index  # noqa: E402

D, HEADS, DEPTH, VOCAB, GRID = 768, 12, 2, 8192, 14
ROWS = (2 * GRID - 1) ** 2 + 3  # 732


# -- helpers -------------------------------------------------------------------------------------------------------
_SPEC_INDEX_14 = None


def spec_index_14() -> torch.Tensor:
    global _SPEC_INDEX_14
    if _SPEC_INDEX_14 is None:
        _SPEC_INDEX_14 = spec_index(14, 14)
    return _SPEC_INDEX_14.clone()


def config(per_layer: bool = False, **kw) -> BeitConfig:
    return BeitConfig.from_preset(
        "base", depth=DEPTH, drop_path_rate=0.0, use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=not per_layer, **kw
    )


def _block(sd, g, i, per_layer_table=False):
    def r(*shape, scale=0.02, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    p = f"blocks.{i}."
    sd.update({
        p + "norm1.weight": r(D, offset=1.0), p + "norm1.bias": r(D),
        p + "attn.qkv.weight": r(3 * D, D), p + "attn.q_bias": r(D), p + "attn.v_bias": r(D),
        p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
        p + "norm2.weight": r(D, offset=1.0), p + "norm2.bias": r(D),
        p + "mlp.fc1.weight": r(4 * D, D), p + "mlp.fc1.bias": r(4 * D),
        p + "mlp.fc2.weight": r(D, 4 * D), p + "mlp.fc2.bias": r(D),
        p + "gamma_1": r(D, offset=0.1), p + "gamma_2": r(D, offset=0.1),
    })
    if per_layer_table:
        sd[p + "attn.relative_position_bias_table"] = r(ROWS, HEADS, scale=0.3)
        sd[p + "attn.relative_position_index"] = spec_index_14()


def unilm_pretrain_sd(seed: int = 0):
    """A unilm pretraining state dict written by hand from the SPEC section 2 key list."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "cls_token": torch.randn(1, 1, D, generator=g) * 0.02,
        "mask_token": torch.randn(1, 1, D, generator=g) * 0.02,
        "patch_embed.proj.weight": torch.randn(D, 3, 16, 16, generator=g) * 0.02,
        "patch_embed.proj.bias": torch.randn(D, generator=g) * 0.02,
        "rel_pos_bias.relative_position_bias_table": torch.randn(ROWS, HEADS, generator=g) * 0.3,
        "rel_pos_bias.relative_position_index": spec_index_14(),
    }
    for i in range(DEPTH):
        _block(sd, g, i)
    sd.update({
        "norm.weight": 1 + torch.randn(D, generator=g) * 0.02, "norm.bias": torch.randn(D, generator=g) * 0.02,
        "lm_head.weight": torch.randn(VOCAB, D, generator=g) * 0.02,
        "lm_head.bias": torch.randn(VOCAB, generator=g) * 0.02,
    })
    return sd


def unilm_finetune_sd(seed: int = 1, num_classes: int = 10):
    """unilm fine-tuning layout: per-layer tables + index per block, fc_norm, head (no mask token, no norm)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "cls_token": torch.randn(1, 1, D, generator=g) * 0.02,
        "patch_embed.proj.weight": torch.randn(D, 3, 16, 16, generator=g) * 0.02,
        "patch_embed.proj.bias": torch.randn(D, generator=g) * 0.02,
    }
    for i in range(DEPTH):
        _block(sd, g, i, per_layer_table=True)
    sd.update({
        "fc_norm.weight": 1 + torch.randn(D, generator=g) * 0.02, "fc_norm.bias": torch.randn(D, generator=g) * 0.02,
        "head.weight": torch.randn(num_classes, D, generator=g) * 0.02,
        "head.bias": torch.randn(num_classes, generator=g),
    })
    return sd


@pytest.fixture(scope="module")
def pretrain_sd():
    return unilm_pretrain_sd()


@pytest.fixture(scope="module")
def mim_model():
    """One base-width depth-2 MIM model shared by the tests that only load into it (each loads what it needs)."""
    return BeitForMaskedImageModeling(config())


def _assert_same(a, b):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# -- unilm round trips ---------------------------------------------------------------------------------------------
def test_unilm_pretrain_round_trip_bit_exact(pretrain_sd, mim_model):
    ckpt = {"model": pretrain_sd, "epoch": 3}
    converted = convert_state_dict(ckpt)
    assert set(converted) == set(pretrain_sd) - {"rel_pos_bias.relative_position_index"}
    assert mim_model.load_pretrained(ckpt) == {"missing": [], "unexpected": []}  # strict=True by default
    exported = mim_model.export_state_dict("unilm")
    _assert_same(exported, pretrain_sd)


def test_unilm_finetune_round_trip_bit_exact():
    sd = unilm_finetune_sd()
    model = BeitForImageClassification(config(per_layer=True), num_classes=10)
    assert model.load_pretrained({"model": sd, "epoch": 99}) == {"missing": [], "unexpected": []}
    _assert_same(model.export_state_dict("unilm"), sd)
    for i in range(DEPTH):
        assert torch.equal(model.blocks[i].attn.relative_position_index, spec_index_14())


def test_export_rejects_other_targets(mim_model):
    with pytest.raises(ValueError, match="unilm"):
        mim_model.export_state_dict("timm")


# -- relative position index ---------------------------------------------------------------------------------------
def test_relative_position_index_matches_spec_14x14(mim_model):
    idx = spec_index_14()
    # the SPEC numbers for 14x14
    assert idx[0, 1:].eq(729).all() and idx[1:, 0].eq(730).all() and idx[0, 0] == 731
    assert idx[1, 1] == 13 * 27 + 13 and idx[1, 196] == (0 - 13 + 13) * 27 + (0 - 13 + 13) == 0
    assert idx[196, 1] == 26 * 27 + 26 == 728
    assert torch.equal(relative_position_index((14, 14)), idx)
    assert torch.equal(mim_model.rel_pos_bias.relative_position_index, idx)
    assert mim_model.rel_pos_bias.relative_position_bias_table.shape == (732, HEADS)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (7, 7), (8, 5), (24, 24)])
def test_relative_position_index_other_grids(grid):
    h, w = grid
    idx = relative_position_index(grid)
    n = h * w
    rows = (2 * h - 1) * (2 * w - 1) + 3
    assert idx.shape == (n + 1, n + 1) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) == rows - 1
    if n <= 64:
        assert torch.equal(idx, spec_index(h, w))
    # every body row is used (each relative offset appears) and the diagonal is the zero offset
    body = idx[1:, 1:]
    assert body.unique().numel() == (2 * h - 1) * (2 * w - 1)
    assert body.diagonal().eq((h - 1) * (2 * w - 1) + (w - 1)).all()


# -- missing / unexpected / mismatched keys --------------------------------------------------------------------------
def test_strict_lists_every_offending_key(pretrain_sd, mim_model):
    sd = dict(pretrain_sd)
    for k in ("blocks.0.gamma_1", "blocks.1.mlp.fc2.bias", "norm.weight"):
        del sd[k]
    sd["foo.bar"] = torch.zeros(3)
    sd["blocks.0.attn.extra_thing"] = torch.zeros(3)
    sd["lm_head.bias"] = torch.zeros(VOCAB + 1)
    sd["blocks.1.attn.proj.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(CheckpointError) as exc:
        mim_model.load_pretrained(sd)
    msg = str(exc.value)
    for name in ("blocks.0.gamma_1", "blocks.1.mlp.fc2.bias", "norm.weight", "foo.bar", "blocks.0.attn.extra_thing",
                 "lm_head.bias", "blocks.1.attn.proj.weight"):
        assert name in msg, (name, msg)
    assert "missing" in msg and "unexpected" in msg and "shape" in msg


def test_shape_mismatch_raises_even_when_not_strict(pretrain_sd, mim_model):
    sd = dict(pretrain_sd)
    sd["lm_head.weight"] = torch.zeros(VOCAB - 1, D)
    sd["patch_embed.proj.bias"] = torch.zeros(D - 1)
    before = mim_model.cls_token.detach().clone()
    with pytest.raises(CheckpointError) as exc:
        mim_model.load_pretrained(sd, strict=False)
    assert "lm_head.weight" in str(exc.value) and "patch_embed.proj.bias" in str(exc.value)
    assert torch.equal(mim_model.cls_token, before)  # nothing loaded


def test_not_strict_returns_lists_and_loads_the_rest(pretrain_sd):
    model = BeitForMaskedImageModeling(config())
    sd = dict(pretrain_sd)
    dropped = ("blocks.0.gamma_1", "norm.weight", "lm_head.bias")
    kept = {k: model.state_dict()[k].clone() for k in dropped}
    for k in dropped:
        del sd[k]
    sd["foo.bar"] = torch.zeros(3)
    sd["blocks.1.attn.extra_thing"] = torch.ones(2)
    result = model.load_pretrained(sd, strict=False)
    assert result == {"missing": sorted(dropped), "unexpected": ["blocks.1.attn.extra_thing", "foo.bar"]}
    msd = model.state_dict()
    for k in dropped:  # missing keys keep their initialisation
        assert torch.equal(msd[k], kept[k]), k
    for k, v in sd.items():
        if k in msd:
            assert torch.equal(msd[k], v), k


# -- corrupted buffers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["one_entry", "transposed", "wrong_shape", "float_garbage"])
def test_corrupted_relative_position_index_raises(pretrain_sd, mim_model, how):
    sd = dict(pretrain_sd)
    idx = spec_index_14()
    if how == "one_entry":
        idx[5, 7] += 1
    elif how == "transposed":
        idx = idx.T.contiguous()
    elif how == "wrong_shape":
        idx = idx[:-1, :-1].contiguous()  # 196 x 196: not (h*w+1)^2
    else:
        idx = torch.rand(197, 197)
    sd["rel_pos_bias.relative_position_index"] = idx
    with pytest.raises(CheckpointError, match="relative_position_index"):
        mim_model.load_pretrained(sd)


def test_index_of_another_grid_than_its_table_raises(pretrain_sd, mim_model):
    sd = dict(pretrain_sd)
    sd["rel_pos_bias.relative_position_index"] = relative_position_index((10, 10))
    with pytest.raises(CheckpointError):
        mim_model.load_pretrained(sd)


def test_timm_k_bias_zero_is_dropped_nonzero_raises(pretrain_sd, mim_model):
    sd = dict(pretrain_sd)
    sd["blocks.0.attn.k_bias"] = torch.zeros(D)
    sd["blocks.1.attn.k_bias"] = torch.zeros(D)
    assert "blocks.0.attn.k_bias" not in convert_state_dict(sd)
    assert mim_model.load_pretrained(sd) == {"missing": [], "unexpected": []}
    sd["blocks.1.attn.k_bias"] = torch.zeros(D).index_fill_(0, torch.tensor([5]), 1e-3)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.k_bias"):
        mim_model.load_pretrained(sd)


@pytest.mark.parametrize(
    "key", ["beit.encoder.layer.0.attention.attention.key.bias", "beit.layers.1.attention.k_proj.bias"]
)
def test_hf_nonzero_key_bias_raises(key):
    sd = {
        "beit.embeddings.cls_token": torch.zeros(1, 1, D),
        key: torch.zeros(D),
    }
    convert_state_dict(sd, "hf")  # a zero key bias is fine (and dropped)
    assert key not in convert_state_dict(sd, "hf")
    sd[key] = torch.full((D,), 0.5)
    with pytest.raises(CheckpointError, match="key bias"):
        convert_state_dict(sd, "hf")


# -- shared -> per-layer -------------------------------------------------------------------------------------------
def test_shared_table_copied_into_every_block(pretrain_sd):
    model = BeitForImageClassification(config(per_layer=True), num_classes=10)
    assert model.rel_pos_bias is None
    with pytest.raises(CheckpointError, match="strict=False"):
        model.load_pretrained({"model": pretrain_sd})
    result = model.load_pretrained({"model": pretrain_sd}, strict=False)
    assert result == {
        "missing": ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"],
        "unexpected": ["lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"],
    }
    table = pretrain_sd["rel_pos_bias.relative_position_bias_table"]
    tables = [blk.attn.relative_position_bias_table for blk in model.blocks]
    for t in tables:
        assert torch.equal(t, table)
    assert len({t.data_ptr() for t in tables}) == DEPTH  # independent copies
    assert torch.equal(model.blocks[1].attn.qkv.weight, pretrain_sd["blocks.1.attn.qkv.weight"])
    # the helper alone
    out = shared_to_per_layer_rel_pos_bias(convert_state_dict(pretrain_sd), 3)
    assert "rel_pos_bias.relative_position_bias_table" not in out
    assert all(torch.equal(out[f"blocks.{i}.attn.relative_position_bias_table"], table) for i in range(3))


# -- resize --------------------------------------------------------------------------------------------------------
def test_224_checkpoint_into_384_model(pretrain_sd):
    model = BeitForMaskedImageModeling(config(img_size=384))
    assert model.patch_embed.grid_size == (24, 24)
    assert model.load_pretrained(pretrain_sd) == {"missing": [], "unexpected": []}
    table = model.rel_pos_bias.relative_position_bias_table
    src = pretrain_sd["rel_pos_bias.relative_position_bias_table"]
    assert table.shape == ((2 * 24 - 1) ** 2 + 3, HEADS) == (2212, HEADS)
    assert torch.equal(table[-3:], src[-3:])  # cls rows kept exactly
    assert torch.equal(table, resize_rel_pos_bias(src, (24, 24)))
    assert model.rel_pos_bias.relative_position_index.shape == (577, 577)
    # it runs at 384 (one image)
    x = torch.randn(1, 3, 384, 384)
    mask = torch.zeros(1, 576, dtype=torch.bool)
    mask[0, :100] = True
    with torch.no_grad():
        out = model.eval()(x, mask, torch.zeros(1, 576, dtype=torch.long))
    assert out.num_masked == 100 and torch.isfinite(out.loss)


def test_shared_224_into_per_layer_384_classifier(pretrain_sd):
    model = BeitForImageClassification(config(per_layer=True, img_size=384), num_classes=10)
    model.load_pretrained(pretrain_sd, strict=False)
    expected = resize_rel_pos_bias(pretrain_sd["rel_pos_bias.relative_position_bias_table"], (24, 24))
    for blk in model.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, expected)


def test_resize_to_own_grid_is_identity():
    table = torch.randn(ROWS, HEADS)
    out = resize_rel_pos_bias(table, (14, 14))
    assert torch.equal(out, table)
    out[0, 0] += 1
    assert not torch.equal(out, table)  # a copy, not a view


def test_resize_bicubic_smooth_function():
    """method="bicubic": a table that is a smooth function of (dy, dx) resizes to about that function.

    With align_corners=False a new offset d' (in [-(n-1), n-1]) samples the old table at d' * (2g-1)/(2n-1)."""
    def f(dy, dx, head):
        return torch.sin(0.08 * dy + 0.3 * head) + 0.5 * torch.cos(0.06 * dx) + 0.004 * dy * dx / (1 + head)

    heads = 3
    old, new = 14, 24
    d_old = torch.arange(-(old - 1), old, dtype=torch.float64)
    dy, dx = torch.meshgrid(d_old, d_old, indexing="ij")
    body = torch.stack([f(dy, dx, h).reshape(-1) for h in range(heads)], dim=1)
    cls_rows = torch.randn(3, heads, dtype=torch.float64)
    table = torch.cat([body, cls_rows]).float()

    out = resize_rel_pos_bias(table, (new, new), method="bicubic")
    assert out.shape == ((2 * new - 1) ** 2 + 3, heads) and out.dtype == torch.float32
    assert torch.equal(out[-3:], table[-3:])
    scale = (2 * old - 1) / (2 * new - 1)
    d_new = torch.arange(-(new - 1), new, dtype=torch.float64)
    ny, nx = torch.meshgrid(d_new, d_new, indexing="ij")
    want = torch.stack([f(ny * scale, nx * scale, h).reshape(-1) for h in range(heads)], dim=1)
    err = (out[:-3].double() - want).abs().reshape(2 * new - 1, 2 * new - 1, heads)
    # the function spans ~3; torch's bicubic (a=-0.75) is only low-order accurate and clamps at the border
    assert float(err.max()) < 3e-2, float(err.max())
    assert float(err.mean()) < 5e-3, float(err.mean())
    assert float(err[3:-3, 3:-3].max()) < 1e-2, float(err[3:-3, 3:-3].max())
    # a transposed (dy <-> dx) or unscaled resize would be far off
    wrong = torch.stack([f(nx * scale, ny * scale, h).reshape(-1) for h in range(heads)], dim=1)
    assert float((out[:-3].double() - wrong).abs().max()) > 0.3
    # the centre (zero offset) lands exactly on the old zero offset
    centre = (new - 1) * (2 * new - 1) + (new - 1)
    assert torch.allclose(out[centre], table[(old - 1) * (2 * old - 1) + (old - 1)], atol=1e-5)


def unilm_resize_ref(rel_pos_bias: torch.Tensor, dst_num_pos: int) -> torch.Tensor:
    """microsoft/unilm `beit/run_class_finetuning.py` (the block under `if "relative_position_bias_table" in key:`),
    transcribed line for line. The one change: scipy removed `interp2d`; its documented replacement on a rectangular
    grid (scipy's interp2d transition guide) is `interp2d(x, y, z)(xn, yn) == RectBivariateSpline(x, y, z.T, kx=3,
    ky=3, s=0)(xn, yn).T` - the same FITPACK regrid_smth fit (interp2d ravels z.T before it) and bispev evaluation
    (interp2d transposes its result back)."""
    np = pytest.importorskip("numpy")
    interpolate = pytest.importorskip("scipy.interpolate")
    src_num_pos, num_attn_heads = rel_pos_bias.size()
    num_extra_tokens = 3
    src_size = int((src_num_pos - num_extra_tokens) ** 0.5)
    dst_size = int((dst_num_pos - num_extra_tokens) ** 0.5)
    extra_tokens = rel_pos_bias[-num_extra_tokens:, :]
    rel_pos_bias = rel_pos_bias[:-num_extra_tokens, :]

    def geometric_progression(a, r, n):
        return a * (1.0 - r**n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = geometric_progression(1, q, src_size // 2)
        if gp > dst_size // 2:
            right = q
        else:
            left = q
    dis = []
    cur = 1
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    r_ids = [-_ for _ in reversed(dis)]
    x = r_ids + [0] + dis
    y = r_ids + [0] + dis
    t = dst_size // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    dy = np.arange(-t, t + 0.1, 1.0)
    all_rel_pos_bias = []
    for i in range(num_attn_heads):
        z = rel_pos_bias[:, i].view(src_size, src_size).float().numpy()
        # unilm: f = interpolate.interp2d(x, y, z, kind="cubic"); f(dx, dy)
        f = interpolate.RectBivariateSpline(x, y, z.T, kx=3, ky=3, s=0)
        all_rel_pos_bias.append(torch.Tensor(f(dx, dy).T).contiguous().view(-1, 1).to(rel_pos_bias.device))
    rel_pos_bias = torch.cat(all_rel_pos_bias, dim=-1)
    return torch.cat((rel_pos_bias, extra_tokens), dim=0)


@pytest.mark.parametrize("old,new", [(14, 24), (14, 28), (24, 14), (8, 12)])  # 224->384, 224->448, 384->224, tiny
def test_resize_geometric_matches_unilm(old, new):
    g = torch.Generator().manual_seed(old * 100 + new)
    table = torch.randn((2 * old - 1) ** 2 + 3, HEADS, generator=g) * 0.3
    out = resize_rel_pos_bias(table, (new, new))
    ref = unilm_resize_ref(table, (2 * new - 1) ** 2 + 3)
    assert out.shape == ref.shape == ((2 * new - 1) ** 2 + 3, HEADS) and out.dtype == torch.float32
    assert torch.equal(out[-3:], table[-3:])  # cls rows kept as they are
    scale = float(table.abs().max())
    assert float((out - ref).abs().max()) < 1e-5 * scale
    # the comparison tells the methods apart: the old default (bicubic on a uniform stretch) is far from unilm's
    assert float((resize_rel_pos_bias(table, (new, new), method="bicubic") - ref).abs().max()) > 1e-2 * scale
    # the zero offset stays on the zero offset (both grids are centred)
    assert torch.equal(out[(new - 1) * (2 * new - 1) + new - 1], table[(old - 1) * (2 * old - 1) + old - 1])


def test_resize_geometric_dtype_and_bad_arguments():
    table = torch.randn(ROWS, HEADS)
    half = resize_rel_pos_bias(table.bfloat16(), (24, 24))
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, resize_rel_pos_bias(table.bfloat16().double(), (24, 24)).bfloat16())  # fp64 inside
    with pytest.raises(ValueError, match="method"):
        resize_rel_pos_bias(table, (24, 24), method="bilinear")
    with pytest.raises(ValueError, match="square"):
        resize_rel_pos_bias(table, (24, 20))
    assert resize_rel_pos_bias(table, (24, 20), method="bicubic").shape == (47 * 39 + 3, HEADS)
    with pytest.raises(ValueError, match="3x3"):  # a 3-wide table has too few points for a cubic spline
        resize_rel_pos_bias(torch.randn(12, HEADS), (24, 24))


def test_pretrain_224_into_per_layer_384_classifier_small():
    """load_pretrained resizes with unilm's method: every per-layer table of a 384 classifier is the shared 224
    table resized (small widths, the real 14 -> 24 grids)."""
    small = dict(embed_dim=96, num_heads=12, depth=2, drop_path_rate=0.0)
    pre = BeitForMaskedImageModeling(BeitConfig.from_preset("base", **small))
    with torch.no_grad():
        pre.rel_pos_bias.relative_position_bias_table.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    sd = pre.export_state_dict("unilm")  # pretraining layout: shared table and its index
    model = BeitForImageClassification(
        BeitConfig.from_preset("base", img_size=384, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, **small),
        num_classes=5,
    )
    result = model.load_pretrained({"model": sd}, strict=False)
    assert result["missing"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    shared = sd["rel_pos_bias.relative_position_bias_table"]
    expected = resize_rel_pos_bias(shared, (24, 24))
    assert expected.shape == (2212, 12)
    for blk in model.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, expected)
        assert torch.equal(blk.attn.relative_position_bias_table[-3:], shared[-3:])
        assert torch.equal(blk.attn.relative_position_index, relative_position_index((24, 24)))
    assert float((expected - unilm_resize_ref(shared, 2212)).abs().max()) < 1e-5 * float(shared.abs().max())


def test_bad_table_rows_raise():
    with pytest.raises(CheckpointError):
        resize_rel_pos_bias(torch.zeros(100, HEADS), (24, 24))


# -- files -----------------------------------------------------------------------------------------------------------
def _assert_loaded(model, sd):
    msd = model.state_dict()
    for k, v in sd.items():
        if not k.endswith("relative_position_index"):
            assert torch.equal(msd[k], v), k


def test_load_pth_file(tmp_path, pretrain_sd, mim_model):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": pretrain_sd, "epoch": 3}, path)
    assert mim_model.load_pretrained(str(path)) == {"missing": [], "unexpected": []}
    _assert_loaded(mim_model, pretrain_sd)
    # pathlib too, and a bare state dict
    path2 = tmp_path / "bare.pt"
    sd2 = {k: v + 1 if v.is_floating_point() else v for k, v in pretrain_sd.items()}
    torch.save(sd2, path2)
    mim_model.load_pretrained(path2)
    _assert_loaded(mim_model, sd2)


def test_load_safetensors_file(tmp_path, pretrain_sd, mim_model):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "ckpt.safetensors"
    sd = {k: (v * 2 if v.is_floating_point() else v).contiguous() for k, v in pretrain_sd.items()}
    safetensors_torch.save_file(sd, str(path))
    assert mim_model.load_pretrained(path) == {"missing": [], "unexpected": []}
    _assert_loaded(mim_model, sd)


def test_load_unilm_training_checkpoint_with_args(tmp_path, pretrain_sd, mim_model):
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": pretrain_sd, "epoch": 799, "args": argparse.Namespace(lr=1.5e-3, model="beit_base")}, path)
    assert mim_model.load_pretrained(path) == {"missing": [], "unexpected": []}


def test_missing_file_raises(tmp_path, mim_model):
    with pytest.raises(FileNotFoundError):
        mim_model.load_pretrained(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        mim_model.load_pretrained(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", "bare"])
def test_ddp_module_prefix_stripped(pretrain_sd, mim_model, wrap):
    sd = {"module." + k: v - 1 if v.is_floating_point() else v for k, v in pretrain_sd.items()}
    ckpt = sd if wrap == "bare" else {wrap: sd, "epoch": 1}
    assert mim_model.load_pretrained(ckpt) == {"missing": [], "unexpected": []}
    _assert_loaded(mim_model, {k[len("module."):]: v for k, v in sd.items()})


# -- atomic_save -----------------------------------------------------------------------------------------------------
def test_atomic_save_writes(tmp_path):
    path = tmp_path / "sub" / "dir" / "ck.pth"
    obj = {"w": torch.arange(10.0), "epoch": 4}
    assert atomic_save(obj, path) == path
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], obj["w"]) and loaded["epoch"] == 4
    assert os.listdir(path.parent) == ["ck.pth"]
    # overwrite
    atomic_save({"w": torch.zeros(2)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))
    assert os.listdir(path.parent) == ["ck.pth"]


@pytest.mark.parametrize("exc_type,raised",
                         [(RuntimeError, CheckpointWriteError), (KeyboardInterrupt, KeyboardInterrupt)])
def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch, exc_type, raised):
    path = tmp_path / "ck.pth"
    atomic_save({"w": torch.arange(5.0)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PARTIAL" * 100)
        raise exc_type("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(raised) as info:  # a writer's error is one line naming the file
        atomic_save({"w": torch.arange(1000.0)}, path)
    if raised is CheckpointWriteError:
        assert str(info.value) == f"cannot write {path}: write failed (RuntimeError: disk full)"
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pth"]  # no temp file left behind
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5.0))


def test_atomic_save_keeps_normal_file_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    ref = tmp_path / "ref.pth"
    torch.save({"w": torch.zeros(1)}, ref)
    path = atomic_save({"w": torch.zeros(1)}, tmp_path / "ck.pth")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(ref.stat().st_mode) == 0o666 & ~umask


def test_hf_two_final_layernorms_refused_not_merged():
    # transformers' MIM model with use_mean_pooling=False has a backbone LayerNorm (beit.layernorm) AND a
    # head LayerNorm (layernorm); BEiT has one. Mapping both onto `norm` would silently drop one.
    import transformers

    hc = transformers.BeitConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, use_mask_token=True, use_mean_pooling=False,
                                 vocab_size=100)
    sd = transformers.BeitForMaskedImageModeling(hc).state_dict()
    with pytest.raises(CheckpointError, match="beit.layernorm.weight and layernorm.weight"):
        convert_state_dict(sd, "hf")


def test_hf_old_layout_index_checked_against_its_table():
    from helpers import spec_index

    sd = {
        "beit.embeddings.cls_token": torch.zeros(1, 1, 8),
        "beit.encoder.relative_position_bias.relative_position_bias_table": torch.zeros(ROWS, 2),
        "beit.encoder.relative_position_bias.relative_position_index": spec_index(10, 10),
    }
    with pytest.raises(CheckpointError, match="10x10"):
        convert_state_dict(sd, "hf")
    sd["beit.encoder.relative_position_bias.relative_position_index"] = spec_index(14, 14)
    out = convert_state_dict(sd, "hf")
    assert set(out) == {"cls_token", "rel_pos_bias.relative_position_bias_table"}
