"""Downstream recipes by network scale: the defaults a fine-tuning, linear-probe or segmentation run takes for every
key the user leaves unset (None in its config).

- `paper`: the BEiT-B ImageNet / ADE20K recipe (SPEC sections 6 and 8; unilm's run_class_finetuning.py and its
  segmentation configs). The default for `small` / `base` / `large` networks and anything bigger than `tiny`.
- `small`: a `tiny`-sized network (depth <= 6 and width <= 192) on a few thousand images and a few hundred steps,
  the field's small-data ViT practice: no colour jitter (on the builtin shapes brightness jitter kept every
  400-800-step run at chance), no layer decay (at depth 4, 0.65 trains the patch embedding at 0.65^5 = 0.12x the
  lr), no label smoothing, drop path, mixup / cutmix, RandAugment or random erasing (a run of ~10 epochs cannot pay
  them back), the whole image in training and evaluation (train crops of the whole image evaluated on unilm's 87.5%
  center crop see objects 14% larger at test time than ever in training), lr 1e-3 at batch 32.

The recipe is chosen once per run (`--recipe auto | paper | small`), before anything trains, from the network alone:
scratch and every pretrained init of the same network get the same one, never a per-variant choice. The resolved
values are what config.json records, so a resume compares them like any other key. README "Fine-tuning" lists
both recipes and the measurements behind `small`.
"""

from __future__ import annotations

from typing import Any, Dict

from beit_fast import BeitConfig

__all__ = ["RECIPES", "RECIPE_NAMES", "recipe_for", "apply_recipe", "SMALL_DEPTH", "SMALL_WIDTH"]

RECIPE_NAMES = ("auto", "paper", "small")
SMALL_DEPTH, SMALL_WIDTH = 6, 192  # a network at most this deep and wide is "small" (the tiny preset: 4 x 96)

# task -> recipe -> {config key: value}; "drop_path_rate" is the model's (BeitConfig), unless --drop-path-rate is given.
RECIPES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "finetune": {
        "paper": dict(lr=4e-3, lr_batch=1024, layer_decay=0.65, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                      auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, crop_scale=0.08, color_jitter=0.4,
                      eval_crop_pct=None, drop_path_rate=0.1),
        "small": dict(lr=1e-3, lr_batch=32, layer_decay=1.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0,
                      auto_augment="none", reprob=0.0, crop_scale=1.0, color_jitter=0.0, eval_crop_pct=1.0,
                      drop_path_rate=0.0),
    },
    # MAE's main_linprobe: crop + flip; the lr of fine-tuning's recipe (the probe's own keys are the same fields)
    "linprobe": {
        "paper": dict(lr=4e-3, lr_batch=1024, crop_scale=0.08, eval_crop_pct=None),
        "small": dict(lr=1e-3, lr_batch=32, crop_scale=1.0, eval_crop_pct=1.0),
    },
    "segment": {
        "paper": dict(lr=7e-4, lr_batch=16, layer_decay=0.65, ratio_range=[0.5, 2.0], photometric=True,
                      drop_path_rate=0.1),
        "small": dict(lr=2e-3, lr_batch=8, layer_decay=1.0, ratio_range=[1.0, 1.0], photometric=False,
                      drop_path_rate=0.0),
    },
}


def recipe_for(requested: str, network: BeitConfig) -> str:
    """The recipe a run takes: `requested` unless "auto", which is "small" for a network of the tiny preset's size or
    smaller (depth <= SMALL_DEPTH and embed_dim <= SMALL_WIDTH), "paper" otherwise."""
    if requested not in RECIPE_NAMES:
        raise ValueError(f"recipe={requested!r}: must be one of {', '.join(RECIPE_NAMES)}")
    if requested != "auto":
        return requested
    return "small" if network.depth <= SMALL_DEPTH and network.embed_dim <= SMALL_WIDTH else "paper"


def apply_recipe(cfg: Any, task: str, network: BeitConfig) -> Dict[str, Any]:
    """Resolve `cfg.recipe` for `network` and fill every config key that is None with the recipe's value (keys the
    user set are kept). Returns the model overrides the recipe adds (drop path, unless `cfg.model` sets it)."""
    name = recipe_for(cfg.recipe, network)
    cfg.recipe = name
    values = dict(RECIPES[task][name])
    if task == "linprobe":  # a probe run is a fine-tuning config: its other keys take fine-tuning's recipe
        values = {**RECIPES["finetune"][name], **values}
    model = {"drop_path_rate": values.pop("drop_path_rate")} if "drop_path_rate" in values else {}
    for key, value in values.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, list(value) if isinstance(value, list) else value)
    return {k: v for k, v in model.items() if k not in cfg.model}
