"""BEiT masked-image-modeling pretraining (`beit-fast pretrain`, `python -m beit_fast.train.pretrain`).

One linear script, nanoGPT style: config -> data -> tokenizer -> model -> engine -> loop. The same script runs
as one plain process, or under DeepSpeed ZeRO (stage 0-3) with `--deepspeed --zero-stage K`, launched by the
`deepspeed` launcher or torchrun (see `beit_fast.train.engine`). `batch_size` is the global batch: each of the
P processes runs `grad_accum_steps` micro-batches of batch_size / (P x grad_accum_steps) images per step.

Every `log_every` steps one line: step | loss | mlm_acc | lr | ms/step | img/s | MFU (GPU) | memory (GPU); every
step a row of `metrics.csv` (and TensorBoard scalars when it imports); a PNG plot of loss and mlm_acc at the end.
Checkpoints are written atomically (temporary name + rename) every `save_every` steps and at the end, the last
`keep_last` kept; `--resume auto` continues exactly where the newest one stopped (model, optimizer, schedule
position, RNG states; the data stream is addressed by step, see `beit_fast.data.StepBatchSampler`).
`beit-fast export CKPT --out FILE` writes a checkpoint's weights in the unilm layout for fine-tuning elsewhere.

Reliability (`beit_fast.train.run`): a run locks its `out` (a second run there is refused); every checkpoint or
tokenizer file is read weights-only (nothing in a file runs); a step is applied only when the loss and the global
gradient norm are finite on every rank (else skipped and counted; `max_bad_steps` skipped steps in a row stop the
run); no checkpoint is written from non-finite weights; SIGTERM / SIGINT finish the step, write a checkpoint and
exit with 128 + the signal; a write error (disk full) is one line and leaves the previous checkpoint intact.

The model runs the Triton MIM kernels where they can run (`fused_kernels="auto"`: on a GPU), told the exact
mask count so the forward needs no host synchronisation; the loop syncs once per micro-batch, to read whether
the loss is finite (a non-finite loss skips the whole step on every rank, and is counted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch

from beit_fast import BeitConfig, BeitForMaskedImageModeling
from beit_fast.attention import AttentionCase, select_backend
from beit_fast.checkpoint import CheckpointError, atomic_save, safe_load
from beit_fast.config import first_line, one_line, parse_options
from beit_fast.data import (
    DataError,
    ImageFolderDataset,
    MicroBatchSampler,
    MIMDataset,
    StepBatchSampler,
    SyntheticMIMDataset,
    TwoViewTransform,
    build_dataset,
)
from beit_fast.kernels import check_deferred, use_fused
from beit_fast.masking import BlockwiseMaskGenerator, RandomMaskGenerator
from beit_fast.tokenizer import RandomConvTokenizer
from beit_fast.train.engine import (
    DeepSpeedEngine,
    PlainEngine,
    checkpoint_problem,
    deepspeed_reasons,
    init_distributed_env,
)
from beit_fast.train.metrics import MetricsWriter, Progress, plot_metrics
from beit_fast.train.run import (
    LOCK_NAME,
    RunLock,
    SignalStop,
    checkpoint_dir,
    checkpoint_step,
    checkpoints,
    clean_run_directory,
    prune_checkpoints,
    remove_checkpoint,
)

log = logging.getLogger("beit_fast.pretrain")

__all__ = [
    "PretrainConfig",
    "TrainingStopped",
    "StoppedBySignal",
    "pretrain",
    "build_optimizer",
    "parameter_groups",
    "lr_at",
    "build_mask_generator",
    "find_latest_checkpoint",
    "read_checkpoint",
    "export_checkpoint",
    "main",
]

# Keys a resumed run may change; every other key must match the checkpoint's (the model config too).
RESUME_MAY_DIFFER = frozenset(
    {"max_steps", "out", "resume", "log_every", "save_every", "keep_last", "num_workers", "device", "max_bad_steps",
     "compile", "compile_mode", "tensorboard", "plot", "grad_accum_steps", "apex", "overwrite", "dist_timeout"}
)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
MAX_SEED = 2**32  # numpy's legacy seed range; every RNG the run seeds accepts [0, 2**32)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many skipped steps in a row); the CLI reports it as one line."""


class StoppedBySignal(RuntimeError):
    """SIGTERM / SIGINT: the run finished its step, wrote a checkpoint and stopped; the CLI exits 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step ran)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where} "
                         "(resume with --resume auto)")


# -- value types (YAML / command line / programmatic configs) ----------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    """Does `value` fit the annotation `tp`? (bool is not an int; an int is a float.)"""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = get_origin(tp)
    if origin is Union:
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin is not None:
        tp = origin  # Dict[str, Any] -> dict
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Union:
        return " or ".join(_describe(a) for a in get_args(tp))
    tp = get_origin(tp) or tp
    names = {bool: "true/false", int: "an int", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _field_types(cls: type) -> Dict[str, Any]:
    try:
        return get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no type checks rather than no run
        return {}


def _check_types(where: str, values: Dict[str, Any], types: Dict[str, Any]) -> None:
    for name, value in values.items():
        tp = types.get(name, Any)
        if not _type_ok(value, tp):
            raise ValueError(f"{where}{name}={value!r}: expects {_describe(tp)}, got {type(value).__name__}")


@dataclass
class PretrainConfig:
    preset: str = "tiny"  # BeitConfig preset: tiny | small | base | large
    model: Dict[str, Any] = field(default_factory=dict)  # BeitConfig overrides, e.g. {"depth": 2}
    data: str = "builtin"  # "builtin" (procedural shapes), "synthetic" (random views, no decoding) or an image folder
    num_images: int = 4096  # size of the built-in and synthetic datasets
    out: str = "runs/pretrain"  # run directory: config.json, metrics.csv, checkpoints/
    max_steps: int = 300  # optimizer steps
    batch_size: int = 64  # images per optimizer step, over all processes and micro-batches (the global batch)
    grad_accum_steps: int = 1  # micro-batches per optimizer step and process
    lr: float = 1.5e-3  # peak learning rate (SPEC: 1.5e-3 at batch 2048)
    min_lr: float = 1e-5  # end of the cosine
    warmup_steps: int = 30  # linear warmup from 0
    weight_decay: float = 0.05  # AdamW decay (not on 1-D params, ".bias" names, model.no_weight_decay(); as unilm)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 3.0  # max global grad norm (0 disables)
    masking: str = "block"  # "block" (BEiT) or "random" (ablation)
    seed: int = 0
    num_workers: int = 1  # data-loader workers (0: load in the main process)
    log_every: int = 10  # steps between log lines
    save_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept
    resume: str = ""  # "" (fresh), "auto" (newest checkpoint in out/ if any) or a checkpoint path
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "fp32", "bf16" (autocast on CUDA); "auto": bf16 on CUDA, fp32 on CPU
    max_bad_steps: int = 10  # stop after this many skipped steps in a row (a step is skipped, and counted in
    # skipped_steps, when the loss or the global gradient norm is not finite on some rank; an applied step resets it)
    tokenizer: str = "random"  # "random" (fixed random conv) or a dVAE file: beit-fast train-tokenizer's
    # tokenizer.pt, a DALL-E encoder.pkl, or an encoder state dict
    deepspeed: bool = False  # DeepSpeed ZeRO engine (one process, or several under the deepspeed launcher / torchrun)
    zero_stage: int = 2  # ZeRO stage with deepspeed: 0 (DDP-like), 1 (optimizer), 2 (+ gradients), 3 (+ parameters)
    compile: bool = False  # torch.compile the model; the Triton kernels are custom ops, so the graph does not break
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead (CUDA
    # graphs) | max-autotune
    apex: bool = False  # apex FusedAdam + FusedLayerNorm (apex is not on the package index; torch's fused AdamW is
    # the default)
    tensorboard: bool = True  # TensorBoard scalars in out/tensorboard (when the tensorboard package imports)
    plot: bool = True  # out/metrics.png at the end (when matplotlib imports)
    overwrite: bool = False  # start afresh in an `out` that holds checkpoints of another run (they are deleted)
    dist_timeout: float = 600.0  # seconds any collective may wait under deepspeed: a hung or dead rank ends the
    # job with one line after this long instead of blocking it forever

    def validate(self) -> None:
        """Raise ValueError (one line, naming the key) for a wrong type or an invalid value."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        types = _field_types(PretrainConfig)
        _check_types("", {f.name: getattr(self, f.name) for f in fields(self)}, types)
        if "extra" in self.model:
            raise ValueError("model.extra: free-form notes are not a model override")
        _check_types("model.", self.model, _field_types(BeitConfig))
        for name in ("max_steps", "batch_size", "log_every", "keep_last", "num_images", "max_bad_steps",
                     "grad_accum_steps"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        for name in ("warmup_steps", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            bad("dist_timeout", "must be a positive number of seconds")
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be a finite number")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            bad("lr", f"need lr > 0 and 0 <= min_lr ({self.min_lr}) <= lr")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be positive")
        if self.clip_grad < 0:
            bad("clip_grad", "must be >= 0 (0 disables clipping)")
        if not 0 <= self.seed < MAX_SEED:
            bad("seed", "must be in [0, 2**32)")
        for name in ("out", "data", "preset"):
            if not getattr(self, name).strip():
                bad(name, "must not be empty")
        if self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", "must be 0, 1, 2 or 3")
        if self.compile_mode not in COMPILE_MODES:
            bad("compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
        if self.batch_size % self.grad_accum_steps:
            bad("batch_size", f"must be divisible by grad_accum_steps={self.grad_accum_steps}")
        if self.masking not in ("block", "random"):
            bad("masking", 'must be "block" or "random"')
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", 'must be "auto", "fp32" or "bf16"')
        if self.tokenizer != "random" and not Path(self.tokenizer).is_file():
            bad("tokenizer", 'must be "random" or the path of a tokenizer file (beit-fast train-tokenizer writes one)')
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            bad("device", 'must be "auto", "cpu", "cuda" or "cuda:N"')
        self.model_config()  # raises on bad preset / model keys

    def model_config(self) -> BeitConfig:
        try:
            return BeitConfig.from_preset(self.preset, **self.model)
        except TypeError as exc:  # a value of a type BeitConfig's own checks did not foresee
            raise ValueError(f"model config {self.model}: {exc}") from None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# -- optimisation ----------------------------------------------------------------------------------------------------
def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """The reference (unilm `optim_factory.get_parameter_groups`) groups: no decay on 1-D params, names ending in
    ".bias", and the names in `model.no_weight_decay()` matched exactly; all else decays."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA) on `parameter_groups`."""
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    groups = parameter_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Per-step linear warmup to `lr`, then cosine to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def flops_per_image(c: BeitConfig) -> float:
    """Training FLOPs per image (3x forward; matmuls only), for MFU."""
    n, d, m = c.num_patches + 1, c.embed_dim, c.mlp_hidden_dim
    block = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    fwd = c.depth * block + 2 * c.num_patches * d * c.in_chans * c.patch_size**2
    fwd += 2 * c.num_masking_patches * d * c.vocab_size
    return 3.0 * fwd


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of known cards (None: unknown, no MFU printed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return value
    return None


# -- checkpoints -----------------------------------------------------------------------------------------------------
def find_latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run directory (None if it has none)."""
    paths = checkpoints(Path(out))
    return paths[-1] if paths else None


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint's run state: the whole file for the plain engine, `meta.pt` of a DeepSpeed directory
    (its weights and optimizer shards stay for DeepSpeed to load). Read weights-only (`safe_load`: nothing in the
    file runs). CheckpointError (a ValueError, one line) if it is incomplete, not one of ours, or hand-edited into
    something that is not."""
    path = Path(path)
    if path.is_dir():
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
    target = path / "meta.pt" if path.is_dir() else path
    ckpt = safe_load(target, what="checkpoint")
    needed = ("step", "config", "model_config", "stats") + (() if path.is_dir() else ("model", "optimizer", "rng"))
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a pretraining checkpoint of this engine (missing {missing})")
    wrong = [f"step={ckpt['step']!r} (not an int >= 0)"] if not (_type_ok(ckpt["step"], int) and ckpt["step"] >= 0) \
        else []
    wrong += [f"{k} is a {type(ckpt[k]).__name__}, not a dict" for k in needed
              if k not in ("step",) and not isinstance(ckpt[k], dict)]
    if not path.is_dir() and isinstance(ckpt["model"], dict):
        wrong += [f"model[{k!r}] is a {type(v).__name__}" for k, v in ckpt["model"].items() if not torch.is_tensor(v)]
    if isinstance(ckpt["stats"], dict):
        wrong += _stats_problems(ckpt["stats"], ckpt["model_config"] if isinstance(ckpt["model_config"], dict) else {})
    if wrong:
        raise CheckpointError(f"{path}: malformed checkpoint: {'; '.join(wrong[:3])}")
    ckpt.setdefault("engine", {"kind": "plain", "world_size": 1})
    return ckpt


def _stats_problems(stats: Dict[str, Any], model_config: Dict[str, Any]) -> List[str]:
    """What is wrong with a checkpoint's run statistics (hand-edited into something the loop cannot use)."""
    wrong = [f"stats.{k}={stats[k]!r} (not an int >= 0)" for k in ("skipped_steps", "skipped_images", "bad_in_row")
             if k in stats and not (_type_ok(stats[k], int) and stats[k] >= 0)]
    for k in ("recent_acc", "bad_files", "suspect_steps"):
        v = stats.get(k, [])
        if not isinstance(v, list) or not all(_type_ok(x, float if k == "recent_acc" else int) for x in v):
            wrong.append(f"stats.{k} is not a list of {'numbers' if k == 'recent_acc' else 'ints'}")
    hist, vocab = stats.get("token_hist"), model_config.get("vocab_size")
    if "token_hist" in stats and not (torch.is_tensor(hist) and hist.dtype == torch.long and hist.dim() == 1
                                      and (vocab is None or hist.numel() == vocab)):
        wrong.append(f"stats.token_hist is not a LongTensor of {vocab} counts")
    return wrong


def checkpoint_model_state(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(full fp32 model state dict, model config dict) of a checkpoint of either engine."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if path.is_dir():
        model_file = path / "model.pt"
        state = safe_load(model_file, what="checkpoint's model.pt")
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{model_file}: not a model file (expected {{'model': state_dict}})")
        sd = state["model"]
        bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
        if bad:
            raise CheckpointError(f"{model_file}: non-tensor entries {bad[:3]}")
        return sd, ckpt["model_config"]
    return ckpt["model"], ckpt["model_config"]


def export_checkpoint(path: Union[str, Path], out: Union[str, Path], layout: str = "unilm") -> Path:
    """Write a pretraining checkpoint's weights as `{"model": state_dict}` in `layout` ("unilm": what unilm's and
    timm's fine-tuning scripts load), atomically."""
    sd, mc = checkpoint_model_state(Path(path))
    try:
        model = BeitForMaskedImageModeling(BeitConfig.from_dict(mc))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: its model config does not build a model ({type(exc).__name__}: "
                              f"{first_line(str(exc))})") from None
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists them over many lines
        text = one_line("\n".join(str(exc).splitlines()[1:4]))
        raise CheckpointError(f"{path}: the weights do not fit its model config ({text[:300]})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: the weights do not fit its model config (missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    return atomic_save({"model": model.export_state_dict(layout)}, Path(out))


# -- the run ---------------------------------------------------------------------------------------------------------
def build_tokenizer(cfg: PretrainConfig, mcfg: BeitConfig, device: torch.device):
    """The target tokenizer: a fixed random one, or a trained dVAE whose code grid and vocabulary must
    match the model's (its input size sets the tokenizer view's size)."""
    if cfg.tokenizer == "random":
        return RandomConvTokenizer(mcfg.vocab_size, mcfg.grid_size, mcfg.img_size // 2, seed=cfg.seed).to(device)
    from beit_fast.tokenizer import DalleTokenizer

    try:
        tok = DalleTokenizer.from_files(cfg.tokenizer, fast="auto")
    except (pickle.UnpicklingError, ValueError, OSError, RuntimeError, KeyError, EOFError) as exc:
        why = one_line(str(exc)) or type(exc).__name__
        raise ValueError(f"tokenizer={cfg.tokenizer!r} cannot be loaded: {why}") from None
    if tok.grid_size != mcfg.grid_size or tok.vocab_size != mcfg.vocab_size:
        raise ValueError(
            f"tokenizer {cfg.tokenizer} makes a {tok.grid_size}x{tok.grid_size} grid of {tok.vocab_size} codes; the "
            f"model needs {mcfg.grid_size}x{mcfg.grid_size} of {mcfg.vocab_size} (set vocab_size / img_size to match)"
        )
    return tok.to(device)


def _worker_init(_: int) -> None:
    # One intra-op thread per worker: the workers' small tensor ops otherwise fight the training
    # step for the same cores (OpenMP spin-waits made steps 10x slower on 2 cores).
    torch.set_num_threads(1)
    # A Ctrl-C (the whole process group) or a scheduler's SIGTERM to every process must not kill the workers
    # while the main process finishes its step and checkpoint; they end with it.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _device(cfg: PretrainConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if cfg.deepspeed else torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available here")
    if dev.type == "cuda" and cfg.deepspeed:
        if dev.index is not None:
            raise ValueError(f"device={cfg.device!r}: under deepspeed each process takes the GPU of its LOCAL_RANK; "
                             "use device=cuda (pick GPUs with CUDA_VISIBLE_DEVICES or the launcher)")
        dev = torch.device("cuda", local_rank)
    return dev


def _check_backends(mcfg: BeitConfig, device: torch.device, use_bf16: bool) -> None:
    """An explicit attention backend or fused_kernels=True that cannot run here fails now, not at step 1."""
    try:
        use_fused(mcfg.fused_kernels, device, "fused MIM kernels")
        case = AttentionCase(
            device_type=device.type,
            dtype=torch.bfloat16 if use_bf16 else torch.float32,
            head_dim=mcfg.head_dim,
            bias_requires_grad=mcfg.use_shared_rel_pos_bias or mcfg.use_rel_pos_bias,
            dropout_p=mcfg.attn_drop_rate,
        )
        select_backend(mcfg.attn_backend, case)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def _resume_differences(ckpt: Dict[str, Any], cfg: PretrainConfig, mcfg: BeitConfig) -> List[str]:
    """`key: old -> new` for every setting that differs from the checkpoint's and may not (see RESUME_MAY_DIFFER).
    The model is compared as the resolved BeitConfig, so `preset` + overrides spelt differently still match."""
    defaults = PretrainConfig().to_dict()
    old, new = ckpt["config"], cfg.to_dict()
    diffs = []
    for key in new:
        if key in RESUME_MAY_DIFFER or key in ("model", "preset"):
            continue
        before = old.get(key, defaults[key])
        if before != new[key]:
            diffs.append(f"{key}: {before!r} -> {new[key]!r}")
    old_m, new_m = ckpt["model_config"], mcfg.to_dict()
    for key in sorted(set(old_m) | set(new_m)):
        if old_m.get(key) != new_m.get(key):
            diffs.append(f"model.{key}: {old_m.get(key)!r} -> {new_m.get(key)!r}")
    return diffs


def _start_distributed(device: torch.device, timeout_s: float) -> None:
    """DeepSpeed's process group (from the launcher's environment, or a one-process group when run plainly); every
    collective waits at most `timeout_s` (a hung rank ends the job instead of blocking it)."""
    import datetime

    init_distributed_env(device.type)
    reason = deepspeed_reasons()
    if reason:
        raise ValueError(f"deepspeed=true: {reason}")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _apex_classes():
    """(FusedLayerNorm, FusedAdam) from apex, or ValueError with why not."""
    try:
        from apex.normalization import FusedLayerNorm
        from apex.optimizers import FusedAdam
    except Exception as exc:
        raise ValueError(
            f"apex=true but apex does not import ({type(exc).__name__}); apex is not on the package index (build it "
            "from github.com/NVIDIA/apex), and torch's fused AdamW, the default, needs nothing"
        ) from None
    return FusedLayerNorm, FusedAdam


def _use_apex(model: torch.nn.Module, cfg: PretrainConfig, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """apex FusedLayerNorm in place of every nn.LayerNorm (same parameters) and apex FusedAdam (AdamW mode)."""
    FusedLayerNorm, FusedAdam = _apex_classes()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.LayerNorm:
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps).to(child.weight.device)
                fused.weight, fused.bias = child.weight, child.bias
                setattr(parent, name, fused)
    return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adam_w_mode=True)


def build_mask_generator(mcfg: BeitConfig, masking: str = "block", seed: Optional[int] = None):
    """The run's mask generator: blockwise (blocks of at least 16 patches, fewer for small grids) or random."""
    if masking == "block":
        min_block = min(16, max(1, mcfg.num_masking_patches // 4))
        return BlockwiseMaskGenerator(mcfg.grid_size, mcfg.num_masking_patches, min_num_patches=min_block, seed=seed)
    return RandomMaskGenerator(mcfg.grid_size, mcfg.num_masking_patches, seed=seed)


def _data(cfg: PretrainConfig, mcfg: BeitConfig, tok_size: int, base: Optional[torch.utils.data.Dataset]):
    """The MIM dataset: masks are drawn in the data-loader workers, from (seed, epoch, index)."""
    mask_gen = build_mask_generator(mcfg, cfg.masking)
    if cfg.data == "synthetic":
        return SyntheticMIMDataset(cfg.num_images, mcfg.img_size, tok_size, mask_gen, seed=cfg.seed,
                                   return_skipped=True)
    return MIMDataset(base, TwoViewTransform(mcfg.img_size, tok_size), mask_gen, seed=cfg.seed, return_skipped=True)


def _process_layout() -> Tuple[int, int, int]:
    """(world size, rank, local rank) as a launcher (deepspeed, torchrun) sets them; a plain run is one process."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"),  # type: ignore
                                                        ("LOCAL_RANK", "0")))


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    """Run pretraining; returns a summary (final metrics, paths). Under DeepSpeed every rank calls it.

    The config and the data are checked first. Then rank 0 takes the run directory's lock (`RunLock`) for the rest
    of the run - a second run into the same `out` is refused (`RunDirectoryBusy`, a ValueError) - and removes what an
    interrupted run left there, before it looks for a checkpoint to resume. A run refused before it trains leaves
    no directory behind that it created. SIGTERM / SIGINT are caught from the start (`SignalStop`)."""
    run = _Run(signals=SignalStop().install())
    try:
        return _pretrain(cfg, run)
    except BaseException:
        if run.created is not None and run.lock is not None:
            run.lock.release()
            run.lock = None
            leftover = {p.name for p in run.created.iterdir()} if run.created.is_dir() else set()
            if leftover <= {LOCK_NAME}:  # nothing of a run in it: as if it had never been made
                shutil.rmtree(run.created, ignore_errors=True)
        raise
    finally:
        run.signals.restore()
        if run.lock is not None:
            run.lock.release()


@dataclass
class _Run:
    signals: SignalStop
    lock: Optional[RunLock] = None
    created: Optional[Path] = None  # `out`, if this run made it


def _lock_run_directory(out: Path, run: _Run) -> None:
    try:
        if not out.exists():
            out.mkdir(parents=True)
            run.created = out
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"out={str(out)!r} is not a writable directory ({type(exc).__name__}: {exc})") from None
    run.lock = RunLock(out).acquire()
    clean_run_directory(out)


def _pretrain(cfg: PretrainConfig, run: _Run) -> Dict[str, Any]:
    cfg.validate()
    mcfg = cfg.model_config()
    out = Path(cfg.out)
    # Everything that can be checked is checked before DeepSpeed starts (its import alone prints to stderr).
    world, rank, local_rank = _process_layout()
    if not cfg.deepspeed and world > 1:
        raise ValueError(f"launched as {world} processes, but the plain engine is one process: "
                         "add --deepspeed (with --zero-stage 0-3)")
    device = _device(cfg, local_rank)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ValueError("precision=bf16 needs a CUDA device (bf16 autocast on the CPU is slow and untested here)")
    _check_backends(mcfg, device, use_bf16)
    is_main = rank == 0
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by processes x grad_accum_steps = "
                         f"{world} x {cfg.grad_accum_steps}")
    if not is_main:
        log.setLevel(logging.WARNING)

    # Data first: a missing directory, or one where no image decodes, must fail before any work starts.
    base = None
    if cfg.data != "synthetic":
        base = build_dataset(cfg.data, num_images=cfg.num_images, size=int(mcfg.img_size * 1.5), seed=cfg.seed)
        if len(base) < cfg.batch_size:
            raise ValueError(f"dataset has {len(base)} images, fewer than batch_size={cfg.batch_size}")
        if isinstance(base, ImageFolderDataset):
            base.check_readable()
    elif cfg.num_images < cfg.batch_size:
        raise ValueError(f"num_images={cfg.num_images} is fewer than batch_size={cfg.batch_size}")
    if is_main:  # before the checkpoints are listed: a run in progress there is refused, leftovers are gone
        _lock_run_directory(out, run)

    resume_path: Optional[Path] = None
    if cfg.resume == "auto":
        resume_path = find_latest_checkpoint(out)
    elif cfg.resume:
        resume_path = Path(cfg.resume)
        if not resume_path.exists():
            raise FileNotFoundError(f"resume checkpoint not found: {resume_path}")
    ckpt: Optional[Dict[str, Any]] = None
    if resume_path is not None:
        # Checked before anything is written: a refused resume leaves the run directory as it was.
        ckpt = read_checkpoint(resume_path)
        diffs = _resume_differences(ckpt, cfg, mcfg)
        if diffs:
            raise ValueError(
                f"refusing to resume from {resume_path}: settings differ from the checkpoint's ({'; '.join(diffs)}); "
                f"only {', '.join(sorted(RESUME_MAY_DIFFER))} may change"
            )
        old_world = ckpt["engine"].get("world_size", 1)
        if cfg.deepspeed and old_world != world:
            raise ValueError(f"refusing to resume from {resume_path}: it was written by {old_world} processes, this "
                             f"run has {world} (ZeRO partitions the optimizer state by process)")
        old_max = ckpt["config"].get("max_steps", cfg.max_steps)
        if old_max != cfg.max_steps:
            log.warning("max_steps changed from %s to %d on resume: the cosine schedule after step %d differs "
                        "from the original run's (and from a straight run to %d)", old_max, cfg.max_steps,
                        ckpt["step"], cfg.max_steps)

    existing = checkpoints(out)
    foreign = resume_path is not None and resume_path.resolve().parent != checkpoint_dir(out).resolve()
    if existing and (resume_path is None or foreign) and not cfg.overwrite:
        what = "start afresh" if resume_path is None else f"resume {resume_path} there"
        raise ValueError(f"{out} already holds checkpoints of a run (newest {existing[-1].name}): continue it with "
                         f"--resume auto, or {what} with --overwrite (deletes them)")
    # Checkpoints past the one resumed from belong to a run this one replaces: keeping them would make the
    # next `--resume auto` continue that other run (and pruning by age could delete this run's newest). They are
    # deleted only once the run has started (the engine built, the checkpoint loaded).
    start_at = ckpt["step"] if ckpt is not None and not foreign else 0
    stale = [p for p in existing if checkpoint_step(p) > start_at]
    if cfg.apex:
        _apex_classes()  # fails with its one-line reason before anything starts
    tokenizer = build_tokenizer(cfg, mcfg, device)  # a bad tokenizer file fails before anything is written
    if cfg.deepspeed:
        _start_distributed(device, cfg.dist_timeout)
        if world > 1:  # the other ranks listed the checkpoints while rank 0 may have been cleaning: rank 0's choice
            import torch.distributed as dist

            chosen = [str(resume_path) if resume_path is not None else ""]
            dist.broadcast_object_list(chosen, src=0)
            if chosen[0] != (str(resume_path) if resume_path is not None else ""):
                resume_path = Path(chosen[0]) if chosen[0] else None
                ckpt = read_checkpoint(resume_path) if resume_path is not None else None
    tok_size = tokenizer.image_size
    if is_main:
        (out / "config.json").write_text(json.dumps({"pretrain": cfg.to_dict(), "model": mcfg.to_dict()}, indent=2))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = BeitForMaskedImageModeling(mcfg).to(device)
    if cfg.apex:
        optimizer = _use_apex(model, cfg, parameter_groups(model, cfg.weight_decay))
    else:
        optimizer = build_optimizer(model, cfg)
    common = dict(device=device, bf16=use_bf16, clip_grad=cfg.clip_grad, grad_accum=cfg.grad_accum_steps)
    if cfg.deepspeed:
        engine: Any = DeepSpeedEngine(model, optimizer, micro_batch=cfg.batch_size // (world * cfg.grad_accum_steps),
                                      zero_stage=cfg.zero_stage, **common)
    else:
        engine = PlainEngine(model, optimizer, **common)
    if cfg.compile:
        engine.compile(cfg.compile_mode)
    # Each rank draws its own stochastic depth; rank 0 keeps the single-process stream.
    torch.manual_seed(cfg.seed + rank)
    log.info("targets: %s", tokenizer.description)
    log.info("engine: %s", engine.describe())

    start_step = 0
    # Run statistics, saved in every checkpoint: counts, the recent accuracies, the global token histogram
    # (for the majority-token baseline; on resume rank 0 carries it, the other ranks start from zero).
    stats: Dict[str, Any] = {"skipped_steps": 0, "skipped_images": 0, "bad_in_row": 0, "recent_acc": [],
                             "token_hist": torch.zeros(mcfg.vocab_size, dtype=torch.long), "bad_files": [],
                             "suspect_steps": []}
    if ckpt is not None:
        engine.load(resume_path, ckpt)
        start_step, stats = ckpt["step"], {**stats, **ckpt["stats"]}
        if not is_main:
            stats["token_hist"] = torch.zeros(mcfg.vocab_size, dtype=torch.long)
        del ckpt
        log.info("resumed from %s at step %d", resume_path, start_step)
        if start_step >= cfg.max_steps:
            log.warning("the checkpoint is at step %d, max_steps=%d: nothing to train (raise --max-steps to go on)",
                        start_step, cfg.max_steps)
    token_hist = stats["token_hist"].to(device)  # counted on the device: no host sync per batch
    if is_main:
        why = "--overwrite" if start_at == 0 else f"it is past step {start_at}, where this run starts"
        for p in stale:
            log.warning("removing %s (%s)", p, why)
            remove_checkpoint(p)
        if start_step == 0:  # a fresh run: the outputs of an earlier run in this directory go too
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
            for name in ("summary.json", "metrics.png"):
                (out / name).unlink(missing_ok=True)
    engine.barrier()

    dataset = _data(cfg, mcfg, tok_size, base)
    sampler = MicroBatchSampler(StepBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start_step),
                                rank=rank, world_size=world, grad_accum=cfg.grad_accum_steps)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched by workers
        worker_init_fn=_worker_init,
    )

    columns = ["step", "loss", "mlm_acc", "lr", "grad_norm", "ms_per_step", "img_per_s", "mfu", "mem_gb",
               "skipped_steps", "skipped_images"]
    metrics = MetricsWriter(out, columns, start_step, cfg.tensorboard) if is_main else None
    fpi, peak = flops_per_image(mcfg), peak_flops(device)
    progress = Progress(cfg.max_steps, start_step, enabled=is_main)
    recent_acc: deque = deque(stats["recent_acc"], maxlen=20)
    last_ckpt: Optional[Path] = resume_path
    K = mcfg.num_masking_patches
    model.train()
    t_last = time.perf_counter()
    step = start_step

    def _report(step: int, lr: float, grad_norm: float, step_stats: torch.Tensor, t_last: float) -> float:
        """One metrics row, the progress bar / log line; returns the time it was taken at."""
        loss_v, acc_v = float(step_stats[0]), float(step_stats[1])
        recent_acc.append(acc_v)
        now = time.perf_counter()
        dt = now - t_last
        ips = cfg.batch_size / dt
        mfu = fpi * ips / (peak * world) if peak else None
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        if metrics is not None:
            metrics.write({"step": step, "loss": loss_v, "mlm_acc": acc_v, "lr": lr, "grad_norm": grad_norm,
                           "ms_per_step": dt * 1e3, "img_per_s": ips, "mfu": mfu, "mem_gb": mem,
                           "skipped_steps": stats["skipped_steps"], "skipped_images": stats["skipped_images"]})
            if log_now:
                metrics.flush()
        mfu_s = f" | MFU {mfu:.1%}" if mfu is not None else ""
        mem_s = f" | mem {mem:.2f} GB" if mem is not None else ""
        line = (f"step {step}/{cfg.max_steps} | loss {loss_v:.4f} | mlm_acc {acc_v:.4f} | lr {lr:.3g} | "
                f"{dt * 1e3:.0f} ms | {ips:.0f} img/s{mfu_s}{mem_s}")
        postfix = {"loss": f"{loss_v:.3f}", "acc": f"{acc_v:.3f}", "lr": f"{lr:.2g}", "img/s": f"{ips:.0f}"}
        if mfu is not None:
            postfix["MFU"] = f"{mfu:.1%}"
        if mem is not None:
            postfix["mem"] = f"{mem:.1f}G"
        progress.update(line, postfix, log_now)
        return now

    # Unreadable image files, each counted once over the run: within an epoch every index is drawn by exactly one
    # rank, which reports it; the ranks' new finds are merged at epoch ends and checkpoints.
    bad_files = set(stats["bad_files"])
    new_bad: set = set()
    steps_per_epoch = len(dataset) // cfg.batch_size

    def merge_bad_files() -> None:
        nonlocal new_bad
        bad_files.update(engine.gather_union(new_bad))
        new_bad = set()
        stats["bad_files"], stats["skipped_images"] = sorted(bad_files), len(bad_files)

    suspect = set(stats.get("suspect_steps", []))  # checkpoints written inside a streak of skipped steps

    def save() -> Path:
        merge_bad_files()
        stats["recent_acc"] = list(recent_acc)
        stats["token_hist"] = engine.reduce_sum(token_hist).cpu()  # the global histogram (a collective)
        if stats["bad_in_row"]:
            suspect.add(step)
        stats["suspect_steps"] = sorted(suspect)
        if not engine.params_finite():  # (every rank) a checkpoint is never written from non-finite weights
            newest = find_latest_checkpoint(out)
            raise TrainingStopped(f"the weights are not finite at step {step}: no checkpoint written (the newest "
                                  f"one is {newest})")
        if metrics is not None:
            metrics.flush()  # every row up to the checkpoint is on disk before it
        path = engine.save(checkpoint_dir(out), step, {"step": step, "config": cfg.to_dict(),
                                                       "model_config": mcfg.to_dict(), "stats": stats})
        if is_main:
            prune_checkpoints(out, cfg.keep_last, good=lambda p: checkpoint_step(p) not in suspect)
        return path

    signals = run.signals
    data_iter = iter(loader)
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            engine.set_lr(lr)
            losses: List[torch.Tensor] = []
            accs: List[torch.Tensor] = []
            step_ok = no_stop = True  # no rank asked to stop (a signal), as far as the agreements said
            for _ in range(cfg.grad_accum_steps):
                patches, tok_view, mask, _, skipped = next(data_iter)
                new_bad.update(i for i in skipped.tolist() if i >= 0 and i not in bad_files)
                if not step_ok:
                    continue  # the rest of a skipped step: its data is consumed (steps stay addressable), not run
                patches = patches.to(device, non_blocking=True)
                tok_view = tok_view.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                with torch.no_grad():
                    tokens = tokenizer.tokenize(tok_view)
                    token_hist.scatter_add_(0, tokens.reshape(-1).long(), mask.reshape(-1).long())
                # Every mask has exactly K patches: the fused path needs no host sync.
                out_ = engine.forward(patches, mask, tokens, num_masked_per_image=K)
                try:  # the kernels' device-side input checks (on the CPU they raised already)
                    check_deferred()
                    input_error = None
                except ValueError as exc:
                    input_error = exc
                # The micro-batch's one sync; every rank learns whether any rank's loss or inputs were bad, and
                # whether any rank was asked to stop (a signal).
                step_ok, inputs_ok, go_on = engine.all_finite(out_.loss, input_error is None,
                                                              signals.requested is None)
                no_stop = no_stop and go_on
                if input_error is not None:
                    raise input_error
                if not inputs_ok:
                    raise TrainingStopped(f"another process failed its input checks at step {step + 1} "
                                          "(its error is in its log)")
                if step_ok:
                    engine.backward(out_.loss)
                    losses.append(out_.loss.detach().float())
                    accs.append(out_.accuracy.detach().float())
            step_stats = engine.reduce_mean(torch.stack([
                torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=device),
                torch.stack(accs).mean() if accs else torch.tensor(float("nan"), device=device),
                torch.tensor(float(len(new_bad)), device=device),
            ]))
            stats["skipped_images"] = len(bad_files) + int(round(float(step_stats[2]) * world))
            grad_norm = float("nan")
            if step_ok:  # every rank's loss was finite: the engine applies the step only if the global norm is too
                grad_norm = engine.step()
            else:  # a non-finite loss on some rank: every rank drops the step's gradients
                engine.discard()
            step += 1
            if step_ok and math.isfinite(grad_norm):
                stats["bad_in_row"] = 0
                t_last = _report(step, lr, grad_norm, step_stats, t_last)
            else:
                stats["bad_in_row"] += 1
                stats["skipped_steps"] += 1
                what = "loss" if not step_ok else f"gradient norm ({grad_norm})"
                log.warning("step %d: non-finite %s, step skipped (%d in a row)", step, what, stats["bad_in_row"])
                if stats["bad_in_row"] >= cfg.max_bad_steps:
                    raise TrainingStopped(
                        f"{stats['bad_in_row']} skipped steps in a row (non-finite loss or gradient norm; "
                        f"max_bad_steps={cfg.max_bad_steps}); stopping. The newest checkpoint written before them is "
                        f"intact: lower the lr, raise warmup, or resume from an earlier checkpoint."
                    )
                t_last = time.perf_counter()  # the next row's time is its own step's
            if steps_per_epoch and step % steps_per_epoch == 0:
                merge_bad_files()
            # One process reads its own flag (a signal after the last agreement counts); ranks go by the agreement.
            stop = not no_stop or (world == 1 and signals.requested is not None)
            if stop or (cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps):
                last_ckpt = save()
            if stop:
                signum = signals.requested or signal.SIGTERM  # another rank's signal: every rank stops here
                raise StoppedBySignal(signum, step, last_ckpt)
        if step > start_step or last_ckpt is None:  # a finished run resumed: its checkpoint stays as it is
            last_ckpt = save()
        elif signals.requested is not None:
            raise StoppedBySignal(signals.requested, step, last_ckpt)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()

    hist = engine.reduce_sum(token_hist).double().cpu()
    majority = float(hist.max() / hist.sum()) if hist.sum() > 0 else None
    plot = None
    if is_main and cfg.plot:
        try:
            plot = plot_metrics(out / "metrics.csv", out / "metrics.png", chance=1.0 / mcfg.vocab_size)
        except Exception as exc:  # a plot is a convenience: never fail a finished run over it
            log.warning("no plot: %s: %s", type(exc).__name__, exc)
    summary = {
        "step": step,
        "steps_run": step - start_step,
        "final_mlm_acc": float(np.mean(recent_acc)) if recent_acc else None,  # None: no step ran (JSON null)
        "chance": 1.0 / mcfg.vocab_size,
        "majority_baseline": majority,
        "skipped_steps": stats["skipped_steps"],
        "skipped_images": stats["skipped_images"],
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "metrics": str(out / "metrics.csv"),
        "plot": str(plot) if plot else None,
        "tensorboard": str(out / "tensorboard") if (out / "tensorboard").is_dir() else None,
        "out": str(out),
        "tokenizer": tokenizer.description,
        "engine": engine.describe(),
        "rank": rank,
    }
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    engine.close()
    return summary


# -- command line ----------------------------------------------------------------------------------------------------
def _accepts(tp: Any, kind: type) -> bool:
    if get_origin(tp) is Union:
        return any(_accepts(a, kind) for a in get_args(tp))
    return (get_origin(tp) or tp) is kind


def _coerce(where: str, name: str, value: Any, tp: Any, from_cli: bool) -> Any:
    """One config value to the type of its field, or ValueError naming it. Command-line values are
    strings, parsed as YAML scalars unless the field is a plain string; YAML-file values come parsed."""
    import yaml

    if from_cli and tp is not str:
        if value.strip().lower() in ("none", "null", "~") and _accepts(tp, type(None)):
            return None  # Optional fields (init_values, num_masking_patches)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        value = value if isinstance(parsed, (list, dict)) else parsed
    if isinstance(value, str) and _accepts(tp, float) and not _accepts(tp, str):
        try:  # YAML 1.1 reads "2e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if not _type_ok(value, tp):
        raise ValueError(f"{where}{name} expects {_describe(tp)}, got {value!r}")
    if _accepts(tp, float) and not isinstance(value, bool) and isinstance(value, int):
        value = float(value)
    return value


def _read_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    if not path.is_file():
        what = "config path is a directory" if path.is_dir() else "config file not found"
        raise FileNotFoundError(f"{what}: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the config file: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def config_from_args(args: List[str]) -> PretrainConfig:
    """`--config FILE.yaml` then `--key=value` / `--key value` overrides; BeitConfig keys go to `model`
    (plain, or as `--model.key=value`). Unknown keys and values of the wrong type raise ValueError."""
    values: Dict[str, Any] = {}
    flags = {f.name: "true" for f in fields(PretrainConfig) if f.type in (bool, "bool")}
    flags["resume"] = "auto"  # a bare --resume means --resume auto
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment (LOCAL_RANK) instead.
    pairs = [(k, v) for k, v in parse_options(args, flags=flags) if k != "local_rank"]
    own_types, model_types = _field_types(PretrainConfig), _field_types(BeitConfig)
    own = {f.name for f in fields(PretrainConfig)}
    model_keys = {f.name for f in fields(BeitConfig)} - {"extra"}  # free-form notes are no override
    model: Dict[str, Any] = {}

    def model_value(where: str, k: str, v: Any, from_cli: bool) -> None:
        if k not in model_keys:
            why = " (free-form notes, not an override)" if k == "extra" else ""
            raise ValueError(f"unknown model key {where}{k}{why}; valid: {', '.join(sorted(model_keys))}")
        model[k] = _coerce(where, k, v, model_types.get(k, Any), from_cli)

    for k, v in pairs:
        if k != "config":
            continue
        path = Path(v)
        loaded = _read_yaml(path)
        where = f"{path}: "
        for key, value in loaded.items():
            if key == "model":
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise ValueError(f"{where}model expects a mapping of BeitConfig keys, got {value!r}")
                for mk, mv in value.items():
                    model_value(f"{path}: model.", mk, mv, False)
            elif key in own:
                values[key] = _coerce(where, key, value, own_types.get(key, Any), False)
            elif key in model_keys:
                model_value(f"{path}: ", key, value, False)
            else:
                raise ValueError(f"{where}unknown config key {key!r}")
    for k, v in pairs:
        if k == "config":
            continue
        if k.startswith("model."):
            model_value("--model.", k[len("model."):], v, True)
        elif k in own and k != "model":
            values[k] = _coerce("--", k, v, own_types.get(k, Any), True)
        elif k in model_keys:
            model_value("--", k, v, True)
        else:
            raise ValueError(f"unknown option --{k}; pretrain options: {sorted(own - {'model'})}, model keys too")
    cfg = PretrainConfig(**values, model=model)
    cfg.validate()
    return cfg


def _one_line(exc: BaseException) -> str:
    """An exception's message as one line. A DataLoader worker re-raises with the worker's traceback in the
    message ("Caught X in DataLoader worker process 0. Original Traceback ..."): keep its last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in lines[1]:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines)


def _field_comments() -> Dict[str, str]:
    """The comment beside each PretrainConfig field (and its continuation lines), for --help."""
    import inspect

    comments: Dict[str, str] = {}
    last = None
    for line in inspect.getsource(PretrainConfig).splitlines():
        m = re.match(r"\s{4}(\w+): [^#]*?#\s*(.*)$", line)
        if m:
            last = m.group(1)
            comments[last] = m.group(2)
        elif last and re.match(r"\s{4}#\s*", line):
            comments[last] += " " + line.strip().lstrip("#").strip()
        elif not line.strip().startswith("#"):
            last = None
    return comments


def print_help() -> None:
    print(__doc__)
    print("options (--key=value or --key value; true/false keys also stand alone, a bare --resume means auto):")
    comments = _field_comments()
    for f in fields(PretrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        print(f"  --{f.name.replace('_', '-')}  (default {default!r})  {comments.get(f.name, '')}".rstrip())
    print("  --config FILE.yaml; any BeitConfig key (e.g. --depth=2 or --model.depth=2)")


def _is_distributed_error(exc: BaseException) -> bool:
    """A torch.distributed failure (a collective's timeout, a peer gone): DistError and its kinds, or gloo's and
    NCCL's RuntimeErrors, which name themselves."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Timed out", "timed out"))


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 done; 2 bad input (config, arguments, missing data, a bad checkpoint or tokenizer file, a run
    directory in use); 1 the data or the run failed (too many skipped steps, a write error such as a full disk, a
    hung or dead rank); 128 + N stopped by signal N (SIGTERM 143, SIGINT 130) after writing a checkpoint.
    Every expected failure is one line on stderr; anything else keeps its traceback (a bug to report)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = PretrainConfig()
    try:
        cfg = config_from_args(argv)
        summary = pretrain(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"beit-fast pretrain: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (DataError, TrainingStopped, OSError) as exc:
        print(f"beit-fast pretrain: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except StoppedBySignal as exc:
        if _process_layout()[1] == 0:  # one line for the job, not one per rank
            print(f"beit-fast pretrain: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except RuntimeError as exc:
        if not _is_distributed_error(exc):
            raise
        print(f"beit-fast pretrain: error: a collective failed or timed out (dist_timeout={cfg.dist_timeout:g} s): "
              f"another process is hung or dead ({type(exc).__name__}: {_one_line(exc)[:300]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("beit-fast pretrain: interrupted; the last checkpoint is intact (resume with --resume auto)",
              file=sys.stderr)
        return 130
    if summary["rank"] != 0:
        return 0
    acc, majority = summary["final_mlm_acc"], summary["majority_baseline"]
    acc_s = "n/a (no steps run)" if acc is None else f"{acc:.4f} (mean of the last 20 steps)"
    majority_s = "n/a" if majority is None else f"{majority:.4f}"
    print(
        f"done: {summary['step']} steps | final mlm_acc {acc_s} vs chance {summary['chance']:.4f} "
        f"(1/{round(1 / summary['chance'])}) and majority-token baseline {majority_s}"
    )
    print(f"targets: {summary['tokenizer']}")
    print(f"checkpoint: {summary['checkpoint']}")
    tb = f" (TensorBoard: {summary['tensorboard']})" if summary["tensorboard"] else ""
    print(f"metrics: {summary['metrics']}{tb}")
    print(f"plot: {summary['plot'] or 'none (pip install -e .[plot] for matplotlib)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
