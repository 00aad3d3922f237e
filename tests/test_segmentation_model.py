"""beit_fast.segmentation: BeitForSemanticSegmentation against transformers (random weights, eval mode, logits and aux
logits; per-layer and shared tables, the embeddings as a pyramid level, transformers < 5 names), the mmseg layout
round trip, backbone-only init from a 224 pretraining checkpoint at 512 (unilm's table resize), mmseg's sliding
window, shapes and bad arguments, the loss, layer-wise lr decay, and the Triton attention path with per-layer tables.

Tiny models throughout (width 32, 2 heads, depth 4-5, 64 px, patch 16 unless a test needs another).
"""

from __future__ import annotations

import functools
import re
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_fast import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling
from beit_fast.attention import relative_position_index
from beit_fast.checkpoint import CheckpointError, resize_rel_pos_bias
from beit_fast.segmentation import BeitForSemanticSegmentation, default_out_indices, segmentation_loss, slide_windows
from helpers import rel_err
from test_checkpoint import unilm_resize_ref

NUM_CLASSES = 5
HEADS = ("backbone.fpn", "decode_head.", "auxiliary_head.")  # what a backbone-only checkpoint does not hold


def tiny(**kw) -> BeitConfig:
    """The fine-tuning layout (per-layer tables) at 64 px, patch 16 (a 4x4 grid), width 32, 2 heads, depth 4."""
    base = dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, vocab_size=64,
                use_rel_pos_bias=True, use_shared_rel_pos_bias=False, drop_path_rate=0.0)
    base.update(kw)
    return BeitConfig(**base)


@torch.no_grad()
def randomise_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and every BatchNorm's running statistics drawn at random, scaled so the activations stay of
    order one through the convs (1/sqrt(fan-in)), the relative position tables entry by entry (a constant added to a
    whole table would vanish in the softmax), norms' weights around 1; then eval mode, where BatchNorm applies the
    running statistics (not the identity: mean != 0, var != 1)."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))}
    for name, p in model.named_parameters():
        n = torch.randn(p.shape, generator=g)
        if id(p) in norms:
            p.copy_(1.0 + 0.2 * n)
        elif "relative_position_bias_table" in name or p.dim() <= 1 or name.endswith(("cls_token", "pos_embed",
                                                                                       "position_embeddings")):
            p.copy_(0.5 * n)
        else:
            p.copy_(n / p[0].numel() ** 0.5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- 1. transformers parity --------------------------------------------------------------------------------------------
# transformers' out_indices i selects hidden_states[i - 1], the output of block i - 2 (0-based; i = 1: the embeddings)
HF_CASES = {
    "per_layer": dict(use_relative_position_bias=True, out_indices=[2, 3, 4, 5]),
    # use_mean_pooling=False: a final beit.layernorm, off the segmentation path, that loading leaves out
    "shared_abs": dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
                       use_mean_pooling=False, out_indices=[2, 3, 4, 5]),
    "embeddings_level": dict(use_relative_position_bias=True, layer_scale_init_value=0.0, out_indices=[1, 2, 4, 5]),
}


@functools.lru_cache(maxsize=None)
def hf_case(case: str) -> Tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random-weight transformers BeitForSemanticSegmentation (depth 5) in eval mode, an input, and its logits and
    aux logits. transformers' forward returns only the main logits: the aux ones are computed as its forward does,
    the auxiliary head on the fpn neck of the selected hidden states."""
    transformers = pytest.importorskip("transformers")
    c = transformers.BeitConfig(image_size=64, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=5,
                                num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6,
                                num_labels=NUM_CLASSES, auxiliary_channels=16, use_auxiliary_head=True,
                                **HF_CASES[case])
    torch.manual_seed(0)
    hf = randomise_(transformers.BeitForSemanticSegmentation(c), seed=1)
    x = pixels(2, 3, 64, 64, seed=2)
    with torch.no_grad():
        logits = hf(pixel_values=x).logits
        hidden = hf.beit(x, output_hidden_states=True).hidden_states
        maps = tuple(hidden[i - 1][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4) for i in c.out_indices)
        aux = hf.auxiliary_head(hf.fpn(maps))
    assert logits.shape == (2, NUM_CLASSES, 16, 16) and aux.shape == (2, NUM_CLASSES, 4, 4)
    assert float(logits.abs().max()) > 0.1 and float(aux.abs().max()) > 0.1  # random weights give non-trivial logits
    return hf, x, logits, aux


def our_config_for(case: str) -> Tuple[BeitConfig, List[int]]:
    """Our config and (0-based) out_indices for an HF_CASES entry, written out by hand (not via from_transformers)."""
    kw = HF_CASES[case]
    per_layer = kw.get("use_relative_position_bias", False)
    cfg = BeitConfig(img_size=64, patch_size=16, embed_dim=32, depth=5, num_heads=2, mlp_ratio=2.0,
                     init_values=kw.get("layer_scale_init_value", 0.1) or None, use_rel_pos_bias=per_layer,
                     use_shared_rel_pos_bias=not per_layer, use_abs_pos_emb=kw.get("use_absolute_position_embeddings",
                                                                                   False), drop_path_rate=0.0)
    return cfg, [i - 2 for i in kw["out_indices"]]


def assert_matches_hf(model: BeitForSemanticSegmentation, case: str) -> None:
    _, x, ref, ref_aux = hf_case(case)
    model.eval()
    with torch.no_grad():
        logits, aux = model(x, return_aux=True)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, ref_aux, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_parity(case):
    hf, x, ref, _ = hf_case(case)
    # (1) from the transformers model: config, out_indices and weights
    model = BeitForSemanticSegmentation.from_transformers(hf)
    assert model.out_indices == [i - 2 for i in HF_CASES[case]["out_indices"]]
    assert model.config.use_rel_pos_bias == HF_CASES[case].get("use_relative_position_bias", False)
    assert_matches_hf(model, case)
    # (2) our own config and out_indices, the transformers (>= 5) state dict
    cfg, out_indices = our_config_for(case)
    model = BeitForSemanticSegmentation(cfg, NUM_CLASSES, out_indices=out_indices, aux_channels=16)
    result = model.load_pretrained(hf.state_dict())
    assert result == {"missing": [], "unexpected": []}
    assert_matches_hf(model, case)
    # (3) the transformers model object: its out_indices replace the model's
    model = BeitForSemanticSegmentation(cfg, NUM_CLASSES, aux_channels=16)
    assert model.out_indices == default_out_indices(5)
    model.load_pretrained(hf)
    assert model.out_indices == out_indices
    assert_matches_hf(model, case)
    if case == "embeddings_level":  # the comparison tells the levels apart: block 0 in place of the embeddings
        model.out_indices = [0] + out_indices[1:]
        with torch.no_grad():
            assert float((model(x) - ref).abs().max()) > 1e-3


# transformers 4.x modeling_beit names (BeitSelfAttention query/key/value under attention.attention, BeitSelfOutput
# attention.output.dense, BeitIntermediate / BeitOutput dense, the per-layer BeitRelativePositionBias inside
# BeitSelfAttention, the shared one in BeitEncoder; fpn1 / fpn2 nn.Sequential; BeitPyramidPoolingModule /
# BeitPyramidPoolingBlock registered by index ("0": the pooling, "1": the BeitConvModule); BeitUperHead.bottleneck;
# BeitConvModule conv / bn; BeitFCNHead.convs an nn.Sequential) from the >= 5 names of the installed version.
from test_parity import _V5_TO_OLD_IN_LAYER as _V4_LAYER  # noqa: E402 (the backbone's renames, one home)
_V4_HEADS = [
    (r"^fpn\.fpn1\.conv_transpose1\.", "fpn1.0."),
    (r"^fpn\.fpn1\.normalization\.", "fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "fpn1.3."),
    (r"^fpn\.fpn2\.", "fpn2.0."),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.", r"decode_head.psp_modules.\1.1."),
    (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
]


def to_transformers_v4(sd: Dict[str, torch.Tensor], grid: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """A transformers >= 5 BeitForSemanticSegmentation state dict under its transformers 4.x names, with the
    relative_position_index buffers 4.x checkpoints carry beside each table."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^beit\.layers\.(\d+)\.(.+)$", k)
        if m:
            rest = m.group(2)
            for new, old in _V4_LAYER:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            k = f"beit.encoder.layer.{m.group(1)}.{rest}"
        elif k.startswith("beit.shared_position_bias."):
            k = "beit.encoder.relative_position_bias." + k[len("beit.shared_position_bias."):]
        else:
            for pattern, repl in _V4_HEADS:
                k = re.sub(pattern, repl, k)
        out[k] = v
        if k.endswith("relative_position_bias_table"):
            out[k[: -len("bias_table")] + "index"] = relative_position_index(grid)
    return out


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_v4_names(case):
    hf, *_ = hf_case(case)
    sd = to_transformers_v4(hf.state_dict(), (4, 4))
    assert len(sd) == len(hf.state_dict()) + sum(k.endswith("relative_position_index") for k in sd)
    v5_only = ("beit.layers.", "fpn.", "q_proj", "o_proj", "mlp.", "psp_bottleneck", "blocks.", "convolution",
               "normalization", "shared_position_bias")
    assert not [k for k in sd if any(s in k for s in v5_only)]
    assert ("beit.layernorm.weight" in sd) == (case == "shared_abs")
    assert "decode_head.psp_modules.3.1.bn.running_var" in sd and "fpn1.3.weight" in sd and "fpn2.0.bias" in sd
    assert "auxiliary_head.convs.0.conv.weight" in sd and "decode_head.bottleneck.conv.weight" in sd
    assert "beit.encoder.layer.4.attention.attention.query.weight" in sd
    cfg, out_indices = our_config_for(case)
    model = BeitForSemanticSegmentation(cfg, NUM_CLASSES, out_indices=out_indices, aux_channels=16)
    assert model.load_pretrained(sd) == {"missing": [], "unexpected": []}
    assert_matches_hf(model, case)


# -- 2. the mmseg / unilm layout ---------------------------------------------------------------------------------------
def seg_model(seed: int, cfg: Optional[BeitConfig] = None, **kw) -> BeitForSemanticSegmentation:
    torch.manual_seed(seed)
    model = BeitForSemanticSegmentation(cfg or tiny(), NUM_CLASSES, aux_channels=16, **kw)
    return randomise_(model, seed)


def test_mmseg_export_round_trip():
    model = seg_model(0)
    sd = model.export_state_dict("mmseg")
    index = {f"backbone.blocks.{i}.attn.relative_position_index" for i in range(4)}
    assert set(sd) == set(model.state_dict()) | index  # the index buffers unilm saves, nothing else new
    for k in index:
        assert torch.equal(sd[k], relative_position_index((4, 4)))
    with pytest.raises(ValueError, match="mmseg"):
        model.export_state_dict("hf")
    fresh = seg_model(1)
    x = pixels(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        assert fresh.load_pretrained(sd) == {"missing": [], "unexpected": []}
        want, want_aux = model(x, return_aux=True)
        got, got_aux = fresh(x, return_aux=True)
    assert torch.equal(got, want) and torch.equal(got_aux, want_aux)


def _drop(sd, k):
    del sd[k]


def _add(sd, k):
    sd[k] = torch.zeros(3)


def _reshape(sd, k):
    sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])


@pytest.mark.parametrize("edit,key,named", [
    (_drop, "decode_head.conv_seg.weight", "decode_head.conv_seg.weight"),
    (_drop, "backbone.fpn2.0.bias", "backbone.fpn2.0.bias"),
    (_drop, "backbone.blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight"),
    (_add, "decode_head.extra.weight", "decode_head.extra.weight"),
    (_add, "backbone.blocks.0.attn.extra", "blocks.0.attn.extra"),
    (_reshape, "auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.weight"),
    (_reshape, "backbone.fpn1.0.weight", "backbone.fpn1.0.weight"),
    (_reshape, "backbone.blocks.2.mlp.fc1.weight", "blocks.2.mlp.fc1.weight"),
], ids=["missing_head", "missing_fpn", "missing_block", "unexpected_head", "unexpected_block", "shape_head",
        "shape_fpn", "shape_block"])
def test_mmseg_bad_checkpoint_names_the_key(edit, key, named):
    sd = seg_model(0).export_state_dict()
    edit(sd, key)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        seg_model(1).load_pretrained(sd)


# -- 3. backbone-only init ---------------------------------------------------------------------------------------------
def _head_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(HEADS)}


def test_backbone_init_from_unilm_pretraining_at_another_resolution():
    # unilm's pretraining layout at 224 / patch 16: one shared 732 x H table (27^2 + 3), mask token, final norm, lm head
    torch.manual_seed(0)
    pre = randomise_(BeitForMaskedImageModeling(tiny(img_size=224, use_rel_pos_bias=False,
                                                     use_shared_rel_pos_bias=True)), 3)
    sd = pre.export_state_dict("unilm")
    shared = sd["rel_pos_bias.relative_position_bias_table"]
    assert shared.shape == (732, 2) and "rel_pos_bias.relative_position_index" in sd
    assert {"mask_token", "norm.weight", "lm_head.weight"} <= set(sd)
    # into a 512 segmentation model: a 32 x 32 grid, per-layer tables
    torch.manual_seed(1)
    model = BeitForSemanticSegmentation(tiny(img_size=512), NUM_CLASSES)
    heads_before = _head_state(model)
    result = model.load_pretrained(sd)
    want = resize_rel_pos_bias(shared, (32, 32))
    unilm = unilm_resize_ref(shared, 63**2 + 3)
    assert want.shape == (63**2 + 3, 2)
    assert rel_err(want, unilm) < 1e-5
    for i, blk in enumerate(model.backbone.blocks):
        assert torch.equal(blk.attn.relative_position_bias_table.detach(), want), i
        for name in ("qkv.weight", "q_bias", "v_bias", "proj.weight"):
            assert torch.equal(model.state_dict()[f"backbone.blocks.{i}.attn.{name}"], sd[f"blocks.{i}.attn.{name}"])
    assert torch.equal(model.backbone.cls_token.detach(), sd["cls_token"])
    assert torch.equal(model.backbone.patch_embed.proj.weight.detach(), sd["patch_embed.proj.weight"])
    after = _head_state(model)
    assert all(torch.equal(after[k], v) for k, v in heads_before.items())  # adapter and heads untouched
    assert set(result["missing"]) == set(heads_before) and len(result["missing"]) == len(heads_before)
    assert result["unexpected"] == []


def test_backbone_init_from_a_classification_checkpoint():
    torch.manual_seed(0)
    cls = randomise_(BeitForImageClassification(tiny(), num_classes=10), 4)
    sd = cls.state_dict()
    torch.manual_seed(1)
    model = BeitForSemanticSegmentation(tiny(), NUM_CLASSES)
    heads_before = _head_state(model)
    result = model.load_pretrained(sd)
    ours = model.state_dict()
    for k, v in sd.items():
        if not k.startswith(("fc_norm.", "head.")):
            assert torch.equal(ours[f"backbone.{k}"], v), k
    assert not [k for k in ours if "fc_norm" in k or k.startswith("head.")]
    assert set(result["missing"]) == set(heads_before) and result["unexpected"] == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in heads_before.items())


def test_backbone_init_from_a_transformers_classification_model():
    """A transformers model object that is not a segmentation model (every transformers BeitConfig carries backbone
    out_indices, by default [depth]): backbone-only init, this model's out_indices kept."""
    transformers = pytest.importorskip("transformers")
    c = transformers.BeitConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4,
                                num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6,
                                use_relative_position_bias=True, num_labels=7)
    torch.manual_seed(0)
    hf = randomise_(transformers.BeitForImageClassification(c), 5)
    from_sd = BeitForSemanticSegmentation(tiny(), NUM_CLASSES)
    result = from_sd.load_pretrained(hf.state_dict())
    assert set(result["missing"]) == set(_head_state(from_sd)) and result["unexpected"] == []
    model = BeitForSemanticSegmentation(tiny(), NUM_CLASSES)
    model.load_pretrained(hf)  # the object, as from a transformers segmentation model
    assert model.out_indices == [0, 1, 2, 3]
    ours, want = model.state_dict(), from_sd.state_dict()
    for k, v in want.items():
        if k.startswith("backbone.") and not k.startswith("backbone.fpn"):
            assert torch.equal(ours[k], v), k


# -- 4. sliding-window inference ---------------------------------------------------------------------------------------
def mmseg_slide_boxes(h_img: int, w_img: int, h_crop: int, w_crop: int, h_stride: int, w_stride: int
                      ) -> List[Tuple[int, int, int, int]]:
    """The window grid of mmseg's EncoderDecoder.slide_inference, transcribed."""
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


@pytest.mark.parametrize("h,w,crop,stride", [(512, 512, 512, 341), (512, 683, 512, 341), (640, 2560, 640, 426),
                                             (96, 80, 64, 42), (40, 50, 64, 42), (64, 200, 64, 21), (65, 64, 64, 64)])
def test_slide_windows_is_mmsegs_grid(h, w, crop, stride):
    boxes = slide_windows(h, w, crop, stride)
    assert boxes == mmseg_slide_boxes(h, w, crop, crop, stride, stride)
    covered = torch.zeros(h, w, dtype=torch.int64)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
        covered[y1:y2, x1:x2] += 1
    assert int(covered.min()) >= 1


@pytest.fixture(scope="module")
def model64() -> BeitForSemanticSegmentation:
    return seg_model(0)


def test_slide_equals_whole_when_the_window_covers_the_image(model64):
    x = pixels(2, 3, 64, 64)
    whole = model64.predict(x, mode="whole")
    assert whole.shape == (2, NUM_CLASSES, 64, 64)
    assert torch.equal(model64.predict(x, mode="slide"), whole)
    assert torch.equal(model64.predict(x, mode="slide", crop_size=64, stride=10), whole)


def test_slide_on_a_larger_image_averages_the_windows(model64):
    x = pixels(1, 3, 96, 80, seed=5)
    out = model64.predict(x, mode="slide", crop_size=64, stride=42)
    assert out.shape == (1, NUM_CLASSES, 96, 80)
    total, count = torch.zeros(1, NUM_CLASSES, 96, 80), torch.zeros(96, 80)
    boxes = slide_windows(96, 80, 64, 42)
    assert len(boxes) == 4  # two rows, two columns: the overlaps count twice
    for y1, y2, x1, x2 in boxes:
        total[:, :, y1:y2, x1:x2] += model64.predict(x[:, :, y1:y2, x1:x2], mode="whole")
        count[y1:y2, x1:x2] += 1
    assert int(count.max()) == 4
    torch.testing.assert_close(out, total / count, atol=1e-6, rtol=1e-6)


def test_slide_pads_an_image_smaller_than_the_window(model64):
    x = pixels(2, 3, 40, 50, seed=6)
    assert slide_windows(40, 50, 64, 42) == [(0, 40, 0, 50)]
    out = model64.predict(x, mode="slide", crop_size=64, stride=42)
    padded = F.pad(x, (0, 14, 0, 24))  # zeros bottom / right, the window's logits cut back to the image
    assert out.shape == (2, NUM_CLASSES, 40, 50)
    torch.testing.assert_close(out, model64.predict(padded, mode="whole")[:, :, :40, :50], atol=1e-6, rtol=1e-6)


def test_predict_bad_arguments(model64):
    x = pixels(1, 3, 64, 64)
    with pytest.raises(ValueError, match="mode"):
        model64.predict(x, mode="tile")
    with pytest.raises(ValueError, match="crop_size"):
        model64.predict(x, mode="slide", crop_size=32)
    with pytest.raises(ValueError, match="slide"):
        model64.predict(pixels(1, 3, 96, 64), mode="whole")
    with pytest.raises(ValueError, match="stride"):
        model64.predict(x, mode="slide", stride=-1)


def test_slide_refuses_a_stride_that_leaves_pixels_unseen(model64):
    """Windows of 64 every 100 px over 200 columns: columns 64-99 are in no window (mmseg asserts every pixel is
    counted); the result must not be a silent 0 / 0. A stride of 0 is refused too, not read as "the default"."""
    boxes = slide_windows(64, 200, 64, 100)
    seen = torch.zeros(200, dtype=torch.bool)
    for _, _, x1, x2 in boxes:
        seen[x1:x2] = True
    assert not bool(seen[64:100].any())
    with pytest.raises(ValueError, match="stride"):
        model64.predict(pixels(1, 3, 64, 200), mode="slide", stride=100)
    with pytest.raises(ValueError, match="stride"):
        model64.predict(pixels(1, 3, 64, 200), mode="slide", stride=0)


def test_predict_aug_probabilities_with_flip(model64):
    x = pixels(2, 3, 64, 64, seed=7)
    probs = model64.predict_aug(x, scales=(1.0,), flip=True)
    assert probs.shape == (2, NUM_CLASSES, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))
    plain = model64.predict(x).softmax(1)
    flipped = model64.predict(x.flip(3)).flip(3).softmax(1)
    torch.testing.assert_close(probs, (plain + flipped) / 2, atol=1e-6, rtol=1e-6)
    assert float((flipped - plain).abs().max()) > 1e-3  # the flip is not a no-op for this model
    multi = model64.predict_aug(x, scales=(0.75, 1.0, 1.5), flip=True)  # 48 px: padded; 96 px: two windows a side
    assert multi.shape == (2, NUM_CLASSES, 64, 64)
    torch.testing.assert_close(multi.sum(1), torch.ones(2, 64, 64))


# -- 5. shapes and bad arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("decoder", ["upernet", "deconv"])
def test_logits_at_a_quarter_of_the_input(patch, decoder):
    torch.manual_seed(0)
    model = BeitForSemanticSegmentation(tiny(patch_size=patch), NUM_CLASSES, decoder=decoder).eval()
    x = pixels(2, 3, 64, 64)
    with torch.no_grad():
        logits, aux = model(x, return_aux=True)
        assert torch.equal(model(x), logits)
    assert logits.shape == (2, NUM_CLASSES, 16, 16)
    # the aux head reads the third level: stride 16 with either adapter, the raw patch grid under the deconv decoder
    side = 4 if decoder == "upernet" else 64 // patch
    assert aux.shape == (2, NUM_CLASSES, side, side)
    if decoder == "upernet":
        feats = model.backbone(x)
        assert [tuple(f.shape[2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]  # strides 4, 8, 16, 32


def test_without_the_aux_head():
    torch.manual_seed(0)
    model = BeitForSemanticSegmentation(tiny(), NUM_CLASSES, aux_head=False).eval()
    assert model.auxiliary_head is None and not [k for k in model.state_dict() if k.startswith("auxiliary_head")]
    with torch.no_grad():
        logits, aux = model(pixels(1, 3, 64, 64), return_aux=True)
    assert logits.shape == (1, NUM_CLASSES, 16, 16) and aux is None


def test_default_out_indices():
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(4) == [0, 1, 2, 3]
    for depth in (4, 5, 6, 8, 16, 32):
        got = default_out_indices(depth)
        assert len(got) == 4 and got == sorted(set(got)) and got[-1] == depth - 1 and got[0] >= 0
    with pytest.raises(ValueError, match="depth"):
        default_out_indices(3)
    assert BeitForSemanticSegmentation(tiny(), 2, aux_head=False).out_indices == [0, 1, 2, 3]


@pytest.mark.parametrize("kw,match", [
    (dict(out_indices=[0, 1, 2]), "out_indices"),
    (dict(out_indices=[0, 1, 2, 4]), "out_indices"),
    (dict(out_indices=[-2, 1, 2, 3]), "out_indices"),
    (dict(decoder="fcn"), "decoder"),
    (dict(num_classes=0), "num_classes"),
    (dict(cfg=tiny(img_size=64, patch_size=32)), "patch"),
    (dict(cfg=tiny(img_size=48, patch_size=12), decoder="deconv"), "patch"),
], ids=["three_levels", "past_depth", "below_embeddings", "decoder", "classes", "adapter_patch", "deconv_patch"])
def test_bad_arguments(kw, match):
    cfg = kw.pop("cfg", tiny())
    num_classes = kw.pop("num_classes", NUM_CLASSES)
    with pytest.raises(ValueError, match=match):
        BeitForSemanticSegmentation(cfg, num_classes, **kw)


def test_out_indices_setter_checks():
    model = BeitForSemanticSegmentation(tiny(), 2, aux_head=False)
    model.out_indices = [-1, 0, 2, 3]
    assert model.backbone.out_indices == [-1, 0, 2, 3]
    with pytest.raises(ValueError, match="out_indices"):
        model.out_indices = [0, 1, 2, 7]


# -- 6. the loss -------------------------------------------------------------------------------------------------------
def test_segmentation_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, NUM_CLASSES, 8, 8, generator=g)
    aux = torch.randn(2, NUM_CLASSES, 4, 4, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    labels[0, :10] = 255
    labels[1, :, 5:9] = 255
    total, main, aux_loss = segmentation_loss(logits, labels, aux)

    def labelled_ce(x):  # upsampled to the labels, then the labelled pixels only
        up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        keep = labels != 255
        return F.cross_entropy(up.permute(0, 2, 3, 1)[keep], labels[keep])

    torch.testing.assert_close(main, labelled_ce(logits))
    torch.testing.assert_close(aux_loss, labelled_ce(aux))
    torch.testing.assert_close(total, main + 0.4 * aux_loss)
    # the ignored pixels do not count: changing their logits changes nothing
    logits2 = logits.clone()
    logits2[0, :, :2] += 5.0  # rows 0-1 at 1/4 scale only feed label rows 0-9 (ignored) after bilinear upsampling
    torch.testing.assert_close(segmentation_loss(logits2, labels)[0], main)
    t, m, a = segmentation_loss(logits, labels, None)
    assert a is None and torch.equal(t, m) and torch.equal(m, main)
    total2, _, _ = segmentation_loss(logits, labels, aux, aux_weight=1.0)
    torch.testing.assert_close(total2, main + aux_loss)
    with pytest.raises(ValueError, match="labels"):
        segmentation_loss(logits, labels[0])


def test_model_loss_uses_its_ignore_index_and_aux_weight():
    model = BeitForSemanticSegmentation(tiny(), NUM_CLASSES, ignore_index=0, aux_loss_weight=0.25)
    g = torch.Generator().manual_seed(1)
    logits, aux = torch.randn(1, NUM_CLASSES, 16, 16, generator=g), torch.randn(1, NUM_CLASSES, 4, 4, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (1, 64, 64), generator=g)
    want = segmentation_loss(logits, labels, aux, ignore_index=0, aux_weight=0.25)
    got = model.loss(logits, labels, aux)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# -- 7. SyncBatchNorm and layer decay ----------------------------------------------------------------------------------
def test_convert_sync_batchnorm_keeps_the_names():
    model = seg_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert num_bn > 0
    model = model.convert_sync_batchnorm()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == num_bn
    assert not [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_layer_decay_groups():
    from beit_fast.train.optim import parameter_groups

    model = BeitForSemanticSegmentation(tiny(), NUM_CLASSES)
    L, decay = 4, 0.65
    groups = parameter_groups(model, 0.05, decay)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(scale) == len(names)
    for name, p in names.items():
        m = re.match(r"backbone\.blocks\.(\d+)\.", name)
        if m:
            want = decay ** (L + 1 - (int(m.group(1)) + 1))
        elif name.startswith(("backbone.cls_token", "backbone.patch_embed.")):
            want = decay ** (L + 1)
        else:
            assert name.startswith(HEADS), name
            want = 1.0
        assert scale[id(p)] == pytest.approx(want), name
        no_decay = p.ndim == 1 or name.endswith(".bias") or name == "backbone.cls_token"
        assert wd[id(p)] == (0.0 if no_decay else 0.05), name
    assert scale[id(names["backbone.fpn1.0.weight"])] == 1.0
    assert scale[id(names["backbone.blocks.0.attn.relative_position_bias_table"])] == pytest.approx(decay**L)


# -- 8. the Triton attention with per-layer tables ---------------------------------------------------------------------
def test_triton_attention_matches_math():
    pytest.importorskip("triton")
    cfg = tiny(attn_backend="math")
    x = pixels(2, 3, 64, 64, seed=8)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=torch.Generator().manual_seed(9))
    runs = []
    for backend in ("math", "triton"):
        torch.manual_seed(0)
        model = BeitForSemanticSegmentation(cfg.replace(attn_backend=backend), NUM_CLASSES, aux_channels=16)
        randomise_(model, 10)
        with torch.enable_grad():
            assert model.backbone.attention_backend(x) == backend
        logits, aux = model(x, return_aux=True)
        model.loss(logits, labels, aux)[0].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "relative_position_bias_table" in n}
        runs.append((logits.detach(), aux.detach(), grads))
    (lm, am, gm), (lt, at, gt) = runs
    torch.testing.assert_close(lt, lm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(at, am, atol=1e-4, rtol=1e-4)
    assert len(gm) == 4
    for name in gm:
        assert float(gm[name].abs().max()) > 0, name
        assert rel_err(gt[name], gm[name]) < 1e-4, name
