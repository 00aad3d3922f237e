"""Numerical parity with timm's `Beit` and transformers' `Beit*` (SPEC sections 1 and 2).

fp32 on CPU, "base" widths (768 wide, 12 heads, 224 px) with depth 2. Every parameter of the
source model is perturbed with random noise after construction, so that zero-initialised
tables and biases (relative position bias, q/v bias, LayerNorm bias, ...) really take part.
The error metric is max|a - b| / max|b| (b = the reference), required to be <= 1e-5.
"""

from __future__ import annotations

import re

import pytest
import torch

timm_beit = pytest.importorskip("timm.models.beit")
transformers = pytest.importorskip("transformers")

from beit_fast import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, BeitModel  # noqa: E402
from beit_fast.checkpoint import convert_state_dict, detect_source  # noqa: E402
from helpers import rel_err, perturb, spec_index  # noqa: E402

TOL = 1e-5
DEPTH = 2
D, HEADS, IMG, GRID, VOCAB = 768, 12, 224, 14, 8192


# -- helpers -------------------------------------------------------------------------------------------------------
def our_config(per_layer: bool = False, **kw) -> BeitConfig:
    return BeitConfig.from_preset(
        "base", depth=DEPTH, drop_path_rate=0.0, use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=not per_layer, **kw
    )


def pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# -- timm ----------------------------------------------------------------------------------------------------------
def timm_model(per_layer: bool, num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm_beit.Beit(
        img_size=IMG, patch_size=16, num_classes=num_classes, embed_dim=D, depth=DEPTH, num_heads=HEADS,
        init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=not per_layer,
        global_pool="avg",
    )
    perturb(m, seed + 100)
    return m.eval()


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared_bias", "per_layer_bias"])
def test_timm_backbone_forward_features(per_layer):
    tm = timm_model(per_layer)
    ours = BeitModel(our_config(per_layer)).eval()
    result = ours.load_pretrained(tm.state_dict(), strict=False)
    # timm's Beit (global_pool="avg") has fc_norm, which the bare backbone does not; nothing else differs
    assert result == {"missing": [], "unexpected": ["fc_norm.bias", "fc_norm.weight"]}
    x = pixels(batch=2 if not per_layer else 1)
    with torch.no_grad():
        ref = tm.forward_features(x)
        out = ours(x)
    err = rel_err(out, ref)
    print(f"\n[timm backbone {'per-layer' if per_layer else 'shared'} bias] rel err {err:.3e}")
    assert err <= TOL


def test_ours_into_timm():
    """The other direction: our (unilm-layout) export loads into timm and gives the same features."""
    ours = BeitModel(our_config(per_layer=True))
    perturb(ours, 7)
    ours.eval()
    tm = timm_model(per_layer=True)
    sd = {k: v for k, v in ours.export_state_dict("unilm").items() if not k.endswith("relative_position_index")}
    res = tm.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc_norm.bias", "fc_norm.weight"]
    assert res.unexpected_keys == []
    x = pixels(batch=1, seed=1)
    with torch.no_grad():
        err = rel_err(tm.forward_features(x), ours(x))
    print(f"\n[ours -> timm per-layer] rel err {err:.3e}")
    assert err <= TOL


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared_bias", "per_layer_bias"])
def test_timm_classification_logits(per_layer):
    tm = timm_model(per_layer, num_classes=10, seed=3)
    ours = BeitForImageClassification(our_config(per_layer), num_classes=10).eval()
    assert ours.load_pretrained(tm.state_dict()) == {"missing": [], "unexpected": []}  # strict
    x = pixels(batch=1, seed=2)
    with torch.no_grad():
        ref, out = tm(x), ours(x)
    assert out.shape == (1, 10)
    err = rel_err(out, ref)
    print(f"\n[timm classification {'per-layer' if per_layer else 'shared'} bias] rel err {err:.3e}")
    assert err <= TOL


# -- transformers --------------------------------------------------------------------------------------------------
def hf_config(**kw) -> "transformers.BeitConfig":
    base = dict(
        hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * D,
        use_mask_token=True, use_shared_relative_position_bias=True, use_relative_position_bias=False,
        layer_scale_init_value=0.1, layer_norm_eps=1e-6, use_absolute_position_embeddings=False, vocab_size=VOCAB,
    )
    base.update(kw)
    return transformers.BeitConfig(**base)


def hf_mim(seed: int = 0):
    torch.manual_seed(seed)
    m = transformers.BeitForMaskedImageModeling(hf_config())
    perturb(m, seed + 200)
    return m.eval()  # eval: transformers' default drop_path_rate is 0.1


def hf_cls(per_layer: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = hf_config(
        use_mask_token=False, use_shared_relative_position_bias=not per_layer, use_relative_position_bias=per_layer,
        use_mean_pooling=True, num_labels=10,
    )
    m = transformers.BeitForImageClassification(cfg)
    perturb(m, seed + 300)
    return m.eval()


def mim_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    mask = torch.zeros(2, GRID * GRID, dtype=torch.bool)
    mask[0, torch.randperm(GRID * GRID, generator=g)[:75]] = True
    mask[1, torch.randperm(GRID * GRID, generator=g)[:60]] = True  # unequal counts: the general (non-fused) path
    tokens = torch.randint(0, VOCAB, (2, GRID * GRID), generator=g)
    return x, mask, tokens


@pytest.fixture(scope="module")
def mim_pair():
    hm = hf_mim()
    ours = BeitForMaskedImageModeling(our_config()).eval()
    hf_sd = hm.state_dict()
    converted = convert_state_dict(hf_sd, "hf")
    assert ours.load_pretrained(hf_sd, source="hf") == {"missing": [], "unexpected": []}  # strict
    return hm, ours, converted


def test_hf_mim_loss_logits_and_grads(mim_pair):
    hm, ours, _ = mim_pair
    x, mask, tokens = mim_inputs()
    hm.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)

    ref = hm(pixel_values=x, bool_masked_pos=mask, labels=tokens[mask])
    out = ours(x, mask, tokens, return_logits=True)
    assert ref.logits.shape == (2, GRID * GRID, VOCAB)
    assert out.logits.shape == (int(mask.sum()), VOCAB)
    assert out.num_masked == 135
    loss_err = rel_err(out.loss, ref.loss)
    logit_err = rel_err(out.logits, ref.logits[mask])
    acc_ref = (ref.logits[mask].argmax(-1) == tokens[mask]).float().mean()

    ref.loss.backward()
    out.loss.backward()
    hf_grads = {k: p.grad for k, p in hm.named_parameters()}
    assert all(g is not None for g in hf_grads.values())
    mapped = convert_state_dict(hf_grads, "hf")  # same renaming / qkv concatenation as for the weights
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    assert set(mapped) == set(ours_grads)
    grad_errs = {k: rel_err(ours_grads[k], mapped[k]) for k in ours_grads}
    # a few mapped by hand, independently of the converter
    L = "beit.layers.1.attention."
    by_hand = {
        "blocks.1.attn.qkv.weight": torch.cat(
            [hf_grads[L + "q_proj.weight"], hf_grads[L + "k_proj.weight"], hf_grads[L + "v_proj.weight"]]
        ),
        "blocks.1.attn.q_bias": hf_grads[L + "q_proj.bias"],
        "blocks.1.attn.v_bias": hf_grads[L + "v_proj.bias"],
        "blocks.0.gamma_1": hf_grads["beit.layers.0.lambda_1"],
        "rel_pos_bias.relative_position_bias_table": hf_grads["beit.shared_position_bias.relative_position_bias_table"],
        "mask_token": hf_grads["beit.embeddings.mask_token"],
        "patch_embed.proj.weight": hf_grads["beit.embeddings.patch_embeddings.projection.weight"],
        "lm_head.weight": hf_grads["lm_head.weight"],
    }
    hand_errs = {k: rel_err(ours_grads[k], v) for k, v in by_hand.items()}

    worst = max(grad_errs, key=grad_errs.get)
    print(
        f"\n[HF MIM] loss {out.loss.item():.6f} vs {ref.loss.item():.6f} rel err {loss_err:.3e}; "
        f"masked logits rel err {logit_err:.3e}; grads: max rel err {grad_errs[worst]:.3e} ({worst}); "
        f"hand-mapped: " + ", ".join(f"{k} {v:.2e}" for k, v in hand_errs.items())
    )
    assert loss_err <= TOL
    assert logit_err <= TOL
    assert abs(float(out.accuracy) - float(acc_ref)) < 1e-6
    assert max(grad_errs.values()) <= TOL, grad_errs
    assert max(hand_errs.values()) <= TOL, hand_errs
    # the grads are not trivially zero (e.g. the relative position table takes part)
    assert float(ours_grads["rel_pos_bias.relative_position_bias_table"].abs().max()) > 0
    assert float(ours_grads["mask_token"].abs().max()) > 0


@pytest.mark.parametrize("per_layer", [True, False], ids=["per_layer_bias", "shared_bias"])
def test_hf_classification_logits(per_layer):
    hm = hf_cls(per_layer)
    ours = BeitForImageClassification(our_config(per_layer), num_classes=10).eval()
    assert ours.load_pretrained(hm.state_dict(), source="auto") == {"missing": [], "unexpected": []}
    x = pixels(batch=1, seed=4)
    with torch.no_grad():
        ref, out = hm(pixel_values=x).logits, ours(x)
    err = rel_err(out, ref)
    print(f"\n[HF classification {'per-layer' if per_layer else 'shared'} bias] rel err {err:.3e}")
    assert err <= TOL


# -- transformers < 5 / Hub layout -----------------------------------------------------------------------------------
_V5_TO_OLD_IN_LAYER = (
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
    ("relative_position_bias.", "attention.attention.relative_position_bias."),
    # layernorm_before/after and lambda_1/2 keep their names
)


def hf_v5_to_old_layout(sd, with_index: bool = False):
    """Rename a transformers-5 BEiT state dict to the names of the checkpoints published on the Hub."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^beit\.layers\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.groups()
            for new, old in _V5_TO_OLD_IN_LAYER:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            k = f"beit.encoder.layer.{i}.{rest}"
        elif k.startswith("beit.shared_position_bias."):
            k = "beit.encoder.relative_position_bias." + k[len("beit.shared_position_bias."):]
        out[k] = v
    if with_index:  # older transformers saved the index buffers too
        for k in list(out):
            if k.endswith("relative_position_bias_table"):
                out[k[: -len("relative_position_bias_table")] + "relative_position_index"] = spec_index()
    return out


def _assert_same_conversion(new_sd, old_sd):
    assert detect_source(old_sd) == "hf" and detect_source(new_sd) == "hf"
    a, b = convert_state_dict(new_sd, "hf"), convert_state_dict(old_sd, "hf")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("with_index", [False, True])
def test_hf_old_layout_mim_converts_identically(mim_pair, with_index):
    hm, ours, converted = mim_pair
    new_sd = hm.state_dict()
    old_sd = hf_v5_to_old_layout(new_sd, with_index=with_index)
    expected_names = {
        "beit.embeddings.cls_token", "beit.embeddings.mask_token", "beit.embeddings.patch_embeddings.projection.weight",
        "beit.encoder.relative_position_bias.relative_position_bias_table",
        "beit.encoder.layer.0.attention.attention.query.weight", "beit.encoder.layer.0.attention.attention.query.bias",
        "beit.encoder.layer.0.attention.attention.key.weight", "beit.encoder.layer.0.attention.attention.value.weight",
        "beit.encoder.layer.0.attention.attention.value.bias", "beit.encoder.layer.1.attention.output.dense.weight",
        "beit.encoder.layer.1.intermediate.dense.weight", "beit.encoder.layer.1.output.dense.bias",
        "beit.encoder.layer.1.layernorm_before.weight", "beit.encoder.layer.1.layernorm_after.bias",
        "beit.encoder.layer.1.lambda_1", "beit.encoder.layer.1.lambda_2", "layernorm.weight", "lm_head.weight",
    }
    assert expected_names <= set(old_sd)
    assert not any(".layers." in k or "_proj" in k or "shared_position_bias" in k for k in old_sd)
    _assert_same_conversion(new_sd, old_sd)
    # and it loads (strictly) into a fresh model with the very same tensors
    fresh = BeitForMaskedImageModeling(our_config())
    assert fresh.load_pretrained(old_sd) == {"missing": [], "unexpected": []}
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_hf_old_layout_classification_converts_identically():
    hm = hf_cls(per_layer=True, seed=5)
    new_sd = hm.state_dict()
    old_sd = hf_v5_to_old_layout(new_sd, with_index=True)
    assert {
        "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table",
        "beit.encoder.layer.1.attention.attention.relative_position_bias.relative_position_index",
        "beit.pooler.layernorm.weight", "beit.pooler.layernorm.bias", "classifier.weight", "classifier.bias",
    } <= set(old_sd)
    _assert_same_conversion(new_sd, old_sd)
    ours = BeitForImageClassification(our_config(per_layer=True), num_classes=10).eval()
    assert ours.load_pretrained(old_sd) == {"missing": [], "unexpected": []}
    x = pixels(batch=1, seed=6)
    with torch.no_grad():
        err = rel_err(ours(x), hm(pixel_values=x).logits)
    print(f"\n[HF old-layout classification per-layer] rel err {err:.3e}")
    assert err <= TOL
