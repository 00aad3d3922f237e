"""`beit_fast.patch`: timm and transformers BEiT / Data2VecVision models patched in place (issue 15).

Every recognised class, on the versions installed: the patched model's outputs and every parameter gradient equal the
unpatched model's - bit for bit on the `math` backend (against the libraries' eager attention), to fp32 rounding on
the Triton kernel through the interpreter - with the same parameter objects and state_dict; the masked-rows MIM head
gives transformers' loss; unknown modules are reported; the class-level patches and unpatch; round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import beit_fast
from beit_fast.kernels import triton_reasons

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(bool(triton_reasons("cpu")) and not torch.cuda.is_available(),
                                reason="the Triton interpreter is needed on the CPU")

IMG, PATCH, DIM, HEADS, DEPTH = 32, 8, 32, 2, 2  # head_dim 16: a power-of-4 scale, so scale-first == scale-after
ATOL = 2e-5  # fp32 through the interpreter: same math, another summation order


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter moved off its init (zero tables and q / v biases would hide the bias paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if "relative_position" in name else 0.05))
    return model


def timm_beit(layout: str, **kw) -> nn.Module:
    rel = dict(per_layer=dict(use_rel_pos_bias=True), shared=dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=True),
               none=dict(use_abs_pos_emb=True))[layout]
    model = timm.models.beit.Beit(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                  num_classes=5, init_values=0.1, **rel, **kw)
    for blk in model.blocks:
        blk.attn.fused_attn = False  # the eager branch: the reference "math" must match bit for bit
    return randomise_(model)


def hf_config(cls_name: str = "BeitConfig", **kw):
    base = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=2 * DIM,
                image_size=IMG, patch_size=PATCH, vocab_size=40, num_labels=5, layer_scale_init_value=0.1,
                use_mask_token=True, attn_implementation="eager")
    base.update(kw)
    return getattr(transformers, cls_name)(**base)


def pixels(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def mim_batch(b: int = 3):
    n = (IMG // PATCH) ** 2
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, :6] = True
    mask[1, 9] = True  # unequal counts per image: transformers' masks need not be BEiT's blockwise ones
    labels = torch.randint(0, 40, (int(mask.sum()),), generator=torch.Generator().manual_seed(2))
    return pixels(b), mask, labels


def first_tensor(out):
    if torch.is_tensor(out):
        return out
    for key in ("loss", "logits", "last_hidden_state", "feature_maps"):
        value = out.get(key) if hasattr(out, "get") else None
        if value is not None:
            return value[-1] if isinstance(value, tuple) else value
    raise AssertionError(f"no tensor output in {type(out)}")


def run_pair(ref: nn.Module, backend, call, exact: bool):
    """(ref, patched) on the same inputs and seeds: outputs and every parameter gradient compared; parameter objects
    and state_dict of the patched copy equal to before the patch."""
    model = copy.deepcopy(ref)
    before = model.state_dict()
    params = list(model.parameters())
    assert beit_fast.patch(model, attention=backend) is model
    assert [p is q for p, q in zip(params, model.parameters())] == [True] * len(params)
    after = model.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in after)
    torch.manual_seed(5)
    out_ref = first_tensor(call(ref))
    torch.manual_seed(5)
    out = first_tensor(call(model))
    out_ref.float().square().mean().backward()
    out.float().square().mean().backward()
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=ATOL))
    assert check(out, out_ref), (out - out_ref).abs().max()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert check(q.grad, p.grad), (name, (q.grad - p.grad).abs().max())
    return model


# -- timm ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["per_layer", "shared", "none"])
@pytest.mark.parametrize("backend", ["math", "triton"])
def test_timm_beit_matches(layout, backend):
    ref = timm_beit(layout, drop_path_rate=0.2).train()  # drop path on: the same draws in both
    model = run_pair(ref, backend, lambda m: m(pixels()), exact=backend == "math")
    assert {type(b.attn).__name__ for b in model.blocks} == {"Attention"}
    assert isinstance(model.blocks[0].attn, timm.models.beit.Attention)
    report = beit_fast.patch_report(model)
    assert [name for name, _ in report.replaced] == [f"blocks.{i}.attn" for i in range(DEPTH)] and not report.skipped


def test_timm_math_with_attention_dropout_and_grad_checkpointing():
    ref = timm_beit("per_layer", attn_drop_rate=0.3).train()
    ref.set_grad_checkpointing(True)
    run_pair(ref, "math", lambda m: m(pixels()), exact=True)


def test_timm_auto_keeps_the_library_path_and_explicit_raises():
    """On the CPU "auto" never takes the interpreter: the library's own attention runs (SDPA here, as unpatched);
    an explicit backend that cannot run this case raises with its reasons."""
    ref = timm_beit("per_layer", attn_drop_rate=0.1)
    for blk in ref.blocks:
        blk.attn.fused_attn = True
    run_pair(ref.train(), "auto", lambda m: m(pixels()), exact=True)
    model = beit_fast.patch(copy.deepcopy(ref).train(), attention="triton")
    with pytest.raises(RuntimeError, match="attention dropout is not implemented"):
        model(pixels())


def test_timm_grad_checkpointing_and_compile_on_the_kernel():
    ref = timm_beit("per_layer").train()
    ref.set_grad_checkpointing(True)
    run_pair(ref, "triton", lambda m: m(pixels()), exact=False)
    model = beit_fast.patch(copy.deepcopy(ref), attention="triton")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(pixels())
    torch.testing.assert_close(out, ref(pixels()), rtol=1e-4, atol=ATOL)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_timm_round_trips(tmp_path):
    model = beit_fast.patch(timm_beit("per_layer"), attention="triton")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    fresh = timm_beit("per_layer")
    timm.models.load_checkpoint(fresh, str(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    buf = io.BytesIO()
    torch.save(model, buf)  # the fast class pickles by name
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.blocks[0].attn) is type(model.blocks[0].attn)
    assert loaded.blocks[0].attn.beit_fast_attention == "triton"
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin.eval()(pixels()), model.eval()(pixels()))
    beit_fast.unpatch(model)
    assert type(model.blocks[0].attn) is timm.models.beit.Attention and beit_fast.patch_report(model) is None


# -- transformers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["use_shared_relative_position_bias", "use_relative_position_bias"])
@pytest.mark.parametrize("backend", ["math", "triton"])
def test_transformers_mim_loss_and_gradients(layout, backend):
    """Training with labels: the head on the masked rows only gives the library's loss and gradients; logits None."""
    ref = randomise_(transformers.BeitForMaskedImageModeling(hf_config(**{layout: True}))).train()
    x, mask, labels = mim_batch()
    model = run_pair(ref, backend, lambda m: m(x, bool_masked_pos=mask, labels=labels), exact=False)
    assert model(x, bool_masked_pos=mask, labels=labels).logits is None
    assert type(model).__name__ == "BeitForMaskedImageModeling"
    replaced = [what for _, what in beit_fast.patch_report(model).replaced]
    assert sum("MIM head" in w for w in replaced) == 1 and sum("attention" in w for w in replaced) == DEPTH


@pytest.mark.parametrize("backend", ["math", "triton"])
def test_transformers_mim_eval_outputs(backend):
    """Eval: the reference head (logits of every row), hidden states; attentions through the library's path."""
    ref = randomise_(transformers.BeitForMaskedImageModeling(hf_config(use_relative_position_bias=True))).eval()
    x, mask, labels = mim_batch()
    model = beit_fast.patch(copy.deepcopy(ref), attention=backend)
    with torch.no_grad():
        a = ref(x, bool_masked_pos=mask, labels=labels, output_hidden_states=True, output_attentions=True)
        b = model(x, bool_masked_pos=mask, labels=labels, output_hidden_states=True, output_attentions=True)
        c = model(x, bool_masked_pos=mask, output_hidden_states=True, return_dict=False)
    for got in (b.logits, c[0]):
        torch.testing.assert_close(got, a.logits, rtol=0 if backend == "math" else 1e-4,
                                   atol=0 if backend == "math" else ATOL)
    assert len(b.attentions) == DEPTH and all(torch.equal(p, q) for p, q in zip(a.attentions, b.attentions))
    assert len(b.hidden_states) == DEPTH + 1
    torch.testing.assert_close(b.loss, a.loss)


def test_transformers_mim_ignored_labels_take_the_reference_head():
    ref = randomise_(transformers.BeitForMaskedImageModeling(hf_config(use_relative_position_bias=True))).train()
    x, mask, labels = mim_batch()
    labels[0] = -100
    model = beit_fast.patch(copy.deepcopy(ref), attention="triton")
    torch.manual_seed(3)  # drop path draws
    out = model(x, bool_masked_pos=mask, labels=labels)
    assert out.logits is not None
    torch.manual_seed(3)
    torch.testing.assert_close(out.loss, ref(x, bool_masked_pos=mask, labels=labels).loss, rtol=1e-5, atol=ATOL)


HF_MODELS = [
    ("BeitForImageClassification", "BeitConfig", {}),
    ("BeitForSemanticSegmentation", "BeitConfig", dict(out_indices=[1, 2, 3, 4], num_hidden_layers=4)),
    ("BeitBackbone", "BeitConfig", dict(out_features=["stage1", "stage2"])),
    ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", {}),
    ("Data2VecVisionForSemanticSegmentation", "Data2VecVisionConfig", dict(out_indices=[1, 2, 3, 4],
                                                                         num_hidden_layers=4)),
]


@pytest.mark.parametrize("cls_name,config_name,extra", HF_MODELS, ids=[m[0] for m in HF_MODELS])
@pytest.mark.parametrize("backend", ["math", "triton"])
def test_transformers_models_match(cls_name, config_name, extra, backend):
    if not hasattr(transformers, cls_name):
        pytest.skip(f"{cls_name} is not in transformers {transformers.__version__}")
    config = hf_config(config_name, use_relative_position_bias=True, drop_path_rate=0.1, **extra)
    ref = randomise_(getattr(transformers, cls_name)(config)).train()
    model = run_pair(ref, backend, lambda m: m(pixels()), exact=backend == "math")
    report = beit_fast.patch_report(model)
    assert len(report.replaced) == config.num_hidden_layers and not report.skipped


def test_transformers_gradient_checkpointing_and_save_pretrained(tmp_path):
    ref = randomise_(transformers.BeitForImageClassification(hf_config(use_relative_position_bias=True))).train()
    ref.gradient_checkpointing_enable()
    model = run_pair(ref, "triton", lambda m: m(pixels()), exact=False)
    model.save_pretrained(tmp_path)
    loaded = transformers.BeitForImageClassification.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded) is transformers.BeitForImageClassification  # config.json names the library's class
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_transformers_compile_smoke():
    ref = randomise_(transformers.BeitForMaskedImageModeling(hf_config(use_shared_relative_position_bias=True)))
    x, mask, labels = mim_batch()
    model = beit_fast.patch(copy.deepcopy(ref).train(), attention="triton")
    torch.manual_seed(3)  # drop path draws
    loss = torch.compile(model, backend="aot_eager")(x, bool_masked_pos=mask, labels=labels).loss
    torch.manual_seed(3)
    torch.testing.assert_close(loss, ref.train()(x, bool_masked_pos=mask, labels=labels).loss, rtol=1e-5, atol=ATOL)
    loss.backward()
    assert model.lm_head.weight.grad is not None


# -- reports, options, class-level patching ---------------------------------------------------------------------------
class MyAttention(nn.Module):
    def forward(self, x):
        return x


def test_unknown_modules_are_left_alone_and_reported():
    class MyTimmAttention(timm.models.beit.Attention):
        def forward(self, x, shared_rel_pos_bias=None):
            return super().forward(x, shared_rel_pos_bias)

    model = timm_beit("per_layer")
    model.extra = MyAttention()
    model.blocks[1].attn = MyTimmAttention(DIM, HEADS, qkv_bias=True, window_size=(IMG // PATCH,) * 2)
    beit_fast.patch(model)
    report = beit_fast.patch_report(model)
    assert [n for n, _ in report.replaced] == ["blocks.0.attn"]
    skipped = dict(report.skipped)
    assert "not a recognised" in skipped["extra"] and "code of its own" in skipped["blocks.1.attn"]
    assert type(model.extra) is MyAttention and type(model.blocks[1].attn) is MyTimmAttention
    plain = beit_fast.patch(nn.Sequential(nn.Linear(2, 2)))
    assert "no timm / transformers BEiT module" in str(beit_fast.patch_report(plain))


def test_options():
    model = timm_beit("per_layer")
    with pytest.raises(ValueError, match="attention='flash'"):
        beit_fast.patch(model, attention="flash")
    with pytest.warns(UserWarning, match="no fused full-row layer norm"):
        beit_fast.patch(model, layer_norm=True)
    assert any("layer_norm" in why for _, why in beit_fast.patch_report(model).skipped)
    beit_fast.patch(model, attention=False)  # a second call changes the options: off gives the class back
    assert type(model.blocks[0].attn) is timm.models.beit.Attention
    with pytest.raises(TypeError, match="torch.nn.Module"):
        beit_fast.patch("beit")


def test_patch_the_libraries_classes():
    try:
        assert beit_fast.patch_timm_models(attention="math") == ["Beit"]
        assert "BeitForMaskedImageModeling" in beit_fast.patch_transformers_models(attention="math")
        model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH,
                                  embed_dim=DIM, depth=1, num_heads=HEADS)
        assert model.blocks[0].attn.beit_fast_attention == "math"
        hf = transformers.BeitForMaskedImageModeling(hf_config())
        assert len(beit_fast.patch_report(hf).replaced) == DEPTH + 1
    finally:
        beit_fast.unpatch_models()
    assert beit_fast.patch_report(timm.models.beit.Beit(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=1,
                                                        num_heads=HEADS)) is None


@pytest.mark.gpu
def test_bf16_on_gpu_within_tolerance():
    """bf16 autocast on a GPU: the patched timm model (Triton kernel) against the unpatched one (SDPA)."""
    ref = timm.models.beit.Beit(img_size=224, patch_size=16, embed_dim=384, depth=4, num_heads=6, num_classes=10,
                                use_rel_pos_bias=True, init_values=0.1).cuda()
    randomise_(ref)
    model = beit_fast.patch(copy.deepcopy(ref))
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref(x).float(), model(x).float()
    assert model.blocks[0].attn._beit_fast_backend(x.half(), 64, True, 0.0) == "triton"
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
