"""BEiT classification fine-tuning and linear probing (`beit-fast finetune`, `beit-fast linprobe`,
`python -m beit_fast.train.finetune`; `beit-fast evaluate` scores what it produced).

A linear script over the shared parts of `beit_fast.train` (config, runtime, run, optim, step, engine, evaluate,
metrics; the task's own pieces in classify.py): config -> init weights -> data -> runtime -> run dir -> model ->
engine -> loop (val every `eval_every` steps) -> summary. One plain process or DeepSpeed ZeRO 0-3, exact resume,
metrics.csv / val_metrics.csv / TensorBoard / metrics.png, atomic checkpoints and `best.pt` (the best val top-1).

`--init`: a pretraining or fine-tuning run (or checkpoint) of this engine, a unilm / timm / transformers file, or
`none`; `--preset auto` builds the network the init weights have, model keys override it (`--img-size 384`:
another resolution, tables resized as unilm does). unilm's fine-tuning layout (per-block tables from the shared
one, mean-pooled head) and, for every recipe key left unset, `--recipe auto`'s values (train/recipes.py): the paper's
base recipe - layer decay 0.65, lr 4e-3 at batch 1024 scaled linearly, warmup + cosine, weight decay 0.05, label
smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, drop path 0.1 (timm's
pieces) - or for tiny-sized networks the small-data one; optional EMA. `--new-head` replaces a head of another
class count (intermediate fine-tuning). `--linear-probe`: frozen backbone, a BatchNorm + Linear head per block.
Data: `builtin` (fixed train/val split) or DIR with train/ and val/ class folders; `--train-fraction` for the
low-label regime. The README's "Fine-tuning" section is the full reference.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional

import torch

from beit_fast import BeitConfig
from beit_fast.data import ClassificationDataset, build_classification_data
from beit_fast.train.classify import (
    MODEL_FILE,
    InitSource,
    build_model,
    eval_loader,
    head_classes,
    infer_model_config,
    init_classifier,
    print_summary,
    read_init,
    save_model,
    train_transform,
    training_loss,
)
from beit_fast.train.config import BeitTrainConfig
from beit_fast.train.evaluate import evaluate
from beit_fast.train.loop import TaskLoop, pad_collective_batches
from beit_fast.train.metrics import accuracy_margin, no_learning
from beit_fast.train.optim import build_optimizer, scaled_lr, warmup_cosine
from beit_fast.train.recipes import RECIPE_NAMES, apply_recipe
from beit_fast.train.run import (
    RunDir,
    agree_on_resume,
    data_identity,
    plan_resume,
    read_checkpoint,
    start_run_directory,
    weights_digest,
)
from beit_fast.train.runtime import (
    build_engine,
    run_main,
    seed_all,
    setup_runtime,
    start_distributed,
    train_loader,
)

log = logging.getLogger("beit_fast.finetune")

__all__ = ["FinetuneConfig", "finetune", "main", "linprobe_main"]

# The fine-tuning layout (unilm run_class_finetuning's defaults), under any model override the user gives.
FINETUNE_LAYOUT = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, drop_path_rate=0.1)


@dataclass
class FinetuneConfig(BeitTrainConfig):
    RESUME_MAY_DIFFER: ClassVar[FrozenSet[str]] = BeitTrainConfig.RESUME_MAY_DIFFER | {"eval_every"}

    preset: str = "auto"  # BeitConfig preset; "auto": the --init checkpoint's network (tiny with --init none)
    init: str = "none"  # a run directory or checkpoint of this engine, a unilm / timm / transformers checkpoint
    # file, or "none" (from scratch: the baseline)
    out: str = "runs/finetune"  # run directory: config.json, metrics.csv, val_metrics.csv, best.pt, checkpoints/
    recipe: str = "auto"  # defaults for the keys below left unset: "paper" (BEiT-B ImageNet, SPEC 6), "small" (tiny
    # networks on small data), "auto": small for networks up to the tiny preset's size, else paper (train/recipes.py)
    lr: Optional[float] = None  # peak learning rate at batch lr_batch (paper: 4e-3 at 1024; small: 1e-3 at 32), scaled
    # linearly to batch_size
    lr_batch: Optional[int] = None  # the batch size `lr` is quoted for (paper 1024, small 32)
    min_lr: float = 1e-6  # end of the cosine (scaled like lr)
    warmup_steps: int = 30  # linear warmup from 0
    clip_grad: float = 0.0  # max global grad norm (0 disables; unilm's fine-tuning does not clip)
    layer_decay: Optional[float] = None  # layer-wise lr decay: block i gets decay^(L+1-i) (unilm's assignment; paper
    # 0.65, small 1.0)
    no_decay_rel_pos_bias: bool = False  # unilm's --disable_weight_decay_on_rel_pos_bias
    num_classes: Optional[int] = None  # classes of the head; None: as many as the data has
    builtin_classes: Optional[int] = None  # builtin data: only the first k shape kinds (2..8; an easier task for
    # small budgets); None: all 8
    new_head: bool = False  # replace an --init head of another class count (intermediate fine-tuning)
    train_fraction: float = 1.0  # fine-tune on this fraction of the labelled train images (stratified)
    data_seed: int = 0  # picks the builtin images and the train_fraction subset (not --seed: runs with different
    # seeds are scored on the same val images)
    eval_every: int = 100  # steps between val evaluations (0: only at the end)
    label_smoothing: Optional[float] = None  # paper 0.1, small 0
    mixup: Optional[float] = None  # mixup alpha (0: off; paper 0.8, small 0)
    cutmix: Optional[float] = None  # cutmix alpha (0: off; paper 1.0, small 0)
    mixup_prob: float = 1.0  # probability of mixup or cutmix per batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    auto_augment: Optional[str] = None  # timm RandAugment spec ("none": off; paper rand-m9-mstd0.5-inc1, small none)
    reprob: Optional[float] = None  # random erasing probability (paper 0.25, small 0)
    crop_scale: Optional[float] = None  # RandomResizedCrop's smallest area fraction (paper 0.08 as unilm / timm; small
    # 1: the whole image)
    color_jitter: Optional[float] = None  # ColorJitter strength, only without RandAugment (paper 0.4, small 0)
    eval_crop_pct: Optional[float] = None  # evaluation: resize the short side to img_size / crop_pct, center crop;
    # None: unilm's 0.875 below 384 px, 1.0 from 384 (paper); small 1.0 (the whole image, as trained)
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3) and evaluate it too
    ema_decay: float = 0.9999
    linear_probe: bool = False  # frozen backbone, BatchNorm + Linear heads on block features
    probe_layer: Optional[int] = None  # the block (1-based) a linear probe reads; None: every block in one pass

    def validate(self) -> None:
        """Types and ranges; a recipe key still None (before `apply_recipe`) is not checked."""
        super().validate()
        if self.recipe not in RECIPE_NAMES:
            self.bad("recipe", f"must be one of {', '.join(RECIPE_NAMES)}")
        if self.lr_batch is not None:
            self.positive("lr_batch")
        self.non_negative("eval_every", "label_smoothing", "mixup", "cutmix", "reprob", "color_jitter")
        if self.label_smoothing is not None and not self.label_smoothing < 1.0:
            self.bad("label_smoothing", "must be in [0, 1) (1 would train on uniform targets)")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                self.bad(name, "is a probability: must be in [0, 1]")
        if self.auto_augment not in (None, "", "none"):
            self.check_auto_augment()
        if self.crop_scale is not None and not 0.0 < self.crop_scale <= 1.0:
            self.bad("crop_scale", "must be in (0, 1]")
        if self.eval_crop_pct is not None and not 0.0 < self.eval_crop_pct <= 1.0:
            self.bad("eval_crop_pct", "must be in (0, 1] (or omitted)")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            self.bad("layer_decay", "must be in (0, 1]")
        if not 0.0 < self.train_fraction <= 1.0:
            self.bad("train_fraction", "must be in (0, 1]")
        if self.num_classes is not None and self.num_classes <= 0:
            self.bad("num_classes", "must be positive (or omitted: from the data)")
        if self.builtin_classes is not None and not 2 <= self.builtin_classes <= 8:
            self.bad("builtin_classes", "the builtin data has 2 to 8 shape kinds")
        if not 0.0 <= self.ema_decay < 1.0:
            self.bad("ema_decay", "must be in [0, 1)")
        if self.ema and self.deepspeed and self.zero_stage == 3:
            self.bad("ema", "an EMA of ZeRO-3 partitioned weights is not supported (use zero_stage <= 2)")
        if self.init != "none" and not Path(self.init).exists():
            self.bad("init", "not found (a run directory or checkpoint file, or none)")
        micro = self.batch_size // self.grad_accum_steps
        if self.mixing and micro % 2:
            self.bad("batch_size", "mixup/cutmix mix pairs of images: the micro-batch must be even")

    def check_auto_augment(self) -> None:
        """A timm augmentation spec that timm cannot build ("rand-m9-mstd0.5-inc1", "augmix-m5", "v0", ...) is
        refused here, before the run directory is touched, not at the first training batch."""
        from beit_fast.data import classification_transform

        try:
            classification_transform(32, True, auto_augment=self.auto_augment, re_prob=0.0, color_jitter=0.0)
        except Exception as exc:  # timm raises AssertionError / KeyError / ValueError / IndexError for a bad spec
            self.bad("auto_augment", f"not a timm augmentation spec ({type(exc).__name__}: {exc}); e.g. "
                                     '"rand-m9-mstd0.5-inc1", "augmix-m5", "v0", or "none"')

    @property
    def mixing(self) -> bool:
        return not self.linear_probe and ((self.mixup or 0) > 0 or (self.cutmix or 0) > 0) and self.mixup_prob > 0

    def network(self, source: Optional[InitSource] = None) -> BeitConfig:
        """The network before the fine-tuning layout: the preset, or with preset auto the init checkpoint's."""
        if self.preset != "auto":
            return BeitConfig.from_preset(self.preset)
        if source is not None:
            return BeitConfig.from_dict(dict(source.model_config or infer_model_config(source.state_dict),
                                             num_masking_patches=None))
        return BeitConfig.from_preset("tiny")

    def resolve(self, source: Optional[InitSource] = None) -> BeitConfig:
        """Fill the recipe's keys (`train.recipes.apply_recipe`), check them, and return the model config."""
        layout = apply_recipe(self, "linprobe" if self.linear_probe else "finetune", self.network(source))
        self.validate()
        return self.model_config(source, layout)

    def model_config(self, source: Optional[InitSource] = None, recipe: Optional[Dict[str, Any]] = None) -> BeitConfig:
        """The network (`network`), the fine-tuning layout and the recipe's drop path, then the user's model
        overrides (an img_size other than the checkpoint's resizes its position tables); the evaluation crop is
        kept in `extra` (as timm's pretrained_cfg crop_pct) so that `beit-fast evaluate` scores as training did."""
        base = self.network(source).to_dict()
        layout = {**FINETUNE_LAYOUT, **(recipe or {})}
        if self.linear_probe:
            layout["drop_path_rate"] = 0.0
        extra = {**base.get("extra", {}), "eval_crop_pct": self.eval_crop_pct}
        try:
            return BeitConfig.from_dict({**base, "num_masking_patches": None, "extra": extra}).replace(
                **{**layout, **self.model})
        except TypeError as exc:
            raise ValueError(f"model config {self.model}: {exc}") from None

    def lr_schedule(self) -> Dict[str, Any]:
        """`warmup_cosine`'s arguments: lr and min_lr, quoted at lr_batch, scaled linearly to batch_size."""
        return dict(super().lr_schedule(), base_lr=scaled_lr(self.lr, self.batch_size, self.lr_batch),
                    min_lr=self.min_lr * (self.batch_size / self.lr_batch))

    def probe_layers(self, depth: int) -> Optional[List[int]]:
        if not self.linear_probe:
            return None
        if self.probe_layer is None:
            return list(range(depth))
        if not 1 <= self.probe_layer <= depth:
            self.bad("probe_layer", f"must be a block number in [1, {depth}]")
        return [self.probe_layer - 1]


def finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Run fine-tuning (or linear probing); returns a summary. Under DeepSpeed every rank calls it. Everything that
    can be checked (config, init weights, data, labels) is checked before the run directory is touched."""
    with RunDir(Path(cfg.out), "beit-fast finetune") as run_dir:
        return _finetune(cfg, run_dir)


def _read(path: Path) -> Dict[str, Any]:
    return read_checkpoint(path, "finetune")


def _finetune(cfg: FinetuneConfig, run_dir: RunDir) -> Dict[str, Any]:
    cfg.validate()
    source = read_init(cfg.init)
    mcfg = cfg.resolve(source)
    layers = cfg.probe_layers(mcfg.depth)
    data = build_classification_data(cfg.data, num_images=cfg.num_images, image_size=int(mcfg.img_size * 1.5),
                                     train_fraction=cfg.train_fraction, seed=cfg.data_seed,
                                     num_classes=cfg.builtin_classes if cfg.data == "builtin" else None)
    num_classes = head_classes(cfg.num_classes, data.num_classes)
    rt = setup_runtime(cfg, mcfg)
    if not rt.is_main:
        log.setLevel(logging.WARNING)
    seed_all(cfg.seed)
    model = build_model(mcfg, num_classes, layers)
    if source is not None:  # weights that do not fit fail here, before the run directory is touched
        fresh = init_classifier(model, source, cfg.new_head)
        log.info("init: %s (initialised here: %s)", source.what, ", ".join(fresh) or "nothing")
    if rt.is_main:
        run_dir.acquire()
    inputs = {"data": data_identity(cfg.data), **({"init": weights_digest(Path(cfg.init))} if cfg.init != "none"
                                                    else {})}
    plan = plan_resume(run_dir.out, cfg, mcfg.to_dict(), rt.world, _read, inputs)
    if rt.deepspeed:
        start_distributed(rt.device, cfg.dist_timeout)
        plan = agree_on_resume(plan, rt.world, _read)
    if rt.is_main:
        run_dir.write_json("config.json", {"finetune": cfg.to_dict(), "model": mcfg.to_dict(),
                                           "num_classes": num_classes, "classes": data.classes})
    model.to(rt.device)
    lr = cfg.lr_schedule()["base_lr"]
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.0 if cfg.linear_probe else cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                layer_decay=1.0 if cfg.linear_probe else cfg.layer_decay,
                                no_decay_rel_pos_bias=cfg.no_decay_rel_pos_bias, apex=cfg.apex)
    engine = build_engine(model, optimizer, cfg, rt)
    torch.manual_seed(cfg.seed + rt.rank)
    log.info("engine: %s | %d classes, %d train / %d val images | lr %.3g (%g at batch %d)", engine.describe(),
             num_classes, len(data.train), len(data.val), lr, cfg.lr, cfg.lr_batch)
    loop = _Loop(cfg, mcfg, rt, engine, data, num_classes, layers)
    loop.inputs = inputs
    start_step = loop.resume(plan)
    if rt.is_main:
        start_run_directory(run_dir.out, plan, start_step, ("summary.json", "metrics.png", MODEL_FILE))
    engine.barrier()
    train = ClassificationDataset(data.train, train_transform(cfg, mcfg.img_size), seed=cfg.seed)
    step, last = loop.run(train_loader(train, cfg, rt, start_step), run_dir.signals, start_step, plan.path)
    return loop.summary(run_dir, step, start_step, last)


class _Loop(TaskLoop):
    """Fine-tuning's part of the shared loop: the loss of a batch (mixup, smoothing), evaluation, best model."""

    task, tag = "finetune", "finetune"

    def __init__(self, cfg: FinetuneConfig, mcfg: BeitConfig, rt: Any, engine: Any, data: Any, num_classes: int,
                 layers: Optional[List[int]]) -> None:
        super().__init__(cfg, mcfg, rt, engine, {"best_top1": None, "best_step": None},
                         ema_decay=cfg.ema_decay if cfg.ema else None)
        self.data, self.num_classes, self.layers = data, num_classes, layers
        self.mixup, self.criterion = training_loss(cfg, num_classes)
        self.val_columns = ["step", "val_loss", "val_top1", "val_top5", "val_top1_ema"] + \
            [f"val_top1_block{i + 1}" for i in layers or []]

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, **self.cfg.lr_schedule())

    def flops_per_image(self) -> float:
        return self.mcfg.train_flops_per_image(1, self.num_classes)

    def loss(self, batch: Any):
        images, labels = batch
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:  # on the loader's CPU tensor: no sync
            raise ValueError(f"labels out of range [0, {self.num_classes}): got {int(labels.min())}..."
                             f"{int(labels.max())}")
        images, labels = images.to(self.rt.device, non_blocking=True), labels.to(self.rt.device, non_blocking=True)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        out = self.engine.forward(images)
        outs = out if isinstance(out, list) else [out]
        losses = [self.criterion(o.float(), labels) for o in outs]
        return torch.stack(losses).sum(), [torch.stack(losses).mean().detach()]

    def val_batches(self):
        """This rank's shard of val (ZeRO-3: padded with unlabelled batches, `pad_collective_batches`)."""
        rt = self.rt
        micro = max(1, self.cfg.batch_size // (rt.world * self.cfg.grad_accum_steps))
        loader = eval_loader(self.data.val, self.mcfg.img_size, micro, rt.rank, rt.world, self.cfg.num_workers,
                             pin_memory=rt.device.type == "cuda", crop_pct=self.cfg.eval_crop_pct)
        return pad_collective_batches(loader, rt.deepspeed and self.cfg.zero_stage == 3)

    def validate(self, step: int) -> Any:
        """Val top-1 / top-5 / loss (every rank, reduced), a val_metrics.csv row, best.pt when it improves."""
        model = self.engine.model
        model.eval()
        results = evaluate(self.engine.forward, self.val_batches(), num_classes=self.num_classes,
                           device=self.rt.device, reduce_sum=self.engine.reduce_sum)
        ema = None
        if self.ema is not None:
            self.ema.module.eval()
            ema = evaluate(self.ema.module, self.val_batches(), num_classes=self.num_classes, device=self.rt.device,
                           bf16=self.rt.bf16, reduce_sum=self.engine.reduce_sum)
        model.train()
        results = results if isinstance(results, list) else [results]
        best = max(results, key=lambda r: r.top1)
        row = {"step": step, "val_loss": best.loss, "val_top1": best.top1, "val_top5": best.top5,
               "val_top1_ema": ema.top1 if ema is not None else None,
               "majority_top1": best.majority_top1, "val_images": best.count}  # the no-learning level, not in the csv
        if self.layers is not None:
            row.update({f"val_top1_block{i + 1}": r.top1 for i, r in zip(self.layers, results)})
        self.write_val_row(row)
        improved = self.stats["best_top1"] is None or best.top1 > self.stats["best_top1"]  # the same on every rank
        full = None
        if improved:
            self.stats["best_top1"], self.stats["best_step"] = best.top1, step
            full = self.full_state_dict()
        if self.rt.is_main:
            log.info("val @ step %d | top-1 %.4f | top-5 %.4f | loss %.4f%s", step, best.top1, best.top5, best.loss,
                     f" | EMA top-1 {ema.top1:.4f}" if ema is not None else "")
            if improved:
                save_model(self.out / MODEL_FILE, full, self.mcfg, self.num_classes, self.data.classes,
                           {"step": step, "top1": best.top1, "probe_layers": self.layers})
        return results

    def meta_extra(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes, "classes": self.data.classes, "probe_layers": self.layers}

    def verdict(self, row: Dict[str, Any]) -> Optional[str]:
        """The final val top-1 (a probe's best block) against always answering the majority class (chance on
        balanced data), within three standard errors of it: "did not learn"."""
        level, n = max(1.0 / self.num_classes, row.get("majority_top1") or 0.0), row.get("val_images") or 0
        name = "chance" if abs(level - 1.0 / self.num_classes) < 1e-12 else "the majority class's share"
        what = "linear-probe val top-1" if self.layers is not None else "val top-1"
        return no_learning(what, row.get("val_top1"), level, accuracy_margin(level, n), name) if n else None

    def summary(self, run_dir: RunDir, step: int, start_step: int, last: Optional[Path]) -> Dict[str, Any]:
        fields = {"best_top1": self.stats["best_top1"], "best_step": self.stats["best_step"],
                  "num_classes": self.num_classes, "chance": 1.0 / self.num_classes,
                  "best_model": str(run_dir.out / MODEL_FILE)}
        if self.layers is not None:  # each block's val top-1 of the final evaluation
            layers = self.layers
            fields["probe"] = lambda row: {f"block{i + 1}": row.get(f"val_top1_block{i + 1}") for i in layers}
        fields["no_learning"] = self.verdict
        return self.finish(run_dir, step, start_step, last, "val_top1", "val top-1", 1.0 / self.num_classes,
                           f"BEiT fine-tuning: {run_dir.out.name}", fields)


def main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast finetune`: exit codes as `beit_fast.train.runtime.run_main` documents."""
    return run_main("beit-fast finetune", __doc__ or "", FinetuneConfig, finetune, argv, print_summary)


def linprobe_main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast linprobe` = `beit-fast finetune --linear-probe`."""
    return main(["--linear-probe", "true", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
