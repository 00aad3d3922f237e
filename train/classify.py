"""The classification task's parts, shared by `finetune.py` (fine-tuning, linear probing) and `beit-fast evaluate`.

- `read_init(init)`: what `--init` names - a run directory or checkpoint of this engine (pretraining or fine-tuning),
  a unilm / timm / transformers checkpoint file, or "none" - as (state dict in this project's layout, the model
  config it implies, its head's class count, where it came from). External files carry no config: it is read off
  the weights' shapes (`infer_model_config`).
- `init_classifier(model, source, new_head)`: loads it the way unilm's fine-tuning does (shared relative position
  table cloned into every block, tables resized for another resolution; `beit_fast.checkpoint.load_into`), and
  refuses anything but the expected differences: the MIM head and mask token are dropped, a missing classification
  head is initialised, a head of another class count is replaced only with `new_head` (intermediate fine-tuning).
- `LinearProbe`: a frozen backbone; one BatchNorm(affine=False) + Linear head per probed block on its mean-pooled
  patch tokens (MAE's `main_linprobe` head; the BEiT paper probes intermediate layers).
- `training_loss` / `train_transform`: the recipe's mixup, criterion and augmentation (timm's pieces).
- `save_model` / `load_model`: the `best.pt` file (weights + everything needed to rebuild the model), atomic.
- `evaluate_main`: `beit-fast evaluate`.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from beit_fast import BeitConfig, BeitForImageClassification
from beit_fast.checkpoint import CheckpointError, atomic_save, convert_state_dict, load_into, load_state_dict_file
from beit_fast.model import BeitModel
from beit_fast.train.run import TASK_NAMES, checkpoint_model_state, resolve_checkpoint

log = logging.getLogger("beit_fast.finetune")

__all__ = ["InitSource", "read_init", "infer_model_config", "init_classifier", "LinearProbe", "build_model",
           "save_model", "load_model", "MODEL_FILE", "evaluate_main", "training_loss",
           "train_transform", "head_classes", "print_summary", "eval_loader"]

MODEL_FILE = "best.pt"  # a fine-tuning run's best weights (by val top-1), loadable without the run's checkpoints
_MIM_ONLY = ("mask_token", "lm_head.", "pixel_head.", "norm.")  # pretraining-head weights a classifier drops


@dataclass
class InitSource:
    state_dict: Dict[str, torch.Tensor]  # this project's layout
    model_config: Optional[Dict[str, Any]]  # the config it was trained with (None: read off the shapes)
    num_classes: Optional[int]  # its classification head's class count (None: no head)
    what: str  # for the log: "pretraining checkpoint runs/x/checkpoints/step_00000300.pt"
    probe_layers: Optional[List[int]] = None  # a linear-probe checkpoint's layers


def _engine_checkpoint(path: Path) -> Optional[Path]:
    """`path` as a checkpoint of this engine (a run directory -> its best.pt, else its newest checkpoint), or None."""
    if path.is_dir() and not re.fullmatch(r"step_\d{8}", path.name):
        return path / MODEL_FILE if (path / MODEL_FILE).is_file() else resolve_checkpoint(path)
    return path if path.is_dir() or path.name.startswith("step_") or path.name == MODEL_FILE else None


def _read_engine_file(path: Path, task: Optional[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, its record: model_config, task, and for fine-tuning num_classes, classes, probe_layers) of
    best.pt or of a step checkpoint of `task` (None: any task)."""
    if path.name == MODEL_FILE:
        saved = load_model_file(path)
        return saved["model"], {**saved, "task": "finetune"}
    return checkpoint_model_state(path, task)


def read_init(init: str) -> Optional[InitSource]:
    """The weights `--init` names (None for "none"); one-line errors for anything that is not a BEiT checkpoint."""
    if init == "none":
        return None
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(f"init checkpoint not found: {path}")
    ours = _engine_checkpoint(path)
    if ours is None:
        sd, record, what = convert_state_dict(load_state_dict_file(path)), {}, f"checkpoint file {path}"
    else:
        sd, record = _read_engine_file(ours, None)
        kind = "fine-tuned model" if ours.name == MODEL_FILE else \
            f"{TASK_NAMES.get(record.get('task', 'pretrain'), 'training')} checkpoint"
        what = f"{kind} {ours}"
    head = sd.get("head.weight")
    return InitSource(sd, record.get("model_config"), int(head.shape[0]) if head is not None else None, what,
                      record.get("probe_layers"))


def infer_model_config(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The BeitConfig keys a state dict in this project's layout implies (width, depth, heads, patch, resolution,
    MLP ratio, biases, layer scale, absolute position embedding)."""
    try:
        embed_dim = int(sd["cls_token"].shape[-1])
        patch = sd["patch_embed.proj.weight"]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        table = sd.get("rel_pos_bias.relative_position_bias_table")
        table = sd.get("blocks.0.attn.relative_position_bias_table") if table is None else table
        fc1 = sd["blocks.0.mlp.fc1.weight"]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"not a BEiT state dict (no {exc})") from None
    out: Dict[str, Any] = dict(embed_dim=embed_dim, depth=depth, patch_size=int(patch.shape[-1]),
                               in_chans=int(patch.shape[1]), mlp_ratio=fc1.shape[0] / embed_dim,
                               qkv_bias="blocks.0.attn.q_bias" in sd, use_abs_pos_emb="pos_embed" in sd)
    if table is not None:
        out["num_heads"] = int(table.shape[1])
        side = (math.isqrt(table.shape[0] - 3) + 1) // 2
        out["img_size"] = side * out["patch_size"]
    elif "pos_embed" in sd:
        out["img_size"] = math.isqrt(sd["pos_embed"].shape[1] - 1) * out["patch_size"]
    if "blocks.0.gamma_1" not in sd:
        out["init_values"] = None
    return out


def build_model(mcfg: BeitConfig, num_classes: int, probe_layers: Optional[Sequence[int]] = None) -> nn.Module:
    """A classifier, or a linear probe over a fresh backbone when `probe_layers` is given."""
    if probe_layers is not None:
        return LinearProbe(BeitModel(mcfg), probe_layers, num_classes)
    return BeitForImageClassification(mcfg, num_classes=num_classes)


def init_classifier(model: nn.Module, source: InitSource, new_head: bool) -> List[str]:
    """Load `source` into `model` (a classifier or a LinearProbe); returns what was left initialised (logged)."""
    probe = isinstance(model, LinearProbe)
    target = model.backbone if probe else model
    sd = {k: v for k, v in source.state_dict.items() if not k.startswith(_MIM_ONLY)}
    if probe:  # a probe keeps only the backbone; a classifier's (or another probe's) heads are not its heads
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "heads.", "backbone."))}
    elif source.num_classes is not None and source.num_classes != model.num_classes:
        if not new_head:
            raise ValueError(f"{source.what} has a {source.num_classes}-class head, this run has "
                             f"{model.num_classes} classes: pass --new-head to replace it (intermediate fine-tuning)")
        log.warning("replacing the %d-class head of %s with a new %d-class head", source.num_classes, source.what,
                    model.num_classes)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    result = load_into(target, sd, strict=False)
    allowed = ("fc_norm.", "head.") if not probe else ()
    unexplained = [k for k in result["missing"] if not k.startswith(allowed)]
    if unexplained or result["unexpected"]:
        raise CheckpointError(f"{source.what} does not fit the model: missing {unexplained[:6]}, unexpected "
                              f"{result['unexpected'][:6]}")
    return result["missing"]


class LinearProbe(nn.Module):
    """Frozen backbone (always in eval mode: no drop path), a BatchNorm1d(affine=False) + Linear head per probed
    block on the mean of that block's patch tokens. forward -> a list of (B, C) logits, one per layer."""

    def __init__(self, backbone: BeitModel, layers: Sequence[int], num_classes: int) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or not layers:
            raise ValueError(f"probe layers {list(layers)} must be in [0, {depth}) (0-based blocks)")
        self.backbone, self.layers, self.num_classes = backbone, list(layers), num_classes
        for p in backbone.parameters():
            p.requires_grad_(False)
        dim = backbone.config.embed_dim
        self.heads = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes)) for _ in layers)
        for head in self.heads:  # MAE's main_linprobe: trunc_normal(std=0.01) weights, zero bias
            nn.init.trunc_normal_(head[1].weight, std=0.01)
            nn.init.zeros_(head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            _, feats = self.backbone.forward_features(pixel_values, return_layers=self.layers)
        return [head(f[:, 1:].mean(1).float()) for head, f in zip(self.heads, feats)]


def training_loss(cfg: Any, num_classes: int) -> Tuple[Optional[Any], nn.Module]:
    """(timm Mixup or None, the criterion) of a fine-tuning config: soft-target CE under mixup/cutmix (which apply
    the label smoothing), else label-smoothed CE; a linear probe trains with plain CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixing:
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                    switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0 and not cfg.linear_probe:
        return None, LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return None, nn.CrossEntropyLoss()


def train_transform(cfg: Any, img_size: int):
    """The fine-tuning train transform (RandAugment, random erasing; timm's create_transform); a linear probe's is
    crop and flip only, as MAE's main_linprobe."""
    from beit_fast.data import classification_transform

    scale = (cfg.crop_scale, 1.0)
    if cfg.linear_probe:
        return classification_transform(img_size, True, auto_augment=None, re_prob=0.0, color_jitter=0.0, scale=scale)
    aa = None if cfg.auto_augment in ("", "none") else cfg.auto_augment
    return classification_transform(img_size, True, auto_augment=aa, re_prob=cfg.reprob, color_jitter=cfg.color_jitter,
                                    scale=scale)


def eval_loader(val: Any, img_size: int, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                pin_memory: bool = False, crop_pct: Optional[float] = None) -> torch.utils.data.DataLoader:
    """This rank's shard of `val` (every image once over the ranks, no padding) through the eval transform (center
    crop `crop_pct`; None: unilm's rule)."""
    from beit_fast.data import ClassificationDataset, ShardedEvalSampler, classification_transform

    ds = ClassificationDataset(val, classification_transform(img_size, False, crop_pct=crop_pct), seed=0)
    return torch.utils.data.DataLoader(ds, batch_sampler=ShardedEvalSampler(len(ds), batch_size, rank, world),
                                       num_workers=num_workers, pin_memory=pin_memory)


def head_classes(requested: Optional[int], in_data: int) -> int:
    """The head's class count: `requested` (--num-classes), or the data's; labels the head cannot hold are refused."""
    if requested is None:
        return in_data
    if in_data > requested:
        raise ValueError(f"num_classes={requested} but the data has {in_data} classes: labels up to {in_data - 1} "
                         "would be out of range")
    return requested


def print_summary(summary: Dict[str, Any]) -> None:
    """The end of a fine-tuning run on stdout: val scores, best, probes, where the outputs are."""
    print(f"done: {summary['step']} steps | val top-1 {summary.get('val_top1', float('nan')):.4f} | top-5 "
          f"{summary.get('val_top5', float('nan')):.4f} | loss {summary.get('val_loss', float('nan')):.4f} | "
          f"best top-1 {summary['best_top1']:.4f} at step {summary['best_step']} (chance {summary['chance']:.4f})")
    for name, top1 in (summary.get("probe") or {}).items():
        print(f"  linear probe {name}: val top-1 {top1:.4f}")
    print(f"best model: {summary['best_model']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics: {summary['metrics']} | plot: {summary['plot'] or 'none'}")
    if summary.get("no_learning"):
        print(f"WARNING: {summary['no_learning']}")


def save_model(path: Path, state_dict: Dict[str, torch.Tensor], mcfg: BeitConfig, num_classes: int,
               classes: Sequence[str], extra: Dict[str, Any]) -> Path:
    """best.pt: {"format", "model", "model_config", "num_classes", "classes", ...extra}, atomically."""
    return atomic_save({"format": "beit-fast classifier", "model": state_dict, "model_config": mcfg.to_dict(),
                        "num_classes": num_classes, "classes": list(classes), **extra}, path)


def load_model_file(path: Path) -> Dict[str, Any]:
    from beit_fast.checkpoint import safe_load

    saved = safe_load(path, what="model file")
    if not isinstance(saved, dict) or saved.get("format") != "beit-fast classifier":
        raise CheckpointError(f"{path}: not a fine-tuned model of this engine (no 'beit-fast classifier' format)")
    return saved


def load_model(path: Path) -> Tuple[nn.Module, List[str], Dict[str, Any]]:
    """A fine-tuned model (best.pt, a fine-tuning checkpoint, or a run directory) ready to evaluate:
    (model, class names, its model config dict)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ours = _engine_checkpoint(Path(path))
    if ours is None:
        raise ValueError(f"{path}: not a fine-tuning run directory, {MODEL_FILE} or step checkpoint of this engine")
    sd, record = _read_engine_file(ours, "finetune")
    mc, classes, num, layers = (record["model_config"], record["classes"], record["num_classes"],
                                record.get("probe_layers"))
    model = build_model(BeitConfig.from_dict(mc), num, layers)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{ours}: the weights do not fit its model config ({str(exc).splitlines()[0]})") from None
    return model, list(classes), mc


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast evaluate CKPT --data DIR`: top-1 / top-5 / loss, per-class accuracy, a confusion-matrix PNG."""
    import argparse

    from beit_fast.data import build_classification_data
    from beit_fast.train.evaluate import evaluate, format_report, plot_confusion
    from beit_fast.train.runtime import cli_call, resolve_device

    p = argparse.ArgumentParser(prog="beit-fast evaluate", description=evaluate_main.__doc__)
    p.add_argument("checkpoint", help="a fine-tuning run directory, its best.pt, or a step checkpoint")
    p.add_argument("--data", default="builtin", help="image folder with val/ (or train/ + val/), or builtin")
    p.add_argument("--num-images", type=int, default=4096, help="builtin: the train split's size (val follows it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="confusion-matrix PNG (default: confusion.png beside the checkpoint)")
    try:
        a = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    def run() -> Tuple[Any, List[str]]:
        model, classes, mc = load_model(Path(a.checkpoint))
        data = build_classification_data(a.data, num_images=a.num_images, image_size=int(mc["img_size"] * 1.5),
                                         num_classes=len(classes) if a.data == "builtin" else None)
        if data.classes != classes:
            raise ValueError(f"the data's classes {data.classes[:5]}... are not the model's {classes[:5]}...")
        device = resolve_device(a.device)
        model.to(device).eval()
        crop = (mc.get("extra") or {}).get("eval_crop_pct")  # as the run evaluated (its recipe's crop)
        return evaluate(model, eval_loader(data.val, mc["img_size"], a.batch_size, crop_pct=crop),
                        num_classes=len(classes), device=device, progress=True), classes

    done, code = cli_call("beit-fast evaluate", run)
    if code:
        return code
    results, classes = done
    results = results if isinstance(results, list) else [results]
    best = max(results, key=lambda r: r.top1)
    print(format_report(best, classes))
    base = Path(a.checkpoint)
    png = Path(a.out) if a.out else (base if base.is_dir() else base.parent) / "confusion.png"
    written = plot_confusion(best.confusion, png, classes, title=f"{a.checkpoint}: top-1 {best.top1:.4f}")
    print(f"confusion matrix: {written or 'not written (matplotlib missing)'}")
    return 0
