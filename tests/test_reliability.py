"""Reliability and security of the pretraining engine (issue 10): hostile checkpoint files never run, a non-finite
gradient is never applied, one run per directory, signals and full disks lose nothing, a hung rank ends the job,
bad checkpoint and tokenizer files are one line. The faults are injected by tests/fault_driver.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import beit_fast.train.pretrain as pt
from beit_fast.checkpoint import CheckpointReadError, UnsafeFileError, safe_load
from beit_fast.train.engine import PlainEngine, deepspeed_reasons
from beit_fast.train.pretrain import read_checkpoint

from helpers import metrics_rows, run_cli

RUN = ["--preset", "tiny", "--data", "builtin", "--seed", "3", "--batch-size", "8", "--num-images", "32",
       "--num-workers", "0", "--log-every", "1", "--warmup-steps", "1", "--lr", "1e-3", "--fused-kernels", "false",
       "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--drop-path-rate", "0", "--tensorboard", "false",
       "--plot", "false"]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
DRIVER = str(Path(__file__).with_name("fault_driver.py"))
needs_deepspeed = pytest.mark.skipif(deepspeed_reasons() is not None, reason=str(deepspeed_reasons()))


def _env():
    env = dict(os.environ, **ENV)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(fault, args, nproc=0, timeout=300):
    """tests/fault_driver.py FAULT ARGS (under torchrun with nproc processes); the CompletedProcess."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    return subprocess.run([*launch, DRIVER, fault, *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def _cli(*args, timeout=300):
    return run_cli(*args, env_extra=ENV, timeout=timeout)


def _errors(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith("beit-fast")]


def _one_line(r, code: int, *words: str) -> str:
    """The run exited `code` with one 'beit-fast ...' line holding `words`, and no traceback."""
    lines = _errors(r.stderr)
    assert r.returncode == code and "Traceback" not in r.stderr and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _only_the_launchers_traceback(stderr: str) -> None:
    """torchrun prints its own traceback (ChildFailedError) when a worker exits non-zero; the workers print none."""
    assert stderr.count("Traceback (most recent call last)") == stderr.count("errors.ChildFailedError: "), stderr


def _no_stray_files(out: Path) -> None:
    for d in (out, out / "checkpoints"):
        stray = [p.name for p in d.iterdir() if p.name.startswith(".") and p.name != ".lock"] if d.is_dir() else []
        assert not stray, stray


class _RunsCode:
    """Unpickling this calls os.system: a file holding one runs a shell command under a plain torch.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights(path: Path) -> dict:
    return safe_load(path)["model"]


# -- 1. no file runs code ---------------------------------------------------------------------------------------------
def test_hostile_checkpoint_files_run_nothing_at_any_entry_point(tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    assert _cli("pretrain", *RUN, "--max-steps", "1", "--out", str(out)).returncode == 0
    good = out / "checkpoints" / "step_00000001.pt"
    ckpt = safe_load(good)
    hostile = tmp_path / "hostile.pt"
    torch.save({**ckpt, "stats": {**ckpt["stats"], "x": _RunsCode(marker)}}, hostile)
    with pytest.raises(UnsafeFileError, match="posix.system|os.system"):
        read_checkpoint(hostile)
    # --resume FILE, --resume auto, export, load_pretrained, tokenize: each refuses in one line, exit 2.
    _one_line(_cli("pretrain", *RUN, "--max-steps", "2", "--out", str(tmp_path / "o1"), "--resume", str(hostile)),
              2, "refused", "system")
    hostile.replace(good)
    _one_line(_cli("pretrain", *RUN, "--max-steps", "2", "--out", str(out), "--resume", "auto"), 2, "refused",
              "system")
    _one_line(_cli("export", str(good), "--out", str(tmp_path / "x.pth")), 2, "refused", "system")
    _one_line(_cli("tokenize", "--tokenizer", str(good), "--out", str(tmp_path / "t.pt")), 2, "system")
    from beit_fast import BeitConfig, BeitForMaskedImageModeling

    with pytest.raises(UnsafeFileError):
        BeitForMaskedImageModeling(BeitConfig.from_preset("tiny")).load_pretrained(str(good))
    # A DeepSpeed-style directory: its meta.pt and model.pt are read the same way.
    d = out / "checkpoints" / "step_00000002"
    d.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}, d / "model.pt")
    torch.save({k: ckpt[k] for k in ("step", "config", "model_config", "stats")}, d / "meta.pt")
    (d / "manifest.json").write_text(json.dumps({"files": {f.name: f.stat().st_size for f in d.iterdir()}}))
    _one_line(_cli("export", str(d), "--out", str(tmp_path / "y.pth")), 2, "refused", "model.pt")
    assert not marker.exists() and not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()


def test_safe_load_reads_our_files_and_older_numpy_rng_states(tmp_path):
    import numpy as np

    old_style = tmp_path / "old.pt"
    torch.save({"numpy": np.random.get_state(), "torch": torch.get_rng_state()}, old_style)
    state = safe_load(old_style)
    assert state["numpy"][1].dtype == np.uint32  # what checkpoints of earlier versions hold: allowed, by name
    for bad, msg in ((b"", "empty file"), (b"garbage", "cannot read")):
        (tmp_path / "bad.pt").write_bytes(bad)
        with pytest.raises(CheckpointReadError, match=msg):
            safe_load(tmp_path / "bad.pt")
    with pytest.raises(CheckpointReadError, match="is a directory"):
        safe_load(tmp_path)


# -- 2. a non-finite gradient is never applied ------------------------------------------------------------------------
def test_plain_engine_skips_a_step_with_an_inf_gradient():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = PlainEngine(model, opt, device=torch.device("cpu"), bf16=False, clip_grad=3.0, grad_accum=1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    assert engine.step() == float("inf")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not opt.state
    assert all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    assert torch.isfinite(torch.tensor(engine.step())) and not torch.equal(before[0], model.weight)


@pytest.mark.parametrize("engine_args", [[], pytest.param(["--deepspeed", "--zero-stage", "0"], marks=needs_deepspeed),
                                         pytest.param(["--deepspeed", "--zero-stage", "2"], marks=needs_deepspeed)],
                         ids=["plain", "zero0", "zero2"])
def test_an_inf_gradient_with_a_finite_loss_is_skipped(tmp_path, engine_args):
    out = tmp_path / "run"
    r = _run("grad@2", [*RUN, "--max-steps", "4", "--save-every", "2", "--keep-last", "1", "--out", str(out),
                        *engine_args])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics_rows(out)
    assert [int(x["step"]) for x in rows] == [1, 3, 4] and rows[-1]["skipped_steps"] == "1"
    assert "non-finite gradient norm" in r.stderr
    final = out / "checkpoints" / ("step_00000004" + ("/model.pt" if engine_args else ".pt"))
    assert all(torch.isfinite(v).all() for v in _weights(final).values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    out = tmp_path / "run"
    r = _run("nanweight@3", [*RUN, "--max-steps", "6", "--save-every", "2", "--max-bad-steps", "9", "--out",
                             str(out)])
    _one_line(r, 1, "weights are not finite at step 4", "step_00000002.pt")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002.pt"]


# -- 3. one run per directory -----------------------------------------------------------------------------------------
def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "beit_fast.cli", "pretrain", *RUN, "--max-steps", "100000",
                              "--save-every", "0", "--out", str(out)], stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 120
        while not (out / "metrics.csv").exists() and time.time() < deadline:  # the first run is training
            time.sleep(0.2)
        second = _cli("pretrain", *RUN, "--max-steps", "2", "--seed", "4", "--out", str(out), "--overwrite")
        _one_line(second, 2, "in use by another run", f"pid {first.pid}")
        assert first.poll() is None  # untouched, still running
    finally:
        first.terminate()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "stopped by SIGTERM" in err
    # Once it has ended the directory is free again (the kernel released the lock).
    assert _cli("pretrain", *RUN, "--max-steps", "1", "--out", str(out), "--overwrite").returncode == 0


def test_kill_9_with_a_data_worker_then_resume_is_exact(tmp_path):
    """A run killed with SIGKILL (its data-loader worker outliving it for a moment) can be restarted at once: the
    worker does not hold the run's lock; the resumed run ends with the uninterrupted run's weights and metrics."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = [*RUN, "--max-steps", "8", "--save-every", "2", "--keep-last", "5", "--num-workers", "1"]
    assert _cli("pretrain", *args, "--out", str(straight)).returncode == 0
    proc = subprocess.Popen([sys.executable, DRIVER, "sleep@6:60", *args, "--out", str(killed)],
                            stderr=subprocess.DEVNULL, env=_env())  # holds still in step 6
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000004.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    r = _cli("pretrain", *args, "--out", str(killed), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    final = "checkpoints/step_00000008.pt"
    a, b = _weights(straight / final), _weights(killed / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in metrics_rows(killed)] == [x["loss"] for x in metrics_rows(straight)]
    _no_stray_files(killed)


# -- 4. and 6. checkpoints are complete or not there; nothing stray survives a start -----------------------------------
@needs_deepspeed
def test_incomplete_or_hostile_deepspeed_checkpoints_are_never_resumed(tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "ds"
    args = [*RUN, "--deepspeed", "--zero-stage", "2", "--save-every", "1", "--keep-last", "3", "--out", str(out)]
    assert _cli("pretrain", *args, "--max-steps", "2").returncode == 0
    ck = out / "checkpoints"
    assert sorted(json.loads((ck / "step_00000002" / "manifest.json").read_text())["files"]) == \
        sorted(p.name for p in (ck / "step_00000002").iterdir() if p.name != "manifest.json")
    # A kill while deleting step 2 (model.pt already gone, the folder still named) and a crashed save: both are
    # removed at the next start, with a warning each, and the run resumes from step 1.
    (ck / "step_00000002" / "model.pt").unlink()
    (ck / ".tmp-step_00000003").mkdir()
    (ck / ".step_00000003.pt.x1y2z3w4.tmp").write_bytes(b"x" * 100)
    r = _cli("pretrain", *args, "--max-steps", "3", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "incomplete checkpoint: model.pt is missing" in r.stderr and "resumed from" in r.stderr
    assert [int(x["step"]) for x in metrics_rows(out)] == [1, 2, 3]
    _no_stray_files(out)
    # A missing RNG file is an error, not a silent reseed.
    (ck / "step_00000003" / "rng_rank00000.pt").unlink()
    manifest = ck / "step_00000003" / "manifest.json"
    files = json.loads(manifest.read_text())
    del files["files"]["rng_rank00000.pt"]
    manifest.write_text(json.dumps(files))
    _one_line(_cli("pretrain", *args, "--max-steps", "4", "--resume", "auto"), 2, "rng_rank00000.pt is missing")
    # A hostile DeepSpeed shard is refused by the same loader; nothing in it runs.
    shard = next((ck / "step_00000002").glob("*model_states.pt"))
    torch.save({"x": _RunsCode(marker)}, shard)
    files = json.loads((ck / "step_00000002" / "manifest.json").read_text())
    files["files"][shard.name] = shard.stat().st_size
    (ck / "step_00000002" / "manifest.json").write_text(json.dumps(files))
    _one_line(_cli("pretrain", *args, "--max-steps", "4", "--resume", str(ck / "step_00000002"), "--overwrite"), 2,
              "refused", "system")
    assert not marker.exists()


# -- 5. a full disk ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine_args", [[], pytest.param(["--deepspeed", "--zero-stage", "1"],
                                                          marks=needs_deepspeed)], ids=["plain", "zero1"])
def test_disk_full_during_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, engine_args):
    out = tmp_path / "run"
    args = [*RUN, "--max-steps", "6", "--save-every", "2", "--out", str(out), *engine_args]
    # Write 1 is the step-2 checkpoint (plain), writes 1-5 its DeepSpeed files (2 shards, RNG, model.pt, meta.pt);
    # the first write of the step-4 checkpoint fails.
    fail_at = 2 if not engine_args else 6
    r = _run(f"enospc@{fail_at}", args)
    _one_line(r, 1, "No space left on device", "errno 28")
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert names == ["step_00000002" + ("" if engine_args else ".pt")], names
    _no_stray_files(out)
    r = _cli("pretrain", *args, "--resume", "auto")  # the previous checkpoint resumes
    assert r.returncode == 0 and "resumed from" in r.stderr and "step_00000002" in r.stderr, r.stderr[-3000:]


# -- 11. signals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [("TERM", 143), ("INT", 130)])
def test_a_signal_mid_run_checkpoints_and_resumes_to_the_uninterrupted_run(tmp_path, sig, code):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = [*RUN, "--max-steps", "5", "--save-every", "0", "--num-workers", "1"]
    assert _cli("pretrain", *args, "--out", str(straight)).returncode == 0
    r = _run(f"signal@3:{sig}", [*args, "--out", str(cut)])  # during step 3
    _one_line(r, code, f"stopped by SIG{sig} after step 3", "step_00000003.pt")
    _no_stray_files(cut)
    assert _cli("pretrain", *args, "--out", str(cut), "--resume", "auto").returncode == 0
    a, b = _weights(straight / "checkpoints" / "step_00000005.pt"), _weights(cut / "checkpoints" / "step_00000005.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in metrics_rows(cut)] == [x["loss"] for x in metrics_rows(straight)]


@needs_deepspeed
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "ds"
    r = _run("signal@2:TERM:1", [*RUN, "--batch-size", "8", "--max-steps", "5", "--save-every", "0", "--deepspeed",
                                 "--zero-stage", "2", "--out", str(out)], nproc=2)
    assert r.returncode != 0 and "stopped by SIGTERM after step 2" in r.stderr, r.stderr[-3000:]
    _only_the_launchers_traceback(r.stderr)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert (out / "checkpoints" / "step_00000002" / "rng_rank00001.pt").is_file()


# -- 12. a hung rank ends the job --------------------------------------------------------------------------------------
@needs_deepspeed
def test_a_hung_rank_ends_the_job_after_dist_timeout(tmp_path):
    t0 = time.time()
    r = _run("stop@3:1", [*RUN, "--max-steps", "5", "--deepspeed", "--zero-stage", "2", "--dist-timeout", "5",
                          "--out", str(tmp_path / "ds")], nproc=2, timeout=240)
    assert r.returncode != 0 and time.time() - t0 < 200
    assert "a collective failed or timed out (dist_timeout=5 s)" in r.stderr, r.stderr[-3000:]
    _only_the_launchers_traceback(r.stderr)


# -- 7. and 10. bad tokenizer and checkpoint files are one line --------------------------------------------------------
def test_bad_tokenizer_and_hand_edited_checkpoints_are_one_line(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _one_line(_cli("pretrain", *RUN, "--max-steps", "1", "--out", str(tmp_path / "t"), "--tokenizer", str(empty)),
              2, "empty.pt")
    out = tmp_path / "run"
    assert _cli("pretrain", *RUN, "--max-steps", "1", "--out", str(out)).returncode == 0
    good = safe_load(out / "checkpoints" / "step_00000001.pt")
    model = dict(good["model"])
    wrong_shape = {**good, "model": {**model, "cls_token": torch.zeros(1, 1, 7)}}
    missing_key = {**good, "model": {k: v for k, v in model.items() if k != "cls_token"}}
    bad_rng = {**good, "rng": {**good["rng"], "torch": torch.zeros(3)}}
    bad_step = {**good, "step": "one"}
    bad_hist = {**good, "stats": {**good["stats"], "token_hist": torch.zeros(3, dtype=torch.long)}}
    bad_acc = {**good, "stats": {**good["stats"], "recent_acc": 5}}
    opt = good["optimizer"]
    moments = {i: {**st, "exp_avg": torch.zeros(3)} if i == 0 else st for i, st in opt["state"].items()}
    bad_moment = {**good, "optimizer": {**opt, "state": moments}}
    for name, ckpt, words in (("shape", wrong_shape, ("model state does not fit", "cls_token")),
                              ("missing", missing_key, ("model state does not fit", "cls_token")),
                              ("rng", bad_rng, ("malformed RNG state",)),
                              ("step", bad_step, ("malformed checkpoint", "step='one'")),
                              ("hist", bad_hist, ("malformed checkpoint", "token_hist")),
                              ("acc", bad_acc, ("malformed checkpoint", "recent_acc")),
                              ("moment", bad_moment, ("optimizer state does not fit", "exp_avg"))):
        path = tmp_path / f"{name}.pt"
        torch.save(ckpt, path)
        _one_line(_cli("pretrain", *RUN, "--max-steps", "2", "--out", str(tmp_path / name), "--resume", str(path)),
                  2, *words)
    torch.save(wrong_shape, tmp_path / "shape.pt")
    _one_line(_cli("export", str(tmp_path / "shape.pt"), "--out", str(tmp_path / "e.pth")), 2, "do not fit")


def test_dist_timeout_is_checked_and_may_change_on_resume():
    with pytest.raises(ValueError, match="dist_timeout"):
        pt.config_from_args(["--dist-timeout", "0"])
    assert pt.PretrainConfig().dist_timeout == 600 and "dist_timeout" in pt.RESUME_MAY_DIFFER


@pytest.mark.gpu
def test_fused_adamw_skips_an_inf_gradient_on_the_device():
    """On CUDA the plain engine skips through fused AdamW's found_inf input (no host sync before the update):
    weights, moments and the step count are exactly as before the skipped step."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = torch.nn.Linear(64, 64).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    engine = PlainEngine(model, opt, device=device, bf16=True, clip_grad=3.0, grad_accum=1)
    x = torch.randn(8, 64, device=device)
    model(x).square().mean().backward()
    assert torch.isfinite(torch.tensor(engine.step()))
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    model(x).square().mean().backward()
    model.weight.grad[0, 0] = float("inf")
    assert engine.step() == float("inf")
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    for before, p in zip(state, model.parameters()):
        assert all(torch.equal(before[k], opt.state[p][k]) for k in before), p.shape
    model(x).square().mean().backward()
    assert torch.isfinite(torch.tensor(engine.step())) and not torch.equal(params[0], model.weight)
    assert float(opt.state[model.weight]["step"]) == 2.0
