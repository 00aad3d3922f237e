"""BEiT semantic-segmentation fine-tuning (`beit-fast segment`, `python -m beit_fast.train.segment`) and its
evaluation (`beit-fast segment-eval`).

A linear script over the shared parts of `beit_fast.train` (config, runtime, run, optim, step, engine, loop,
evaluate, metrics): config -> init weights -> data (checked before anything is written) -> runtime -> run dir ->
model -> engine -> loop (val mIoU every `eval_every` steps, best.pt) -> summary. One plain process or DeepSpeed ZeRO
0-3 (SyncBatchNorm over the processes), exact resume, metrics.csv / val_metrics.csv / TensorBoard / metrics.png.

The model is `beit_fast.segmentation.BeitForSemanticSegmentation` (BEiT + multi-scale adapter + UperNet, aux FCN
head; `--decoder deconv` for the paper's light decoder) in unilm's fine-tuning layout (per-layer relative position
tables). `--init`: a pretraining / classification run or checkpoint of this engine, a unilm / timm /
transformers backbone checkpoint (tables resized to the crop's grid as unilm does), a transformers or mmseg / unilm
segmentation checkpoint, a segmentation run of this engine, or none. The recipe (`--recipe auto`, train/recipes.py,
for the keys left unset) is unilm's (SPEC section 8) - AdamW lr 7e-4 at batch 16 (scaled linearly), layer decay
0.65, weight decay 0.05, poly schedule (power 1) with linear warmup (1500 of 160k iterations: the same share of a
shorter run), per-pixel cross-entropy with the ignore index + 0.4 x the aux head's, mmseg's training pipeline (random
resize 0.5-2.0 of the base scale, crop with cat_max_ratio 0.75, flip, photometric distortion), drop path 0.1 - or for
tiny-sized networks the small one (lr 2e-3 at batch 8, no layer decay, rescaling, photometric distortion or drop
path). Evaluation: whole image or mmseg's sliding window.
Data: `builtin` (procedural shapes with per-pixel labels), an ADE20K folder, or DIR/images + DIR/labels.
The README's "Semantic segmentation" section is the full reference.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Tuple

import torch

from beit_fast import BeitConfig
from beit_fast.checkpoint import CheckpointError, atomic_save, load_state_dict_file, safe_load, unwrap
from beit_fast.segmentation import DECODERS, BeitForSemanticSegmentation, default_out_indices, segmentation_loss
from beit_fast.train.config import BeitTrainConfig
from beit_fast.train.evaluate import evaluate_segmentation
from beit_fast.train.loop import TaskLoop, pad_collective_batches
from beit_fast.train.metrics import MIOU_MARGIN, no_learning
from beit_fast.train.optim import build_optimizer, scaled_lr, warmup_poly
from beit_fast.train.recipes import RECIPE_NAMES, apply_recipe
from beit_fast.train.run import RunDir, agree_on_resume, plan_resume, read_checkpoint, start_run_directory
from beit_fast.train.runtime import build_engine, run_main, seed_all, setup_runtime, start_distributed, train_loader

log = logging.getLogger("beit_fast.segment")

__all__ = ["SegmentConfig", "segment", "main", "evaluate_main", "load_segmenter", "MODEL_FILE"]

MODEL_FILE = "best.pt"  # the best val mIoU's weights and everything needed to rebuild the model
FORMAT = "beit-fast segmenter"
FINETUNE_LAYOUT = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, drop_path_rate=0.1)
REFERENCE_ITERS, REFERENCE_WARMUP = 160_000, 1500  # unilm's ADE20K schedule


@dataclass
class SegmentConfig(BeitTrainConfig):
    RESUME_MAY_DIFFER: ClassVar[FrozenSet[str]] = BeitTrainConfig.RESUME_MAY_DIFFER | {"eval_every"}

    preset: str = "auto"  # BeitConfig preset; "auto": the --init checkpoint's network (tiny with --init none)
    init: str = "none"  # a run directory or checkpoint (this engine, unilm, timm, transformers, mmseg), or "none"
    out: str = "runs/segment"  # run directory: config.json, metrics.csv, val_metrics.csv, best.pt, checkpoints/
    data: str = "builtin"  # "builtin", an ADE20K folder (images/ + annotations/), or DIR with images/ + labels/
    num_images: int = 1024  # builtin: training images (val: a quarter as many, at least 64)
    batch_size: int = 16  # images per optimizer step over all processes (unilm: 2 per GPU x 8)
    recipe: str = "auto"  # defaults for the keys below left unset: "paper" (unilm's ADE20K recipe, SPEC 8), "small"
    # (tiny networks on small data), "auto": small for networks up to the tiny preset's size (train/recipes.py)
    lr: Optional[float] = None  # peak learning rate at batch lr_batch (paper: 7e-4 at 16; small: 2e-3 at 8), scaled
    # linearly to batch_size
    lr_batch: Optional[int] = None  # the batch size `lr` is quoted for (paper 16, small 8)
    min_lr: float = 0.0  # the poly schedule's end
    warmup_steps: Optional[int] = None  # linear warmup; None: 1500 x max_steps / 160000 (unilm's share), at most 1500
    clip_grad: float = 0.0  # max global grad norm (0 disables; unilm's segmentation does not clip)
    layer_decay: Optional[float] = None  # layer-wise lr decay (unilm's assignment; the adapter and heads are the top
    # layer; paper 0.65, small 1.0)
    max_steps: int = 2000  # optimizer steps (unilm: 160000)
    decoder: str = "upernet"  # "upernet" (unilm's) or "deconv" (the paper's light decoder)
    out_indices: Optional[List[int]] = None  # the 4 blocks (0-based) feeding the pyramid; None: [3, 5, 7, 11] at 12
    aux_head: bool = True  # auxiliary FCN head on the third level (loss weight aux_weight)
    aux_weight: float = 0.4
    channels: Optional[int] = None  # decoder width; None: embed_dim (upernet), 256 (deconv)
    num_classes: Optional[int] = None  # classes; None: the data's (DIR/images + DIR/labels needs it; builtin: 3-9)
    ignore_index: int = 255  # label value that is not scored and not trained on
    reduce_zero_label: Optional[bool] = None  # label 0 -> ignore, c -> c - 1; None: on for ADE20K only
    new_head: bool = False  # replace an --init segmentation head of another class count
    data_seed: int = 0  # picks the builtin images (not --seed: runs with different seeds share val)
    scale: Optional[List[int]] = None  # mmseg's img_scale (long, short) for resizing; None: (4 x crop, crop)
    ratio_range: Optional[List[float]] = None  # random resize ratio of `scale` (paper [0.5, 2.0], small [1.0, 1.0])
    cat_max_ratio: float = 0.75  # re-draw a crop where one class covers more than this share
    photometric: Optional[bool] = None  # mmseg's PhotoMetricDistortion (paper true, small false)
    eval_every: int = 200  # steps between val evaluations (0: only at the end)
    eval_mode: str = "auto"  # "whole", "slide" (windows of the crop), "auto": whole when every val image fits
    eval_stride: Optional[int] = None  # sliding-window stride; None: 2/3 of the crop (341 at 512)
    sync_bn: bool = True  # SyncBatchNorm when several processes train

    def validate(self) -> None:
        super().validate()
        if self.recipe not in RECIPE_NAMES:
            self.bad("recipe", f"must be one of {', '.join(RECIPE_NAMES)}")
        if self.lr_batch is not None:
            self.positive("lr_batch")
        self.non_negative("eval_every", "aux_weight")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            self.bad("warmup_steps", "must be >= 0 (or omitted)")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            self.bad("layer_decay", "must be in (0, 1]")
        if self.decoder not in DECODERS:
            self.bad("decoder", f"must be one of {DECODERS}")
        if self.out_indices is not None and len(self.out_indices) != 4:
            self.bad("out_indices", "must name 4 blocks")
        if self.num_classes is not None and self.num_classes <= 0:
            self.bad("num_classes", "must be positive (or omitted: from the data)")
        if not 0 <= self.ignore_index <= 255:
            self.bad("ignore_index", "must be in [0, 255] (labels are 8-bit PNGs)")
        if self.scale is not None and (len(self.scale) != 2 or min(self.scale) <= 0):
            self.bad("scale", "must be two positive sizes [long, short]")
        if self.ratio_range is not None and (len(self.ratio_range) != 2
                                             or not 0 < self.ratio_range[0] <= self.ratio_range[1]):
            self.bad("ratio_range", "must be [low, high] with 0 < low <= high")
        if not 0.0 < self.cat_max_ratio <= 1.0:
            self.bad("cat_max_ratio", "must be in (0, 1]")
        if self.eval_mode not in ("auto", "whole", "slide"):
            self.bad("eval_mode", "must be auto, whole or slide")
        if self.eval_stride is not None and self.eval_stride <= 0:
            self.bad("eval_stride", "must be positive")
        if self.eval_mode == "slide" and self.deepspeed and self.zero_stage == 3:
            self.bad("eval_mode", "sliding-window evaluation runs the unwrapped model: use zero_stage <= 2")
        if self.init != "none" and not Path(self.init).exists():
            self.bad("init", "not found (a run directory or checkpoint file, or none)")

    def network(self, source: Optional["SegInit"] = None) -> BeitConfig:
        """The network before the fine-tuning layout: the preset, or with preset auto the init checkpoint's."""
        if self.preset != "auto":
            return BeitConfig.from_preset(self.preset)
        if source is not None:
            return BeitConfig.from_dict({**source.model_config, "num_masking_patches": None})
        return BeitConfig.from_preset("tiny")

    def resolve(self, source: Optional["SegInit"] = None) -> BeitConfig:
        """Fill the recipe's keys (`train.recipes.apply_recipe`), check them, and return the model config."""
        layout = apply_recipe(self, "segment", self.network(source))
        self.validate()
        return self.model_config(source, layout)

    def model_config(self, source: Optional["SegInit"] = None, recipe: Optional[Dict[str, Any]] = None) -> BeitConfig:
        """The network (`network`), the fine-tuning layout and the recipe's drop path, then the user's model
        overrides (`--img-size 512`: the crop; position tables resized as unilm does)."""
        try:
            return self.network(source).replace(**{**FINETUNE_LAYOUT, **(recipe or {}), **self.model})
        except TypeError as exc:
            raise ValueError(f"model config {self.model}: {exc}") from None

    def lr_schedule(self) -> Dict[str, Any]:
        """`warmup_poly`'s arguments: lr quoted at lr_batch, scaled linearly to batch_size; unilm's warmup share."""
        warmup = self.warmup_steps
        if warmup is None:
            warmup = min(REFERENCE_WARMUP, math.ceil(self.max_steps * REFERENCE_WARMUP / REFERENCE_ITERS))
        return dict(base_lr=scaled_lr(self.lr, self.batch_size, self.lr_batch),
                    min_lr=self.min_lr * self.batch_size / self.lr_batch, warmup_steps=warmup,
                    max_steps=self.max_steps)


# -- init weights ------------------------------------------------------------------------------------------------------
@dataclass
class SegInit:
    state_dict: Dict[str, Any]  # for BeitForSemanticSegmentation.load_pretrained (any layout it detects)
    model_config: Dict[str, Any]  # the backbone's BeitConfig keys
    num_classes: Optional[int]  # a segmentation head's class count (None: backbone only)
    what: str  # for the log
    record: Dict[str, Any] = field(default_factory=dict)  # a segmentation run's model settings (decoder, ...)


def read_seg_init(init: str) -> Optional[SegInit]:
    """The weights `--init` names: this engine's runs / checkpoints of any task, external backbone checkpoints
    (unilm / timm / transformers), transformers or mmseg segmentation checkpoints. One-line errors otherwise."""
    from beit_fast.segmentation import detect_segmentation_layout, segmentation_backbone_state
    from beit_fast.train.classify import infer_model_config, read_init

    if init == "none":
        return None
    path = Path(init)
    ours = _read_segment(path)
    if ours is not None:
        where, sd, record = ours
        return SegInit(sd, record["model_config"], record["num_classes"], f"segmentation model {where}", record)
    if path.is_file() and not path.name.startswith("step_"):
        raw = unwrap(load_state_dict_file(path))
        if detect_segmentation_layout(raw) != "backbone":
            backbone = segmentation_backbone_state(raw)
            head = raw.get("decode_head.conv_seg.weight", raw.get("decode_head.classifier.weight"))
            return SegInit(raw, infer_model_config(backbone), int(head.shape[0]) if head is not None else None,
                           f"segmentation checkpoint {path}")
    source = read_init(init)  # pretraining / classification: the backbone
    config = source.model_config or BeitConfig.from_dict(infer_model_config(source.state_dict)).to_dict()
    return SegInit(source.state_dict, config, None, source.what)


def _read_segment(path: Path) -> Optional[Tuple[Path, Dict[str, torch.Tensor], Dict[str, Any]]]:
    """(the file, its state dict, its record) when `path` is a segmentation run directory, its best.pt or one of its
    step checkpoints; None for anything else. Each file is read once."""
    from beit_fast.train.run import checkpoint_model_state, resolve_checkpoint

    if path.is_dir() and (path / MODEL_FILE).is_file():
        candidate = path / MODEL_FILE
    elif path.is_dir():
        try:
            candidate = resolve_checkpoint(path)
        except (FileNotFoundError, ValueError):
            return None
    else:
        candidate = path
    if candidate.name == MODEL_FILE:
        saved = safe_load(candidate, what="model file")
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            return None
        return candidate, saved["model"], saved
    if candidate.name.startswith("step_"):
        try:
            sd, ckpt = checkpoint_model_state(candidate, "segment")
        except CheckpointError:  # another task's checkpoint (or not one)
            return None
        return candidate, sd, {**ckpt["segmenter"], "model_config": ckpt["model_config"]}
    return None


# -- the model file ----------------------------------------------------------------------------------------------------
def model_record(model: BeitForSemanticSegmentation, data: Any, cfg: SegmentConfig) -> Dict[str, Any]:
    """What rebuilds the model and reads its data the same way: decoder settings, classes, label handling."""
    return {"num_classes": model.num_classes, "classes": list(data.classes), "decoder": model.decoder,
            "out_indices": list(model.out_indices), "aux_head": model.auxiliary_head is not None,
            "channels": cfg.channels, "ignore_index": data.ignore_index, "reduce_zero_label": data.reduce_zero_label,
            "scale": list(_scale(cfg, model.config.img_size)), "eval_stride": cfg.eval_stride}


def build_segmenter(mcfg: BeitConfig, record: Dict[str, Any]) -> BeitForSemanticSegmentation:
    return BeitForSemanticSegmentation(mcfg, record["num_classes"], decoder=record["decoder"],
                                       out_indices=record["out_indices"], aux_head=record["aux_head"],
                                       channels=record.get("channels"), ignore_index=record["ignore_index"])


def load_segmenter(path: Path) -> Tuple[BeitForSemanticSegmentation, Dict[str, Any]]:
    """A segmentation model (a run directory, its best.pt or a step checkpoint) and its record."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ours = _read_segment(Path(path))
    if ours is None:
        raise ValueError(f"{path}: not a segmentation run directory, {MODEL_FILE} or step checkpoint of this engine")
    ours, sd, record = ours
    model = build_segmenter(BeitConfig.from_dict(record["model_config"]), record)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{ours}: the weights do not fit its model config ({str(exc).splitlines()[0]})") from None
    return model, record


def seg_eval_loader(data: Any, scale: Tuple[int, int], batch_size: int, rank: int = 0, world: int = 1,
                    num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """This rank's shard of `data.val` through mmseg's test pipeline (resize to `scale`, the label kept at its size);
    one image per batch for folders (images of different sizes, as mmseg tests), `batch_size` for builtin."""
    from beit_fast.data import ShardedEvalSampler
    from beit_fast.seg_data import SegEvalTransform, SegmentationDataset, seg_collate

    ds = SegmentationDataset(data.val, SegEvalTransform(scale), seed=0)
    batch = batch_size if data.layout == "builtin" else 1
    return torch.utils.data.DataLoader(ds, batch_sampler=ShardedEvalSampler(len(ds), batch, rank, world),
                                       num_workers=num_workers, collate_fn=seg_collate, pin_memory=pin_memory)


def _scale(cfg: Any, crop: int) -> Tuple[int, int]:
    from beit_fast.seg_data import default_scales

    return tuple(cfg.scale) if cfg.scale else default_scales(crop)


# -- the run -----------------------------------------------------------------------------------------------------------
def segment(cfg: SegmentConfig) -> Dict[str, Any]:
    """Run segmentation fine-tuning; returns a summary. Under DeepSpeed every rank calls it. Everything that can be
    checked (config, init weights, data pairs and labels) is checked before the run directory is touched."""
    with RunDir(Path(cfg.out), "beit-fast segment") as run_dir:
        return _segment(cfg, run_dir)


def _read(path: Path) -> Dict[str, Any]:
    return read_checkpoint(path, "segment")


def _segment(cfg: SegmentConfig, run_dir: RunDir) -> Dict[str, Any]:
    from beit_fast.seg_data import build_segmentation_data

    cfg.validate()
    source = read_seg_init(cfg.init)
    mcfg = cfg.resolve(source)
    data = build_segmentation_data(cfg.data, num_images=cfg.num_images, image_size=mcfg.img_size,
                                   num_classes=cfg.num_classes, ignore_index=cfg.ignore_index,
                                   reduce_zero_label=cfg.reduce_zero_label, seed=cfg.data_seed)
    rt = setup_runtime(cfg, mcfg)
    if not rt.is_main:
        log.setLevel(logging.WARNING)
    seed_all(cfg.seed)
    out_indices = cfg.out_indices or (source.record.get("out_indices") if source else None)
    model = BeitForSemanticSegmentation(mcfg, data.num_classes, decoder=cfg.decoder,
                                        out_indices=out_indices or default_out_indices(mcfg.depth),
                                        aux_head=cfg.aux_head, channels=cfg.channels, aux_loss_weight=cfg.aux_weight,
                                        ignore_index=data.ignore_index)
    if source is not None:  # weights that do not fit fail here, before the run directory is touched
        fresh = init_segmenter(model, source, cfg.new_head)
        log.info("init: %s (initialised here: %s)", source.what, _summarise(fresh))
    if rt.is_main:
        run_dir.acquire()
    plan = plan_resume(run_dir.out, cfg, mcfg.to_dict(), rt.world, _read)
    if rt.deepspeed:
        start_distributed(rt.device, cfg.dist_timeout)
        plan = agree_on_resume(plan, rt.world, _read)
    if rt.world > 1 and cfg.sync_bn:
        if rt.device.type == "cuda":
            model = model.convert_sync_batchnorm()
        else:  # torch's SyncBatchNorm runs on CUDA only
            log.warning("sync_bn: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process on %s",
                        rt.device.type)
    record = model_record(model, data, cfg)
    if rt.is_main:
        run_dir.write_json("config.json", {"segment": cfg.to_dict(), "model": mcfg.to_dict(), **record})
    model.to(rt.device)
    lr = cfg.lr_schedule()["base_lr"]
    optimizer = build_optimizer(model, lr=lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                eps=cfg.eps, layer_decay=cfg.layer_decay, apex=cfg.apex)
    engine = build_engine(model, optimizer, cfg, rt)
    torch.manual_seed(cfg.seed + rt.rank)
    log.info("engine: %s | %d classes, %d train / %d val images | crop %d | lr %.3g (%g at batch %d)",
             engine.describe(), data.num_classes, len(data.train), len(data.val), mcfg.img_size, lr, cfg.lr,
             cfg.lr_batch)
    loop = SegmentLoop(cfg, mcfg, rt, engine, data, record)
    start_step = loop.resume(plan)
    if rt.is_main:
        start_run_directory(run_dir.out, plan, start_step, ("summary.json", "metrics.png", MODEL_FILE,
                                                            "val_samples.png"))
    engine.barrier()
    train = loop.train_dataset()
    step, last = loop.run(train_loader(train, cfg, rt, start_step), run_dir.signals, start_step, plan.path)
    return loop.summary(run_dir, step, start_step, last)


def _summarise(keys: List[str]) -> str:
    """'backbone.fpn1.*, decode_head.*' for a list of parameter names (the log line stays short)."""
    parts = sorted({".".join(k.split(".")[:2]) if k.startswith("backbone.") else k.split(".")[0] for k in keys})
    return ", ".join(f"{p}.*" for p in parts) or "nothing"


def init_segmenter(model: BeitForSemanticSegmentation, source: SegInit, new_head: bool) -> List[str]:
    """Load `source`; returns what was left initialised. A segmentation head of another class count is replaced
    only with `new_head`."""
    sd = source.state_dict
    if source.num_classes is not None and source.num_classes != model.num_classes:
        if not new_head:
            raise ValueError(f"{source.what} has a {source.num_classes}-class head, this run has {model.num_classes} "
                             "classes: pass --new-head to replace it")
        log.warning("replacing the %d-class heads of %s with new %d-class heads", source.num_classes, source.what,
                    model.num_classes)
        sd = {k: v for k, v in sd.items() if not k.endswith(("conv_seg.weight", "conv_seg.bias", "classifier.weight",
                                                             "classifier.bias"))}
    result = model.load_pretrained(sd, strict=False)
    if source.num_classes is None:  # a backbone: the adapter and the heads start fresh
        allowed: Tuple[str, ...] = ("backbone.fpn", "decode_head.", "auxiliary_head.")
    else:  # a segmentation model: its heads' classifiers when replaced, an aux head it did not have
        allowed = ("auxiliary_head.",) + (("decode_head.conv_seg.",) if new_head else ())
    unexplained = [k for k in result["missing"] if not k.startswith(allowed)]
    if unexplained or result["unexpected"]:
        raise CheckpointError(f"{source.what} does not fit the model: missing {unexplained[:6]}, unexpected "
                              f"{result['unexpected'][:6]}")
    return result["missing"]


class SegmentLoop(TaskLoop):
    """Segmentation's part of the shared loop: the per-pixel loss (+ aux), val mIoU, best.pt."""

    task, tag = "segment", "segment"
    loss_columns = (("loss", "loss"), ("decode_loss", "decode"), ("aux_loss", "aux"))
    val_columns = ("step", "val_miou", "val_macc", "val_aacc")

    def __init__(self, cfg: SegmentConfig, mcfg: BeitConfig, rt: Any, engine: Any, data: Any,
                 record: Dict[str, Any]) -> None:
        super().__init__(cfg, mcfg, rt, engine, {"best_miou": None, "best_step": None})
        self.data, self.record = data, record
        self.num_classes = data.num_classes
        self.crop = mcfg.img_size

    def train_dataset(self) -> Any:
        from beit_fast.seg_data import SegmentationDataset, SegTrainTransform

        c = self.cfg
        transform = SegTrainTransform(self.crop, scale=_scale(c, self.crop), ratio_range=tuple(c.ratio_range),
                                      cat_max_ratio=c.cat_max_ratio, photometric=c.photometric,
                                      ignore_index=self.data.ignore_index)
        return SegmentationDataset(self.data.train, transform, seed=c.seed)

    def lr_at(self, step: int) -> float:
        return warmup_poly(step, **self.cfg.lr_schedule())

    def flops_per_image(self) -> float:
        return self.mcfg.train_flops_per_image(0, 0)  # the backbone's share (the decoder's convs are not counted)

    def loss(self, batch: Any):
        images, labels = batch
        images = images.to(self.rt.device, non_blocking=True)
        labels = labels.to(self.rt.device, non_blocking=True)
        logits, aux = self.engine.forward(images, return_aux=True)
        total, main, aux_loss = segmentation_loss(logits, labels, aux, ignore_index=self.data.ignore_index,
                                                  aux_weight=self.cfg.aux_weight)
        zero = torch.zeros((), device=total.device)
        return total, [total.detach(), main.detach(), (aux_loss if aux_loss is not None else zero).detach()]

    def val_batches(self):
        rt = self.rt
        micro = max(1, self.cfg.batch_size // (rt.world * self.cfg.grad_accum_steps))
        loader = seg_eval_loader(self.data, _scale(self.cfg, self.crop), micro, rt.rank, rt.world,
                                 self.cfg.num_workers, pin_memory=rt.device.type == "cuda")
        return pad_collective_batches(loader, rt.deepspeed and self.cfg.zero_stage == 3)

    def forward_fn(self):
        """What evaluation runs on an image batch: the engine's forward (whole image: logits at 1/4, upsampled by
        the evaluator) or the model's sliding window; "auto" picks whole when the image is the crop's size."""
        model, crop, stride = self.engine.model, self.crop, self.cfg.eval_stride

        def forward(images: torch.Tensor) -> torch.Tensor:
            if model.inference_mode(self.cfg.eval_mode, images) == "whole":
                return self.engine.forward(images)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.rt.bf16):
                return model.predict(images, mode="slide", crop_size=crop, stride=stride)

        return forward

    def validate(self, step: int) -> Any:
        """Val mIoU / mAcc / aAcc (every rank, reduced), a val_metrics.csv row, best.pt when mIoU improves."""
        model = self.engine.model
        model.eval()
        result = evaluate_segmentation(self.forward_fn(), self.val_batches(), num_classes=self.num_classes,
                                       ignore_index=self.data.ignore_index, device=self.rt.device,
                                       reduce_sum=self.engine.reduce_sum, keep=4 if self.rt.is_main else 0)
        model.train()
        self.write_val_row({"step": step, "val_miou": result.miou, "val_macc": result.macc, "val_aacc": result.aacc,
                            "majority_miou": result.majority_miou})  # the no-learning level, not in the csv
        improved = self.stats["best_miou"] is None or result.miou > self.stats["best_miou"]
        full = None
        if improved:
            self.stats["best_miou"], self.stats["best_step"] = result.miou, step
            full = self.full_state_dict()
        if self.rt.is_main:
            log.info("val @ step %d | mIoU %.4f | mAcc %.4f | aAcc %.4f", step, result.miou, result.macc, result.aacc)
            if improved:
                atomic_save({"format": FORMAT, "model": full, "model_config": self.mcfg.to_dict(), **self.record,
                             "step": step, "miou": result.miou}, self.out / MODEL_FILE)
            self.last_samples = result.samples
        return result

    def meta_extra(self) -> Dict[str, Any]:
        return {"segmenter": self.record}

    def summary(self, run_dir: RunDir, step: int, start_step: int, last: Optional[Path]) -> Dict[str, Any]:
        from beit_fast.train.evaluate import plot_segmentation

        background = _all_background_miou(self.data) if self.data.layout == "builtin" else None
        fields = {"best_miou": self.stats["best_miou"], "best_step": self.stats["best_step"],
                  "num_classes": self.num_classes, "best_model": str(run_dir.out / MODEL_FILE),
                  "all_background_miou": background,
                  "no_learning": lambda row: no_learning("val mIoU", row.get("val_miou"), row.get("majority_miou"),
                                                         MIOU_MARGIN, "the all-background (majority-class) mIoU")}
        summary = self.finish(run_dir, step, start_step, last, "val_miou", "val mIoU", background,
                              f"BEiT segmentation: {run_dir.out.name}", fields)
        if self.rt.is_main and self.cfg.plot and getattr(self, "last_samples", None):
            png = plot_segmentation(self.last_samples, run_dir.out / "val_samples.png", num_classes=self.num_classes,
                                    ignore_index=self.data.ignore_index, classes=self.data.classes,
                                    title=f"step {step}: val mIoU {summary.get('val_miou', float('nan')):.4f}")
            summary["samples"] = str(png) if png else None
            run_dir.write_json("summary.json", summary)
        return summary


def _all_background_miou(data: Any) -> Optional[float]:
    """The mIoU of predicting background everywhere on the builtin val set: background's IoU = its pixel share, every
    other class present gets 0 (the baseline a model must beat)."""
    counts = torch.zeros(data.num_classes, dtype=torch.float64)
    for i in range(len(data.val)):
        label = torch.as_tensor(data.val[i][1]).long().flatten()
        label = label[label != data.ignore_index]
        counts += torch.bincount(label, minlength=data.num_classes).double()
    present = counts > 0
    return float(counts[0] / counts.sum() / present.sum()) if present.any() else None


def print_summary(summary: Dict[str, Any]) -> None:
    """The end of a segmentation run on stdout."""
    print(f"done: {summary['step']} steps | val mIoU {summary.get('val_miou', float('nan')):.4f} | mAcc "
          f"{summary.get('val_macc', float('nan')):.4f} | aAcc {summary.get('val_aacc', float('nan')):.4f} | best "
          f"mIoU {summary['best_miou']:.4f} at step {summary['best_step']}")
    print(f"best model: {summary['best_model']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics: {summary['metrics']} | plot: {summary['plot'] or 'none'} | samples: "
          f"{summary.get('samples') or 'none'}")
    if summary.get("no_learning"):
        print(f"WARNING: {summary['no_learning']}")


def main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast segment`: exit codes as `beit_fast.train.runtime.run_main` documents."""
    return run_main("beit-fast segment", __doc__ or "", SegmentConfig, segment, argv, print_summary)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """`beit-fast segment-eval CKPT --data DIR`: mIoU, per-class IoU / accuracy, aAcc (mmseg's definitions); optional
    multi-scale + flip test; a PNG of images | ground truth | prediction."""
    import argparse

    from beit_fast.train.evaluate import format_seg_report, plot_segmentation
    from beit_fast.train.runtime import cli_call

    p = argparse.ArgumentParser(prog="beit-fast segment-eval", description=evaluate_main.__doc__)
    p.add_argument("checkpoint", help="a segmentation run directory, its best.pt, or a step checkpoint")
    p.add_argument("--data", default="builtin", help="builtin, an ADE20K folder, or DIR with images/ + labels/")
    p.add_argument("--num-images", type=int, default=1024, help="builtin: the train split's size (val follows it)")
    p.add_argument("--data-seed", type=int, default=0, help="builtin: the data seed the model was trained with")
    p.add_argument("--mode", default="auto", choices=("auto", "whole", "slide"))
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default 2/3 of the crop)")
    p.add_argument("--scales", default="1.0", help="comma-separated test scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="samples PNG (default: segment_eval.png beside the checkpoint)")
    p.add_argument("--samples", type=int, default=6, help="rows in the PNG")
    try:
        a = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    def run() -> Tuple[Any, Dict[str, Any]]:
        scales = [float(s) for s in a.scales.split(",") if s.strip()]
        if not scales or min(scales) <= 0:
            raise ValueError(f"--scales {a.scales!r}: positive numbers, comma-separated")
        return _evaluate_checkpoint(a, scales)

    done, code = cli_call("beit-fast segment-eval", run)
    if code:
        return code
    result, record = done
    print(format_seg_report(result, record["classes"]))
    base = Path(a.checkpoint)
    png = Path(a.out) if a.out else (base if base.is_dir() else base.parent) / "segment_eval.png"
    written = plot_segmentation(result.samples, png, num_classes=record["num_classes"],
                                ignore_index=record["ignore_index"], classes=record["classes"],
                                title=f"{a.checkpoint}: mIoU {result.miou:.4f}")
    print(f"samples: {written or 'not written (matplotlib missing)'}")
    return 0


def _evaluate_checkpoint(a: Any, scales: List[float]) -> Tuple[Any, Dict[str, Any]]:
    from beit_fast.seg_data import build_segmentation_data, default_scales
    from beit_fast.train.runtime import resolve_device

    model, record = load_segmenter(Path(a.checkpoint))
    crop = model.config.img_size
    data = build_segmentation_data(a.data, num_images=a.num_images, image_size=crop, num_classes=record["num_classes"],
                                   ignore_index=record["ignore_index"], reduce_zero_label=record["reduce_zero_label"],
                                   seed=a.data_seed)
    if data.num_classes != record["num_classes"]:
        raise ValueError(f"the data has {data.num_classes} classes, the model {record['num_classes']}")
    device = resolve_device(a.device)
    model.to(device).eval()
    loader = seg_eval_loader(data, tuple(record.get("scale") or default_scales(crop)), a.batch_size)
    stride = a.stride or record.get("eval_stride")

    def forward(images: torch.Tensor) -> torch.Tensor:
        mode = model.inference_mode(a.mode, images)
        if scales == [1.0] and not a.flip:
            return model.predict(images, mode=mode, crop_size=crop, stride=stride)
        if mode == "whole" and any(s != 1.0 for s in scales):
            mode = "slide"  # a rescaled image is not the crop's size
        return model.predict_aug(images, scales=scales, flip=a.flip, mode=mode, crop_size=crop, stride=stride).log()

    result = evaluate_segmentation(forward, loader, num_classes=record["num_classes"],
                                   ignore_index=record["ignore_index"], device=device, progress=True,
                                   keep=a.samples, classes=record["classes"])
    return result, record


if __name__ == "__main__":
    sys.exit(main())
