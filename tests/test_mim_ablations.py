"""The paper's pretraining ablations as model switches (SPEC section 7): `mim_target="pixels"` (regress the patches'
pixels, MSE) and `mim_loss_on="all"` (score every patch, not only the masked ones), each against a hand-computed
reference, and the fused (Triton, interpreter on the CPU) path against the reference path for every combination."""

import pytest
import torch
import torch.nn.functional as F

from beit_fast import BeitConfig, BeitForMaskedImageModeling, BlockwiseMaskGenerator
from helpers import rel_err

TOL = 1e-5
B, K = 3, 26


def _model(**kw):
    torch.manual_seed(0)
    m = BeitForMaskedImageModeling(BeitConfig.from_preset("tiny", depth=2, drop_path_rate=0.0, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 64, 64, generator=g)
    mask = BlockwiseMaskGenerator(8, K, min_num_patches=4, seed=0).batch(B)
    tok = torch.randint(0, 512, (B, 64), generator=g)
    return x, mask, tok


def _rows(m, x, mask):
    """The final LayerNorm's output on every patch (B, N, D), computed outside the model."""
    h = m.run_blocks(m.embed(x, mask))
    return m.norm(h[:, 1:])


@pytest.mark.parametrize("norm", [True, False])
def test_pixel_target_is_the_mse_of_the_masked_patches(norm):
    m = _model(mim_target="pixels", pixel_norm=norm, fused_kernels=False)
    assert not hasattr(m, "lm_head") and m.pixel_head.out_features == 8 * 8 * 3
    x, mask, _ = _inputs()
    out = m(x, mask)  # no visual tokens: the pixel target needs no tokenizer
    # by hand: patch (i, j) of image b is x[b, :, 8i:8i+8, 8j:8j+8], flattened (row, column, channel)
    target = torch.stack([torch.stack([x[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].permute(1, 2, 0).reshape(-1)
                                       for i in range(8) for j in range(8)]) for b in range(B)])
    if norm:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    with torch.no_grad():
        pred = m.pixel_head(_rows(m, x, mask)[mask])
        expected = ((pred - target[mask]) ** 2).mean()
    assert rel_err(out.loss.detach(), expected) <= TOL
    assert out.accuracy is None and out.num_masked == B * K


def test_all_token_loss_is_the_cross_entropy_over_every_patch():
    m = _model(mim_loss_on="all", fused_kernels=False)
    x, mask, tok = _inputs()
    out = m(x, mask, tok)
    with torch.no_grad():
        logits = m.lm_head(_rows(m, x, mask)).reshape(-1, 512)
        expected = F.cross_entropy(logits, tok.reshape(-1))
        acc = (logits.argmax(-1) == tok.reshape(-1)).float().mean()
    assert rel_err(out.loss.detach(), expected) <= TOL and float(out.accuracy) == float(acc)
    assert out.num_masked == B * 64
    # the embedding still masks: the same loss without a mask differs
    assert not torch.allclose(m(x, torch.zeros_like(mask), tok).loss, out.loss)


@pytest.mark.parametrize("target,loss_on", [("tokens", "all"), ("pixels", "masked"), ("pixels", "all")])
def test_fused_equals_reference(target, loss_on):
    m = _model(mim_target=target, mim_loss_on=loss_on)
    x, mask, tok = _inputs()
    runs = {}
    for fused in (False, True):
        m.config.fused_kernels = fused
        out = m(x, mask, tok, return_logits=True, num_masked_per_image=K if fused else None)
        m.zero_grad()
        out.loss.backward()
        runs[fused] = (out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (a, ga), (b, gb) = runs[False], runs[True]
    assert rel_err(b.loss.detach(), a.loss.detach()) <= TOL and rel_err(b.logits, a.logits) <= TOL
    assert a.num_masked == b.num_masked == B * (64 if loss_on == "all" else K)
    assert (a.accuracy is None) == (b.accuracy is None) == (target == "pixels")
    assert sorted(ga) == sorted(gb)
    for n in ga:
        assert rel_err(gb[n], ga[n]) <= TOL, n


def test_bad_switch_values_are_one_line():
    with pytest.raises(ValueError, match="mim_target"):
        BeitConfig(mim_target="pixel")
    with pytest.raises(ValueError, match="mim_loss_on"):
        BeitConfig(mim_loss_on="everything")


def test_pretraining_switches(tmp_path, monkeypatch):
    """`--target pixels` runs no tokenizer and logs the MSE; the switches land in config.json's model and a resume
    that changes one is refused; `--loss-on all` trains with an accuracy over every patch."""
    from beit_fast.train import pretrain as pretrain_mod
    from helpers import metrics_rows, pretrain_config

    model = dict(depth=1, embed_dim=32, num_heads=2)

    def no_tokenizer(*a, **k):
        raise AssertionError("the pixel target must not build a tokenizer")

    monkeypatch.setattr(pretrain_mod, "build_tokenizer", no_tokenizer)
    out = tmp_path / "pixels"
    summary = pretrain_mod.pretrain(pretrain_config(out, model, max_steps=2, save_every=2, target="pixels",
                                                    loss_on="all", pixel_norm=False))
    assert summary["final_mlm_acc"] is None and summary["chance"] is None and summary["final_loss"] > 0
    assert "pixels of the all patches" in summary["tokenizer"]
    rows = metrics_rows(out)
    assert len(rows) == 2 and float(rows[0]["loss"]) > 0
    import json

    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["mim_target"] == "pixels" and saved["model"]["mim_loss_on"] == "all"
    assert saved["pretrain"]["pixel_norm"] is False
    with pytest.raises(ValueError, match="mim_target"):
        pretrain_mod.pretrain(pretrain_config(out, model, max_steps=4, save_every=2, resume="auto"))
    monkeypatch.undo()
    summary = pretrain_mod.pretrain(pretrain_config(tmp_path / "all", model, max_steps=2, save_every=0,
                                                    loss_on="all"))
    assert 0.0 <= summary["final_mlm_acc"] <= 1.0
    with pytest.raises(ValueError, match="--target"):
        pretrain_mod.PretrainConfig(model={"mim_target": "pixels"}).validate()
