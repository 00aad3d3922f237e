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
    assert again["steps_run"] == 0 and again["final_loss"] == json.loads(before)["final_loss"] is not None

    out = tmp_path / "ft"
    finetune(_ft(out))
    before = (out / "summary.json").read_bytes()
    again = finetune(_ft(out, resume="auto"))
    assert (out / "summary.json").read_bytes() == before and again["steps_run"] == 0
    assert json.loads(before)["val_top1"] == again["val_top1"]


def test_no_stray_temporary_json_left(tmp_path):
    from beit_fast.train.run import clean_run_directory

    (tmp_path / ".summary.json.tmp").write_text("{")
    (tmp_path / "keep.json").write_text("{}")
    clean_run_directory(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep.json"]


# -- a run's inputs identified by content ----------------------------------------------------------------------------
def _tokenizer(out: Path, seed: int) -> Path:
    from beit_fast.train.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    train_tokenizer(TokenizerTrainConfig(out=str(out), max_steps=2, batch_size=4, num_images=8, log_every=1,
                                         n_hid=8, n_init=8, vocab_size=512, seed=seed, save_every=0,
                                         overwrite=True))
    return out / "tokenizer.pt"


def test_a_tokenizer_swapped_under_a_run_is_refused_on_resume(tmp_path):
    tok = _tokenizer(tmp_path / "tok", seed=0)
    out = tmp_path / "run"
    tiny = dict(model={**MODEL, "vocab_size": 512}, tokenizer=str(tok))
    pretrain(_pt(out, **tiny))
    _tokenizer(tmp_path / "tok", seed=1)  # retrained into the same path: other targets under the same name
    with pytest.raises(ValueError, match="the tokenizer file changed since the checkpoint"):
        pretrain(_pt(out, max_steps=4, resume="auto", **tiny))


def test_changed_data_and_init_are_refused_on_resume(tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(16):
        Image.new("RGB", (48, 48), (i * 15, 80, 200 - i * 10)).save(data / f"{i:02d}.png")
    out = tmp_path / "run"
    pretrain(_pt(out, data=str(data), num_workers=0))
    Image.new("RGB", (48, 48), (1, 2, 3)).save(data / "new.png")  # the folder's files changed
    with pytest.raises(ValueError, match=r"the data changed since the checkpoint .*--allow-changed-data"):
        pretrain(_pt(out, data=str(data), max_steps=4, resume="auto"))
    assert pretrain(_pt(out, data=str(data), max_steps=4, resume="auto", allow_changed_data=True))["steps_run"] == 2

    init = tmp_path / "pt"
    pretrain(_pt(init))
    ftout = tmp_path / "ft"
    finetune(_ft(ftout, init=str(init), max_steps=2))
    pretrain(_pt(init, max_steps=4, resume="auto"))  # the --init run directory's newest weights are other weights
    with pytest.raises(ValueError, match="the --init weights changed since the checkpoint"):
        finetune(_ft(ftout, init=str(init), max_steps=4, resume="auto"))


# -- train-tokenizer: the run-directory rules ------------------------------------------------------------------------
def test_train_tokenizer_refuses_an_existing_tokenizer_and_resumes_exactly(tmp_path):
    from beit_fast.train.run import RunLock
    from beit_fast.train.train_tokenizer import TokenizerTrainConfig, main, train_tokenizer

    base = dict(max_steps=4, batch_size=4, num_images=8, log_every=1, n_hid=8, n_init=8, save_every=2, seed=0)
    straight = tmp_path / "straight"
    train_tokenizer(TokenizerTrainConfig(out=str(straight), **base))
    before = (straight / "tokenizer.pt").read_bytes()
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in base.items()] + ["--out", str(straight)]
    assert main(argv) == 2 and (straight / "tokenizer.pt").read_bytes() == before  # refused, nothing replaced
    with RunLock(straight):  # a run in progress there
        assert main(argv + ["--overwrite"]) == 2

    cut = tmp_path / "cut"
    import beit_fast.train.train_tokenizer as tt

    real = tt._step

    def crash_at_third(enc, dec, opt, params, x, step, *a):
        if step == 2:
            raise RuntimeError("killed")
        return real(enc, dec, opt, params, x, step, *a)
    tt._step = crash_at_third
    try:
        with pytest.raises(RuntimeError, match="killed"):
            train_tokenizer(TokenizerTrainConfig(out=str(cut), **base))
    finally:
        tt._step = real
    resumed = train_tokenizer(TokenizerTrainConfig(out=str(cut), **base, resume="auto"))
    assert resumed["steps_run"] == 2
    import csv

    def rows(d):
        with open(d / "metrics.csv") as f:
            return [{k: v for k, v in r.items() if k != "img_per_s"} for r in csv.DictReader(f)]
    assert rows(cut) == rows(straight)  # exact resume


# -- all images unreadable -------------------------------------------------------------------------------------------
def test_pretraining_on_unreadable_images_stops(tmp_path):
    from beit_fast.data import DataError

    data = tmp_path / "images"
    data.mkdir()
    from PIL import Image

    for i in range(16):  # 4 of 16 decode (the up-front check finds those), 12 do not
        if i < 4:
            Image.new("RGB", (48, 48), (i * 40, 90, 10)).save(data / f"{i:02d}.jpg")
        else:
            (data / f"{i:02d}.jpg").write_bytes(b"\xff\xd8 not a jpeg " + bytes([i]))
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"of the 16 images read so far could not be decoded"):
        pretrain(_pt(out, data=str(data), max_steps=8, save_every=0))
    assert pretrain(_pt(out, data=str(data), max_steps=2, max_bad_images_frac=1.0))["skipped_images"] >= 1
