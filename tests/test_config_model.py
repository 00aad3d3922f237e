"""BeitConfig presets and validation; model init, input checks, outputs, attention backends, drop path,
intermediate layers (SPEC section 1). fp32 on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from beit_fast import (
    PRESETS,
    BeitConfig,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitModel,
    BlockwiseMaskGenerator,
)
from beit_fast import model as model_module
from helpers import rel_err, perturb  # noqa: E402

TOL = 1e-5


@pytest.fixture
def no_init(monkeypatch):
    """Build models without spending time on weight init (only shapes / counts matter)."""
    for cls in (nn.Linear, nn.Conv2d, nn.LayerNorm):
        monkeypatch.setattr(cls, "reset_parameters", lambda self: None)
    monkeypatch.setattr(model_module.BeitModel, "init_weights", lambda self, pretraining=True: None)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -- config ----------------------------------------------------------------------------------------------------------
def test_presets_construct(no_init):
    assert set(PRESETS) >= {"tiny", "small", "base", "large"}
    counts = {}
    for name in ("tiny", "small", "base", "large"):
        cfg = BeitConfig.from_preset(name)
        counts[name] = n_params(BeitForMaskedImageModeling(cfg))
        assert n_params(BeitForImageClassification(cfg, num_classes=7)) > 0
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["large"]
    large = BeitConfig.from_preset("large")
    assert (large.embed_dim, large.depth, large.num_heads, large.init_values) == (1024, 24, 16, 1e-5)


def test_base_matches_spec(no_init):
    c = BeitConfig.from_preset("base")
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) == (224, 16, 768, 12, 12)
    assert c.mlp_hidden_dim == 4 * 768 and c.init_values == 0.1 and c.layer_norm_eps == 1e-6
    assert c.grid_size == 14 and c.num_patches == 196 and c.head_dim == 64
    assert c.vocab_size == 8192 and c.num_masking_patches == 75 and c.drop_path_rate == 0.1
    assert c.use_shared_rel_pos_bias and not c.use_rel_pos_bias and not c.use_abs_pos_emb and c.qkv_bias
    m = BeitForMaskedImageModeling(c)
    assert n_params(m) == 91_965_776  # SPEC section 1 table
    assert m.rel_pos_bias.relative_position_bias_table.shape == (732, 12)
    assert m.mask_token.shape == (1, 1, 768) and m.pos_embed is None
    assert m.blocks[0].attn.qkv.bias is None and m.blocks[0].attn.q_bias.shape == (768,)


def test_config_round_trip():
    c = BeitConfig.from_preset("small", drop_path_rate=0.2)
    assert BeitConfig.from_dict(c.to_dict()) == c
    assert c.replace(depth=3).depth == 3 and c.depth == 12
    assert '"embed_dim": 384' in c.to_json()


def test_unknown_preset_and_key():
    with pytest.raises(ValueError, match="huge"):
        BeitConfig.from_preset("huge")
    with pytest.raises(ValueError, match="embed_dims"):
        BeitConfig.from_preset("base", embed_dims=10)
    with pytest.raises(ValueError, match="not_a_key"):
        BeitConfig.from_dict({"not_a_key": 1})


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(depth=-1), "depth"),
        (dict(depth=0), "depth"),
        (dict(num_heads=7), "embed_dim"),  # 768 % 7
        (dict(embed_dim=100), "embed_dim"),  # 100 % 12
        (dict(img_size=225), "img_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(attn_backend="flash"), "attn_backend"),
        (dict(fused_kernels="yes"), "fused_kernels"),
        (dict(fused_kernels="true"), "fused_kernels"),
        (dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True), "use_rel_pos_bias"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(drop_path_rate=-0.1), "drop_path_rate"),
        (dict(init_values=-1.0), "init_values"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(num_masking_patches=197), "num_masking_patches"),
        (dict(num_masking_patches=0), "num_masking_patches"),
        (dict(depth=2.0), "depth"),
        (dict(depth=True), "depth"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        BeitConfig.from_preset("base", **overrides)


@pytest.mark.parametrize("value", [1, 1.0, 0])
def test_fused_kernels_non_bool_numbers_rejected(value):
    with pytest.raises(ValueError, match="fused_kernels"):
        BeitConfig.from_preset("tiny", fused_kernels=value)


def test_valid_switches():
    for v in ("auto", True, False):
        BeitConfig.from_preset("tiny", fused_kernels=v)
    for b in ("auto", "triton", "xformers", "sdpa", "math"):
        BeitConfig.from_preset("tiny", attn_backend=b)
    BeitConfig.from_preset("tiny", use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    BeitConfig.from_preset("tiny", init_values=None)


# -- init ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_init_model():
    torch.manual_seed(0)
    return BeitForMaskedImageModeling(BeitConfig.from_preset("base", depth=4))


def _std(t):
    return float(t.detach().double().std())


# unilm draws N(0, 0.02) cut at +-1 std (trunc_normal_ with a=-std, b=std): the std of a standard
# normal truncated to [-1, 1] is sqrt(1 - 2*phi(1) / (2*Phi(1) - 1)) = 0.5394.
TRUNC = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))
STD = 0.02 * TRUNC


def test_init_rescaled_proj_and_fc2(base_init_model):
    m = base_init_model
    for l, blk in enumerate(m.blocks, start=1):
        want = STD / math.sqrt(2 * l)
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert abs(_std(w) / want - 1) < 0.02, (l, _std(w), want)
            assert abs(float(w.detach().double().mean())) < want * 0.01
            assert float(w.detach().abs().max()) <= 0.02 / math.sqrt(2 * l) * (1 + 1e-6)
        for w in (blk.attn.qkv.weight, blk.mlp.fc1.weight):  # not rescaled
            assert abs(_std(w) / STD - 1) < 0.02
            assert float(w.detach().abs().max()) <= 0.02 * (1 + 1e-6)


def test_init_other_parameters(base_init_model):
    m = base_init_model
    for blk in m.blocks:
        assert torch.equal(blk.gamma_1, torch.full((768,), 0.1)) and torch.equal(blk.gamma_2, torch.full((768,), 0.1))
        for b in (blk.attn.q_bias, blk.attn.v_bias, blk.attn.proj.bias, blk.mlp.fc1.bias, blk.mlp.fc2.bias,
                  blk.norm1.bias, blk.norm2.bias):
            assert torch.count_nonzero(b) == 0
        assert torch.equal(blk.norm1.weight, torch.ones(768))
    assert torch.count_nonzero(m.rel_pos_bias.relative_position_bias_table) == 0
    for tok in (m.cls_token, m.mask_token):  # 768 samples: std estimate within ~10%
        assert abs(_std(tok) / STD - 1) < 0.15, _std(tok)
    assert not torch.equal(m.cls_token, m.mask_token)
    assert abs(_std(m.lm_head.weight) / STD - 1) < 0.01 and torch.count_nonzero(m.lm_head.bias) == 0
    assert abs(_std(m.patch_embed.proj.weight) / STD - 1) < 0.02
    assert torch.count_nonzero(m.patch_embed.proj.bias) == 0
    assert torch.equal(m.norm.weight, torch.ones(768)) and torch.count_nonzero(m.norm.bias) == 0


def test_init_per_layer_tables_and_classification_head():
    torch.manual_seed(1)
    cfg = BeitConfig.from_preset("base", depth=1, use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    m = BeitForImageClassification(cfg, num_classes=1000)
    assert torch.count_nonzero(m.blocks[0].attn.relative_position_bias_table) == 0
    # Fine-tuning init (unilm modeling_finetune): timm's trunc_normal_ cut at +-2, i.e. a plain N(0, 0.02).
    assert abs(_std(m.head.weight) / (0.02 * 0.001) - 1) < 0.02, _std(m.head.weight)
    assert torch.count_nonzero(m.head.bias) == 0
    assert torch.equal(m.fc_norm.weight, torch.ones(768))
    m2 = BeitForImageClassification(cfg, num_classes=1000, head_init_scale=1.0)
    assert abs(_std(m2.head.weight) / 0.02 - 1) < 0.02
    with pytest.raises(ValueError, match="num_classes"):
        BeitForImageClassification(cfg, num_classes=0)


# -- MIM inputs ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = BeitForMaskedImageModeling(BeitConfig.from_preset("tiny"))
    perturb(m, 1)
    return m.eval()


def tiny_inputs(batch=2, seed=0, counts=(26, 26)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 64, 64, generator=g)
    mask = torch.zeros(batch, 64, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(64, generator=g)[: counts[b % len(counts)]]] = True
    tokens = torch.randint(0, 512, (batch, 64), generator=g)
    return x, mask, tokens


def test_bad_pixels(tiny):
    _, mask, tok = tiny_inputs()
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\)"):
        tiny(torch.randn(2, 3, 32, 32), mask, tok)
    with pytest.raises(ValueError, match=r"\(2, 1, 64, 64\)"):
        tiny(torch.randn(2, 1, 64, 64), mask, tok)
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        tiny(torch.randn(3, 64, 64), mask, tok)
    with pytest.raises(ValueError, match="floating"):
        tiny(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), mask, tok)


def test_bad_mask(tiny):
    x, mask, tok = tiny_inputs()
    with pytest.raises(ValueError, match="torch.int64"):
        tiny(x, mask.long(), tok)
    with pytest.raises(ValueError, match="torch.float32"):
        tiny(x, mask.float(), tok)
    with pytest.raises(ValueError, match=r"\(2, 63\)"):
        tiny(x, mask[:, :63], tok)
    with pytest.raises(ValueError, match=r"\(1, 64\)"):
        tiny(x, mask[:1], tok)
    with pytest.raises(ValueError, match="bool_masked_pos"):
        tiny(x, None, tok)


def test_bad_visual_tokens(tiny):
    x, mask, tok = tiny_inputs()
    pos = int(mask[0].nonzero()[0])
    neg = tok.clone()
    neg[0, pos] = -1
    with pytest.raises(ValueError, match="-1"):
        tiny(x, mask, neg)
    big = tok.clone()
    big[0, pos] = 512
    with pytest.raises(ValueError, match="512"):
        tiny(x, mask, big)
    with pytest.raises(ValueError, match="float32"):
        tiny(x, mask, tok.float())
    with pytest.raises(ValueError, match="bool"):
        tiny(x, mask, tok.bool())
    with pytest.raises(ValueError, match=r"\(2, 26\)"):
        tiny(x, mask, tok[:, :26])
    with pytest.raises(ValueError, match=r"\(1, 64\)"):
        tiny(x, mask, tok[:1])


def test_visual_tokens_wrong_grid_shape_rejected(tiny):
    x, mask, tok = tiny_inputs()
    with pytest.raises(ValueError, match=r"\(2, 4, 16\)"):
        tiny(x, mask, tok.reshape(2, 4, 16))


def test_fused_kernels_needs_equal_mask_counts(tiny):
    x, mask, tok = tiny_inputs(counts=(26, 20))
    fused = BeitForMaskedImageModeling(tiny.config.replace(fused_kernels=True))
    fused.load_state_dict(tiny.state_dict())
    fused.eval()
    with pytest.raises(ValueError, match=r"\[26, 20\]"):
        fused(x, mask, tok)
    with torch.no_grad():
        out = BeitForMaskedImageModeling(tiny.config.replace(fused_kernels=False)).eval()(x, mask, tok)
        assert out.num_masked == 46 and torch.isfinite(out.loss)
        out_auto = tiny(x, mask, tok)  # "auto" also takes unequal counts
        assert out_auto.num_masked == 46
        x2, mask2, tok2 = tiny_inputs(counts=(26,))
        assert torch.allclose(fused(x2, mask2, tok2).loss, tiny(x2, mask2, tok2).loss)


def test_grid_shaped_mask_and_tokens_equal_flat(tiny):
    x, mask, tok = tiny_inputs()
    with torch.no_grad():
        a = tiny(x, mask, tok, return_logits=True)
        b = tiny(x, mask.reshape(2, 8, 8), tok, return_logits=True)
        c = tiny(x, mask.reshape(2, 8, 8), tok.reshape(2, 8, 8), return_logits=True)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits) and a.num_masked == b.num_masked
    assert torch.equal(a.loss, c.loss)


def test_output_fields(tiny):
    x, mask, tok = tiny_inputs(counts=(26, 17))
    out = tiny(x, mask, tok)
    assert out.logits is None
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.num_masked == int(mask.sum()) == 43
    assert out.accuracy.dim() == 0 and not out.accuracy.requires_grad and 0.0 <= float(out.accuracy) <= 1.0

    with torch.no_grad():
        full = tiny(x, mask, tok, return_logits=True)
    assert full.logits.shape == (43, 512)
    targets = tok[mask]
    assert float(full.accuracy) == pytest.approx(float((full.logits.argmax(-1) == targets).float().mean()), abs=0)
    assert float(full.loss) == pytest.approx(float(nn.functional.cross_entropy(full.logits, targets)), rel=1e-6)
    # accuracy is not trivially 0: take the argmax as the targets
    t2 = tok.clone()
    t2[mask] = full.logits.argmax(-1)
    with torch.no_grad():
        assert float(tiny(x, mask, t2).accuracy) == 1.0
        no_target = tiny(x, mask, None, return_logits=True)
    assert no_target.loss is None and no_target.accuracy is None and no_target.logits.shape == (43, 512)


def test_masked_positions_use_the_mask_token(tiny):
    """Patch content under the mask does not matter; elsewhere it does."""
    x, mask, tok = tiny_inputs()
    x2 = x.clone()
    m = mask[0].reshape(8, 8)
    r, c = [int(v) for v in m.nonzero()[0]]
    x2[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 5.0  # change a masked patch only
    with torch.no_grad():
        e1, e2 = tiny.embed(x, mask), tiny.embed(x2, mask)
    assert torch.equal(e1, e2)
    assert torch.equal(e1[0, 1 + r * 8 + c], tiny.mask_token[0, 0])


# -- attention backends ------------------------------------------------------------------------------------------------
def _loss_and_grads(model, x, mask, tok):
    model.zero_grad(set_to_none=True)
    out = model(x, mask, tok)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared_bias", "per_layer_bias"])
def test_math_and_sdpa_backends_agree(per_layer):
    cfg = BeitConfig.from_preset(
        "tiny", use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=not per_layer, attn_backend="math"
    )
    torch.manual_seed(0)
    a = BeitForMaskedImageModeling(cfg)
    perturb(a, 5)
    b = BeitForMaskedImageModeling(cfg.replace(attn_backend="sdpa"))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x, mask, tok = tiny_inputs(seed=3, counts=(26, 30))
    la, ga = _loss_and_grads(a, x, mask, tok)
    lb, gb = _loss_and_grads(b, x, mask, tok)
    assert rel_err(lb, la) <= TOL
    errs = {k: rel_err(gb[k], ga[k]) for k in ga}
    assert max(errs.values()) <= TOL, errs
    table = "blocks.0.attn.relative_position_bias_table" if per_layer else "rel_pos_bias.relative_position_bias_table"
    assert float(ga[table].abs().max()) > 0


@pytest.mark.parametrize("backend", ["triton", "xformers"])
def test_explicit_unavailable_backend_raises_with_reason(tiny, backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a plain CPU: no Triton, no xformers kernels
    m = BeitForMaskedImageModeling(tiny.config.replace(attn_backend=backend))
    x, mask, tok = tiny_inputs()
    with pytest.raises(RuntimeError, match=backend) as exc:
        m(x, mask, tok)
    reason = str(exc.value).split("cannot run here:", 1)[-1].strip()
    assert len(reason) > 10, str(exc.value)


def test_auto_backend_runs_on_cpu(tiny):
    x, mask, tok = tiny_inputs()
    with torch.no_grad():
        assert torch.isfinite(tiny(x, mask, tok).loss)  # tiny uses "auto"


# -- drop path -------------------------------------------------------------------------------------------------------
def test_drop_path_stochastic_in_train_deterministic_in_eval():
    torch.manual_seed(0)
    m = BeitModel(BeitConfig.from_preset("tiny", drop_path_rate=0.5))
    m.init_weights()
    perturb(m, 2)
    x = torch.randn(4, 3, 64, 64)
    rates = [blk.drop_path.drop_prob for blk in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    m.train()
    with torch.no_grad():
        outs = [m(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])
    m.eval()
    with torch.no_grad():
        e1, e2 = m(x), m(x)
    assert torch.equal(e1, e2)
    # with rate 0 train == eval
    m0 = BeitModel(BeitConfig.from_preset("tiny", drop_path_rate=0.0))
    m0.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(m0.train()(x), m0.eval()(x))


# -- intermediate layers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_tiny():
    torch.manual_seed(0)
    m = BeitModel(BeitConfig.from_preset("tiny", depth=12))
    m.init_weights()
    perturb(m, 3)
    return m.eval()


def test_return_layers_shapes_and_values(deep_tiny):
    m = deep_tiny
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last, feats = m(x, return_layers=[3, 5, 7, 11])
        assert torch.equal(last, m(x))
        assert len(feats) == 4 and all(f.shape == (2, 65, 96) for f in feats)
        assert torch.equal(feats[-1], last)
        # block by block by hand
        from beit_fast.attention import RelPosBias

        h = m.embed(x)
        rpb = m.rel_pos_bias
        bias = RelPosBias(rpb.relative_position_bias_table, rpb.relative_position_index, rpb())
        backend = m.attention_backend(h)
        manual = []
        for blk in m.blocks:
            h = blk(h, bias, backend)
            manual.append(h)
        for i, f in zip([3, 5, 7, 11], feats):
            assert torch.equal(f, manual[i])
        # order as requested
        _, rev = m(x, return_layers=[7, 3])
        assert torch.equal(rev[0], manual[7]) and torch.equal(rev[1], manual[3])
        maps = m.feature_maps(x)
        assert [tuple(t.shape) for t in maps] == [(2, 96, 8, 8)] * 4
        assert torch.equal(maps[0], manual[3][:, 1:].transpose(1, 2).reshape(2, 96, 8, 8))
        assert torch.equal(maps[0][1, :, 2, 5], manual[3][1, 1 + 2 * 8 + 5])
        maps2 = m.feature_maps(x, layers=(0, 11))
        assert len(maps2) == 2


@pytest.mark.parametrize("layers", [[12], [-2], [3, 20]])
def test_return_layers_out_of_range(deep_tiny, layers):
    with pytest.raises(ValueError, match="out of range"):
        deep_tiny(torch.randn(1, 3, 64, 64), return_layers=layers)


def test_feature_maps_default_out_of_range_for_shallow_model(tiny):
    backbone = BeitModel(tiny.config)  # depth 4: the default (3, 5, 7, 11) does not fit
    with pytest.raises(ValueError, match="out of range"):
        backbone.feature_maps(torch.randn(1, 3, 64, 64))


def test_all_false_mask_raises_instead_of_nan():
    cfg = BeitConfig.from_preset("tiny", depth=1)
    m = BeitForMaskedImageModeling(cfg)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="masks no patch"):
        m(x, mask, torch.zeros(2, 64, dtype=torch.long))
    out = m(x, mask)  # without targets there is no loss to define; logits are (0, V)
    assert out.loss is None and out.num_masked == 0


@pytest.mark.parametrize(
    "key,value",
    [("init_values", "a"), ("mlp_ratio", None), ("mlp_ratio", float("inf")), ("layer_norm_eps", "1e-6"),
     ("drop_path_rate", None), ("use_abs_pos_emb", "false"), ("qkv_bias", 0), ("init_values", float("nan")),
     ("num_masking_patches", 7.5), ("extra", 5), ("depth", True)],
)
def test_config_rejects_bad_types_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        BeitConfig.from_preset("tiny", **{key: value})


def test_num_masking_patches_follows_the_grid():
    assert BeitConfig().num_masking_patches == 75  # SPEC: 75 of 196
    assert BeitConfig.from_preset("base", img_size=64).num_masking_patches == 6  # 16 patches: no unrelated error
    assert BeitConfig.from_preset("base", img_size=384).num_masking_patches == 220
    assert BeitConfig.from_preset("base").replace(img_size=32).num_masking_patches == 2  # round(4 * 75 / 196)
    assert BeitConfig.from_preset("base", num_masking_patches=60).replace(depth=2).num_masking_patches == 60
    BeitForImageClassification(BeitConfig.from_preset("tiny", img_size=32, depth=1), num_classes=3)


def test_backbone_alone_is_initialised_and_decay_set_is_the_reference():
    torch.manual_seed(0)
    m = BeitModel(BeitConfig.from_preset("small", depth=1))
    assert float(m.cls_token.abs().max()) > 0  # not left at zeros
    assert abs(_std(m.blocks[0].attn.qkv.weight) / 0.02 - 1) < 0.02  # fine-tuning init: plain N(0, 0.02)
    assert BeitForMaskedImageModeling(BeitConfig.from_preset("tiny", depth=1)).no_weight_decay() == {
        "cls_token", "pos_embed"}


def test_float64_model_gets_a_float64_loss():
    cfg = BeitConfig.from_preset("tiny", depth=1, fused_kernels=False)
    m = BeitForMaskedImageModeling(cfg).double()
    mask = BlockwiseMaskGenerator(8, 26, min_num_patches=4, seed=0).batch(2)
    out = m(torch.randn(2, 3, 64, 64, dtype=torch.float64), mask, torch.randint(0, 512, (2, 64)))
    assert out.loss.dtype == torch.float64
