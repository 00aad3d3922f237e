"""BEiT masked-image-modeling pretraining (`beit-fast pretrain`, `python -m beit_fast.train.pretrain`).

One linear script, nanoGPT style: config -> runtime -> run dir -> data -> tokenizer -> model -> engine -> loop ->
summary; the parts it wires live in `beit_fast.train` (config, runtime, run, optim, step, engine, metrics). The
same script runs as one plain process, or under DeepSpeed ZeRO (stage 0-3) with `--deepspeed --zero-stage K`,
launched by the `deepspeed` launcher or torchrun (see `beit_fast.train.engine`). `batch_size` is the global batch:
each of the P processes runs `grad_accum_steps` micro-batches of batch_size / (P x grad_accum_steps) images per step.

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

import logging
import pickle
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Tuple, Union

import numpy as np
import torch

from beit_fast import BeitConfig, BeitForMaskedImageModeling
from beit_fast.checkpoint import CheckpointError, atomic_save
from beit_fast.config import MIM_LOSS_ON, MIM_TARGETS, first_line, one_line
from beit_fast.data import (DataError, ImageFolderDataset, MIMDataset, SyntheticMIMDataset, TwoViewTransform,
                            build_dataset)
from beit_fast.shards import ShardStream, count_samples, is_shard_spec, shard_list
from beit_fast.views import FastTwoViewTransform, augment_views, collate_crops, resize_crops
from beit_fast.masking import BlockwiseMaskGenerator, RandomMaskGenerator
from beit_fast.tokenizer import RandomConvTokenizer
from beit_fast.train.config import BeitTrainConfig, type_ok
from beit_fast.train.metrics import TOKEN_ACC_MARGIN, StepReporter, no_learning, plot_metrics
from beit_fast.train.optim import build_optimizer, warmup_cosine
from beit_fast.train.run import (
    Checkpointer,
    RunDir,
    agree_on_resume,
    checkpoint_model_state,
    data_identity,
    file_digest,
    find_latest_checkpoint,
    plan_resume,
    read_checkpoint as _read_checkpoint,
    resolve_checkpoint,
    start_run_directory,
)
from beit_fast.train.runtime import (
    build_engine,
    close_loader,
    run_main,
    seed_all,
    setup_runtime,
    start_distributed,
    train_loader,
    worker_init,
)
from beit_fast.train.step import BadSteps, StoppedBySignal, TrainingStopped, run_step, train_steps

log = logging.getLogger("beit_fast.pretrain")

__all__ = ["PretrainConfig", "TrainingStopped", "StoppedBySignal", "pretrain", "build_mask_generator",
           "find_latest_checkpoint", "read_checkpoint", "export_checkpoint", "config_from_args", "main"]


@dataclass
class PretrainConfig(BeitTrainConfig):
    RESUME_MAY_DIFFER: ClassVar[FrozenSet[str]] = BeitTrainConfig.RESUME_MAY_DIFFER | {"max_bad_images_frac"}

    data: str = "builtin"  # "builtin" (procedural shapes), "synthetic" (random views, no decoding), an image folder,
    # or WebDataset tar shards: a .tar, a brace pattern (shard-{000000..000099}.tar) or a folder of them (make-shards)
    data_backend: str = "cpu"  # the two-view pipeline: "cpu" (draft decoding, crop first, uint8 resizes on the
    # workers; jitter, flip and normalisation batched on the device), "gpu" (the workers decode and crop; both
    # resizes too on the device) or "pil" (all per image in Pillow, the reference)
    out: str = "runs/pretrain"  # run directory: config.json, metrics.csv, checkpoints/
    lr: float = 1.5e-3  # peak learning rate (SPEC: 1.5e-3 at batch 2048)
    masking: str = "block"  # "block" (BEiT) or "random" (ablation)
    target: str = "tokens"  # "tokens" (BEiT: the tokenizer's visual tokens) or "pixels" (ablation: regress the
    # masked patches' pixels with MSE; no tokenizer runs)
    loss_on: str = "masked"  # "masked" (BEiT) or "all" (ablation: the loss scores every patch)
    pixel_norm: bool = True  # pixel target: each patch normalised by its own mean / std (false: the input's pixels)
    tokenizer: str = "random"  # "random" (fixed random conv) or a dVAE file: beit-fast train-tokenizer's
    # tokenizer.pt, a DALL-E encoder.pkl, or an encoder state dict
    crop_scale: float = 0.08  # RandomResizedCrop's smallest area fraction (unilm's --min_crop_scale)
    max_bad_images_frac: float = 0.5  # stop when more than this share of the images read is unreadable
    # (counted from the first 256 images, or the whole dataset if smaller; 1: never stop)
    color_jitter: float = 0.4  # ColorJitter brightness = contrast = saturation (unilm's --color_jitter; 0: off)

    def validate(self) -> None:
        super().validate()
        if self.masking not in ("block", "random"):
            self.bad("masking", 'must be "block" or "random"')
        if self.data_backend not in DATA_BACKENDS:
            self.bad("data_backend", f"must be one of {DATA_BACKENDS}")
        if self.target not in MIM_TARGETS:
            self.bad("target", f"must be one of {MIM_TARGETS}")
        if self.loss_on not in MIM_LOSS_ON:
            self.bad("loss_on", f"must be one of {MIM_LOSS_ON}")
        clash = [k for k in ("mim_target", "mim_loss_on", "pixel_norm") if k in self.model]
        if clash:
            self.bad("model", f"set {clash} with --target / --loss-on / --pixel-norm")
        if not 0.0 < self.crop_scale <= 1.0:
            self.bad("crop_scale", "must be in (0, 1]")
        self.non_negative("color_jitter")
        if not 0.0 <= self.max_bad_images_frac <= 1.0:
            self.bad("max_bad_images_frac", "is a share of the images: must be in [0, 1]")
        if self.tokenizer != "random" and not Path(self.tokenizer).is_file():
            self.bad("tokenizer", 'must be "random" or the path of a tokenizer file (beit-fast train-tokenizer '
                                  'writes one)')

    def model_config(self) -> BeitConfig:
        """The preset with the model overrides and the ablation switches (target, loss_on, pixel_norm: they shape
        the head, so they live in the model config too and a resume must keep them)."""
        return super().model_config().replace(mim_target=self.target, mim_loss_on=self.loss_on,
                                              pixel_norm=self.pixel_norm)


RESUME_MAY_DIFFER: FrozenSet[str] = PretrainConfig.RESUME_MAY_DIFFER
DATA_BACKENDS = ("cpu", "gpu", "pil")
config_from_args = PretrainConfig.from_args
SUMMARY_OUTPUTS = ("summary.json", "metrics.png")
BAD_IMAGES_WINDOW = 256  # images read before the unreadable share is judged (max_bad_images_frac)


def _stats_problems(stats: Dict[str, Any], model_config: Dict[str, Any]) -> List[str]:
    """Pretraining's own run statistics: the recent accuracies and the token histogram."""
    wrong = [] if isinstance(stats.get("recent_acc", []), list) and all(
        type_ok(x, float) for x in stats.get("recent_acc", [])) else ["stats.recent_acc is not a list of numbers"]
    hist, vocab = stats.get("token_hist"), model_config.get("vocab_size")
    if "token_hist" in stats and not (torch.is_tensor(hist) and hist.dtype == torch.long and hist.dim() == 1
                                      and (vocab is None or hist.numel() == vocab)):
        wrong.append(f"stats.token_hist is not a LongTensor of {vocab} counts")
    return wrong


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A pretraining checkpoint's run state (see `beit_fast.train.run.read_checkpoint`)."""
    return _read_checkpoint(path, "pretrain", _stats_problems)


def export_checkpoint(path: Union[str, Path], out: Union[str, Path], layout: str = "unilm") -> Path:
    """Write a pretraining checkpoint's weights as `{"model": state_dict}` in `layout` ("unilm": what unilm's and
    timm's fine-tuning scripts load), atomically. `path`: a checkpoint, or a run directory (its newest one)."""
    sd, ckpt = checkpoint_model_state(resolve_checkpoint(Path(path)))
    try:
        model = BeitForMaskedImageModeling(BeitConfig.from_dict(ckpt["model_config"]))
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


def build_mask_generator(mcfg: BeitConfig, masking: str = "block", seed: Optional[int] = None):
    """The run's mask generator: blockwise (blocks of at least 16 patches, fewer for small grids) or random."""
    if masking == "block":
        min_block = min(16, max(1, mcfg.num_masking_patches // 4))
        return BlockwiseMaskGenerator(mcfg.grid_size, mcfg.num_masking_patches, min_num_patches=min_block, seed=seed)
    return RandomMaskGenerator(mcfg.grid_size, mcfg.num_masking_patches, seed=seed)


def _base_data(cfg: PretrainConfig, mcfg: BeitConfig) -> Optional[torch.utils.data.Dataset]:
    """The images (None for synthetic views), checked before any work starts: a missing directory, one where no
    image decodes, or too few images fail here."""
    if cfg.data == "synthetic":
        if cfg.num_images < cfg.batch_size:
            raise ValueError(f"num_images={cfg.num_images} is fewer than batch_size={cfg.batch_size}")
        return None
    if is_shard_spec(cfg.data):  # WebDataset tar shards: streamed (beit_fast.shards)
        shards = shard_list(cfg.data)
        n = count_samples(shards)
        if n is not None and n < cfg.batch_size:
            raise ValueError(f"the shards hold {n} images, fewer than batch_size={cfg.batch_size}")
        return shards
    base = build_dataset(cfg.data, num_images=cfg.num_images, size=int(mcfg.img_size * 1.5), seed=cfg.seed)
    if len(base) < cfg.batch_size:
        raise ValueError(f"dataset has {len(base)} images, fewer than batch_size={cfg.batch_size}")
    if isinstance(base, ImageFolderDataset):
        base.check_readable()
    return base


def _mim_data(cfg: PretrainConfig, mcfg: BeitConfig, tok_size: int, base: Optional[torch.utils.data.Dataset],
              device: torch.device):
    """The MIM dataset: masks are drawn in the data-loader workers, from (seed, epoch, index). The fast path jitters
    on the device when it is a GPU (uint8 views over PCIe), in the workers otherwise."""
    mask_gen = build_mask_generator(mcfg, cfg.masking)
    if base is None:
        return SyntheticMIMDataset(cfg.num_images, mcfg.img_size, tok_size, mask_gen, seed=cfg.seed,
                                   return_skipped=True)
    if isinstance(base, list):  # shards: the per-sample function only (ShardStream reads the images)
        base = None
    views = dict(scale=(cfg.crop_scale, 1.0), color_jitter=cfg.color_jitter)
    if cfg.data_backend == "gpu":
        if device.type != "cuda":
            log.warning("--data-backend gpu on %s: the crops are resized and augmented there, on the CPU (slower "
                        "than --data-backend cpu)", device)
        transform: Any = FastTwoViewTransform(mcfg.img_size, tok_size, resize_on_device=True, **views)
    elif cfg.data_backend == "cpu":
        transform = FastTwoViewTransform(mcfg.img_size, tok_size, device_augment=device.type == "cuda", **views)
    else:
        transform = TwoViewTransform(mcfg.img_size, tok_size, **views)
    return MIMDataset(base, transform, mask_gen, seed=cfg.seed, return_skipped=True)


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    """Run pretraining; returns a summary (final metrics, paths). Under DeepSpeed every rank calls it.

    The config and the data are checked first. Then rank 0 takes the run directory's lock (`RunLock`) for the rest
    of the run - a second run into the same `out` is refused (`RunDirectoryBusy`, a ValueError) - and removes what an
    interrupted run left there, before it looks for a checkpoint to resume. A run refused before it trains leaves
    no directory behind that it created. SIGTERM / SIGINT are caught from the start (`SignalStop`)."""
    with RunDir(Path(cfg.out), "beit-fast pretrain") as run_dir:
        return _pretrain(cfg, run_dir)


def _pretrain(cfg: PretrainConfig, run_dir: RunDir) -> Dict[str, Any]:
    cfg.validate()
    mcfg = cfg.model_config()
    out = run_dir.out
    # Everything that can be checked is checked before DeepSpeed starts (its import alone prints to stderr).
    rt = setup_runtime(cfg, mcfg)
    if not rt.is_main:
        log.setLevel(logging.WARNING)
    base = _base_data(cfg, mcfg)
    if rt.is_main:  # before the checkpoints are listed: a run in progress there is refused, leftovers are gone
        run_dir.acquire()
    inputs = run_inputs(cfg)
    plan = plan_resume(out, cfg, mcfg.to_dict(), rt.world, read_checkpoint, inputs)
    if cfg.apex:
        from beit_fast.train.optim import apex_classes

        apex_classes()  # fails with its one-line reason before anything starts
    # a bad tokenizer file fails before anything is written; the pixel target runs none
    tokenizer = build_tokenizer(cfg, mcfg, rt.device) if cfg.target == "tokens" else None
    targets = tokenizer.description if tokenizer is not None else (
        f"pixels of the {cfg.loss_on} patches, MSE"
        f"{', each patch normalised by its mean / std' if cfg.pixel_norm else ''} (no tokenizer)")
    if rt.deepspeed:
        start_distributed(rt.device, cfg.dist_timeout)
        plan = agree_on_resume(plan, rt.world, read_checkpoint)
    if rt.is_main:
        run_dir.write_json("config.json", {"pretrain": cfg.to_dict(), "model": mcfg.to_dict()})

    seed_all(cfg.seed)
    model = BeitForMaskedImageModeling(mcfg).to(rt.device)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                eps=cfg.eps, apex=cfg.apex)
    engine = build_engine(model, optimizer, cfg, rt)
    torch.manual_seed(cfg.seed + rt.rank)  # each rank draws its own stochastic depth; rank 0 keeps one process's
    log.info("targets: %s", targets)
    log.info("engine: %s", engine.describe())

    # Run statistics, saved in every checkpoint: counts, the recent accuracies, the global token histogram
    # (for the majority-token baseline; on resume rank 0 carries it, the other ranks start from zero).
    stats: Dict[str, Any] = {"skipped_steps": 0, "skipped_images": 0, "bad_in_row": 0, "recent_acc": [],
                             "token_hist": torch.zeros(mcfg.vocab_size, dtype=torch.long), "bad_files": [],
                             "suspect_steps": []}
    start_step, ckpt_layout = 0, None
    if plan.ckpt is not None:
        ckpt_layout = (plan.ckpt["config"].get("num_workers"), plan.ckpt["engine"].get("world_size", 1),
                       plan.ckpt["config"].get("grad_accum_steps", 1))
        engine.load(plan.path, plan.ckpt)
        start_step, stats = plan.ckpt["step"], {**stats, **plan.ckpt["stats"]}
        if not rt.is_main:
            stats["token_hist"] = torch.zeros(mcfg.vocab_size, dtype=torch.long)
        plan.ckpt = None
        log.info("resumed from %s at step %d", plan.path, start_step)
        if start_step >= cfg.max_steps:
            log.warning("the checkpoint is at step %d, max_steps=%d: nothing to train (raise --max-steps to go on)",
                        start_step, cfg.max_steps)
    if rt.is_main:
        start_run_directory(out, plan, start_step, SUMMARY_OUTPUTS)
    engine.barrier()
    # the pixel target reads the first view; the second (tokenizer) view is still made, at the random tokenizer's size
    dataset = _mim_data(cfg, mcfg, tokenizer.image_size if tokenizer is not None else mcfg.img_size // 2, base,
                        rt.device)
    collate = collate_crops if getattr(getattr(dataset, "transform", None), "resize_on_device", False) else None
    if isinstance(base, list):  # a stream: no epochs of the loop's own (unreadable samples merge at checkpoints)
        loader, steps_per_epoch = _shard_loader(cfg, rt, base, dataset, start_step, ckpt_layout, collate), 0
    else:
        loader = train_loader(dataset, cfg, rt, start_step, collate)
        steps_per_epoch = len(dataset) // cfg.batch_size
    loop = _Loop(cfg, mcfg, rt, engine, tokenizer, stats, start_step, steps_per_epoch)
    loop.inputs = inputs
    step, last_ckpt = loop.run(loader, run_dir.signals, plan.path)
    return _summary(cfg, mcfg, rt, run_dir, engine, loop, step, start_step, last_ckpt, targets)


def run_inputs(cfg: PretrainConfig) -> Dict[str, Any]:
    """The content identity of the run's inputs, kept in its checkpoints and compared on resume: the data, and
    the tokenizer file's sha256 (a tokenizer retrained under the same path is another tokenizer)."""
    inputs = {"data": data_identity(cfg.data)}
    if cfg.target == "tokens" and cfg.tokenizer != "random":
        inputs["tokenizer"] = file_digest(Path(cfg.tokenizer))
    return inputs


def _shard_loader(cfg: PretrainConfig, rt: Any, shards: List[str], dataset: MIMDataset, start_step: int,
                  ckpt_layout: Optional[Tuple[Any, int, int]], collate_fn: Any = None) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of the shard stream, fast-forwarded to `start_step` (beit_fast.shards: exact when
    the world size and num_workers are the checkpoint's (`ckpt_layout`), approximate otherwise - said here)."""
    micro = cfg.batch_size // (rt.world * cfg.grad_accum_steps)
    if len(shards) < rt.world * max(1, cfg.num_workers):
        raise ValueError(f"{len(shards)} shards cannot feed {rt.world} process(es) x {max(1, cfg.num_workers)} "
                         "data-loader worker(s): write more, smaller shards (beit-fast make-shards --max-count) or "
                         "lower --num-workers")
    if start_step and ckpt_layout is not None:
        before = ckpt_layout
        if before != (cfg.num_workers, rt.world, cfg.grad_accum_steps):
            log.warning("resuming a shard stream with num_workers=%s on %s process(es), grad_accum_steps=%s, where the "
                        "checkpoint had %s on %s, %s: the stream restarts at the same sample counts, which is "
                        "approximate (samples of the interrupted epoch may repeat or be missed)", cfg.num_workers,
                        rt.world, cfg.grad_accum_steps, *before)
    stream = ShardStream(shards, dataset.make, cfg.seed, micro, rt.rank, rt.world,
                         start_micro_batch=start_step * cfg.grad_accum_steps)
    return torch.utils.data.DataLoader(
        stream, batch_size=micro, num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers > 0 else None,
        worker_init_fn=worker_init, collate_fn=collate_fn)


class _Loop:
    """Pretraining's parts of the shared loop: the MIM loss of a batch, the token histogram, unreadable files."""

    def __init__(self, cfg: PretrainConfig, mcfg: BeitConfig, rt: Any, engine: Any, tokenizer: Any,
                 stats: Dict[str, Any], start_step: int, steps_per_epoch: int) -> None:
        self.cfg, self.mcfg, self.rt, self.engine, self.tokenizer = cfg, mcfg, rt, engine, tokenizer
        self.stats, self.start_step, self.steps_per_epoch = stats, start_step, steps_per_epoch
        self.dataset_size = steps_per_epoch * cfg.batch_size if steps_per_epoch else 0  # 0: a stream (shards)
        self.tok_size = tokenizer.image_size if tokenizer is not None else mcfg.img_size // 2  # the second view's
        self.token_hist = stats["token_hist"].to(rt.device)  # counted on the device: no host sync per batch
        self.recent_acc: deque = deque(stats["recent_acc"], maxlen=20)
        self.last_loss: Optional[float] = None
        # Unreadable image files, each counted once over the run: within an epoch every index is drawn by exactly
        # one rank, which reports it; the ranks' new finds are merged at epoch ends and checkpoints.
        self.bad_files, self.new_bad = set(stats["bad_files"]), set()
        self.reporter = StepReporter(
            Path(cfg.out), [("loss", "loss"), ("mlm_acc", "acc")], ["skipped_steps", "skipped_images"],
            start_step=start_step, max_steps=cfg.max_steps, log_every=cfg.log_every, batch_size=cfg.batch_size,
            world=rt.world, device=rt.device, flops_per_image=mcfg.train_flops_per_image(
                mcfg.num_masking_patches if mcfg.mim_loss_on == "masked" else mcfg.num_patches,
                mcfg.vocab_size if mcfg.mim_target == "tokens" else mcfg.patch_size**2 * mcfg.in_chans),
            tensorboard=cfg.tensorboard, tag="pretrain", enabled=rt.is_main, num_workers=cfg.num_workers)

    def next_batch(self) -> Any:
        patches, tok_view, mask, _, skipped, *aug = next(self.data_iter)  # aug: the fast path's parameters
        self.new_bad.update(i for i in skipped.tolist() if i >= 0 and i not in self.bad_files)
        return (patches, tok_view, mask) + tuple(aug)

    def loss(self, batch: Any):
        dev = self.rt.device
        if batch[0].dim() == 1:  # the gpu backend: the crops in one flat buffer, their sizes (kept on the host)
            flat, sizes, mask, aug = batch
            patches, tok_view = resize_crops(flat.to(dev, non_blocking=True), sizes, self.mcfg.img_size,
                                             self.tok_size)
            batch = (patches, tok_view, mask, aug)
        patches, tok_view, mask, *aug = (t.to(dev, non_blocking=True) for t in batch)
        if aug:  # uint8 views from the fast path: jitter, flip, normalise here, batched
            patches, tok_view = augment_views(patches, tok_view, aug[0])
        tokens = None
        if self.tokenizer is not None:  # the pixel target needs none
            with torch.no_grad():
                tokens = self.tokenizer.tokenize(tok_view)
                # the tokens the loss scores, for the majority-token baseline of the accuracy
                scored = mask if self.mcfg.mim_loss_on == "masked" else torch.ones_like(mask)
                self.token_hist.scatter_add_(0, tokens.reshape(-1).long(), scored.reshape(-1).long())
        # Every mask has exactly K patches: the fused path needs no host sync.
        out = self.engine.forward(patches, mask, tokens, num_masked_per_image=self.mcfg.num_masking_patches)
        acc = out.accuracy if out.accuracy is not None else torch.full((), float("nan"), device=out.loss.device)
        return out.loss, [acc]  # NaN: no accuracy for a pixel target (the log shows nan)

    def merge_bad_files(self) -> None:
        self.bad_files.update(self.engine.gather_union(self.new_bad))
        self.new_bad = set()
        self.stats["bad_files"], self.stats["skipped_images"] = sorted(self.bad_files), len(self.bad_files)

    def one_step(self, step: int):
        cfg = self.cfg
        lr = warmup_cosine(step, **cfg.lr_schedule())
        self.engine.set_lr(lr)
        self.lr = lr
        outcome = run_step(self.engine, self.next_batch, self.loss, grad_accum=cfg.grad_accum_steps, num_extras=1,
                           stop_requested=lambda: self.signals.requested is not None,
                           host_values=lambda: [float(len(self.new_bad))])
        self.stats["skipped_images"] = len(self.bad_files) + int(round(float(outcome.values[2]) * self.rt.world))
        self.check_bad_share(step + 1)
        return outcome

    def check_bad_share(self, steps_done: int) -> None:
        """Stop (DataError, one line) once more than `max_bad_images_frac` of the images read are unreadable,
        counted from the first BAD_IMAGES_WINDOW images (or the whole dataset, if smaller): a run never trains on
        stand-in images for most of its data."""
        seen = (steps_done - self.start_step) * self.cfg.batch_size
        if self.dataset_size:
            seen = min(seen, self.dataset_size)
        if seen < min(BAD_IMAGES_WINDOW, self.dataset_size or BAD_IMAGES_WINDOW):
            return
        bad = self.stats["skipped_images"]
        if bad > self.cfg.max_bad_images_frac * seen:
            raise DataError(f"{bad} of the {seen} images read so far could not be decoded (more than "
                            f"max_bad_images_frac={self.cfg.max_bad_images_frac:g}): the data at {self.cfg.data} is "
                            "mostly unreadable; the files are named in the warnings above")

    def applied(self, step: int, outcome: Any) -> None:
        loss, acc = float(outcome.values[0]), float(outcome.values[1])
        self.last_loss = loss
        if self.tokenizer is not None:
            self.recent_acc.append(acc)
        self.reporter.report(step, [loss, acc], self.lr, outcome.grad_norm,
                             {k: self.stats[k] for k in ("skipped_steps", "skipped_images")})

    def after_step(self, step: int) -> None:
        if self.steps_per_epoch and step % self.steps_per_epoch == 0:
            self.merge_bad_files()

    def meta(self, step: int) -> Dict[str, Any]:
        self.merge_bad_files()
        self.stats["recent_acc"] = list(self.recent_acc)
        self.stats["token_hist"] = self.engine.reduce_sum(self.token_hist).cpu()  # the global histogram (a collective)
        return {"step": step, "config": self.cfg.to_dict(), "model_config": self.mcfg.to_dict(), "stats": self.stats,
                "inputs": self.inputs}

    def run(self, loader: Any, signals: Any, last_ckpt: Optional[Path]):
        self.signals, self.data_iter = signals, self.reporter.timed(iter(loader))
        ckpt = Checkpointer(Path(self.cfg.out), self.engine, self.cfg.keep_last, self.rt.is_main, self.stats,
                            self.meta, self.reporter.flush)
        self.engine.model.train()
        try:
            return train_steps(start_step=self.start_step, max_steps=self.cfg.max_steps,
                               save_every=self.cfg.save_every, world=self.rt.world, signals=signals,
                               one_step=self.one_step, bad=BadSteps(self.stats, self.cfg.max_bad_steps),
                               on_applied=self.applied, on_skipped=lambda s: self.reporter.restart(),
                               after_step=self.after_step, save=ckpt.save, last_checkpoint=last_ckpt)
        finally:
            close_loader(loader, self.data_iter)
            self.data_iter = None
            self.reporter.close()


def _summary(cfg: PretrainConfig, mcfg: BeitConfig, rt: Any, run_dir: RunDir, engine: Any, loop: _Loop, step: int,
             start_step: int, last_ckpt: Optional[Path], targets: str) -> Dict[str, Any]:
    out = run_dir.out
    kept = run_dir.finished_summary(step, step - start_step)
    if kept is not None:  # resumed after the end: nothing ran, the run's own summary stays
        engine.close()
        return {**kept, "steps_run": 0, "rank": rt.rank}  # this call ran none
    hist = engine.reduce_sum(loop.token_hist).double().cpu()
    majority = float(hist.max() / hist.sum()) if hist.sum() > 0 else None
    plot = None
    if rt.is_main and cfg.plot:
        try:
            panels = [("loss", "MIM loss (cross-entropy)", None),
                      ("mlm_acc", f"mlm_acc ({mcfg.mim_loss_on} patches)", 1.0 / mcfg.vocab_size)]
            if mcfg.mim_target == "pixels":
                panels = [("loss", "MIM loss (pixel MSE)", None)]
            plot = plot_metrics(out / "metrics.csv", out / "metrics.png", panels,
                                title=f"BEiT pretraining: {out.name}")
        except Exception as exc:  # a plot is a convenience: never fail a finished run over it
            log.warning("no plot: %s: %s", type(exc).__name__, exc)
    summary = {
        "step": step,
        "steps_run": step - start_step,
        "final_mlm_acc": float(np.mean(loop.recent_acc)) if loop.recent_acc else None,  # None: no step ran
        "chance": 1.0 / mcfg.vocab_size if mcfg.mim_target == "tokens" else None,
        "final_loss": float(loop.last_loss) if loop.last_loss is not None else None,
        "majority_baseline": majority,
        "skipped_steps": loop.stats["skipped_steps"],
        "skipped_images": loop.stats["skipped_images"],
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "metrics": str(out / "metrics.csv"),
        "plot": str(plot) if plot else None,
        "tensorboard": str(out / "tensorboard") if (out / "tensorboard").is_dir() else None,
        "out": str(out),
        "tokenizer": targets,
        "engine": engine.describe(),
        "rank": rt.rank,
    }
    summary["no_learning"] = no_learning("mlm_acc", summary["final_mlm_acc"], majority, TOKEN_ACC_MARGIN,
                                         "the majority-token baseline") if summary["chance"] is not None else None
    if rt.is_main:
        run_dir.write_json("summary.json", summary)
    engine.close()
    return summary


def _report(summary: Dict[str, Any]) -> None:
    if summary.get("chance") is None:  # the pixel target: no accuracy, no token baselines
        loss = summary.get("final_loss")
        print(f"done: {summary['step']} steps | final pixel MSE {'n/a' if loss is None else f'{loss:.4f}'}")
        _report_paths(summary)
        return
    acc, majority = summary["final_mlm_acc"], summary["majority_baseline"]
    acc_s = "n/a (no steps run)" if acc is None else f"{acc:.4f} (mean of the last 20 steps)"
    majority_s = "n/a" if majority is None else f"{majority:.4f}"
    print(
        f"done: {summary['step']} steps | final mlm_acc {acc_s} vs chance {summary['chance']:.4f} "
        f"(1/{round(1 / summary['chance'])}) and majority-token baseline {majority_s}"
    )
    _report_paths(summary)


def _report_paths(summary: Dict[str, Any]) -> None:
    print(f"targets: {summary['tokenizer']}")
    print(f"checkpoint: {summary['checkpoint']}")
    tb = f" (TensorBoard: {summary['tensorboard']})" if summary["tensorboard"] else ""
    print(f"metrics: {summary['metrics']}{tb}")
    print(f"plot: {summary['plot'] or 'none (pip install -e .[plot] for matplotlib)'}")
    if summary.get("no_learning"):
        print(f"WARNING: {summary['no_learning']}")


def main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast pretrain`: exit codes as `beit_fast.train.runtime.run_main` documents."""
    return run_main("beit-fast pretrain", __doc__ or "", PretrainConfig, pretrain, argv, _report)


if __name__ == "__main__":
    sys.exit(main())
