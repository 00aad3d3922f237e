"""`beit-fast study` (cells, resume, reports) and `beit-fast attention-maps` (the own-shape attention number)."""

import json
import math
from pathlib import Path

import pytest
import torch

from beit_fast import BeitConfig
from beit_fast.model import BeitModel
from beit_fast.train.attention_maps import default_queries, own_shape_attention, patch_labels
from beit_fast.train.attention_maps import main as maps_main
from beit_fast.train.study import StudyConfig, VARIANTS, mean_std, plan_cells, study, tokenizer_preset
from beit_fast.train.study import main as study_main
from helpers import pretrain_config

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=64)


# -- the study's plan --------------------------------------------------------------------------------------------
def test_plan_has_every_variant_switch_and_budget(tmp_path):
    cfg = StudyConfig(out=str(tmp_path), seeds=2, pretrain_steps=10)
    cfg.validate()
    cells = {c.name: c for c in plan_cells(cfg)}
    assert "tokenizer" in cells
    per_seed = {v: [s for s in ("pretrain", "finetune", "linprobe", "segment", "attention")
                    if f"{s}/{v}/seed1" in cells] for v in VARIANTS}
    assert per_seed["scratch"] == ["finetune", "linprobe", "segment", "attention"]  # no pretraining
    assert all(len(s) == 5 for v, s in per_seed.items() if v != "scratch")

    def opt(cell, key):
        argv = cells[cell].argv
        return argv[argv.index(key) + 1]

    assert opt("pretrain/random_masking/seed0", "--masking") == "random"
    assert opt("pretrain/pixels/seed0", "--target") == "pixels" and "--tokenizer" not in cells[
        "pretrain/pixels/seed0"].argv and cells["pretrain/pixels/seed0"].needs == []  # no tokenizer for pixels
    assert opt("pretrain/pixels_random/seed1", "--masking") == "random"
    assert opt("pretrain/all_tokens/seed0", "--loss-on") == "all"
    assert opt("pretrain/beit/seed0", "--max-steps") == "10" and opt("pretrain/beit_2x/seed0", "--max-steps") == "20"
    assert cells["pretrain/beit/seed0"].needs == ["tokenizer"]
    assert opt("finetune/beit/seed1", "--init") == str(tmp_path / "pretrain" / "beit" / "seed1")
    assert opt("finetune/scratch/seed1", "--init") == "none" and opt("finetune/beit/seed1", "--seed") == "1"
    # The same fine-tuning budget for every variant: the argv differs only in init, preset, seed and out.
    ft = [cells[f"finetune/{v}/seed0"].argv for v in VARIANTS]
    same = {tuple(a[i:i + 2]) for a in ft for i in range(0, len(a), 2) if a[i] not in ("--init", "--preset", "--out")}
    assert len(same) == len(ft[0]) // 2 - 3
    assert {c.name.split("/")[0] for c in plan_cells(StudyConfig(out=str(tmp_path), variants=["pixels", "scratch"],
                                                                 segmentation=False))} == \
        {"pretrain", "finetune", "linprobe", "attention"}  # no tokenizer without a token variant, no segment cells


def test_quick_puts_its_budget_under_explicit_options(tmp_path):
    cfg = StudyConfig.from_args(["--quick", "--finetune-steps", "7", "--out", str(tmp_path)])
    assert cfg.quick and cfg.finetune_steps == 7 and cfg.pretrain_steps == 60
    assert StudyConfig.from_args(["--quick=on"]).pretrain_steps == 60
    assert StudyConfig.from_args(["--quick", "--quick", "false"]).pretrain_steps == StudyConfig().pretrain_steps
    assert tokenizer_preset("tiny") == "small" and tokenizer_preset("base") == "dalle"
    assert plan_cells(StudyConfig(preset="base"))[0].argv[:2] == ["--preset", "dalle"]
    with pytest.raises(ValueError, match="variants"):
        StudyConfig.from_args(["--variants", "beit,nope"])


# -- running and resuming, with a stand-in for the commands --------------------------------------------------------
VALUES = {"beit": 0.5, "random_masking": 0.45, "pixels": 0.4, "pixels_random": 0.3, "all_tokens": 0.42,
          "beit_2x": 0.55, "scratch": 0.2}


def _cell_name(log_path):
    d = Path(log_path).parent
    return "/".join(d.parts[-3:]) if d.name.startswith("seed") else d.name


def fake_run(command, argv, log_path):
    """Writes what `command` would (summary.json / maps.json / tokenizer.pt) with known values."""
    d, name = Path(log_path).parent, _cell_name(log_path)
    if command == "train-tokenizer":
        (d / "tokenizer.pt").write_bytes(b"x")
        return 0, 0.0
    stage, variant, seed = name.split("/")
    v = VALUES[variant] + 0.01 * int(seed[4:])
    summary = {"pretrain": {"final_loss": 5 - v, "final_mlm_acc": v / 2}, "finetune": {"val_top1": v},
               "linprobe": {"probe": {"block1": v / 4, "block2": v / 3}},
               "segment": {"val_miou": v / 2}}.get(stage)
    if stage == "attention":
        (d / "maps.json").write_text(json.dumps({"score": {"own_shape_mass": v, "area": 0.2},
                                                 "random_init": {"own_shape_mass": 0.19}}))
    else:
        (d / "summary.json").write_text(json.dumps(summary))
    return 0, 0.0


class FakeRunner:
    """`fake_run`, recording the cells it ran; the cells in `fail` exit 1 instead."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, command, argv, log_path):
        name = _cell_name(log_path)
        self.calls.append(name)
        if name in self.fail:
            Path(log_path).write_text("beit-fast x: error: it broke\n")
            return 1, 0.0
        return fake_run(command, argv, log_path)


def crash_once(command, argv, log_path):
    """In a worker process: the first finetune/beit/seed0 kills its worker (as an out-of-memory kill would)."""
    import os

    marker = Path(log_path).parents[3] / "crash-once"
    if _cell_name(log_path) == "finetune/beit/seed0" and marker.exists():
        marker.unlink()
        os._exit(1)
    return fake_run(command, argv, log_path)


def test_study_resume_skips_finished_cells_and_reports(tmp_path):
    cfg = StudyConfig(out=str(tmp_path / "s"), seeds=3)
    runner = FakeRunner()
    result = study(cfg, runner)
    cells = plan_cells(cfg)
    assert result["failed"] == [] and sorted(runner.calls) == sorted(c.name for c in cells)
    assert runner.calls[0] == "tokenizer" or runner.calls[0].startswith("pretrain/pixels")
    # Seed by seed: every seed-0 cell before any seed-2 cell.
    seeds = [c.split("seed")[-1] for c in runner.calls if "seed" in c]
    assert max(i for i, s in enumerate(seeds) if s == "0") < min(i for i, s in enumerate(seeds) if s == "2")
    rows = {r.split(",")[0] + "/" + r.split(",")[1]: r.split(",") for r in
            (tmp_path / "s" / "study.csv").read_text().splitlines()[1:]}
    mean, std = mean_std([0.5, 0.51, 0.52])
    assert float(rows["beit/top1"][2]) == pytest.approx(mean) and float(rows["beit/top1"][3]) == pytest.approx(std)
    assert float(rows["beit/probe"][2]) == pytest.approx(mean / 3)  # the best block
    assert float(rows["scratch/attn_own"][2]) == pytest.approx(0.19)  # from scratch: the random init's
    assert rows["beit/top1"][6] == "82.86" and rows["beit/miou"][6] == "44.65"
    md = (tmp_path / "s" / "study.md").read_text()
    assert "| BEiT | 0.510 +- 0.010 |" in md and "82.86" in md
    assert "pretraining beats training from scratch (top-1: beit 0.510" in md and "reproduced, beyond" in md
    assert "longer pretraining helps (top-1" in md

    # Everything done: a rerun runs nothing.
    runner.calls.clear()
    study(cfg, runner)
    assert runner.calls == []
    # An interrupted cell (its record says running) and a changed budget rerun exactly those cells.
    rec = tmp_path / "s" / "segment" / "pixels" / "seed1" / "cell.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "status": "running"}))
    study(cfg, runner)
    assert runner.calls == ["segment/pixels/seed1"]
    runner.calls.clear()
    cfg2 = StudyConfig(out=str(tmp_path / "s"), seeds=3, linprobe_steps=5)
    study(cfg2, runner)
    assert sorted(runner.calls) == sorted(c.name for c in cells if c.stage == "linprobe")
    # Another pretraining budget: the pretrainings and everything downstream of them are redone (they read the new
    # checkpoints), from-scratch cells and the tokenizer are not.
    runner.calls.clear()
    study(StudyConfig(out=str(tmp_path / "s"), seeds=3, linprobe_steps=5, pretrain_steps=7), runner)
    assert sorted(runner.calls) == sorted(c.name for c in cells if c.variant not in (None, "scratch"))


def test_a_dead_worker_requeues_its_cell(tmp_path):
    cfg = StudyConfig(out=str(tmp_path / "s"), seeds=1, variants=["beit"], segmentation=False, workers=2, threads=1)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "crash-once").write_text("")
    result = study(cfg, crash_once, in_process=False)
    assert result["failed"] == [] and not (tmp_path / "s" / "crash-once").exists()
    assert "a worker process died" in (tmp_path / "s" / "finetune" / "beit" / "seed0" / "log.txt").read_text()
    assert json.loads((tmp_path / "s" / "finetune" / "beit" / "seed0" / "cell.json").read_text())["status"] == "done"


def test_a_failed_cell_skips_what_needs_it(tmp_path):
    cfg = StudyConfig(out=str(tmp_path / "s"), seeds=1, variants=["beit", "pixels"], segmentation=False)
    runner = FakeRunner(fail={"pretrain/pixels/seed0"})
    result = study(cfg, runner)
    assert set(result["failed"]) == {"pretrain/pixels/seed0", "finetune/pixels/seed0", "linprobe/pixels/seed0",
                                     "attention/pixels/seed0"}
    assert "finetune/pixels/seed0" not in runner.calls and "finetune/beit/seed0" in runner.calls
    assert "| - visual tokens (pixel regression) | - |" in (tmp_path / "s" / "study.md").read_text()
    # The retry runs the failed cells only.
    runner.fail.clear()
    runner.calls.clear()
    assert study(cfg, runner)["failed"] == []
    assert sorted(runner.calls) == sorted(result["failed"])


def test_study_end_to_end_in_worker_processes(tmp_path, capsys):
    """The real commands, two worker processes, a tiny budget: every cell finishes and the table is filled."""
    out = tmp_path / "s"
    args = ["--out", str(out), "--seeds", "1", "--variants", "beit,scratch", "--tokenizer", "random",
            "--pretrain-steps", "2", "--pretrain-batch", "8", "--finetune-steps", "2", "--linprobe-steps", "2",
            "--segment-steps", "2", "--num-images", "64", "--seg-images", "16", "--workers", "2",
            "--pretrain-args=--warmup-steps 1"]
    assert study_main(args) == 0
    md = (out / "study.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| BEiT |"))
    assert row.count("+-") == 6, row  # top-1, probe, mIoU, attention, loss, mlm_acc
    assert (out / "study.png").is_file() and "log.txt" in {p.name for p in (out / "finetune/beit/seed0").iterdir()}
    records = {p: p.read_text() for p in out.rglob("cell.json")}
    assert len(records) == 9 and study_main(args) == 0  # tokenizer random: 1 pretraining + 2 x 4 downstream cells
    assert {p: p.read_text() for p in out.rglob("cell.json")} == records  # nothing reran
    assert study_main(["--variants", "nope", "--out", str(out)]) == 2


def test_a_signal_stops_the_study_and_the_rerun_resumes_the_cell(tmp_path):
    """SIGTERM to the study: passed on to the running cell, which writes its checkpoint; exit 143; the same command
    again resumes that cell from its checkpoint and finishes the study."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    args = ["--out", str(out), "--seeds", "1", "--variants", "beit", "--tokenizer", "random", "--pretrain-steps", "40",
            "--pretrain-batch", "4", "--finetune-steps", "1", "--linear-probe", "false", "--segmentation", "false",
            "--attention", "false", "--num-images", "32", "--workers", "1", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "beit_fast.cli", "study", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "pretrain" / "beit" / "seed0" / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "step 10/40" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "rerun the same command" in err.strip().splitlines()[-1]
    assert json.loads((log.parent / "cell.json").read_text())["status"] == "running"
    assert list((log.parent / "checkpoints").glob("step_*.pt"))
    assert study_main(args) == 0
    assert "resumed from" in log.read_text() and (out / "finetune" / "beit" / "seed0" / "summary.json").is_file()


# -- attention maps ------------------------------------------------------------------------------------------------
def test_patch_labels_take_the_majority():
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    seg[0, :2, :2] = torch.tensor([[3, 3], [3, 0]])
    seg[0, 2:, 2:] = 5
    assert patch_labels(seg, 2).tolist() == [[3, 0, 0, 5]]


def test_own_shape_attention_on_constructed_matrices():
    labels = torch.tensor([[1, 1, 0, 2]])  # 4 patches: two of shape 1, background, one of shape 2
    n = 5  # + cls
    uniform = torch.full((1, 1, n, n), 1.0 / n)
    r = own_shape_attention(uniform, labels)
    # Uniform over patch keys: a query's own-shape share is its shape's area (2/4, 2/4, 1/4 for the 3 queries).
    assert r["own_shape_mass"] == pytest.approx((0.5 + 0.5 + 0.25) / 3) and r["area"] == pytest.approx(r[
        "own_shape_mass"]) and r["lift"] == pytest.approx(1.0) and r["queries"] == 3
    # Hand-made rows (cls key weight is dropped and the rest renormalised): query 1 puts 0.6 of its patch mass on
    # patch 2 (its own shape), query 2 all on itself, query 4 half on itself; the background query is not counted.
    a = torch.zeros(1, 2, n, n)
    a[0, :, 1] = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])  # patches 0.2, 0.1, 0.1, 0.1 -> own 0.3 / 0.5 = 0.6
    a[0, :, 2] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    a[0, :, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    a[0, :, 4] = torch.tensor([0.2, 0.0, 0.0, 0.4, 0.4])
    r = own_shape_attention(a, labels)
    assert r["own_shape_mass"] == pytest.approx((0.6 + 1.0 + 0.5) / 3)
    assert r["area"] == pytest.approx((0.5 + 0.5 + 0.25) / 3) and r["queries"] == 6  # 3 queries x 2 heads
    with pytest.raises(ValueError, match="background"):
        own_shape_attention(a, torch.zeros(1, 4, dtype=torch.long))
    assert default_queries(8) == [0, 1 + 2 * 8 + 2, 1 + 4 * 8 + 4, 1 + 6 * 8 + 6]


@pytest.mark.parametrize("layout", [dict(use_shared_rel_pos_bias=True), dict(use_rel_pos_bias=True,
                                                                                use_shared_rel_pos_bias=False)])
def test_attention_maps_are_softmax_of_q_k_and_the_bias(layout):
    torch.manual_seed(0)
    model = BeitModel(BeitConfig(**TINY, **layout)).eval()
    for p in model.parameters():  # non-zero biases and tables
        torch.nn.init.normal_(p, std=0.05) if p.dim() < 2 else None
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x, layer=1)
    assert maps.shape == (2, 2, 17, 17) and torch.allclose(maps.sum(-1), torch.ones(2, 2, 17))
    # By hand: the block-1 input, its LayerNorm, q / k with q_bias, the relative position bias of its table(s).
    _, (h,) = model.forward_features(x, return_layers=[0])
    blk = model.blocks[1]
    y = blk.norm1(h)
    q = y @ blk.attn.qkv.weight[:32].T + blk.attn.q_bias
    k = y @ blk.attn.qkv.weight[32:64].T
    q, k = (t.reshape(2, 17, 2, 16).transpose(1, 2) for t in (q, k))
    table = model.rel_pos_bias.relative_position_bias_table if model.rel_pos_bias is not None else \
        blk.attn.relative_position_bias_table
    index = model.rel_pos_bias.relative_position_index if model.rel_pos_bias is not None else \
        blk.attn.relative_position_index
    bias = table[index.reshape(-1)].reshape(17, 17, 2).permute(2, 0, 1)
    want = ((q @ k.transpose(-1, -2)) / math.sqrt(16) + bias).softmax(-1)
    assert torch.allclose(maps, want, atol=1e-5)
    assert torch.equal(model.attention_maps(x, layer=-1), maps)
    with pytest.raises(ValueError, match="out of range"):
        model.attention_maps(x, layer=2)


def test_attention_maps_cli_on_a_run_and_on_timm_weights(tmp_path, capsys):
    run = tmp_path / "pt"
    from beit_fast.train.pretrain import pretrain

    pretrain(pretrain_config(run, dict(TINY, img_size=64), max_steps=2, save_every=0))
    assert maps_main([str(run), "--out", str(tmp_path / "m.png"), "--score-images", "4", "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert "attention on the query's own shape" in out and "random init" in out
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["layer"] == 1 and 0 < rec["score"]["own_shape_mass"] <= 1 and 0 < rec["score"]["area"] < 1
    assert rec["score"]["images"] == 4 and (tmp_path / "m.png").is_file()
    import timm

    net = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=5)
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    assert maps_main([str(tmp_path / "timm.pth"), "--out", str(tmp_path / "t.png"), "--no-score",
                      "--queries", "cls,1:2"]) == 0
    assert (tmp_path / "t.png").is_file() and not (tmp_path / "t.json").exists()
    assert maps_main([str(run), "--out", str(tmp_path / "x.png"), "--layer", "7"]) == 2
    assert maps_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--layer 7" in err[0] and "not found" in err[1]


@pytest.mark.parametrize("shared", [True, False])
def test_attention_maps_equal_transformers_attentions(tmp_path, shared):
    """Weights of a transformers BEiT, loaded by the attention-maps loader: the same attention matrices as its own
    `output_attentions` (shared or per-layer relative position tables, random non-zero biases)."""
    transformers = pytest.importorskip("transformers")
    c = transformers.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, layer_norm_eps=1e-6, use_mask_token=True,
                                use_shared_relative_position_bias=shared, use_relative_position_bias=not shared,
                                layer_scale_init_value=0.1, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.BeitForMaskedImageModeling(c).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "relative_position_bias_table" in name or name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    torch.save(hf.state_dict(), tmp_path / "hf.pth")
    from beit_fast.train.attention_maps import load_backbone

    model, _, norm = load_backbone(str(tmp_path / "hf.pth"))
    assert norm == ((0.5,) * 3, (0.5,) * 3)  # BEiT's input normalisation, not a segmenter's
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        theirs = hf.beit(pixel_values=x, output_attentions=True).attentions
    for layer in (0, 1):
        assert torch.allclose(model.attention_maps(x, layer), theirs[layer], atol=1e-5), layer
