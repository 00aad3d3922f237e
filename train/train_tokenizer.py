"""Train a DALL-E-style dVAE tokenizer (`beit-fast train-tokenizer`, `python -m beit_fast.train.train_tokenizer`).

The DALL-E recipe: encoder logits -> Gumbel-softmax relaxation (temperature annealed from
`tau_start` to `tau_end`, 1 -> 1/16) -> decoder reconstructs the pixels (logit-Laplace likelihood
or MSE) + KL(q || uniform) over the codes with a weight ramped up from 0. Logged per step:
reconstruction error (pixel MSE), codebook perplexity (exp entropy of the batch's hard-code
usage), dead codes (unused over the last `usage_window` steps). Saves `tokenizer.pt` (encoder,
decoder, their hyper-parameters) atomically, loadable by `beit_fast.tokenizer.DalleTokenizer`,
`metrics.csv`, and `reconstructions.png` (originals above, reconstructions below).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional

import torch
import torch.nn.functional as F

from beit_fast.checkpoint import atomic_save
from beit_fast.data import build_dataset
from beit_fast.tokenizer import LOGIT_LAPLACE_EPS, DalleDecoder, DalleEncoder, map_pixels
from beit_fast.train.config import TrainConfig
from beit_fast.train.metrics import PERPLEXITY_FLOOR, MetricsWriter, no_learning
from beit_fast.train.run import (
    RunDir,
    atomic_save_json,
    checkpoint_dir,
    checkpoint_name,
    data_identity,
    plan_resume,
    prune_checkpoints,
    read_checkpoint,
    start_run_directory,
)
from beit_fast.train.runtime import resolve_device, run_main

log = logging.getLogger("beit_fast.train_tokenizer")

__all__ = ["TokenizerTrainConfig", "train_tokenizer", "PRESETS", "config_from_args", "main"]

PRESETS: Dict[str, Dict[str, Any]] = {
    "small": {},  # 32px -> 8x8 codes, 512 codes: matches the `tiny` BEiT preset (64px images, 8px patches)
    "dalle": dict(image_size=112, group_count=4, n_hid=256, n_blk_per_group=2, n_init=128, vocab_size=8192),
}


@dataclass
class TokenizerTrainConfig(TrainConfig):
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = PRESETS
    RESUME_MAY_DIFFER: ClassVar[FrozenSet[str]] = frozenset(
        {"max_steps", "out", "resume", "log_every", "save_every", "keep_last", "device", "overwrite",
         "allow_changed_data"})
    BARE_VALUES: ClassVar[Dict[str, str]] = {"resume": "auto"}

    preset: str = "small"  # small (32px -> 8x8 of 512 codes, for the tiny BEiT preset) | dalle (112px -> 14x14 of 8192)
    image_size: int = 32  # tokenizer input side; the grid is image_size / 2**(group_count - 1)
    group_count: int = 3  # encoder groups (DALL-E: 4 -> 8x down; 3 -> 4x)
    n_hid: int = 32  # base width (DALL-E: 256)
    n_blk_per_group: int = 1  # residual blocks per group (DALL-E: 2)
    n_init: int = 32  # decoder input width (DALL-E: 128)
    vocab_size: int = 512  # codebook size (DALL-E: 8192)
    num_images: int = 2048  # size of the built-in dataset
    out: str = "runs/tokenizer"  # tokenizer.pt, config.json, metrics.csv, reconstructions.png, summary.json
    max_steps: int = 400  # optimizer steps
    batch_size: int = 32  # images per step
    lr: float = 2e-3  # AdamW learning rate (constant)
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed (cosine) to tau_end
    tau_end: float = 1.0 / 16
    kl_weight: float = 1e-2  # final weight of KL(q || uniform) per position (0.1 collapsed the small preset)
    kl_warmup_steps: int = 100  # the KL weight ramps linearly from 0
    recon: str = "mse"  # "mse" or "logit_laplace"
    usage_window: int = 20  # steps over which a code must be used not to count as dead
    log_every: int = 20  # steps between log lines
    save_every: int = 100  # steps between checkpoints (out/checkpoints; 0: only at the end)
    keep_last: int = 2  # checkpoints kept
    resume: str = ""  # "" (fresh), "auto" (the newest checkpoint in out/) or a checkpoint path: exact resume
    overwrite: bool = False  # start afresh in an `out` that holds a tokenizer or checkpoints (they are replaced)
    allow_changed_data: bool = False  # resume although the data's files changed since the checkpoint

    def validate(self) -> None:
        super().validate()
        if self.preset not in PRESETS:
            self.bad("preset", f"choose from {sorted(PRESETS)}")
        self.positive("image_size", "group_count", "n_hid", "n_blk_per_group", "n_init", "vocab_size", "usage_window",
                      "keep_last")
        self.non_negative("save_every")
        down = 2 ** (self.group_count - 1)
        if self.image_size % down:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {down} (group_count={self.group_count})"
            )
        if self.recon not in ("mse", "logit_laplace"):
            raise ValueError(f"recon={self.recon!r}: must be 'mse' or 'logit_laplace'")
        if not (self.tau_start > 0 and self.tau_end > 0 and self.kl_weight >= 0):
            raise ValueError("tau_start, tau_end must be positive and kl_weight >= 0")

    def model_kwargs(self) -> Dict[str, Dict[str, int]]:
        enc = dict(group_count=self.group_count, n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group,
                   vocab_size=self.vocab_size)
        dec = dict(group_count=self.group_count, n_init=self.n_init, n_hid=self.n_hid,
                   n_blk_per_group=self.n_blk_per_group, vocab_size=self.vocab_size)
        return {"encoder": enc, "decoder": dec}


config_from_args = TokenizerTrainConfig.from_args


def tau_at(step: int, cfg: TokenizerTrainConfig) -> float:
    t = min(1.0, step / max(1, cfg.max_steps - 1))
    return cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1 + math.cos(math.pi * t))


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """out: decoder output (B, 6, H, W); x: images in [0, 1]."""
    if kind == "mse":
        return F.mse_loss(decoded_images(out), x)
    # Logit-Laplace NLL of the mapped pixels y in (eps, 1 - eps): per pixel
    # |logit(y) - mu| / b + log(2 b) + log(y (1 - y))   (the last term: change of variables).
    y = map_pixels(x).clamp(LOGIT_LAPLACE_EPS, 1 - LOGIT_LAPLACE_EPS)
    mu, log_b = out[:, :3], out[:, 3:6].clamp(min=-7.0)
    logit_y = torch.log(y) - torch.log1p(-y)
    nll = (logit_y - mu).abs() * torch.exp(-log_b) + log_b + math.log(2.0) + torch.log(y * (1 - y))
    return nll.mean()


def decoded_images(out: torch.Tensor) -> torch.Tensor:
    """Decoder output -> images in [0, 1] (sigmoid of the means, then the inverse pixel map)."""
    y = torch.sigmoid(out[:, :3])
    return ((y - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """PNG: originals in the top row, reconstructions below (no matplotlib needed)."""
    from PIL import Image

    n = min(8, originals.shape[0])
    rows = torch.cat([torch.cat(list(originals[:n]), dim=2), torch.cat(list(recons[:n]), dim=2)], dim=1)
    arr = (rows.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


def _indices(n: int, g: torch.Generator):
    """An endless stream of dataset indices, a fresh permutation per epoch."""
    while True:
        yield from torch.randperm(n, generator=g).tolist()


def _read(path: Path) -> Dict[str, Any]:
    return read_checkpoint(path, "tokenizer")


def train_tokenizer(cfg: TokenizerTrainConfig) -> Dict[str, Any]:
    """Train the dVAE; returns the summary. The run directory follows every training command's rules
    (`train.run.RunDir`): one run at a time (its lock), a directory holding a tokenizer or checkpoints is refused
    unless `--resume auto` (continue: exact, from the newest checkpoint) or `--overwrite` (start afresh), a failed
    start leaves it as it was, SIGTERM / SIGINT write a checkpoint and exit 128 + N."""
    with RunDir(Path(cfg.out), "beit-fast train-tokenizer") as run_dir:
        return _train_tokenizer(cfg, run_dir)


def _train_tokenizer(cfg: TokenizerTrainConfig, run_dir: RunDir) -> Dict[str, Any]:
    from beit_fast.train.step import StoppedBySignal

    cfg.validate()
    device = resolve_device(cfg.device)
    data = build_dataset(cfg.data, num_images=cfg.num_images, size=cfg.image_size * 3 // 2, seed=cfg.seed)
    if len(data) < cfg.batch_size:
        raise ValueError(f"dataset has {len(data)} images, fewer than batch_size={cfg.batch_size}")
    run_dir.acquire()
    out = run_dir.out
    kw = cfg.model_kwargs()
    inputs = {"data": data_identity(cfg.data)}
    plan = plan_resume(out, cfg, kw, 1, _read, inputs=inputs)
    if (out / TOKENIZER_FILE).exists() and plan.ckpt is None and not cfg.overwrite:
        raise ValueError(f"{out} already holds a tokenizer ({TOKENIZER_FILE}): continue its run with --resume auto, "
                         "or train a new one there with --overwrite (replaces it), or choose another --out")
    atomic_save_json(cfg.to_dict(), out / "config.json", indent=2)
    torch.manual_seed(cfg.seed)
    enc, dec = DalleEncoder(**kw["encoder"]).to(device), DalleDecoder(**kw["decoder"]).to(device)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    usage = torch.zeros(cfg.usage_window, cfg.vocab_size, dtype=torch.long)
    start_step = 0
    if plan.ckpt is not None:
        ck = plan.ckpt
        enc.load_state_dict({k[len("encoder."):]: v for k, v in ck["model"].items() if k.startswith("encoder.")})
        dec.load_state_dict({k[len("decoder."):]: v for k, v in ck["model"].items() if k.startswith("decoder.")})
        opt.load_state_dict(ck["optimizer"])
        usage.copy_(ck["stats"]["usage"])
        torch.set_rng_state(ck["rng"]["torch"])
        start_step = ck["step"]
        log.info("resumed from %s at step %d", plan.path, start_step)
    start_run_directory(out, plan, start_step, ("summary.json", "reconstructions.png", TOKENIZER_FILE))
    order = _indices(len(data), torch.Generator().manual_seed(cfg.seed))
    for _ in range(start_step * cfg.batch_size):  # the data order is a stream of permutations: replayed, no decoding
        next(order)
    metrics = MetricsWriter(out, COLUMNS, start_step, tensorboard=False, tag="dvae")
    last: Dict[str, float] = dict(plan.ckpt["stats"]["last"]) if plan.ckpt is not None else {}
    plan.ckpt = None
    newest = plan.path if plan.path is not None and start_step else None

    def save(step: int) -> Path:
        metrics.flush()
        state = {"task": "tokenizer", "step": step, "config": cfg.to_dict(), "model_config": kw,
                 "model": {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
                           **{f"decoder.{k}": v for k, v in dec.state_dict().items()}},
                 "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()},
                 "stats": {"usage": usage.clone(), "last": dict(last)}, "inputs": inputs}
        path = atomic_save(state, checkpoint_dir(out) / f"{checkpoint_name(step)}.pt")
        prune_checkpoints(out, cfg.keep_last)
        return path

    t0, x = time.perf_counter(), None
    try:
        for step in range(start_step, cfg.max_steps):
            x = _batch(data, order, cfg).to(device)
            row = _step(enc, dec, opt, params, x, step, cfg, usage)
            row.update(step=step + 1,
                       img_per_s=cfg.batch_size * (step + 1 - start_step) / (time.perf_counter() - t0))
            metrics.write(row)
            last = {k: row[k] for k in ("loss", "recon_mse", "kl", "perplexity", "dead_codes")}
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                metrics.flush()
                print(f"step {step + 1}/{cfg.max_steps} | loss {row['loss']:.4f} | recon mse {row['recon_mse']:.4f} | "
                      f"perplexity {row['perplexity']:.1f} | dead codes {row['dead_codes']} | tau {row['tau']:.3f} | "
                      f"{row['img_per_s']:.0f} img/s", file=sys.stderr, flush=True)
            if run_dir.signals.requested is not None:
                raise StoppedBySignal(run_dir.signals.requested, step + 1, save(step + 1))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                newest = save(step + 1)
        if start_step < cfg.max_steps or newest is None:
            newest = save(cfg.max_steps)
    finally:
        metrics.close()
    kept = run_dir.finished_summary(cfg.max_steps, cfg.max_steps - start_step)
    if kept is not None and (out / TOKENIZER_FILE).is_file():
        return {**kept, "steps_run": 0}  # this call ran none; the run's summary.json stays
    ckpt = out / TOKENIZER_FILE
    atomic_save({"format": "beit-fast dvae", "encoder": enc.state_dict(), "decoder": dec.state_dict(),
                 "encoder_kwargs": kw["encoder"], "decoder_kwargs": kw["decoder"], "image_size": cfg.image_size,
                 "config": cfg.to_dict()}, ckpt)
    if x is None:
        x = _batch(data, _indices(len(data), torch.Generator().manual_seed(cfg.seed)), cfg).to(device)
    with torch.no_grad():
        enc.eval(), dec.eval()
        hard = F.one_hot(enc(map_pixels(x)).argmax(1), cfg.vocab_size).permute(0, 3, 1, 2).float()
        save_grid(x, decoded_images(dec(hard)), out / "reconstructions.png")
    summary = {**last, "step": cfg.max_steps, "steps_run": cfg.max_steps - start_step, "checkpoint": str(ckpt),
               "grid": str(out / "reconstructions.png"), "metrics": str(out / "metrics.csv"),
               "no_learning": no_learning("codebook perplexity", last.get("perplexity"), 1.0, PERPLEXITY_FLOOR - 1.0,
                                          "one live code's perplexity")}
    run_dir.write_json("summary.json", summary)
    return summary


TOKENIZER_FILE = "tokenizer.pt"
COLUMNS = ["step", "loss", "recon_mse", "kl", "kl_weight", "tau", "perplexity", "dead_codes", "img_per_s"]


def _batch(data: Any, order: Any, cfg: TokenizerTrainConfig) -> torch.Tensor:
    """The next batch_size images, center-cropped and resized to image_size, in [0, 1]."""
    from torchvision.transforms import functional as TF

    imgs = []
    for _ in range(cfg.batch_size):
        img, _ = data[next(order)]
        img = TF.center_crop(img, min(img.size)).resize((cfg.image_size, cfg.image_size))
        imgs.append(TF.to_tensor(img))
    return torch.stack(imgs)


def _step(enc: torch.nn.Module, dec: torch.nn.Module, opt: torch.optim.Optimizer, params: List[torch.Tensor],
          x: torch.Tensor, step: int, cfg: TokenizerTrainConfig, usage: torch.Tensor) -> Dict[str, Any]:
    """One dVAE step (Gumbel-softmax relaxation, reconstruction + ramped KL to the uniform prior); its metrics."""
    tau = tau_at(step, cfg)
    klw = cfg.kl_weight * min(1.0, step / max(1, cfg.kl_warmup_steps))
    logits = enc(map_pixels(x))
    z = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
    dec_out = dec(z)
    rec = reconstruction_loss(dec_out, x, cfg.recon)
    logq = F.log_softmax(logits, dim=1)
    kl = (logq.exp() * logq).sum(1).mean() + math.log(cfg.vocab_size)
    loss = rec + klw * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        counts = torch.bincount(logits.argmax(1).flatten().cpu(), minlength=cfg.vocab_size)
        usage[step % cfg.usage_window] = counts
        p = counts.double() / counts.sum()
        perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        dead = int(((usage.sum(0) == 0)).sum()) if step + 1 >= cfg.usage_window else -1
        mse = float(F.mse_loss(decoded_images(dec_out), x))
    return dict(loss=loss.item(), recon_mse=mse, kl=kl.item(), kl_weight=klw, tau=tau, perplexity=perplexity,
                dead_codes=dead)


def _report(summary: Dict[str, Any]) -> None:
    print(f"done | recon mse {summary['recon_mse']:.4f} | codebook perplexity {summary['perplexity']:.1f} | "
          f"dead codes {summary['dead_codes']}")
    print(f"tokenizer: {summary['checkpoint']}")
    print(f"reconstructions: {summary['grid']}")
    if summary.get("no_learning"):
        print(f"WARNING: {summary['no_learning']}")


def main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast train-tokenizer`: exit 0 done, 2 bad input, 1 unreadable images or a write error (one line)."""
    return run_main("beit-fast train-tokenizer", __doc__ or "", TokenizerTrainConfig, train_tokenizer, argv, _report)


if __name__ == "__main__":
    sys.exit(main())
