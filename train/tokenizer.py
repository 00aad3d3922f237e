"""Train a DALL-E-style dVAE visual tokenizer (`beit-fast train-tokenizer`).

The DALL-E recipe: encoder logits -> Gumbel-softmax relaxation (temperature annealed from
`tau_start` to `tau_end`, 1 -> 1/16) -> decoder reconstructs the pixels (logit-Laplace likelihood
or MSE) + KL(q || uniform) over the codes with a weight ramped up from 0. Logged per step:
reconstruction error (pixel MSE), codebook perplexity (exp entropy of the batch's hard-code
usage), dead codes (unused over the last `usage_window` steps). Saves `tokenizer.pt` (encoder,
decoder, their hyper-parameters) atomically, loadable by `beit_fast.tokenizer.DalleTokenizer`,
`metrics.csv`, and `reconstructions.png` (originals above, reconstructions below).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from beit_fast.checkpoint import atomic_save
from beit_fast.config import first_line, parse_options
from beit_fast.data import DataError, build_dataset
from beit_fast.tokenizer import LOGIT_LAPLACE_EPS, DalleDecoder, DalleEncoder, map_pixels

log = logging.getLogger("beit_fast.train_tokenizer")

__all__ = ["TokenizerTrainConfig", "train_tokenizer", "PRESETS"]


@dataclass
class TokenizerTrainConfig:
    image_size: int = 32  # tokenizer input side; the grid is image_size / 2**(group_count - 1)
    group_count: int = 3  # encoder groups (DALL-E: 4 -> 8x down; 3 -> 4x)
    n_hid: int = 32  # base width (DALL-E: 256)
    n_blk_per_group: int = 1  # residual blocks per group (DALL-E: 2)
    n_init: int = 32  # decoder input width (DALL-E: 128)
    vocab_size: int = 512  # codebook size (DALL-E: 8192)
    data: str = "builtin"
    num_images: int = 2048
    out: str = "runs/tokenizer"
    max_steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed (cosine) to tau_end
    tau_end: float = 1.0 / 16
    kl_weight: float = 1e-2  # final weight of KL(q || uniform) per position (0.1 collapsed the small preset)
    kl_warmup_steps: int = 100  # the KL weight ramps linearly from 0
    recon: str = "mse"  # "mse" or "logit_laplace"
    usage_window: int = 20  # steps over which a code must be used not to count as dead
    log_every: int = 20
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        for name in ("image_size", "group_count", "n_hid", "n_blk_per_group", "n_init", "vocab_size", "max_steps",
                     "batch_size", "num_images", "log_every", "usage_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r}: must be a positive int")
        down = 2 ** (self.group_count - 1)
        if self.image_size % down:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {down} (group_count={self.group_count})"
            )
        if self.recon not in ("mse", "logit_laplace"):
            raise ValueError(f"recon={self.recon!r}: must be 'mse' or 'logit_laplace'")
        if not (self.lr > 0 and self.tau_start > 0 and self.tau_end > 0 and self.kl_weight >= 0):
            raise ValueError("lr, tau_start, tau_end must be positive and kl_weight >= 0")

    def model_kwargs(self) -> Dict[str, Dict[str, int]]:
        enc = dict(group_count=self.group_count, n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group,
                   vocab_size=self.vocab_size)
        dec = dict(group_count=self.group_count, n_init=self.n_init, n_hid=self.n_hid,
                   n_blk_per_group=self.n_blk_per_group, vocab_size=self.vocab_size)
        return {"encoder": enc, "decoder": dec}


PRESETS: Dict[str, Dict[str, Any]] = {
    "small": {},  # 32px -> 8x8 codes, 512 codes: matches the `tiny` BEiT preset (64px images, 8px patches)
    "dalle": dict(image_size=112, group_count=4, n_hid=256, n_blk_per_group=2, n_init=128, vocab_size=8192),
}


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


def train_tokenizer(cfg: TokenizerTrainConfig) -> Dict[str, Any]:
    cfg.validate()
    from torchvision.transforms import functional as TF

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    data = build_dataset(cfg.data, num_images=cfg.num_images, size=cfg.image_size * 3 // 2, seed=cfg.seed)
    if len(data) < cfg.batch_size:
        raise ValueError(f"dataset has {len(data)} images, fewer than batch_size={cfg.batch_size}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    kw = cfg.model_kwargs()
    enc, dec = DalleEncoder(**kw["encoder"]).to(device), DalleDecoder(**kw["decoder"]).to(device)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    order = _indices(len(data), g)
    usage = torch.zeros(cfg.usage_window, cfg.vocab_size, dtype=torch.long)
    metrics_path = out / "metrics.csv"
    last: Dict[str, float] = {}
    t0 = time.perf_counter()
    with open(metrics_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "recon_mse", "kl", "kl_weight", "tau", "perplexity", "dead_codes", "img_per_s"])
        for step in range(cfg.max_steps):
            imgs = []
            for _ in range(cfg.batch_size):
                img, _ = data[next(order)]
                img = TF.center_crop(img, min(img.size)).resize((cfg.image_size, cfg.image_size))
                imgs.append(TF.to_tensor(img))
            x = torch.stack(imgs).to(device)
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
                codes = logits.argmax(1).flatten()
                counts = torch.bincount(codes.cpu(), minlength=cfg.vocab_size)
                usage[step % cfg.usage_window] = counts
                p = counts.double() / counts.sum()
                perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
                dead = int(((usage.sum(0) == 0)).sum()) if step + 1 >= cfg.usage_window else -1
                mse = float(F.mse_loss(decoded_images(dec_out), x))
            ips = cfg.batch_size * (step + 1) / (time.perf_counter() - t0)
            loss_v, kl_v = loss.item(), kl.item()
            last = dict(loss=loss_v, recon_mse=mse, kl=kl_v, perplexity=perplexity, dead_codes=dead)
            w.writerow([step + 1, f"{loss_v:.6f}", f"{mse:.6f}", f"{kl_v:.5f}", f"{klw:.3g}", f"{tau:.4f}",
                        f"{perplexity:.2f}", dead, f"{ips:.1f}"])
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                f.flush()
                print(f"step {step + 1}/{cfg.max_steps} | loss {loss_v:.4f} | recon mse {mse:.4f} | "
                      f"perplexity {perplexity:.1f} | dead codes {dead} | tau {tau:.3f} | {ips:.0f} img/s",
                      file=sys.stderr, flush=True)
    ckpt = out / "tokenizer.pt"
    atomic_save({"format": "beit-fast dvae", "encoder": enc.state_dict(), "decoder": dec.state_dict(),
                 "encoder_kwargs": kw["encoder"], "decoder_kwargs": kw["decoder"], "image_size": cfg.image_size,
                 "config": dataclasses.asdict(cfg)}, ckpt)
    with torch.no_grad():
        enc.eval(), dec.eval()
        hard = F.one_hot(enc(map_pixels(x)).argmax(1), cfg.vocab_size).permute(0, 3, 1, 2).float()
        save_grid(x, decoded_images(dec(hard)), out / "reconstructions.png")
    summary = {**last, "checkpoint": str(ckpt), "grid": str(out / "reconstructions.png"), "metrics": str(metrics_path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def config_from_args(args: List[str]) -> TokenizerTrainConfig:
    values: Dict[str, Any] = {}
    preset: Optional[str] = None
    own = {f.name: f for f in fields(TokenizerTrainConfig)}
    for k, v in parse_options(args):
        if k == "preset":
            if v not in PRESETS:
                raise ValueError(f"unknown preset {v!r}; choose from {sorted(PRESETS)}")
            preset = v
            continue
        if k not in own:
            valid = ", ".join(f"--{n.replace('_', '-')}" for n in own)
            raise ValueError(f"unknown option --{k.replace('_', '-')}; valid: --preset, {valid}")
        default = own[k].default
        try:
            values[k] = type(default)(v) if not isinstance(default, str) else v
        except ValueError:
            raise ValueError(f"--{k} expects a {type(default).__name__}, got {v!r}") from None
    return TokenizerTrainConfig(**{**PRESETS.get(preset or "small", {}), **values})


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("options (--key=value or --key value):\n  --preset  small (default) | dalle")
        for f in fields(TokenizerTrainConfig):
            print(f"  --{f.name.replace('_', '-'):<18} default {f.default}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        summary = train_tokenizer(config_from_args(argv))
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"beit-fast train-tokenizer: error: {exc}", file=sys.stderr)
        return 2
    except (DataError, OSError) as exc:  # unreadable images, a write error (disk full): one line, exit 1
        print(f"beit-fast train-tokenizer: error: {first_line(exc)}", file=sys.stderr)
        return 1
    print(f"done | recon mse {summary['recon_mse']:.4f} | codebook perplexity {summary['perplexity']:.1f} | "
          f"dead codes {summary['dead_codes']}")
    print(f"tokenizer: {summary['checkpoint']}")
    print(f"reconstructions: {summary['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
