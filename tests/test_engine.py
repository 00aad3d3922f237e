"""The pretraining engine: DeepSpeed ZeRO on the CPU (2 processes) against one plain process, gradient accumulation,
exact resume under DeepSpeed, synthetic data, skipped images and non-finite losses, outputs (TensorBoard, plot),
export to the unilm layout, and bad input on the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit_fast.train.pretrain as pt
from beit_fast.data import MicroBatchSampler, StepBatchSampler, SyntheticMIMDataset
from beit_fast.masking import BlockwiseMaskGenerator
from beit_fast.train.engine import deepspeed_reasons
from beit_fast.train.pretrain import config_from_args, pretrain

from helpers import metrics_rows, pretrain_config, run_cli

SMALL = dict(depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.0, fused_kernels=False)
# The acceptance interface: the tiny preset, built-in data; small batches keep 2 CPU processes quick.
RUN = ["--preset", "tiny", "--data", "builtin", "--seed", "3", "--batch-size", "16", "--num-images", "64",
       "--num-workers", "0", "--log-every", "1", "--warmup-steps", "2", "--lr", "1e-3", "--fused-kernels", "false"]


def _cfg(out, **kw):
    return pretrain_config(out, SMALL, **{"max_steps": 4, "save_every": 0, **kw})


_metrics = metrics_rows


def _losses(out):
    return [float(r["loss"]) for r in _metrics(out)]


ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _env():
    env = dict(os.environ, **ENV)
    env.pop("TRITON_INTERPRET", None)  # the runs use the torch reference path (fused_kernels false)
    return env


def _torchrun(nproc, args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "beit_fast.train.pretrain", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _cli(*args, timeout=600):
    return run_cli(*args, env_extra=ENV, timeout=timeout)


needs_deepspeed = pytest.mark.skipif(deepspeed_reasons() is not None, reason=str(deepspeed_reasons()))


# -- data split over ranks and micro-batches -------------------------------------------------------------------------
def test_micro_batches_cover_the_global_batch():
    steps = StepBatchSampler(40, 8, seed=1)
    whole = iter(steps)
    parts = [iter(MicroBatchSampler(StepBatchSampler(40, 8, seed=1), rank=r, world_size=2, grad_accum=2))
             for r in range(2)]
    for _ in range(7):  # across an epoch boundary (5 steps per epoch)
        expected = next(whole)
        got = []
        for _m in range(2):
            for it in parts:
                got += next(it)
        assert sorted(got) == sorted(expected) and len(got) == 8
    with pytest.raises(ValueError, match="not divisible"):
        MicroBatchSampler(StepBatchSampler(40, 8), world_size=3)


def test_synthetic_data_is_deterministic_and_trains(tmp_path):
    ds = SyntheticMIMDataset(16, 64, 32, BlockwiseMaskGenerator(8, 26, min_num_patches=4), seed=2, return_skipped=True)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and a[4] == -1
    assert a[0].shape == (3, 64, 64) and a[1].shape == (3, 32, 32) and int(a[2].sum()) == 26
    assert not torch.equal(ds[(0, 4)][0], a[0])
    summary = pretrain(_cfg(tmp_path / "syn", data="synthetic", max_steps=2))
    assert summary["step"] == 2 and len(_losses(tmp_path / "syn")) == 2


# -- gradient accumulation and the plain engine ------------------------------------------------------------------
def test_grad_accumulation_matches_the_whole_batch(tmp_path):
    pretrain(_cfg(tmp_path / "whole", grad_accum_steps=1))
    pretrain(_cfg(tmp_path / "accum", grad_accum_steps=4))
    assert _losses(tmp_path / "accum") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-5)


NAN_DRIVER = str(Path(__file__).with_name("nan_driver.py"))


def _nan_run(out, call, extra=(), nproc=0):
    """A run with the loss of forward call `call` made NaN (tests/nan_driver.py); returns its metrics rows."""
    args = [*RUN, "--max-steps", "3", "--grad-accum-steps", "2", "--out", str(out), *extra]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               NAN_DRIVER, str(call), *args]
    else:
        cmd = [sys.executable, NAN_DRIVER, str(call), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return _metrics(out)


def test_non_finite_loss_skips_the_whole_step(tmp_path):
    # 2 micro-batches per step; forward call 3 is step 2's first micro-batch, call 4 its second (after the first
    # one's backward has accumulated). Either way step 2 makes no update, so step 3 sees the same weights.
    first = _nan_run(tmp_path / "first", 3, ["--save-every", "2"])
    second = _nan_run(tmp_path / "second", 4)
    for rows in (first, second):
        assert [int(r["step"]) for r in rows] == [1, 3]
        assert [int(r["skipped_steps"]) for r in rows] == [0, 1]
    assert second[1]["loss"] == first[1]["loss"]  # the accumulated half of step 2 was discarded
    # A checkpoint due at a skipped step is still written.
    assert sorted(p.name for p in (tmp_path / "first" / "checkpoints").glob("step_*")) == \
        ["step_00000002.pt", "step_00000003.pt"]


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, capsys):
    rc = pt.main(["--out", str(tmp_path / "nan"), "--lr=1e30", "--warmup-steps=0", "--max-bad-steps=2",
                  "--max-steps=5", "--batch-size=4", "--grad-accum-steps=2", "--num-images=16", "--num-workers=0",
                  "--depth=1", "--embed-dim=32", "--num-heads=2", "--fused-kernels=false", "--clip-grad=0"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 1 and err and "2 skipped steps in a row" in err[-1]


def test_corrupt_images_are_counted(tmp_path):
    from beit_fast.data import BuiltinShapes

    root = tmp_path / "imgs"
    root.mkdir()
    shapes = BuiltinShapes(10, 96, seed=0)
    for i in range(10):
        shapes[i][0].save(root / f"{i:02d}.png")
    for i in range(3):
        (root / f"{i:02d}_broken.jpg").write_bytes(b"not an image")
    summary = pretrain(_cfg(tmp_path / "run", data=str(root), max_steps=4, batch_size=13, num_images=13))
    rows = _metrics(tmp_path / "run")
    # Every epoch of 13 files reads each broken file once: the 3 files are counted once, not once per epoch.
    assert [int(r["skipped_images"]) for r in rows] == [3, 3, 3, 3]
    assert summary["skipped_images"] == 3


def test_outputs_plot_tensorboard_and_export(tmp_path):
    out = tmp_path / "run"
    summary = pretrain(_cfg(out, max_steps=3, save_every=2))
    assert Path(summary["plot"]).is_file() and Path(summary["plot"]).stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert set(_metrics(out)[0]) >= {"step", "loss", "mlm_acc", "lr", "img_per_s", "skipped_images"}
    r = _cli("export", str(out), "--out", str(tmp_path / "unilm.pth"))
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "unilm.pth", weights_only=True)["model"]
    ck = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)["model"]
    assert "rel_pos_bias.relative_position_index" in sd and torch.equal(sd["lm_head.weight"], ck["lm_head.weight"])
    from beit_fast import BeitConfig, BeitForMaskedImageModeling

    again = BeitForMaskedImageModeling(BeitConfig.from_preset("tiny", **SMALL))
    again.load_pretrained(sd)  # the unilm loader takes it back
    r = _cli("export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pth"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# -- options ----------------------------------------------------------------------------------------------------------
def test_checkpoints_of_another_run_are_never_mixed(tmp_path):
    out = tmp_path / "run"
    pretrain(_cfg(out, max_steps=4, save_every=2, keep_last=3))
    # A fresh run into a directory with checkpoints is refused, unless asked to overwrite.
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(_cfg(out, max_steps=2))
    # Resuming from an older checkpoint replaces the later ones: pruning and `--resume auto` see this run only.
    pretrain(_cfg(out, max_steps=3, save_every=0, keep_last=3, resume=str(out / "checkpoints" / "step_00000002.pt")))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000002.pt", "step_00000003.pt"]
    assert [int(r["step"]) for r in _metrics(out)] == [1, 2, 3]
    # Another directory's checkpoint resumed into this one: refused too (it would mix two runs).
    other = tmp_path / "other"
    pretrain(_cfg(other, max_steps=2, save_every=0))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(_cfg(out, max_steps=3, resume=str(other / "checkpoints" / "step_00000002.pt")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000003.pt"]
    # --overwrite: a fresh run; the earlier run's checkpoints and TensorBoard events go.
    assert (out / "tensorboard").is_dir()
    old_events = set((out / "tensorboard").iterdir())
    pretrain(_cfg(out, max_steps=1, overwrite=True, keep_last=3))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt"]
    assert not old_events & set((out / "tensorboard").iterdir())


def test_engine_options_parse_and_check(tmp_path):
    cfg = config_from_args(["--deepspeed", "--zero-stage", "3", "--compile", "--grad-accum-steps", "2",
                            "--local_rank=1"])
    assert cfg.deepspeed is True and cfg.zero_stage == 3 and cfg.compile is True and cfg.grad_accum_steps == 2
    assert config_from_args(["--deepspeed=false"]).deepspeed is False
    assert config_from_args(["--resume"]).resume == "auto" and config_from_args(["--resume", "x.pt"]).resume == "x.pt"
    assert config_from_args(["--resume", "--max-steps", "3"]).resume == "auto"
    for argv, msg in ((["--zero-stage", "4"], "zero_stage"), (["--batch-size", "10", "--grad-accum-steps", "4"],
                      "divisible"), (["--compile-mode", "fast"], "compile_mode"), (["--grad-accum-steps", "0"],
                      "grad_accum_steps")):
        with pytest.raises(ValueError, match=msg):
            config_from_args(argv)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("deepspeed: true\nzero_stage: 1\nmodel:\n  depth: 2\n")
    cfg = config_from_args(["--config", str(yaml_file)])
    assert cfg.deepspeed and cfg.zero_stage == 1 and cfg.model == {"depth": 2}


def test_cli_bad_input_is_one_line(tmp_path):
    cases = [
        (["--data", str(tmp_path / "nowhere")], "does not exist"),
        (["--bogus-key", "1"], "unknown option"),
        (["--zero-stage", "7", "--deepspeed"], "zero_stage"),
        (["--deepspeed", "--zero-stage", "2", "--data", str(tmp_path / "nowhere")], "does not exist"),
        (["--deepspeed", "--batch-size", "6", "--grad-accum-steps", "4"], "divisible"),
    ]
    for extra, msg in cases:
        r = _cli("pretrain", "--preset", "tiny", "--max-steps", "2", "--out", str(tmp_path / "o"), *extra)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and msg in lines[0], (extra, r.stderr)


# -- DeepSpeed ZeRO on the CPU ----------------------------------------------------------------------------------------
@needs_deepspeed
def test_zero2_two_processes_match_one_plain_process(tmp_path):
    plain, zero = tmp_path / "plain", tmp_path / "zero2"
    r = _cli("pretrain", *RUN, "--max-steps", "4", "--out", str(plain))
    assert r.returncode == 0, r.stderr
    _torchrun(2, [*RUN, "--max-steps", "4", "--out", str(zero), "--deepspeed", "--zero-stage", "2"])
    assert _losses(zero) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
    acc = {run: [float(r["mlm_acc"]) for r in _metrics(run)] for run in (plain, zero)}
    assert acc[zero] == pytest.approx(acc[plain], abs=1e-6)
    ck = zero / "checkpoints" / "step_00000004"
    assert (ck / "meta.pt").is_file() and (ck / "model.pt").is_file()
    assert not list((zero / "checkpoints").glob(".tmp-*"))
    a = torch.load(ck / "model.pt", weights_only=True)["model"]
    b = torch.load(plain / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-5


@needs_deepspeed
def test_zero_resume_is_exact_and_zero3_with_accumulation_matches(tmp_path):
    straight, resumed, z3 = tmp_path / "straight", tmp_path / "resumed", tmp_path / "z3"
    ds = ["--deepspeed", "--zero-stage", "2", "--save-every", "2"]
    _torchrun(2, [*RUN, *ds, "--max-steps", "4", "--out", str(straight)])
    _torchrun(2, [*RUN, *ds, "--max-steps", "2", "--out", str(resumed)])
    _torchrun(2, [*RUN, *ds, "--max-steps", "4", "--out", str(resumed), "--resume", "auto"])
    assert _losses(resumed) == _losses(straight)  # identical: same processes, same reductions
    # ZeRO-3 (parameters partitioned) with 2 micro-batches per step: the same losses as ZeRO-2.
    _torchrun(2, [*RUN, "--deepspeed", "--zero-stage", "3", "--grad-accum-steps", "2", "--max-steps", "4",
                  "--out", str(z3)])
    assert _losses(z3) == pytest.approx(_losses(straight), rel=1e-5, abs=1e-6)
    # A ZeRO checkpoint exports like a plain one.
    r = _cli("export", str(z3), "--out", str(tmp_path / "z3.pth"))
    assert r.returncode == 0, r.stderr
    assert "lm_head.weight" in torch.load(tmp_path / "z3.pth", weights_only=True)["model"]


@needs_deepspeed
def test_zero2_skips_a_non_finite_step_like_the_plain_engine(tmp_path):
    # Step 2's second micro-batch is NaN after its first one was reduced into ZeRO-2's gradient partitions:
    # those must be dropped on both ranks, as the plain engine drops its accumulated gradients.
    plain = _nan_run(tmp_path / "plain", 4)
    zero = _nan_run(tmp_path / "zero", 4, ["--deepspeed", "--zero-stage", "2"], nproc=2)
    assert [int(r["step"]) for r in zero] == [1, 3] and [int(r["skipped_steps"]) for r in zero] == [0, 1]
    assert float(zero[1]["loss"]) == pytest.approx(float(plain[1]["loss"]), rel=1e-5)


@needs_deepspeed
def test_deepspeed_one_process_without_a_launcher(tmp_path):
    # `beit-fast pretrain --deepspeed` run plainly: a one-process group, the same losses as the plain engine.
    plain, ds = tmp_path / "plain", tmp_path / "ds"
    assert _cli("pretrain", *RUN, "--max-steps", "3", "--out", str(plain)).returncode == 0
    r = _cli("pretrain", *RUN, "--max-steps", "3", "--out", str(ds), "--deepspeed", "--zero-stage", "1")
    assert r.returncode == 0, r.stderr
    assert _losses(ds) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
    # Resuming a DeepSpeed checkpoint without DeepSpeed is refused in one line.
    r = _cli("pretrain", *RUN, "--max-steps", "4", "--out", str(ds), "--resume", "auto")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "error" in ln]
    assert r.returncode == 2 and lines and "deepspeed: True -> False" in lines[-1], r.stderr


def test_pretrain_module_help():
    r = subprocess.run([sys.executable, "-m", "beit_fast.train.pretrain", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--deepspeed" in r.stdout and "--zero-stage" in r.stdout.replace("_", "-")
    assert pt.PretrainConfig().zero_stage == 2
