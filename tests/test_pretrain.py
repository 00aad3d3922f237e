"""The single-process pretraining loop: exact resume, config checks, CLI errors, outputs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit_fast.train.pretrain as pt
from beit_fast.train.pretrain import PretrainConfig, config_from_args, lr_at, pretrain

# The loop's own behaviour is tested on the reference path: the kernels have their own tests, and
# through the Triton CPU interpreter (TRITON_INTERPRET=1, set by conftest) every step would be ~50x slower.
SMALL = dict(depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.1, fused_kernels=False)


def _cfg(out, **kw):
    base = dict(preset="tiny", model=dict(SMALL), out=str(out), max_steps=6, batch_size=8, num_images=64,
                num_workers=0, warmup_steps=2, save_every=3, log_every=1, seed=3, lr=1e-3)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(out):
    with open(Path(out) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def test_resume_is_exact(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pretrain(_cfg(straight))
    steps_a, losses_a = _losses(straight)
    assert steps_a == [1, 2, 3, 4, 5, 6]

    # Crash right after the step-3 checkpoint, then `--resume auto`.
    crashed = tmp_path / "crashed"
    original = pt.save_checkpoint

    def save_then_crash(out, step, *args, **kwargs):
        path = original(out, step, *args, **kwargs)
        if step == 3:
            raise RuntimeError("simulated crash")
        return path

    monkeypatch.setattr(pt, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(_cfg(crashed))
    monkeypatch.setattr(pt, "save_checkpoint", original)
    summary = pretrain(_cfg(crashed, resume="auto"))
    steps_b, losses_b = _losses(crashed)
    assert steps_b == steps_a
    assert losses_b == losses_a  # bit-identical (fp32, CPU)
    assert summary["step"] == 6
    a = torch.load(Path(straight) / "checkpoints" / "step_00000006.pt", weights_only=False)["model"]
    b = torch.load(Path(crashed) / "checkpoints" / "step_00000006.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_and_keep_last(tmp_path):
    out = tmp_path / "run"
    summary = pretrain(_cfg(out, max_steps=7, save_every=2, keep_last=2))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert ckpts == ["step_00000006.pt", "step_00000007.pt"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrain"]["max_steps"] == 7 and cfg["model"]["depth"] == 2
    steps, losses = _losses(out)
    assert steps == list(range(1, 8)) and all(l > 0 for l in losses)
    assert summary["chance"] == pytest.approx(1 / 512)
    assert 0.0 <= summary["majority_baseline"] <= 1.0
    # The checkpoint exports to the unilm layout.
    from beit_fast import BeitConfig, BeitForMaskedImageModeling

    ck = torch.load(summary["checkpoint"], weights_only=False)
    model = BeitForMaskedImageModeling(BeitConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    unilm = model.export_state_dict("unilm")
    assert "rel_pos_bias.relative_position_index" in unilm and "mask_token" in unilm


def test_learns_above_majority_baseline(tmp_path):
    # A short run must beat predicting the most frequent token: the targets are learnable.
    summary = pretrain(_cfg(tmp_path / "learn", max_steps=60, batch_size=16, num_images=256, save_every=0,
                            lr=2e-3, model=dict(depth=2, embed_dim=64, num_heads=4, drop_path_rate=0.0,
                                                fused_kernels=False)))
    assert summary["final_mlm_acc"] > summary["majority_baseline"] + 0.02, summary


def test_lr_schedule():
    cfg = PretrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-5)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_groups():
    from beit_fast import BeitConfig, BeitForMaskedImageModeling

    model = BeitForMaskedImageModeling(BeitConfig.from_preset("tiny"))
    opt = pt.build_optimizer(model, PretrainConfig())
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table"} <= no_decay_names
    assert all(not n.endswith(".bias") and "norm" not in n and "gamma" not in n for n in decay_names)
    assert "blocks.0.attn.qkv.weight" in decay_names and "lm_head.weight" in decay_names
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_config_from_args(tmp_path):
    cfg = config_from_args(["--preset", "tiny", "--max-steps=5", "--depth=2", "--model.num_heads=2", "--lr", "2e-3"])
    assert cfg.max_steps == 5 and cfg.model == {"depth": 2, "num_heads": 2} and cfg.lr == 2e-3
    yml = tmp_path / "c.yaml"
    yml.write_text("max_steps: 9\nmodel:\n  depth: 1\nbatch_size: 4\n")
    cfg = config_from_args(["--config", str(yml), "--batch-size=6"])
    assert cfg.max_steps == 9 and cfg.batch_size == 6 and cfg.model == {"depth": 1}
    for bad in (["--bogus=1"], ["--max-steps=abc"], ["--depth=-1"], ["--masking=grid"], ["--model.nope=1"],
                ["positional"], ["--max-steps"], ["--preset=huge"]):
        with pytest.raises(ValueError):
            config_from_args(bad)


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: the CPU runs the reference path
    return subprocess.run([sys.executable, "-m", "beit_fast.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    for args in (["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                 ["pretrain", "--bogus=1"],
                 ["pretrain", "--max-steps=0"]):
        r = _cli(*args)
        assert r.returncode != 0, args
        lines = [l for l in r.stderr.strip().splitlines() if l]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("pretrain", "--data", str(empty), "--out", str(tmp_path / "o2"))
    assert r.returncode != 0 and "no images" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o2").exists()  # nothing started


def test_cli_pretrain_and_info(tmp_path):
    out = tmp_path / "cli"
    r = _cli("pretrain", "--preset", "tiny", "--data", "builtin", "--max-steps", "2", "--out", str(out), "--seed", "1",
             "--batch-size=4", "--num-images=16", "--num-workers=0", "--depth=1", "--fused-kernels=false")
    assert r.returncode == 0, r.stderr
    assert "final mlm_acc" in r.stdout and "checkpoint:" in r.stdout
    steps, _ = _losses(out)
    assert steps == [1, 2]
    r = _cli("info")
    assert r.returncode == 0 and "attention backends" in r.stdout and "math" in r.stdout


def test_image_folder_training_skips_corrupt(tmp_path):

    from beit_fast.data import BuiltinShapes

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    shapes = BuiltinShapes(12, 96, seed=0)
    for i in range(12):
        shapes[i][0].save(root / ("a" if i % 2 else "b") / f"{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    summary = pretrain(_cfg(tmp_path / "run", data=str(root), max_steps=3, batch_size=4, save_every=0))
    assert summary["step"] == 3


def test_fused_kernels_in_the_loop(tmp_path):
    # Two steps with the Triton kernels (interpreted on the CPU) match the reference path's losses.
    losses = {}
    for fused in (False, True):
        out = tmp_path / f"fused_{fused}"
        pretrain(_cfg(out, max_steps=2, batch_size=4, save_every=0,
                      model=dict(SMALL, drop_path_rate=0.0, fused_kernels=fused)))
        losses[fused] = _losses(out)[1]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
