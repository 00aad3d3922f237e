"""Segmentation fine-tuning and evaluation (train/segment.py): a short CPU run on `builtin` from a pretraining run of
this engine that learns (val mIoU above the all-background baseline), exact resume, init from an mmseg-layout and a
transformers checkpoint, the head swap, `beit-fast segment-eval`, and bad data as one line with nothing written."""

import json

import pytest
import torch
from PIL import Image

from beit_fast import BeitConfig, BeitForSemanticSegmentation
from beit_fast.train.pretrain import pretrain
from beit_fast.train.segment import SegmentConfig, load_segmenter, segment
from beit_fast.train.segment import main as segment_main
from helpers import crash_after_checkpoint, metrics_rows, pretrain_config, run_cli

MODEL = dict(depth=4, embed_dim=32, num_heads=2, fused_kernels=False)
# 64 px builtin images (tiny preset: 8 px patches -> an 8x8 grid, the patch-8 adapter), batch 8.
SEG = dict(max_steps=4, batch_size=8, num_images=32, num_workers=0, save_every=2, log_every=1, eval_every=2, seed=3,
           lr=1e-3, lr_batch=8, tensorboard=False, channels=32)
ARGS = ["--batch-size", "8", "--num-images", "32", "--num-workers", "0", "--log-every", "1", "--seed", "3",
        "--tensorboard", "false", "--channels", "32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step pretraining run of the small model (shared relative position table)."""
    out = tmp_path_factory.mktemp("pt") / "run"
    pretrain(pretrain_config(out, MODEL, max_steps=2, save_every=0))
    return out


def _seg(out, **kw):
    return SegmentConfig(out=str(out), **{**SEG, "model": dict(MODEL), **kw})


def _cli(*args, **kw):
    return run_cli(*args, env_extra={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}, **kw)


def test_segment_from_a_pretraining_run_learns(pretrained, tmp_path):
    """200 steps on 64 builtin images of 3 classes (background, disc, square; no photometric distortion or rescaling:
    the budget of a unit test): val mIoU well above predicting background everywhere."""
    out = tmp_path / "seg"
    summary = segment(_seg(out, init=str(pretrained), max_steps=200, num_images=64, eval_every=100, save_every=0,
                           lr=4e-3, log_every=50, num_classes=3, photometric=False, ratio_range=[1.0, 1.0]))
    saved = json.loads((out / "summary.json").read_text())
    rows = metrics_rows(out)
    assert summary["step"] == 200 and len(rows) == 200
    background = _background_miou(out)
    assert summary["val_miou"] > background + 0.05, (summary["val_miou"], background)
    assert saved["best_miou"] >= summary["val_miou"] - 1e-12 and (out / "best.pt").exists()
    assert (out / "val_samples.png").exists() and (out / "metrics.png").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["depth"] == 4 and config["model"]["use_rel_pos_bias"]  # preset auto: the init's network
    assert config["num_classes"] == 3 and config["classes"] == ["background", "disc", "square"]
    model, record = load_segmenter(out)
    assert isinstance(model, BeitForSemanticSegmentation) and record["num_classes"] == 3


def _background_miou(out):
    """The all-background mIoU over the run's val set (the baseline the run's plot shows)."""
    from beit_fast.seg_data import build_segmentation_data
    from beit_fast.train.segment import _all_background_miou

    cfg = json.loads((out / "config.json").read_text())["segment"]
    data = build_segmentation_data("builtin", num_images=cfg["num_images"], image_size=64, seed=cfg["data_seed"],
                                   num_classes=cfg["num_classes"])
    return _all_background_miou(data)


def test_resume_is_exact(pretrained, tmp_path, monkeypatch):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    segment(_seg(straight, init=str(pretrained)))
    crash_after_checkpoint(monkeypatch, lambda: segment(_seg(crashed, init=str(pretrained))), at_step=2)
    segment(_seg(crashed, init=str(pretrained), resume="auto"))
    a, b = metrics_rows(straight), metrics_rows(crashed)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 4
    va = (straight / "val_metrics.csv").read_text().splitlines()
    vb = (crashed / "val_metrics.csv").read_text().splitlines()
    assert va == vb
    sa = torch.load(straight / "best.pt", weights_only=True)["model"]
    sb = torch.load(crashed / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_from_an_mmseg_checkpoint_and_the_head_swap(tmp_path):
    """A segmentation checkpoint in mmseg's layout initialises every
    weight; a head of another class count needs --new-head."""
    cfg = BeitConfig.from_preset("tiny", **MODEL, use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    src = BeitForSemanticSegmentation(cfg, 9, channels=32)
    mm = tmp_path / "upernet_mmseg.pth"
    torch.save({"meta": {}, "state_dict": src.export_state_dict("mmseg")}, mm)
    out = tmp_path / "from-mmseg"
    segment(_seg(out, init=str(mm), max_steps=2, eval_every=0))
    model, _ = load_segmenter(out)
    # 2 steps later the weights moved, but every one came from the file (a fresh init would differ by far more)
    assert torch.allclose(model.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight, atol=0.05)

    other = BeitForSemanticSegmentation(cfg, 5, channels=32)
    torch.save({"state_dict": other.export_state_dict("mmseg")}, tmp_path / "five.pth")
    r = _cli("segment", "--init", str(tmp_path / "five.pth"), "--out", str(tmp_path / "five"), "--max-steps", "1",
             *ARGS)
    assert r.returncode == 2 and "--new-head" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "five").exists()
    summary = segment(_seg(tmp_path / "five", init=str(tmp_path / "five.pth"), new_head=True, max_steps=1,
                           eval_every=0))
    assert summary["num_classes"] == 9


def test_segment_eval_cli(pretrained, tmp_path):
    out = tmp_path / "seg"
    segment(_seg(out, init=str(pretrained), max_steps=2, eval_every=0))
    r = _cli("segment-eval", str(out), "--data", "builtin", "--num-images", "32", "--flip", "--scales", "0.75,1.0",
             "--out", str(tmp_path / "eval.png"))
    assert r.returncode == 0, r.stderr
    assert "mIoU" in r.stdout and "background" in r.stdout
    assert (tmp_path / "eval.png").exists()
    r = _cli("segment-eval", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not found" in r.stderr


def _write_pair(root, side, stem, size=(40, 32), label_size=None, value=1):
    (root / "images" / side).mkdir(parents=True, exist_ok=True)
    (root / "labels" / side).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(root / "images" / side / f"{stem}.jpg")
    label = Image.new("L", label_size or size, value)
    label.save(root / "labels" / side / f"{stem}.png")


@pytest.mark.parametrize("problem", ["no_label", "size", "value", "empty_val"])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, problem, capsys):
    root = tmp_path / "data"
    _write_pair(root, "train", "a")
    _write_pair(root, "val", "b")
    if problem == "no_label":
        (root / "labels" / "train" / "a.png").unlink()
        _write_pair(root, "train", "c")
    elif problem == "size":
        _write_pair(root, "train", "c", label_size=(20, 32))
    elif problem == "value":
        _write_pair(root, "train", "c", value=7)
    else:
        for p in (root / "images" / "val").iterdir():
            p.unlink()
        for p in (root / "labels" / "val").iterdir():
            p.unlink()
    out = tmp_path / "run"
    code = segment_main(["--data", str(root), "--num-classes", "3", "--out", str(out), "--max-steps", "1",
                         "--preset", "tiny", *ARGS])  # in-process (the CLI's exit path is test_init_...'s)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    named = {"no_label": "a.jpg", "size": "c.", "value": "c.png", "empty_val": "val"}[problem]
    assert named in err, err
    assert not out.exists()


def test_list_options_from_the_command_line():
    cfg = SegmentConfig.from_args(["--ratio-range", "[1.0,1.5]", "--out-indices", "0,1,2,3", "--scale", "256,64"])
    assert cfg.ratio_range == [1.0, 1.5] and cfg.out_indices == [0, 1, 2, 3] and cfg.scale == [256, 64]
    with pytest.raises(ValueError, match="--lr expects a number"):
        SegmentConfig.from_args(["--lr", "[1,2]"])
    with pytest.raises(ValueError, match="out_indices"):
        SegmentConfig.from_args(["--out-indices", "1,2"]).validate()
