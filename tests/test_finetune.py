"""Classification fine-tuning, linear probing, intermediate fine-tuning and `beit-fast evaluate` (train/finetune.py):
init from a pretraining run of this engine, a unilm-layout file and a timm state dict; exact resume; another
resolution; the head swap; ZeRO-2 on 2 CPU processes against one; bad input as one line with nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit_fast import BeitConfig, BeitForImageClassification
from beit_fast.train.classify import init_classifier, read_init
from beit_fast.train.engine import deepspeed_reasons
from beit_fast.train.finetune import FinetuneConfig, finetune
from beit_fast.train.pretrain import export_checkpoint, pretrain
from helpers import crash_after_checkpoint, metrics_rows, pretrain_config, run_cli

MODEL = dict(depth=2, embed_dim=32, num_heads=2, fused_kernels=False)
# The loop's behaviour on small inputs: 64 px builtin images (tiny preset: 8 px patches), batch 8.
FT = dict(max_steps=4, batch_size=8, num_images=64, num_workers=0, warmup_steps=1, save_every=2, log_every=1,
          eval_every=2, seed=3, lr=2e-2, lr_batch=8, tensorboard=False)
ARGS = ["--batch-size", "8", "--num-images", "64", "--num-workers", "0", "--warmup-steps", "1", "--log-every", "1",
        "--seed", "3", "--lr", "2e-2", "--lr-batch", "8", "--tensorboard", "false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-step pretraining run of the small model (shared relative position table)."""
    out = tmp_path_factory.mktemp("pt") / "run"
    pretrain(pretrain_config(out, MODEL, max_steps=4, save_every=0))
    return out


def _ft(out, **kw):
    return FinetuneConfig(out=str(out), **{**FT, "model": dict(MODEL), **kw})


def _losses(out):
    return [float(r["loss"]) for r in metrics_rows(out)]


def _cli(*args, **kw):
    return run_cli(*args, env_extra={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}, **kw)


def test_finetune_from_a_pretraining_run(pretrained, tmp_path):
    out = tmp_path / "ft"
    summary = finetune(_ft(out, init=str(pretrained), ema=True, ema_decay=0.5))
    assert summary["step"] == 4 and 0.0 <= summary["val_top1"] <= 1.0 and summary["num_classes"] == 8
    assert summary["val_top5"] >= summary["val_top1"]
    val = [json.loads(json.dumps(r)) for r in metrics_rows_file(out / "val_metrics.csv")]
    assert [int(r["step"]) for r in val] == [2, 4] and all(0 <= float(r["val_top1_ema"]) <= 1 for r in val)
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["num_classes"] == 8 and len(saved["classes"]) == 8
    assert saved["model_config"]["use_rel_pos_bias"] and not saved["model_config"]["use_shared_rel_pos_bias"]
    assert json.loads((out / "config.json").read_text())["model"]["depth"] == 2  # preset auto: the run's network
    # The pretrained shared table initialised every block's own table (unilm's layout conversion).
    src = read_init(str(pretrained))
    model = BeitForImageClassification(BeitConfig.from_dict(json.loads((out / "config.json").read_text())["model"]),
                                       num_classes=8)
    fresh = init_classifier(model, src, new_head=False)
    assert sorted(fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    shared = src.state_dict["rel_pos_bias.relative_position_bias_table"]
    for blk in model.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table.detach(), shared)
    assert torch.equal(model.blocks[1].mlp.fc1.weight.detach(), src.state_dict["blocks.1.mlp.fc1.weight"])


def metrics_rows_file(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_resume_is_exact(pretrained, tmp_path, monkeypatch):
    straight, crashed, ema = tmp_path / "straight", tmp_path / "crashed", dict(ema=True, ema_decay=0.5)
    finetune(_ft(straight, init=str(pretrained), **ema))
    crash_after_checkpoint(monkeypatch, lambda: finetune(_ft(crashed, init=str(pretrained), **ema)), 2)
    finetune(_ft(crashed, init=str(pretrained), resume="auto", **ema))
    assert _losses(crashed) == _losses(straight)  # bit-identical on the CPU: mixup, RandAugment, drop path
    a = torch.load(straight / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]
    b = torch.load(crashed / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    val = [(r["val_top1"], r["val_top1_ema"]) for r in metrics_rows_file(crashed / "val_metrics.csv")]
    assert val == [(r["val_top1"], r["val_top1_ema"]) for r in metrics_rows_file(straight / "val_metrics.csv")]


def test_unilm_file_at_another_resolution_and_a_timm_state_dict(pretrained, tmp_path):
    # The pretraining run exported in the unilm layout, fine-tuned at 96 px (12x12 grid instead of 8x8): the
    # relative position tables are resized on load.
    unilm = export_checkpoint(pretrained, tmp_path / "unilm.pth")
    summary = finetune(_ft(tmp_path / "r96", init=str(unilm), max_steps=2, model={**MODEL, "img_size": 96}))
    cfg = json.loads((tmp_path / "r96" / "config.json").read_text())["model"]
    assert cfg["img_size"] == 96 and cfg["depth"] == 2 and summary["step"] == 2
    best = torch.load(tmp_path / "r96" / "best.pt", weights_only=True)["model"]
    assert best["blocks.0.attn.relative_position_bias_table"].shape == ((2 * 12 - 1) ** 2 + 3, 2)
    # A timm Beit state dict (its names, k_bias buffers) with a 5-class head: preset auto reads the network off it.
    import timm

    net = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=5)
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    r = _cli("finetune", *ARGS, "--init", str(tmp_path / "timm.pth"), "--max-steps", "2", "--out",
             str(tmp_path / "t"))
    assert r.returncode == 2 and "--new-head" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "t").exists()
    r = _cli("finetune", *ARGS, "--init", str(tmp_path / "timm.pth"), "--max-steps", "2", "--new-head", "--out",
             str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert "replacing the 5-class head" in r.stderr and "val top-1" in r.stdout


def test_linear_probe_reports_every_layer(pretrained, tmp_path):
    out = tmp_path / "probe"
    summary = finetune(_ft(out, init=str(pretrained), linear_probe=True, max_steps=3, eval_every=0))
    assert set(summary["probe"]) == {"block1", "block2"}
    on_disk = json.loads((out / "summary.json").read_text())["probe"]  # the written summary has the values too
    assert on_disk == summary["probe"] and all(0 <= v <= 1 for v in on_disk.values())
    header = metrics_rows_file(out / "val_metrics.csv")[0]
    assert {"val_top1_block1", "val_top1_block2"} <= set(header)
    # The backbone did not move.
    saved = torch.load(out / "best.pt", weights_only=True)
    src = read_init(str(pretrained)).state_dict
    assert torch.equal(saved["model"]["backbone.blocks.0.mlp.fc1.weight"], src["blocks.0.mlp.fc1.weight"])
    assert saved["probe_layers"] == [0, 1]
    r = _cli("linprobe", *ARGS, "--init", str(pretrained), "--probe-layer", "9", "--out", str(tmp_path / "p9"))
    assert r.returncode == 2 and "probe_layer" in r.stderr, r.stderr


def _folder(root, classes, per_class=6, size=40):
    """An ImageNet-layout folder of small random PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_intermediate_finetuning_head_swap_and_evaluate(pretrained, tmp_path):
    # pretrain -> fine-tune on A (builtin, 8 classes) -> fine-tune on B (a folder of 3 classes).
    a = tmp_path / "a"
    finetune(_ft(a, init=str(pretrained), max_steps=2))
    b_data = _folder(tmp_path / "b_data", ["cat", "dog", "eel"])
    with pytest.raises(ValueError, match="--new-head"):
        finetune(_ft(tmp_path / "b", init=str(a), data=str(b_data), max_steps=2))
    assert not (tmp_path / "b").exists()
    summary = finetune(_ft(tmp_path / "b", init=str(a), data=str(b_data), max_steps=2, new_head=True))
    assert summary["num_classes"] == 3
    r = _cli("evaluate", str(tmp_path / "b"), "--data", str(b_data), "--out", str(tmp_path / "cm.png"))
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and all(c in r.stdout for c in ("cat", "dog", "eel"))
    assert (tmp_path / "cm.png").stat().st_size > 0
    r = _cli("evaluate", str(tmp_path / "b"), "--data", "builtin")  # 8 classes: not this model's
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_input_is_one_line_and_writes_nothing(pretrained, tmp_path):
    out = tmp_path / "out"
    bad_val = _folder(tmp_path / "missing", ["a", "b"])
    import shutil

    shutil.rmtree(bad_val / "val" / "b")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    wide = BeitForImageClassification(BeitConfig.from_preset("tiny", depth=2, embed_dim=64, num_heads=2), num_classes=8)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    cases = [
        (["--data", str(bad_val)], "b"),
        (["--data", str(empty)], "class"),
        (["--init", str(tmp_path / "wide.pth"), "--preset", "tiny", "--depth", "2", "--embed-dim", "32",
          "--num-heads", "2"], "does not fit"),
        (["--num-classes", "3"], "out of range"),
        (["--init", str(tmp_path / "nope.pth")], "not found"),
        (["--train-fraction", "0"], "train_fraction"),
        (["--builtin-classes", "9"], "builtin_classes"),
    ]
    for extra, words in cases:
        r = _cli("finetune", *ARGS, "--max-steps", "1", "--out", str(out), *extra)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (extra, r.stderr)
        assert not out.exists(), extra


needs_deepspeed = pytest.mark.skipif(deepspeed_reasons() is not None, reason=str(deepspeed_reasons()))


@needs_deepspeed
def test_zero2_two_processes_match_one_process(pretrained, tmp_path):
    # Mixup pairs images within a micro-batch and each rank draws its own drop path: both off, so that the
    # 2 x 4-image micro-batches compute exactly what one process's 8-image batch does.
    # the paper recipe (layer decay 0.65, smoothing): with the small one's full lr on every layer, lr 2e-2 makes step 3
    # chaotic enough that the two reduction orders part at 5e-5
    same = [*ARGS, "--init", str(pretrained), "--max-steps", "3", "--eval-every", "0", "--mixup", "0", "--cutmix",
            "0", "--drop-path-rate", "0", "--fused-kernels", "false", "--recipe", "paper"]
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    r = _cli("finetune", *same, "--out", str(plain))
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "beit_fast.train.finetune", *same, "--out", str(zero), "--deepspeed", "--zero-stage", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _losses(zero) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
    top1 = [float(metrics_rows_file(d / "val_metrics.csv")[-1]["val_top1"]) for d in (plain, zero)]
    assert top1[0] == pytest.approx(top1[1], abs=1e-6)  # the val shards of 2 ranks reduce to one process's score
    a = torch.load(zero / "checkpoints" / "step_00000003" / "model.pt", weights_only=True)["model"]
    b = torch.load(plain / "checkpoints" / "step_00000003.pt", weights_only=True)["model"]
    # fp32 rounding of the 2-rank gradient reduction, through 3 AdamW steps at lr 2e-2 (Adam's normalised update
    # turns a near-zero gradient's rounding into up to ~lr-sized moves): ~1e-5, against weights of ~1e-2..1.
    assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-4


def test_help_and_config():
    r = subprocess.run([sys.executable, "-m", "beit_fast.train.finetune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--layer-decay" in r.stdout and "--linear-probe" in r.stdout
    cfg = FinetuneConfig.from_args(["--init", "none", "--layer-decay", "0.75", "--depth", "2"])
    assert cfg.layer_decay == 0.75 and cfg.model == {"depth": 2}
    m = cfg.model_config()
    assert m.use_rel_pos_bias and not m.use_shared_rel_pos_bias and m.drop_path_rate == 0.1 and m.depth == 2
    paper = FinetuneConfig(preset="base")  # the paper's recipe: what --recipe auto gives a base network
    paper.resolve()
    assert paper.lr == 4e-3 and paper.lr_batch == 1024 and paper.layer_decay == 0.65 and paper.recipe == "paper"
    for bad in (["--layer-decay", "0"], ["--mixup", "-1"], ["--batch-size", "7", "--mixup", "0.8"]):
        with pytest.raises(ValueError):
            FinetuneConfig.from_args(bad)
    assert Path(__file__).exists()
