"""beit_fast.train.optim: parameter groups against a transcription of unilm's, optimizers, lr schedule.

The `unilm_*` functions below transcribe microsoft/unilm beit/optim_factory.py (`get_num_layer_for_vit`,
`LayerDecayValueAssigner`, `get_parameter_groups`, the printing left out) and the skip-list / assigner set-up of
beit/run_class_finetuning.py `main` (`skip_weight_decay_list`, `--disable_weight_decay_on_rel_pos_bias`,
`assigner = None` unless layer_decay < 1), with `no_weight_decay()` = {'pos_embed', 'cls_token'} as both
modeling_finetune.py and modeling_pretrain.py return it.
"""

import io
import math
import sys
import types

import pytest
import torch

from beit_fast import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling
from beit_fast.model import BeitModel
from beit_fast.train.optim import (
    apex_classes,
    build_optimizer,
    layer_id,
    parameter_groups,
    scaled_lr,
    set_lr,
    warmup_cosine,
)

WD = 0.05


# -- unilm, transcribed ----------------------------------------------------------------------------------------
def unilm_get_num_layer_for_vit(var_name, num_max_layer):
    if var_name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        layer_id = int(var_name.split('.')[1])
        return layer_id + 1
    else:
        return num_max_layer - 1


class UnilmLayerDecayValueAssigner(object):
    def __init__(self, values):
        self.values = values

    def get_scale(self, layer_id):
        return self.values[layer_id]

    def get_layer_id(self, var_name):
        return unilm_get_num_layer_for_vit(var_name, len(self.values))


def unilm_get_parameter_groups(model, weight_decay=1e-5, skip_list=(), get_num_layer=None, get_layer_scale=None):
    """Returns (parameter_group_names, parameter_group_vars) - unilm returns only the vars' values and prints
    the names; both are kept here to compare group names and member names."""
    parameter_group_names = {}
    parameter_group_vars = {}

    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            group_name = "no_decay"
            this_weight_decay = 0.
        else:
            group_name = "decay"
            this_weight_decay = weight_decay
        if get_num_layer is not None:
            layer_id = get_num_layer(name)
            group_name = "layer_%d_%s" % (layer_id, group_name)
        else:
            layer_id = None

        if group_name not in parameter_group_names:
            if get_layer_scale is not None:
                scale = get_layer_scale(layer_id)
            else:
                scale = 1.

            parameter_group_names[group_name] = {"weight_decay": this_weight_decay, "params": [], "lr_scale": scale}
            parameter_group_vars[group_name] = {"weight_decay": this_weight_decay, "params": [], "lr_scale": scale}

        parameter_group_vars[group_name]["params"].append(param)
        parameter_group_names[group_name]["params"].append(name)
    return parameter_group_names, parameter_group_vars


def unilm_finetuning_groups(model, weight_decay, layer_decay, disable_weight_decay_on_rel_pos_bias):
    """run_class_finetuning.py main(): the assigner and skip list handed to get_parameter_groups."""
    num_layers = len(model.blocks)  # model_without_ddp.get_num_layers()
    if layer_decay < 1.0:
        assigner = UnilmLayerDecayValueAssigner(
            list(layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)))
    else:
        assigner = None

    skip_weight_decay_list = {'pos_embed', 'cls_token'}  # model.no_weight_decay()
    if disable_weight_decay_on_rel_pos_bias:
        for i in range(num_layers):
            skip_weight_decay_list.add("blocks.%d.attn.relative_position_bias_table" % i)

    return unilm_get_parameter_groups(
        model, weight_decay, skip_weight_decay_list,
        assigner.get_layer_id if assigner is not None else None,
        assigner.get_scale if assigner is not None else None)


# -- pretrain.py at b9110c6, transcribed (pretraining's groups until now; its checkpoints must keep loading) ---------
def legacy_pretrain_groups(model, weight_decay):
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def legacy_lr_at(step, lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# -- models ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_models():
    """BEiT-B in both layouts; only names, shapes and requires_grad matter, so the (slow on CPU) reference
    initialisation is skipped. Meta-device construction is not possible: the drop-path rates are read with .item()."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BeitModel, "init_weights", lambda self, pretraining=True: None)
        pretrain = BeitForMaskedImageModeling(BeitConfig.from_preset("base"))
        finetune = BeitForImageClassification(
            BeitConfig.from_preset("base", use_rel_pos_bias=True, use_shared_rel_pos_bias=False), num_classes=1000)
    return {"pretrain": pretrain, "finetune": finetune}


def tiny(**overrides):
    torch.manual_seed(0)
    return BeitForImageClassification(BeitConfig.from_preset("tiny", use_rel_pos_bias=True,
                                                             use_shared_rel_pos_bias=False, **overrides), 10)


def by_name(model, groups):
    """{param name: (group_name, lr_scale, weight_decay)}; each parameter in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} in two groups"
            out[names[id(p)]] = (g["group_name"], g["lr_scale"], g["weight_decay"])
    return out


# -- parameter groups vs unilm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["pretrain", "finetune"])
@pytest.mark.parametrize("layer_decay", [0.65, 0.9, 1.0])
@pytest.mark.parametrize("no_decay_rpb", [False, True])
def test_groups_equal_unilm(base_models, layout, layer_decay, no_decay_rpb):
    model = base_models[layout]
    ours = parameter_groups(model, WD, layer_decay, no_decay_rel_pos_bias=no_decay_rpb)
    ref_names, ref_vars = unilm_finetuning_groups(model, WD, layer_decay, no_decay_rpb)

    got = by_name(model, ours)
    want = {n: (gname, g["lr_scale"], g["weight_decay"]) for gname, g in ref_names.items() for n in g["params"]}
    assert len(got) == len(want) == len(list(model.parameters()))
    assert got == want  # every parameter: same group name, lr_scale, weight decay
    if layer_decay < 1.0:  # same groups in the same order with the same members in the same order
        assert [(g["group_name"], [id(p) for p in g["params"]]) for g in ours] == \
               [(k, [id(p) for p in g["params"]]) for k, g in ref_vars.items()]

    # anchors, independent of the transcription
    L = len(model.blocks)
    head = "lm_head.weight" if layout == "pretrain" else "head.weight"
    assert got[head][1:] == (1.0, WD)
    assert got["cls_token"][1:] == (layer_decay ** (L + 1), 0.0)
    assert got["patch_embed.proj.weight"][1:] == (layer_decay ** (L + 1), WD)
    assert got["blocks.0.attn.qkv.weight"][1:] == (layer_decay ** L, WD)
    assert got["blocks.11.mlp.fc2.bias"][1:] == (layer_decay, 0.0)
    if layout == "pretrain":
        assert got["mask_token"][1:] == (layer_decay ** (L + 1), WD)  # (1, 1, D), not in no_weight_decay: decays
        # a shared table is an "everything else" parameter, and unilm's option leaves its decay alone
        assert got["rel_pos_bias.relative_position_bias_table"][1:] == (1.0, WD)
    else:
        want_wd = 0.0 if no_decay_rpb else WD
        for i in range(L):
            assert got[f"blocks.{i}.attn.relative_position_bias_table"][1:] == (layer_decay ** (L - i), want_wd)


def test_layer_id():
    L = 12
    for name in ["cls_token", "mask_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]:
        assert layer_id(name, L) == 0 == unilm_get_num_layer_for_vit(name, L + 2)
    for name in ["rel_pos_bias.relative_position_bias_table", "norm.weight", "fc_norm.bias", "head.weight",
                 "lm_head.bias"]:
        assert layer_id(name, L) == L + 1 == unilm_get_num_layer_for_vit(name, L + 2)
    assert layer_id("blocks.0.norm1.weight", L) == 1
    assert layer_id("blocks.11.attn.relative_position_bias_table", L) == 12


def test_layer_decay_one_is_pretrainings_two_groups(base_models):
    for model in base_models.values():
        ours = parameter_groups(model, WD)
        legacy = legacy_pretrain_groups(model, WD)
        assert [g["group_name"] for g in ours] == ["decay", "no_decay"]
        assert [g["lr_scale"] for g in ours] == [1.0, 1.0]
        assert [g["weight_decay"] for g in ours] == [WD, 0.0]
        # same members in the same order: optimizer states index parameters by position over the groups
        assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in legacy]


def test_loads_a_legacy_pretraining_optimizer_state():
    model = tiny()
    legacy = torch.optim.AdamW(legacy_pretrain_groups(model, WD), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    legacy.step()
    opt = build_optimizer(model, lr=1e-3, weight_decay=WD)
    opt.load_state_dict(legacy.state_dict())
    for a, b in zip(opt.state_dict()["state"].values(), legacy.state_dict()["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)
    set_lr(opt, 3e-4)  # the loaded groups have no lr_scale: scale 1
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4]


def test_frozen_parameters_left_out():
    model = tiny()
    frozen = {n for n, p in model.named_parameters() if n.startswith(("patch_embed.", "blocks.0.", "cls_token"))}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    for decay in (1.0, 0.75):
        got = by_name(model, parameter_groups(model, WD, decay))
        assert set(got) == {n for n, _ in model.named_parameters()} - frozen
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.requires_grad_(False), lr=1e-3, weight_decay=WD)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_bad_layer_decay(bad):
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(tiny(), WD, bad)


def test_layer_decay_needs_blocks():
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False), torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match="blocks") as exc:
        parameter_groups(probe, WD, 0.9)
    assert "\n" not in str(exc.value)
    groups = parameter_groups(probe, WD)  # no layers needed without layer decay
    assert [len(g["params"]) for g in groups] == [1, 1]


# -- optimizer and lr -------------------------------------------------------------------------------------------
def test_build_optimizer_applies_scale_and_decay():
    """AdamW with zero gradients moves only by decoupled weight decay: p <- p (1 - lr x lr_scale x wd)."""
    model = tiny()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, layer_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.95)} and {g["eps"] for g in opt.param_groups} == {1e-6}
    assert all(g["lr"] == 1e-2 * g["lr_scale"] for g in opt.param_groups)
    set_lr(opt, 2e-2)
    assert all(g["lr"] == 2e-2 * g["lr_scale"] for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    info = by_name(model, opt.param_groups)
    for n, p in model.named_parameters():
        _, scale, wd = info[n]
        torch.testing.assert_close(p.detach(), before[n] * (1 - 2e-2 * scale * wd), rtol=1e-6, atol=0)
    assert info["head.weight"][1:] == (1.0, 0.1) and info["cls_token"][1:] == (0.5 ** 5, 0.0)  # tiny: L = 4


def test_set_lr_without_scale():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}], lr=1.0)  # e.g. a state loaded from before groups carried lr_scale
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25


def test_groups_survive_a_weights_only_checkpoint():
    """group_name / lr_scale go through torch.save and a weights-only load (how checkpoints are read)."""
    opt = build_optimizer(tiny(), lr=1e-3, weight_decay=WD, layer_decay=0.7)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = build_optimizer(tiny(), lr=5.0, weight_decay=0.0, layer_decay=0.7)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    keys = ("group_name", "lr_scale", "weight_decay", "lr")
    assert [[g[k] for k in keys] for g in opt2.param_groups] == [[g[k] for k in keys] for g in opt.param_groups]


@pytest.mark.parametrize("base_lr,min_lr,warmup,max_steps", [(1.5e-3, 1e-5, 10, 100), (4e-3, 1e-6, 0, 50),
                                                             (1e-3, 0.0, 20, 20), (5e-4, 1e-6, 3, 7)])
def test_warmup_cosine(base_lr, min_lr, warmup, max_steps):
    kw = dict(base_lr=base_lr, min_lr=min_lr, warmup_steps=warmup, max_steps=max_steps)
    for step in range(max_steps + 5):
        assert warmup_cosine(step, **kw) == legacy_lr_at(step, base_lr, min_lr, warmup, max_steps)
    if warmup:
        assert warmup_cosine(0, **kw) == pytest.approx(base_lr / warmup)
        assert warmup_cosine(warmup - 1, **kw) == pytest.approx(base_lr)
    if max_steps > warmup:
        assert warmup_cosine(warmup, **kw) == pytest.approx(base_lr)
        assert warmup_cosine(warmup + (max_steps - warmup) / 2, **kw) == pytest.approx((base_lr + min_lr) / 2)
        assert warmup_cosine(max_steps, **kw) == pytest.approx(min_lr)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, base_lr=1.0, min_lr=0.0, warmup_steps=-1, max_steps=10)


def test_scaled_lr():
    assert scaled_lr(4e-3, 1024, 1024) == 4e-3
    assert scaled_lr(4e-3, 256, 1024) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        scaled_lr(4e-3, 0, 1024)


# -- apex ---------------------------------------------------------------------------------------------------------
def test_apex_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError, installed or not
    with pytest.raises(ValueError, match="apex does not import") as exc:
        apex_classes()
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="apex does not import"):
        build_optimizer(tiny(), lr=1e-3, weight_decay=WD, apex=True)


def test_apex_swaps_layer_norms_keeping_parameters(monkeypatch):
    class FusedLayerNorm(torch.nn.LayerNorm):
        pass

    class FusedAdam(torch.optim.AdamW):
        def __init__(self, params, adam_w_mode, **kw):
            self.adam_w_mode = adam_w_mode
            super().__init__(params, **kw)

    apex = types.ModuleType("apex")
    apex.normalization = types.SimpleNamespace(FusedLayerNorm=FusedLayerNorm)
    apex.optimizers = types.SimpleNamespace(FusedAdam=FusedAdam)
    for name, mod in {"apex": apex, "apex.normalization": apex.normalization,
                      "apex.optimizers": apex.optimizers}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    model = tiny()
    params = {n: p for n, p in model.named_parameters()}
    n_norms = sum(type(m) is torch.nn.LayerNorm for m in model.modules())
    want = by_name(model, parameter_groups(model, WD, 0.8))
    opt = build_optimizer(model, lr=1e-3, weight_decay=WD, layer_decay=0.8, apex=True)
    assert isinstance(opt, FusedAdam) and opt.adam_w_mode is True
    assert sum(type(m) is FusedLayerNorm for m in model.modules()) == n_norms > 0
    assert not any(type(m) is torch.nn.LayerNorm for m in model.modules())
    assert all(params[n] is p for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert by_name(model, opt.param_groups) == want
    model(torch.randn(2, 3, 64, 64)).sum().backward()  # the swapped norms are in the graph of the same parameters
    assert all(p.grad is not None for p in model.parameters())
