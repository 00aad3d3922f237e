"""The paper's ablation study (Table 4) at your scale, as one command: `beit-fast study` (`make study`).

For each variant (default: the paper's rows - BEiT, random instead of blockwise masking, pixel regression instead of
visual tokens, both removed, the loss on every patch, a 2x longer BEiT - and training from scratch) and each seed,
the study pretrains (`beit-fast pretrain` with that variant's switches, the same data, seed and budget), then
fine-tunes on classification (`beit-fast finetune`), probes every block linearly (`beit-fast linprobe`), fine-tunes on
segmentation (`beit-fast segment`, on by default) and measures the attention on the query's own shape
(`beit-fast attention-maps`), each with the same budget for every variant. Token-target variants share one dVAE
tokenizer trained first (`beit-fast train-tokenizer`; `--tokenizer random` or a file skips it).

Every cell is one of those commands in its own run directory under `out/` (`pretrain/VARIANT/seedS`,
`finetune/...`, `linprobe/...`, `segment/...`, `attention/...`), run in `--workers` processes at once (cells whose
inputs are ready, seed 0 first); each cell's output goes to its `log.txt`. A finished cell is not rerun: rerunning
the same command after an interruption continues where it stopped (an interrupted training cell resumes from its
own last checkpoint; a cell whose settings or inputs changed is redone). `study.md` (the paper's Table 4 layout:
rows = variants, columns = mean +- std over the seeds, the paper's numbers beside, and which of its orderings
reproduce) and `study.csv` (one row per variant and metric, and per seed) are rewritten as cells finish, `study.png`
(bars with the spread) at the end.

`--quick`: the smallest budget whose downstream cells leave their no-learning levels on builtin, 2 seeds (~21 min on
2 CPU cores; every other key still applies).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

from beit_fast.config import parse_options
from beit_fast.train.config import ConfigBase
from beit_fast.train.run import SignalStop, atomic_write_text

log = logging.getLogger("beit_fast.study")

__all__ = ["StudyConfig", "VARIANTS", "QUICK", "Cell", "plan_cells", "study", "collect", "write_reports", "main"]


@dataclass(frozen=True)
class Variant:
    label: str  # the row's name, as the paper's Table 4 words it
    pretrain: Optional[Dict[str, str]]  # the pretraining switches (None: no pretraining, from scratch)
    steps: float = 1.0  # pretraining budget, a multiple of --pretrain-steps
    paper: Tuple[Optional[float], Optional[float]] = (None, None)  # the paper's (ImageNet top-1, ADE20K mIoU)

    @property
    def token_target(self) -> bool:
        """Pretrains on visual tokens (needs the tokenizer)."""
        return self.pretrain is not None and self.pretrain.get("target", "tokens") == "tokens"


# The paper's Table 4 (BEiT-B, 300 epochs; SPEC section 7) and the from-scratch baseline.
VARIANTS: Dict[str, Variant] = {
    "beit": Variant("BEiT", {}, 1.0, (82.86, 44.65)),
    "random_masking": Variant("- blockwise masking (random)", {"masking": "random"}, 1.0, (82.77, 42.93)),
    "pixels": Variant("- visual tokens (pixel regression)", {"target": "pixels"}, 1.0, (81.04, 41.38)),
    "pixels_random": Variant("- visual tokens - blockwise masking", {"target": "pixels", "masking": "random"}, 1.0,
                             (80.50, 37.09)),
    "all_tokens": Variant("+ recover 100% visual tokens", {"loss_on": "all"}, 1.0, (82.08, 36.73)),
    "beit_2x": Variant("BEiT, pretrained 2x longer (paper: 800 vs 300 epochs)", {}, 2.0, (83.19, 45.58)),
    "scratch": Variant("from scratch (no pretraining)", None),
}
# (better, worse, what the paper says) for the orderings the study checks, when both variants ran.
ORDERINGS = [
    ("beit", "random_masking", "blockwise beats random masking"),
    ("beit", "pixels", "visual tokens beat pixel regression"),
    ("pixels", "pixels_random", "removing both is worst (pixels + random below pixels alone)"),
    ("beit", "all_tokens", "the loss on masked patches beats the loss on all"),
    ("beit_2x", "beit", "longer pretraining helps"),
    ("beit", "scratch", "pretraining beats training from scratch"),
]
METRICS = [  # (key, column title, source)
    ("top1", "top-1", "finetune"),
    ("probe", "linear probe (best block)", "linprobe"),
    ("miou", "mIoU", "segment"),
    ("attn_own", "attention on own shape (random init)", "attention"),
    ("pt_loss", "pretraining loss", "pretrain"),
    ("pt_acc", "pretraining mlm_acc", "pretrain"),
]
# Each plotted metric's no-learning level (a dashed line): chance, all-background, the shapes' share of the image.
FLOORS = {"top1": "chance", "probe": "chance", "miou": "all_background", "attn_own": "attn_area"}
# --quick: the smallest budget whose downstream cells leave their no-learning levels on builtin (README: the tiny ViT
# needs ~25k labelled images seen, 800 steps of 32, to leave chance; segmentation ~300 steps of 8), 2 seeds.
QUICK: Dict[str, Any] = dict(seeds=2, tokenizer_steps=150, pretrain_steps=60, pretrain_batch=32, finetune_steps=800,
                             linprobe_steps=60, segment_steps=300, num_images=2048, seg_images=512)


@dataclass
class StudyConfig(ConfigBase):
    out: str = "runs/study"  # the study's directory: study.md / .csv / .png, study.json, one directory per cell
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))  # rows, from: beit, random_masking,
    # pixels, pixels_random, all_tokens, beit_2x, scratch
    seeds: int = 3  # seeds 0..seeds-1 for every cell (pretraining, fine-tuning, probing, segmentation)
    data: str = "builtin"  # builtin (its class and per-pixel labels) or an image folder with train/ and val/
    # class folders for pretraining and classification (segmentation then needs --seg-data)
    seg_data: str = "builtin"  # segmentation data: builtin, an ADE20K folder or DIR with images/ + labels/
    classes: int = 8  # builtin: the first k shape kinds (2..8; fewer is an easier task) for classification, and
    # background + k for segmentation
    quick: bool = False  # the --quick budget (QUICK in train/study.py); explicit keys still win
    preset: str = "tiny"  # the BEiT network (BeitConfig preset) every variant pretrains
    tokenizer: str = "train"  # "train" (one dVAE for the study, trained first), "random" or a tokenizer file
    tokenizer_steps: int = 400  # dVAE training steps with --tokenizer train
    num_images: int = 2048  # builtin images for pretraining and classification (train split)
    seg_images: int = 1024  # builtin segmentation train images
    pretrain_steps: int = 300  # pretraining steps of every variant (x2 for beit_2x)
    pretrain_batch: int = 64
    pretrain_lr: float = 1.5e-3
    finetune_steps: int = 400  # classification fine-tuning steps (every cell: finetune's --recipe auto, one recipe for
    # every variant)
    finetune_batch: int = 32
    finetune_lr: Optional[float] = None  # at batch finetune_batch; None: the recipe's (fine-tuning and probe cells)
    linear_probe: bool = True  # the linear-probe column
    linprobe_steps: int = 200
    segmentation: bool = True  # the mIoU column
    segment_steps: int = 1000  # segmentation fine-tuning steps (segment's --recipe auto)
    segment_batch: int = 8
    segment_lr: Optional[float] = None  # at batch segment_batch; None: the recipe's
    attention: bool = True  # the attention-on-own-shape column (builtin images)
    pretrain_args: str = ""  # extra options for every pretraining cell: --pretrain-args="--warmup-steps 10" (not
    # model keys: the network is --preset for every variant, from scratch too)
    finetune_args: str = ""  # extra options for every fine-tuning cell
    segment_args: str = ""  # extra options for every segmentation cell
    workers: int = 0  # cells run at once (0: one per core on the CPU, at most 8; one on a GPU)
    threads: int = 0  # torch threads per cell (0: cores // workers)
    device: str = "auto"  # every cell's device: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:N"

    def validate(self) -> None:
        super().validate()
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            self.bad("variants", f"choose from {', '.join(VARIANTS)} (comma-separated)")
        if len(set(self.variants)) != len(self.variants):
            self.bad("variants", "names a variant twice")
        self.positive("seeds", "tokenizer_steps", "num_images", "seg_images", "pretrain_steps", "pretrain_batch",
                      "finetune_steps", "finetune_batch", "linprobe_steps", "segment_steps", "segment_batch")
        self.non_negative("workers", "threads")
        if not 2 <= self.classes <= 8:
            self.bad("classes", "the builtin data has 2 to 8 shape kinds")
        for name in ("pretrain_lr", "finetune_lr", "segment_lr"):
            if getattr(self, name) is not None and not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                self.bad(name, "must be a positive number")
        if self.tokenizer not in ("train", "random") and not Path(self.tokenizer).is_file():
            self.bad("tokenizer", '"train", "random" or the path of a tokenizer file')
        if self.tokenizer == "train" and any(VARIANTS[v].token_target for v in self.variants):
            try:
                tokenizer_preset(self.preset)
            except ValueError as exc:
                self.bad("tokenizer", str(exc))
        if not self.out.strip():
            self.bad("out", "must not be empty")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            self.bad("device", 'must be "auto", "cpu", "cuda" or "cuda:N"')
        for name in ("pretrain_args", "finetune_args", "segment_args"):
            try:
                parse_options(shlex.split(getattr(self, name)))
            except ValueError as exc:
                self.bad(name, f"not --key value options ({exc})")

    @classmethod
    def from_args(cls, args: List[str]) -> "StudyConfig":
        """As every config; `--quick` puts QUICK's values under the options given (which win)."""
        from beit_fast.train.config import coerce

        pairs = parse_options(list(args), flags={"quick": "true", "linear_probe": "true", "segmentation": "true",
                                                 "attention": "true"})
        quick = [v for k, v in pairs if k == "quick"]
        if quick and coerce("--", "quick", quick[-1], bool, True):  # the last --quick wins, as for every key
            args = [f"--{k}={v}" for k, v in QUICK.items()] + list(args)
        return super().from_args(args)  # type: ignore[return-value]

    def worker_count(self) -> int:
        if self.workers:
            return self.workers
        from beit_fast.train.runtime import resolve_device

        # Small cells run best on one thread each (OpenMP spin-waiting makes 2 threads slower than 1 for them).
        return 1 if resolve_device(self.device).type == "cuda" else max(1, min(os.cpu_count() or 1, 8))

    def thread_count(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.worker_count())


def tokenizer_preset(preset: str) -> str:
    """The `beit-fast train-tokenizer` preset whose grid and vocabulary fit the `preset` network's; ValueError when
    none does (then --tokenizer FILE or random)."""
    from beit_fast import BeitConfig

    mc = BeitConfig.from_preset(preset)
    fits = {(8, 512): "small", (14, 8192): "dalle"}
    key = (mc.img_size // mc.patch_size, mc.vocab_size)
    if key not in fits:
        raise ValueError(f"--tokenizer train makes a small (8x8 grid, 512 codes) or dalle (14x14, 8192) dVAE; the "
                         f"{preset} network needs {key[0]}x{key[0]} of {key[1]}: pass --tokenizer FILE or random")
    return fits[key]


@dataclass
class Cell:
    name: str  # its directory under out/, e.g. "finetune/beit/seed0"
    command: str  # a beit-fast command
    argv: List[str]
    needs: List[str]  # cells that must finish first
    variant: Optional[str] = None
    seed: Optional[int] = None
    stage: str = ""  # tokenizer | pretrain | finetune | linprobe | segment | attention
    fingerprint: str = ""  # its command and argv and the fingerprints of the cells it needs (plan_cells sets it)
    RESULT: ClassVar[Dict[str, str]] = {"attention": "maps.json", "tokenizer": "tokenizer.pt"}

    def result_file(self, out: Path) -> Path:
        return out / self.name / self.RESULT.get(self.stage, "summary.json")


def plan_cells(cfg: StudyConfig) -> List[Cell]:
    """Every cell of the study in the order they are preferred (seed by seed), with their dependencies."""
    out = Path(cfg.out)
    cells: List[Cell] = []
    common = ["--num-workers", "0", "--device", cfg.device, "--resume", "auto", "--tensorboard", "false"]
    cls_classes = ["--builtin-classes", str(cfg.classes)] if cfg.data == "builtin" and cfg.classes != 8 else []
    seg_classes = ["--num-classes", str(cfg.classes + 1)] if cfg.seg_data == "builtin" and cfg.classes != 8 else []
    tok_path = cfg.tokenizer
    if cfg.tokenizer == "train" and any(VARIANTS[v].token_target for v in cfg.variants):
        tok_path = str(out / "tokenizer" / "tokenizer.pt")
        cells.append(Cell("tokenizer", "train-tokenizer",
                          ["--preset", tokenizer_preset(cfg.preset), "--data", cfg.data,
                           "--num-images", str(cfg.num_images), "--max-steps", str(cfg.tokenizer_steps),
                           "--seed", "0", "--device", cfg.device,
                           "--out", str(out / "tokenizer")], [], stage="tokenizer"))
    for seed in range(cfg.seeds):
        for v in cfg.variants:
            spec = VARIANTS[v]
            s = f"{v}/seed{seed}"
            init, needs = "none", []
            if spec.pretrain is not None:
                switches = {"masking": "block", "target": "tokens", "loss_on": "masked", **spec.pretrain}
                argv = ["--preset", cfg.preset, "--data", cfg.data, "--num-images", str(cfg.num_images),
                        "--max-steps", str(round(cfg.pretrain_steps * spec.steps)),
                        "--batch-size", str(cfg.pretrain_batch), "--lr", str(cfg.pretrain_lr), "--seed", str(seed),
                        "--out", str(out / "pretrain" / s), *common]
                for key, value in switches.items():
                    argv += [f"--{key.replace('_', '-')}", value]
                pre_needs = []
                if spec.token_target:
                    argv += ["--tokenizer", tok_path]
                    pre_needs = ["tokenizer"] if cfg.tokenizer == "train" else []
                cells.append(Cell(f"pretrain/{s}", "pretrain", argv + shlex.split(cfg.pretrain_args), pre_needs, v,
                                  seed, "pretrain"))
                init, needs = str(out / "pretrain" / s), [f"pretrain/{s}"]
            net = ["--preset", "auto"] if spec.pretrain is not None else ["--preset", cfg.preset]
            ft_lr = [] if cfg.finetune_lr is None else ["--lr", str(cfg.finetune_lr), "--lr-batch",
                                                        str(cfg.finetune_batch)]
            cls_common = ["--init", init, *net, "--data", cfg.data, "--num-images", str(cfg.num_images), *cls_classes,
                          "--batch-size", str(cfg.finetune_batch), *ft_lr, "--seed", str(seed), "--eval-every", "0",
                          *common]
            cells.append(Cell(f"finetune/{s}", "finetune",
                              cls_common + ["--max-steps", str(cfg.finetune_steps), "--out", str(out / "finetune" / s)]
                              + shlex.split(cfg.finetune_args), needs, v, seed, "finetune"))
            if cfg.linear_probe:
                cells.append(Cell(f"linprobe/{s}", "finetune",
                                  cls_common + ["--linear-probe", "true", "--max-steps", str(cfg.linprobe_steps),
                                                "--out", str(out / "linprobe" / s)],
                                  needs, v, seed, "linprobe"))
            if cfg.segmentation:
                cells.append(Cell(f"segment/{s}", "segment",
                                  ["--init", init, *net, "--data", cfg.seg_data, "--num-images", str(cfg.seg_images),
                                   *seg_classes,
                                   "--max-steps", str(cfg.segment_steps), "--batch-size", str(cfg.segment_batch),
                                   *([] if cfg.segment_lr is None else ["--lr", str(cfg.segment_lr), "--lr-batch",
                                                                         str(cfg.segment_batch)]),
                                   "--seed", str(seed),
                                   "--eval-every", "0", "--out", str(out / "segment" / s),
                                   *common] + shlex.split(cfg.segment_args), needs, v, seed, "segment"))
            if cfg.attention:
                cells.append(Cell(f"attention/{s}", "attention-maps",
                                  [init, "--preset", cfg.preset, "--seed", str(seed), "--num-images", "1",
                                   "--out", str(out / "attention" / s / "maps.png")], needs, v, seed, "attention"))
    prints: Dict[str, str] = {}
    for c in cells:  # a cell comes after the cells it needs
        c.fingerprint = hashlib.sha256(json.dumps([c.command, c.argv, [prints[n] for n in c.needs]]).encode()
                                       ).hexdigest()[:16]
        prints[c.name] = c.fingerprint
    return cells


# -- running cells ---------------------------------------------------------------------------------------------------
class StudyStopped(Exception):
    """SIGINT / SIGTERM reached the study: the running cells were told to checkpoint and stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # Out of the terminal's process group: a Ctrl-C reaches the study alone, which passes it on to each worker exactly
    # once (a second signal would make a cell exit before its checkpoint). Between cells, and in a cell whose command
    # installs no handler (a tokenizer, attention maps: short), the signal is ignored: the cell finishes; a training
    # command's own handler (RunDir) makes it finish its step, write a checkpoint and exit.
    os.setpgrp()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def run_cell(command: str, argv: List[str], log_path: str) -> Tuple[int, float]:
    """Run `beit-fast COMMAND ARGV` in this process with stdout and stderr going to `log_path`; (exit status,
    seconds). A worker process runs cells one after another, so torch is imported once per worker."""
    import importlib
    import traceback

    from beit_fast.cli import COMMANDS

    module, fn = COMMANDS[command].split(":")
    main_fn = getattr(importlib.import_module(module), fn)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    start = time.time()
    with open(log_path, "a") as f:
        f.write(f"$ beit-fast {command} {' '.join(argv)}\n")
        f.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            code = main_fn(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # a bug in a cell: its traceback is in its log, the study goes on with the others
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return int(code or 0), time.time() - start


def _record_path(out: Path, cell: Cell) -> Path:
    return out / cell.name / "cell.json"


def cell_done(out: Path, cell: Cell) -> bool:
    """Finished with these exact settings and inputs (its fingerprint: a cell is redone when what it needs was) and
    its result file exists."""
    rec = _read_json(_record_path(out, cell)) or {}
    return rec.get("fingerprint") == cell.fingerprint and rec.get("status") == "done" and \
        cell.result_file(out).is_file()


def _prepare(out: Path, cell: Cell) -> None:
    """Before a cell runs: a directory left by a cell with other settings or inputs is removed (a cell interrupted
    with these is kept: its command resumes from its last checkpoint); the record says "running"."""
    d = out / cell.name
    rec = _read_json(_record_path(out, cell))
    if d.exists() and (rec is None or rec.get("fingerprint") != cell.fingerprint):
        log.info("%s: its settings changed (or it has no record): started afresh", cell.name)
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    _write_record(out, cell, status="running")


def _finish(out: Path, cell: Cell, code: int, seconds: float) -> bool:
    """The record after a cell ran; True when it is done (exit 0 and its result file written)."""
    done = code == 0 and cell.result_file(out).is_file()
    _write_record(out, cell, status="done" if done else "failed", exit=code, seconds=round(seconds, 1))
    return done


def _write_record(out: Path, cell: Cell, **fields: Any) -> None:
    from beit_fast.train.run import atomic_save_json

    atomic_save_json({"argv": cell.argv, "command": cell.command, "fingerprint": cell.fingerprint, **fields},
                     _record_path(out, cell), indent=1)


def _last_error(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(empty log)"])[-1][:300]


def execute(cfg: StudyConfig, cells: List[Cell], on_done: Callable[[], None],
            runner: Callable[[str, List[str], str], Tuple[int, float]] = run_cell,
            in_process: Optional[bool] = None) -> List[str]:
    """Run every cell not yet done, `cfg.worker_count()` at a time in worker processes (`in_process`: in this one,
    one at a time; default: only for a runner other than `run_cell`), a cell once all it needs is done (seed order
    first). Returns the names of the cells that failed (and of those that needed them)."""
    out = Path(cfg.out)
    done = {c.name for c in cells if cell_done(out, c)}
    todo = [c for c in cells if c.name not in done]
    order = {c.name: i for i, c in enumerate(cells)}
    failed: List[str] = []
    if done:
        log.info("study: %d of %d cells already done (not rerun)", len(done), len(cells))
    workers = cfg.worker_count()
    start, finished, total = time.time(), 0, len(todo)
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                      initargs=(cfg.thread_count(),))

    in_process = runner is not run_cell if in_process is None else in_process
    pool = new_pool() if not in_process and todo else None
    running: Dict[Any, Cell] = {}
    crashes: Dict[str, int] = {}  # cells that were running when a worker process died
    stop = _StopOnSignal(pool)
    try:
        stop.install()
        while todo or running:
            blocked = [c for c in todo if any(n in failed for n in c.needs)]
            for c in blocked:
                todo.remove(c)
                failed.append(c.name)
                log.warning("%s: skipped (needs %s, which failed)", c.name, ", ".join(c.needs))
            ready = [c for c in todo if all(n in done for n in c.needs)]
            while ready and len(running) < workers:
                c = ready.pop(0)
                todo.remove(c)
                _prepare(out, c)
                args = (c.command, c.argv, str(out / c.name / "log.txt"))
                if pool is None:  # in-process (tests): one at a time
                    fut: Any = cf.Future()
                    fut.set_result(runner(*args))
                else:
                    fut = pool.submit(runner, *args)
                running[fut] = c
                log.info("study: started %s", c.name)
            if not running:
                break
            finished_now, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in finished_now:
                c = running.pop(fut)
                try:
                    code, seconds = fut.result()
                except BrokenProcessPool as exc:  # a worker died (killed, out of memory): every cell
                    # running then is lost; each goes back in the queue (resuming from its checkpoint) unless it was
                    # running at two such deaths already
                    broken = True
                    crashes[c.name] = crashes.get(c.name, 0) + 1
                    with (out / c.name / "log.txt").open("a") as f:
                        f.write(f"a worker process died while this cell ran ({exc})\n")
                    if crashes[c.name] < 3:
                        todo.insert(0, c)
                        log.warning("study: a worker died while %s ran: it goes back in the queue", c.name)
                        continue
                    code, seconds = 1, 0.0
                finished += 1
                if _finish(out, c, code, seconds):
                    done.add(c.name)
                else:
                    failed.append(c.name)
                    log.warning("study: %s FAILED (exit %d): %s | log: %s", c.name, code,
                                _last_error(out / c.name / "log.txt"), out / c.name / "log.txt")
                elapsed = time.time() - start
                eta = elapsed / finished * (total - finished)
                log.info("study: [%d/%d] %s %s in %.0f s | elapsed %s, about %s left", finished, total, c.name,
                         "done" if c.name in done else "failed", seconds, _clock(elapsed), _clock(eta))
                on_done()
            if broken and pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                pool = stop.pool = new_pool()
                for fut, c in list(running.items()):  # lost with the pool: back in the queue, first
                    running.pop(fut)
                    todo.insert(0, c)
                todo.sort(key=lambda c: order[c.name])
    finally:
        if pool is not None:  # after a signal: the cells write their checkpoint and stop (their records say running)
            pool.shutdown(wait=True, cancel_futures=True)
        stop.restore()
    return failed


class _StopOnSignal(SignalStop):
    """SIGINT / SIGTERM in the study: passed on to the worker processes (each running cell then finishes its step,
    writes a checkpoint and exits), then `StudyStopped`; a second signal exits at once. Installed and restored as
    the training runs' `SignalStop`."""

    def __init__(self, pool: Any) -> None:
        super().__init__("beit-fast study")
        self.pool = pool

    def _forward(self, signum: int) -> None:
        for proc in list(getattr(self.pool, "_processes", {}).values()) if self.pool is not None else []:
            try:
                os.kill(proc.pid, signum)
            except OSError:
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self._forward(signum)
        if self.requested is not None:
            os._exit(128 + signum)
        self.requested = signum
        raise StudyStopped(signum)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


# -- results ---------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell_values(out: Path, cell: Cell) -> Dict[str, Optional[float]]:
    """The metric values a finished cell gives (an unfinished one gives none)."""
    if not cell_done(out, cell):
        return {}
    res = _read_json(cell.result_file(out)) or {}
    if cell.stage == "pretrain":
        return {"pt_loss": res.get("final_loss"), "pt_acc": res.get("final_mlm_acc")}
    if cell.stage == "finetune":
        return {"top1": res.get("val_top1"), "chance": res.get("chance")}
    if cell.stage == "linprobe":
        probe = [v for v in (res.get("probe") or {}).values() if v is not None]
        return {"probe": max(probe) if probe else None}
    if cell.stage == "segment":
        return {"miou": res.get("val_miou"), "all_background": res.get("all_background_miou")}
    if cell.stage == "attention":
        score = res.get("score") or {}
        own = {"attn_own": score.get("own_shape_mass"), "attn_area": score.get("area")}
        if VARIANTS[cell.variant].pretrain is None:  # from scratch: the random initialisation is the model
            own["attn_own"] = (res.get("random_init") or {}).get("own_shape_mass")
        return own
    return {}


def collect(cfg: StudyConfig, cells: List[Cell]) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """variant -> metric -> [(seed, value)] over the finished cells."""
    out = Path(cfg.out)
    table: Dict[str, Dict[str, List[Tuple[int, float]]]] = {v: {} for v in cfg.variants}
    for c in cells:
        if c.variant is None:
            continue
        for key, value in cell_values(out, c).items():
            if value is not None and math.isfinite(value):
                table[c.variant].setdefault(key, []).append((c.seed, float(value)))
    return table


def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _fmt(values: List[Tuple[int, float]], seeds: int) -> str:
    if not values:
        return "-"
    mean, std = mean_std([v for _, v in values])
    partial = "" if len(values) == seeds else f" ({len(values)}/{seeds} seeds)"
    return f"{mean:.3f} +- {std:.3f}{partial}"


def orderings(cfg: StudyConfig, table: Dict[str, Dict[str, List[Tuple[int, float]]]]) -> List[str]:
    """One line per paper ordering and downstream metric (top-1, linear probe, mIoU): reproduced beyond the spread
    (the means differ by more than the two standard deviations together), the same direction within the spread, or
    reversed."""
    lines = []
    for better, worse, claim in ORDERINGS:
        if better not in table or worse not in table:
            continue
        for key, title in (("top1", "top-1"), ("probe", "linear probe"), ("miou", "mIoU")):
            a, b = table[better].get(key, []), table[worse].get(key, [])
            if len(a) < 2 or len(b) < 2:
                continue
            (ma, sa), (mb, sb) = mean_std([v for _, v in a]), mean_std([v for _, v in b])
            if abs(ma - mb) < 1e-9:
                verdict = "not reproduced (equal means)"
            elif ma - mb > sa + sb:
                verdict = "reproduced, beyond the seed spread"
            elif ma > mb:
                verdict = "same direction, within the seed spread (not shown)"
            else:
                verdict = "NOT reproduced (reversed)" if mb - ma > sa + sb else "not reproduced (reversed, within " \
                                                                                "the spread)"
            lines.append(f"- {claim} ({title}: {better} {ma:.3f} +- {sa:.3f} vs {worse} {mb:.3f} +- {sb:.3f}): "
                         f"{verdict}")
    return lines


def write_reports(cfg: StudyConfig, cells: List[Cell], plot: bool = False, command: str = "beit-fast study"
                  ) -> Dict[str, Path]:
    """study.md, study.csv (and study.png with `plot`) from the finished cells, atomically."""
    out = Path(cfg.out)
    table = collect(cfg, cells)
    shown = [(k, t) for k, t, src in METRICS if (src != "linprobe" or cfg.linear_probe) and
             (src != "segment" or cfg.segmentation) and (src != "attention" or cfg.attention)]
    head = ["variant", *[t for _, t in shown], "paper top-1", "paper mIoU"]
    md = [f"# BEiT ablation study ({cfg.seeds} seeds, mean +- std)", "",
          f"`{command}`", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in cfg.variants:
        paper = VARIANTS[v].paper
        md.append("| " + " | ".join([VARIANTS[v].label, *[_fmt(table[v].get(k, []), cfg.seeds) for k, _ in shown],
                                     *[f"{p:.2f}" if p is not None else "-" for p in paper]]) + " |")
    area = [x for v in cfg.variants for _, x in table[v].get("attn_area", [])]
    floors = [f"{title} {vals[0][1]:.3f}" for key, title in (("chance", "chance top-1"),
                                                             ("all_background", "all-background mIoU"))
              for vals in [[x for v in cfg.variants for x in table[v].get(key, [])]] if vals]
    keys = ["preset", "classes", "num_images", "pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch"]
    keys += ["linprobe_steps"] * cfg.linear_probe + ["segment_steps", "segment_batch", "seg_images"] * cfg.segmentation
    keys += ["tokenizer"] + ["tokenizer_steps"] * (cfg.tokenizer == "train")
    md += ["", "Budget: " + ", ".join(f"{k} {getattr(cfg, k)}" for k in keys) + ".",
           "Paper: BEiT-B, 300 epochs of ImageNet-1k (Table 4; the 2x row is its 800-epoch run), ImageNet top-1 and "
           "ADE20K mIoU."]
    if floors:
        md.append("What no learning scores: " + ", ".join(floors) + ".")
    if any(table[v].get("pt_loss") for v in cfg.variants):
        md.append("Pretraining loss: cross-entropy over the scored patches for token targets (all_tokens: every "
                  "patch), pixel MSE for pixel targets - not comparable across the two.")
    if area:
        md.append(f"Attention on own shape: the share of a shape patch's last-layer attention on patches of its own "
                  f"class (builtin images); content-blind attention would give the shapes' area, "
                  f"{sum(area) / len(area):.3f}. The from-scratch row is the random initialisation.")
    lines = orderings(cfg, table)
    if lines:
        md += ["", "## The paper's orderings at this scale", "", *lines]
    atomic_write_text(out / "study.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "metric", "mean", "std", "n", "values_by_seed", "paper"])
    for v in cfg.variants:
        for key, title in shown:
            vals = sorted(table[v].get(key, []))
            if not vals:
                continue
            mean, std = mean_std([x for _, x in vals])
            paper = {"top1": VARIANTS[v].paper[0], "miou": VARIANTS[v].paper[1]}.get(key)
            w.writerow([v, key, f"{mean:.6g}", f"{std:.6g}", len(vals), ";".join(f"{s}:{x:.6g}" for s, x in vals),
                        "" if paper is None else paper])
    atomic_write_text(out / "study.csv", buf.getvalue())
    paths = {"md": out / "study.md", "csv": out / "study.csv"}
    if plot:
        png = _plot(cfg, table, [(k, t) for k, t in shown if k in ("top1", "probe", "miou", "attn_own")],
                    out / "study.png")
        if png:
            paths["png"] = png
    return paths


def _plot(cfg: StudyConfig, table: Dict[str, Dict[str, List[Tuple[int, float]]]], shown: List[Tuple[str, str]],
          path: Path) -> Optional[Path]:
    from beit_fast.train.evaluate import pyplot, save_figure

    plt = pyplot("study")
    if plt is None or not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown):
        names = list(cfg.variants)
        spread = [mean_std([x for _, x in table[v][key]]) if table[v].get(key) else (0.0, 0.0) for v in names]
        means, stds = [m for m, _ in spread], [d for _, d in spread]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(names))])
        floor = [x for v in cfg.variants for _, x in table[v].get(FLOORS.get(key, ""), [])]
        if floor:  # what no learning scores (chance, all-background, the shapes' area)
            ax.axhline(sum(floor) / len(floor), color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"BEiT ablation study: mean +- std over {cfg.seeds} seeds (dashed: no learning)", fontsize=9)
    fig.tight_layout()
    return save_figure(plt, fig, path)


# -- the command -----------------------------------------------------------------------------------------------------
def study(cfg: StudyConfig, runner: Callable[[str, List[str], str], Tuple[int, float]] = run_cell,
          command: str = "beit-fast study", in_process: Optional[bool] = None) -> Dict[str, Any]:
    """Run (or continue) the study; returns {"failed": [...], "paths": {...}, "cells": n}."""
    from beit_fast.train.run import RunLock, atomic_save_json

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()
    try:
        atomic_save_json(cfg.to_dict(), out / "study.json", indent=2)
        cells = plan_cells(cfg)
        log.info("study: %d variants x %d seeds, %d cells, %d at a time (%d threads each) in %s", len(cfg.variants),
                 cfg.seeds, len(cells), cfg.worker_count(), cfg.thread_count(), out)
        failed = execute(cfg, cells, lambda: write_reports(cfg, cells, command=command), runner, in_process)
        paths = write_reports(cfg, cells, plot=True, command=command)
    finally:
        lock.release()
    return {"failed": failed, "paths": {k: str(v) for k, v in paths.items()}, "cells": len(cells)}


def main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast study`: 0 every cell done; 1 some cell failed (the others ran; rerun to retry them); 2 bad input;
    128 + N stopped by signal N (SIGINT 130, SIGTERM 143; rerun the same command to continue)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(StudyConfig.help_text(__doc__ or ""))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from beit_fast.train.runtime import cli_call

    def go() -> Dict[str, Any]:
        return study(StudyConfig.from_args(argv), command=' '.join(['beit-fast study', *argv]))

    try:
        result, code = cli_call("beit-fast study", go)
    except StudyStopped as exc:
        print(f"beit-fast study: {exc}: the running cells wrote a checkpoint; rerun the same command to continue "
              "(finished cells are kept)", file=sys.stderr)
        return 128 + exc.signum
    if code:
        return code
    print((Path(result["paths"]["md"])).read_text())
    print("report: " + ", ".join(result["paths"].values()))
    if result["failed"]:
        print(f"beit-fast study: {len(result['failed'])} cell(s) failed: {', '.join(result['failed'][:6])} "
              "(their log.txt says why; rerun to retry them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
