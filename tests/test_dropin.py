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
               both=dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True), none=dict(use_abs_pos_emb=True))[layout]
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
@pytest.mark.parametrize("layout", ["per_layer", "shared", "both", "none"])
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


def test_transformers_mim_reference_head_cases():
    """Ignored labels (-100), tuple outputs, nothing masked: the library's own head, the library's answer."""
    ref = randomise_(transformers.BeitForMaskedImageModeling(hf_config(use_relative_position_bias=True))).train()
    model = beit_fast.patch(copy.deepcopy(ref), attention="triton")
    x, mask, labels = mim_batch()
    ignored = labels.clone()
    ignored[0] = -100
    empty = torch.zeros_like(mask)
    for kwargs in (dict(bool_masked_pos=mask, labels=ignored), dict(bool_masked_pos=mask, labels=labels,
                                                                     return_dict=False),
                   dict(bool_masked_pos=empty, labels=labels[:0])):
        outs = []
        for m in (model, ref):
            torch.manual_seed(3)  # drop path draws
            out = m(x, **kwargs)
            outs.append(out if isinstance(out, tuple) else (out.loss, out.logits))
        assert outs[0][1] is not None
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=ATOL, equal_nan=True)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=ATOL)


def test_transformers_batch_one_attention_mask_takes_the_library_path():
    """A user's attention mask broadcast over heads, (1, 1, N, N) at batch 1, is not the bias: the library's path."""
    ref = randomise_(transformers.BeitForImageClassification(hf_config(use_absolute_position_embeddings=True)))
    model = beit_fast.patch(copy.deepcopy(ref).eval(), attention="triton")
    n = (IMG // PATCH) ** 2 + 1
    with torch.no_grad():
        got = model(pixels(1), attention_mask=torch.ones(1, n, dtype=torch.long)).logits
        torch.testing.assert_close(got, ref.eval()(pixels(1), attention_mask=torch.ones(1, n, dtype=torch.long)).logits)


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
    # the layers recompute their forward in the backward (transformers 5.x renamed the switch)
    (getattr(ref, "activation_checkpointing_enable", None) or ref.gradient_checkpointing_enable)()
    assert getattr(ref, "is_activation_checkpointing", None) or ref.is_gradient_checkpointing
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
    off = beit_fast.patch(timm_beit("none"), attention=False)
    assert "switched off" in str(beit_fast.patch_report(off)) and "no timm" not in str(beit_fast.patch_report(off))


def test_options():
    model = timm_beit("per_layer")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="bf16 dots"):
        beit_fast.patch(copy.deepcopy(model), attention="triton")(pixels())  # the interpreter's bf16 is wrong
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


def test_data2vec_sdpa_class():
    """transformers' SDPA self-attention subclass (the old layout Data2VecVision keeps): patched, and "math" is the
    library's eager order (so equal to its SDPA to fp32 rounding, not bit for bit)."""
    config = hf_config("Data2VecVisionConfig", use_relative_position_bias=True, attn_implementation="sdpa")
    ref = randomise_(transformers.Data2VecVisionForImageClassification(config)).train()
    for backend in ("triton", "math"):
        model = run_pair(ref, backend, lambda m: m(pixels()), exact=False)
        assert type(model.data2vec_vision.encoder.layer[0].attention.attention).__name__ == \
            "Data2VecVisionSdpaSelfAttention"
        ref.zero_grad()
    run_pair(ref, "auto", lambda m: m(pixels()), exact=True)  # the CPU: the library's own SDPA path


def _bf16_error_rule(build, call, params):
    """On a GPU under bf16 autocast: the patched model's error against a float64 copy is at most twice the unpatched
    model's plus 1e-3 of the exact value's scale (the attention kernel tests' rule), for the output and the gradients
    of `params` (names)."""
    ref = build().cuda()
    exact = copy.deepcopy(ref).double()
    model = beit_fast.patch(copy.deepcopy(ref))
    results = []
    for m, dtype in ((model, None), (ref, None), (exact, torch.float64)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is None):
            out = call(m, dtype or torch.float32)
        grads = torch.autograd.grad(out.float().square().mean() if dtype is None else out.square().mean(),
                                    [dict(m.named_parameters())[n] for n in params])
        results.append([out, *grads])
    for name, kk, tt, ee in zip(("out", *params), *results):
        ek = float((kk.double() - ee.double()).abs().max())
        et = float((tt.double() - ee.double()).abs().max())
        assert ek <= 2 * et + 1e-3 * float(ee.abs().max()), (name, ek, et)
    return model


@pytest.mark.gpu
def test_gpu_timm_bf16_error_rule():
    def build():
        model = timm.models.beit.Beit(img_size=224, patch_size=16, embed_dim=384, depth=4, num_heads=6,
                                      num_classes=10, use_rel_pos_bias=True, init_values=0.1)
        return randomise_(model)

    x = torch.randn(8, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    params = ["blocks.0.attn.relative_position_bias_table", "blocks.0.attn.qkv.weight", "blocks.3.attn.q_bias"]
    model = _bf16_error_rule(build, lambda m, dt: m(x.to(dt)), params)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.blocks[0].attn._beit_fast_backend(x, 64, True, 0.0) == "triton"


@pytest.mark.gpu
def test_gpu_transformers_mim_bf16_error_rule():
    def build():
        config = hf_config(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=4,
                           num_attention_heads=6, intermediate_size=1536, vocab_size=8192, drop_path_rate=0.0,
                           use_shared_relative_position_bias=True, attn_implementation="sdpa")
        return randomise_(transformers.BeitForMaskedImageModeling(config)).train()

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(8, 3, 224, 224, device="cuda", generator=g)
    mask = torch.rand(8, 196, device="cuda", generator=g) < 0.4
    labels = torch.randint(0, 8192, (int(mask.sum()),), device="cuda", generator=g)
    names = [n for n, _ in build().named_parameters()]  # the shared table's path differs across transformers versions
    params = ["lm_head.weight", "layernorm.weight"] + [n for n in names if n.endswith("relative_position_bias_table")]
    _bf16_error_rule(build, lambda m, dt: m(x.to(dt), bool_masked_pos=mask, labels=labels).loss, params)


def test_transformers_imports_from_the_repo_root():
    """transformers >= 5.25 imports Hugging Face's `kernels` distribution; from a clone's root the kernels/ folder
    (beit_fast.kernels' source) must hand that import over, not shadow it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("from transformers import BeitForMaskedImageModeling, BeitForSemanticSegmentation; "
            "import beit_fast.kernels as k; assert k.__file__.startswith(%r)" % str(root / "kernels"))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
