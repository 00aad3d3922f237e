"""The single-process pretraining loop: exact resume, config checks, CLI errors, outputs."""

import json
from pathlib import Path

import pytest
import torch

import beit_fast.train.pretrain as pt
from beit_fast.train.optim import build_optimizer, warmup_cosine
from beit_fast.train.pretrain import PretrainConfig, config_from_args, pretrain
from beit_fast.train.runtime import one_line_error
from helpers import crash_after_checkpoint, metrics_rows, pretrain_config, run_cli

# The loop's own behaviour is tested on the reference path: the kernels have their own tests, and
# through the Triton CPU interpreter (TRITON_INTERPRET=1, set by conftest) every step would be ~50x slower.
SMALL = dict(depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.1, fused_kernels=False)


def _cfg(out, **kw):
    return pretrain_config(out, SMALL, **kw)


def _losses(out):
    rows = metrics_rows(out)
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def test_resume_is_exact(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pretrain(_cfg(straight))
    steps_a, losses_a = _losses(straight)
    assert steps_a == [1, 2, 3, 4, 5, 6]

    # Crash right after the step-3 checkpoint, then `--resume auto`.
    crashed = tmp_path / "crashed"
    crash_after_checkpoint(monkeypatch, lambda: pretrain(_cfg(crashed)), 3)
    summary = pretrain(_cfg(crashed, resume="auto"))
    steps_b, losses_b = _losses(crashed)
    assert steps_b == steps_a
    assert losses_b == losses_a  # bit-identical (fp32, CPU)
    assert summary["step"] == 6
    a = torch.load(Path(straight) / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
    b = torch.load(Path(crashed) / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
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

    ck = torch.load(summary["checkpoint"], weights_only=True)
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

    def lr_at(step, cfg):
        return warmup_cosine(step, **cfg.lr_schedule())

    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-5)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_groups():
    from beit_fast import BeitConfig, BeitForMaskedImageModeling

    model = BeitForMaskedImageModeling(BeitConfig.from_preset("tiny"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    # unilm's get_parameter_groups: no decay for 1-D params, names ending in ".bias", and the names of
    # no_weight_decay() = {"pos_embed", "cls_token"} matched exactly; the mask token (1, 1, D) and the shared
    # relative position bias table (2-D) are not 1-D and not in that set, so the reference decays them.
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert "cls_token" in no_decay_names
    assert {"mask_token", "rel_pos_bias.relative_position_bias_table"} <= decay_names
    assert all(p.ndim == 1 or names[id(p)].endswith(".bias") or names[id(p)] in {"cls_token", "pos_embed"}
               for p in no_decay["params"])
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert not any(n.endswith(".bias") or "norm" in n or "gamma" in n for n in decay_names)
    assert {"blocks.0.norm1.weight", "blocks.0.gamma_1", "blocks.0.attn.q_bias"} <= no_decay_names
    assert "blocks.0.attn.qkv.weight" in decay_names and "lm_head.weight" in decay_names
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_weight_decay_skip_names_match_exactly():
    # A skip name is a full parameter name, not a substring: "pos_embed" must not catch "rel_pos_embed_table".
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
            self.rel_pos_embed_table = torch.nn.Parameter(torch.zeros(4, 8))
            self.proj = torch.nn.Linear(8, 8)
            self.scale = torch.nn.Parameter(torch.ones(8))

        def no_weight_decay(self):
            return {"pos_embed"}

    model = Toy()
    decay, no_decay = build_optimizer(model, lr=1e-3, weight_decay=0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"rel_pos_embed_table", "proj.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"pos_embed", "proj.bias", "scale"}


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
    return run_cli(*args, env_extra={"PYTHONWARNINGS": "ignore"}, cwd=cwd)


def test_cli_errors_are_one_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: abc\n")
    for args in (["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                 ["pretrain", "--config", str(bad_yaml)],
                 ["pretrain", "--fused-kernels=true", "--out", str(tmp_path / "o")],
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


# -- bad input: one line on stderr, non-zero exit, nothing started ---------------------------------------------------
def _one_line_error(capsys, main, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc != 0, (argv, captured)
    assert len(lines) == 1 and "Traceback" not in captured.err, (argv, captured.err)
    return rc, lines[0]


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
    cases = {
        "lr: abc\n": "lr expects a number",
        'max_steps: "5"\n': "max_steps expects an int",
        "model: 5\n": "model expects a mapping",
        'model: {init_values: "a"}\n': "init_values expects a number or null",
        "model: {depth: 2.5}\n": "depth expects an int",
        "fused_kernels: 1\n": "fused_kernels expects",
        "lr: [1\n": "invalid YAML at line 2",
        "- 1\n- 2\n": "expected a mapping",
        "model: {extra: {a: 1}}\n": "unknown model key",
        "seed: 1.5\n": "seed expects an int",
    }
    for i, (text, message) in enumerate(cases.items()):
        yml = tmp_path / f"c{i}.yaml"
        yml.write_text(text)
        out = tmp_path / f"o{i}"
        rc, line = _one_line_error(capsys, pt.main, ["--config", str(yml), "--out", str(out)])
        assert rc == 2 and message in line and str(yml) in line, (text, line)
        assert not out.exists()
    # YAML 1.1 reads 1e-3 (no dot) as a string: numbers are still numbers.
    yml = tmp_path / "ok.yaml"
    yml.write_text("lr: 1e-3\nmin_lr: 0\nmodel:\n  layer_norm_eps: 1e-6\n  init_values: null\n")
    cfg = config_from_args(["--config", str(yml)])
    assert cfg.lr == 1e-3 and cfg.min_lr == 0.0 and isinstance(cfg.min_lr, float)
    assert cfg.model == {"layer_norm_eps": 1e-6, "init_values": None}


def test_bad_options_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as a user's shell: the CPU cannot run Triton
    out = tmp_path / "o"
    cases = [
        (["--attn_backend=triton"], "attention backend 'triton' cannot run here"),
        (["--attn-backend", "xformers"], "attention backend 'xformers' cannot run here"),
        (["--fused_kernels=true"], "fused_kernels=True) but cannot run"),
        (["--clip_grad=-1"], "clip_grad"),
        (["--out="], "out=''"),
        (["--data="], "data=''"),
        (["--model.extra=5"], "unknown model key --model.extra"),
        (["--extra=5"], "unknown option --extra"),
        (["--seed=-1"], "seed"),
        (["--seed=4294967296"], "seed"),
        (["--lr=nan"], "lr"),
        (["--lr=inf"], "lr"),
        (["--beta2=1"], "beta2"),
        (["--weight-decay=-0.1"], "weight_decay"),
        (["--init-values=abc"], "init_values expects"),
        (["--model.depth=[1"], "depth expects an int"),
    ]
    for args, message in cases:
        argv = ["--out", str(out), "--num-workers=0", *args] if args != ["--out="] else args
        rc, line = _one_line_error(capsys, pt.main, argv)
        assert rc == 2 and message in line, (args, line)
        assert not out.exists(), args
    # The switches that can run are accepted: clipping off, fused "auto", an explicit backend that runs here.
    cfg = config_from_args(["--clip-grad=0", "--fused-kernels=auto", "--attn-backend=math", "--init-values=none"])
    assert cfg.clip_grad == 0.0 and cfg.model == {"fused_kernels": "auto", "attn_backend": "math", "init_values": None}


def test_unreadable_image_folder_fails_before_training(tmp_path, capsys):
    from beit_fast.data import DataError

    root = tmp_path / "corrupt"
    root.mkdir()
    for i in range(10):
        (root / f"{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    with pytest.raises(DataError, match="none of the 10 image files"):
        pretrain(_cfg(out, data=str(root), batch_size=4))
    assert not out.exists()  # failed up front, not in the loop
    rc, line = _one_line_error(capsys, pt.main, ["--data", str(root), "--out", str(out), "--batch-size=4"])
    assert rc == 1 and "can be decoded" in line
    # A DataLoader worker re-raises with its traceback in the message: the CLI keeps the last line.
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nbeit_fast.data.DataError: no readable image under d")
    assert one_line_error(wrapped) == "no readable image under d"


def test_large_seed(tmp_path):
    # Seeds above ~1.8e6 overflowed torch.manual_seed in the per-sample seed.
    summary = pretrain(_cfg(tmp_path / "seed", seed=2_000_000, max_steps=1, batch_size=4, save_every=0))
    assert summary["step"] == 1
    cfg = config_from_args(["--seed", str(2**32 - 1)])
    assert cfg.seed == 2**32 - 1


def test_training_stopped_is_one_line(tmp_path, capsys):
    # A run that diverges stops with its message on one line (exit 1), not a traceback.
    rc, line = _one_line_error(capsys, pt.main, ["--out", str(tmp_path / "nan"), "--lr=1e30", "--warmup-steps=0",
                                                 "--max-bad-steps=1", "--max-steps=3", "--batch-size=4",
                                                 "--num-images=16", "--num-workers=0", "--depth=1",
                                                 "--embed-dim=32", "--num-heads=2", "--fused-kernels=false",
                                                 "--clip-grad=0", "--log-every=100"])
    assert rc == 1 and "skipped steps in a row" in line


# -- resume ------------------------------------------------------------------------------------------------------------
def test_resume_refuses_changed_settings_and_keeps_config(tmp_path, caplog):
    out = tmp_path / "run"
    pretrain(_cfg(out, max_steps=2, save_every=0))
    config_before = (out / "config.json").read_text()
    metrics_before = (out / "metrics.csv").read_text()
    refused = [
        (dict(seed=4), "seed: 3 -> 4"),
        (dict(batch_size=4), "batch_size: 8 -> 4"),
        (dict(lr=2e-3, min_lr=0.0), "lr: 0.001 -> 0.002"),
        (dict(warmup_steps=1, weight_decay=0.1, beta2=0.99, eps=1e-6, clip_grad=1.0), "weight_decay"),
        (dict(masking="random"), "masking: 'block' -> 'random'"),
        (dict(num_images=32), "num_images"),
        (dict(precision="fp32"), "precision: 'auto' -> 'fp32'"),
        (dict(model=dict(SMALL, depth=1)), "model.depth: 2 -> 1"),
    ]
    for changes, message in refused:
        with pytest.raises(ValueError, match="refusing to resume") as info:
            pretrain(_cfg(out, max_steps=4, save_every=0, resume="auto", **changes))
        assert message in str(info.value) and "\n" not in str(info.value), (changes, str(info.value))
        # A refused resume leaves the run directory as it was.
        assert (out / "config.json").read_text() == config_before
        assert (out / "metrics.csv").read_text() == metrics_before
    with pytest.raises(ValueError, match="eps: 1e-08 -> 1e-06"):
        pretrain(_cfg(out, resume="auto", eps=1e-6))
    # Bookkeeping may change; max_steps too, with a warning (the cosine schedule changes).
    with caplog.at_level("WARNING", logger="beit_fast.pretrain"):
        summary = pretrain(_cfg(out, max_steps=3, save_every=5, log_every=2, keep_last=3, max_bad_steps=5,
                                device="cpu", resume=str(out / "checkpoints" / "step_00000002.pt")))
    assert summary["step"] == 3 and summary["steps_run"] == 1
    assert any("max_steps changed from 2 to 3" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "config.json").read_text())["pretrain"]["max_steps"] == 3


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        pretrain(_cfg(tmp_path / "o", resume=str(bogus)))
    torch.save({"step": 1}, bogus)
    with pytest.raises(ValueError, match="not a pretraining checkpoint"):
        pretrain(_cfg(tmp_path / "o", resume=str(bogus)))
    assert not (tmp_path / "o").exists()


def test_resume_a_finished_run(tmp_path, capsys):
    out = tmp_path / "done"
    first = pretrain(_cfg(out, max_steps=2, save_every=0))
    ckpt = out / "checkpoints" / "step_00000002.pt"
    mtime = ckpt.stat().st_mtime_ns
    summary = pretrain(_cfg(out, max_steps=2, save_every=0, resume="auto"))
    # The run's recent accuracies travel in the checkpoint: the final mlm_acc is the finished run's.
    assert summary["step"] == 2 and summary["steps_run"] == 0 and summary["final_mlm_acc"] == first["final_mlm_acc"]
    assert summary["checkpoint"] == str(ckpt) and ckpt.stat().st_mtime_ns == mtime  # left as it was

    def no_nan(token):
        raise AssertionError(f"{token} in summary.json")

    on_disk = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)
    assert on_disk["final_mlm_acc"] == first["final_mlm_acc"]
    argv = ["--out", str(out), "--max-steps=2", "--save-every=0", "--resume", "auto", "--batch-size=8",
            "--num-images=64", "--num-workers=0", "--warmup-steps=2", "--log-every=1", "--seed=3", "--lr=1e-3",
            "--depth=2", "--embed-dim=32", "--num-heads=2", "--drop-path-rate=0.1", "--fused-kernels=false"]
    assert pt.main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"final mlm_acc {first['final_mlm_acc']:.4f}" in stdout and "nan" not in stdout


# -- the beit-fast command -------------------------------------------------------------------------------------------
def test_cli_usage_version_and_unknown_commands(capsys):
    from beit_fast import __version__, cli

    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: beit-fast" in captured.err  # a usage error: stderr
    assert cli.main(["--help"]) == 0
    assert "usage: beit-fast" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"beit-fast {__version__}"
    for argv, message in ((["trian"], "unknown command 'trian'"), (["--bogus"], "unknown option '--bogus'"),
                          (["info", "--bogus"], "info takes none"),
                          (["mask-bench", "--num-masking-patches", "500"], "exceeds the 14x14 grid"),
                          (["mask-bench", "--input-size", "0"], "input_size must be positive"),
                          (["mask-bench", "--n", "0"], "--n must be positive"),
                          (["mask-bench", "--n", "abc"], "invalid int value")):
        rc, line = _one_line_error(capsys, cli.main, argv)
        assert rc == 2 and message in line, (argv, line)
    assert cli.main(["info", "--help"]) == 0
    assert "usage: beit-fast info" in capsys.readouterr().out
    # --help anywhere in the pretrain options prints the help, and nothing runs.
    for argv in (["pretrain", "--depth", "2", "--help"], ["pretrain", "--bogus=1", "-h"]):
        assert cli.main(argv) == 0
        captured = capsys.readouterr()
        assert "--max-steps" in captured.out and captured.err == ""


def test_close_loader_stops_workers_that_ignore_sigterm():
    # The training loops' workers ignore SIGTERM (worker_init): any still alive at interpreter exit would keep
    # multiprocessing's exit handler waiting forever (a run that failed mid-loop hung instead of exiting 2).
    from beit_fast.train.runtime import close_loader, worker_init

    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True,
                                         worker_init_fn=worker_init)
    it = iter(loader)
    next(it)
    workers = list(it._workers)
    assert workers and all(w.is_alive() for w in workers)
    close_loader(loader, it)
    assert not any(w.is_alive() for w in workers) and loader._iterator is None
