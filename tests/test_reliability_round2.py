"""Reliability round 2 (issue 25), each test written as the attack: numbers that mean nothing refused in one line
naming the option, a failed start leaves the run directory as it was, a finished run resumed keeps its summary, a
swapped tokenizer / changed data / changed --init is noticed on resume, train-tokenizer takes the run-directory
rules, a run whose images are all unreadable stops."""

import json
import os
from pathlib import Path

import pytest

import beit_fast.train.finetune as ft
import beit_fast.train.pretrain as pt
from beit_fast.train.finetune import FinetuneConfig, finetune
from beit_fast.train.pretrain import PretrainConfig, pretrain
from helpers import pretrain_config

MODEL = dict(depth=1, embed_dim=32, num_heads=2, fused_kernels=False, drop_path_rate=0.0)
FT = dict(max_steps=2, batch_size=8, num_images=32, num_workers=0, warmup_steps=1, save_every=2, log_every=1,
          eval_every=0, seed=3, lr=2e-2, lr_batch=8, tensorboard=False, plot=False)


def _ft(out, **kw):
    return FinetuneConfig(out=str(out), **{**FT, "model": dict(MODEL), **kw})


def _pt(out, **kw):
    return pretrain_config(out, MODEL, **{**dict(max_steps=2, save_every=2, num_images=32, tensorboard=False,
                                                 plot=False), **kw})


def _listing(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- numbers that mean nothing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["--label-smoothing", "2"], "label_smoothing"),
    (["--label-smoothing", "1"], "label_smoothing"),
    (["--mixup-prob", "5"], "mixup_prob"),
    (["--mixup-prob", "-0.5"], "mixup_prob"),
    (["--mixup-switch-prob", "1.5"], "mixup_switch_prob"),
    (["--reprob", "5"], "reprob"),
    (["--auto-augment", "garbage"], "auto_augment"),
    (["--lr", "nan"], "lr"),
    (["--min-lr", "nan"], "min_lr"),
    (["--ema-decay", "nan"], "ema_decay"),
    (["--drop-path-rate", "nan"], "model.drop_path_rate"),
    (["--num-workers", "100000"], "num_workers"),
    (["--num-images", "1000000000000"], "num_images"),
])
def test_finetune_numbers_are_refused_naming_the_option(argv, option, tmp_path, capsys):
    out = tmp_path / "run"
    code = ft.main([*argv, "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"beit-fast finetune: error: {option}="), err
    assert "JSON" not in err[0] and not out.exists()


@pytest.mark.parametrize("argv, option", [
    (["--color-jitter", "nan"], "color_jitter"),
    (["--crop-scale", "nan"], "crop_scale"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--num-workers", "100000"], "num_workers"),
])
def test_pretrain_numbers_are_refused_naming_the_option(argv, option):
    with pytest.raises(ValueError, match=f"^{option}="):
        PretrainConfig.from_args(argv)


def test_evaluate_builtin_images_bounded():
    from beit_fast.data import build_classification_data

    with pytest.raises(ValueError, match="num_images must be in"):
        build_classification_data("builtin", num_images=10**13)


# -- a failed start --------------------------------------------------------------------------------------------------
def _fail_after_config(monkeypatch, module):
    def broken(*a, **k):
        raise ValueError("injected: the start failed after config.json was written")
    monkeypatch.setattr(module, "build_engine", broken)


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_a_failed_start_leaves_a_new_out_absent(task, tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"
    module, run, cfg = (pt, pretrain, _pt(out)) if task == "pretrain" else (ft, finetune, _ft(out))
    _fail_after_config(monkeypatch, module)
    with pytest.raises(ValueError, match="injected"):
        run(cfg)
    assert not out.exists()


def test_a_failed_start_leaves_an_existing_out_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "run"
    summary = pretrain(_pt(out))
    before = _listing(out)
    assert summary["steps_run"] == 2
    # a resume (e.g. to more steps) that fails at start: nothing new in out, config.json as it was
    _fail_after_config(monkeypatch, pt)
    with pytest.raises(ValueError, match="injected"):
        pretrain(_pt(out, max_steps=4, resume="auto"))
    assert _listing(out) == before
    # an empty directory the user made: left empty (no .lock, config.json or empty metrics to mistake for a run)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="injected"):
        pretrain(_pt(empty))
    assert list(empty.iterdir()) == []
    monkeypatch.undo()
    assert pretrain(_pt(out, max_steps=4, resume="auto"))["steps_run"] == 2  # the run goes on from its checkpoint


# -- a finished run resumed ------------------------------------------------------------------------------------------
def test_a_finished_run_resumed_keeps_its_summary(tmp_path):
    out = tmp_path / "pt"
    pretrain(_pt(out))
    before = (out / "summary.json").read_bytes()
    again = pretrain(_pt(out, resume="auto"))
    assert (out / "summary.json").read_bytes() == before
    assert again["steps_run"] == 2 and again["final_loss"] is not None

    out = tmp_path / "ft"
    finetune(_ft(out))
    before = (out / "summary.json").read_bytes()
    again = finetune(_ft(out, resume="auto"))
    assert (out / "summary.json").read_bytes() == before and again["steps_run"] == 2
    assert json.loads(before)["val_top1"] == again["val_top1"]


def test_no_stray_temporary_json_left(tmp_path):
    from beit_fast.train.run import clean_run_directory

    (tmp_path / ".summary.json.tmp").write_text("{")
    (tmp_path / "keep.json").write_text("{}")
    clean_run_directory(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep.json"]
