"""The optimizer side shared by every training script: parameter groups, optimizers, learning-rate schedule.

`parameter_groups` is unilm's assignment (`beit/optim_factory.py`: `get_num_layer_for_vit`,
`LayerDecayValueAssigner`, `get_parameter_groups`; the skip list of `beit/run_class_finetuning.py`):

    weight decay   none on 1-D params (norms, biases, gamma_1/2, q_bias/v_bias), names ending in ".bias" and the
                   names in `model.no_weight_decay()` (exact match: cls_token, pos_embed); with
                   `no_decay_rel_pos_bias` (unilm's --disable_weight_decay_on_rel_pos_bias) also none on the
                   per-layer tables blocks.i.attn.relative_position_bias_table - NOT on a shared
                   rel_pos_bias.relative_position_bias_table, which unilm does not add to the list; the mask token
                   (1, 1, D) decays, as in unilm.
    layer          cls_token, mask_token, pos_embed, patch_embed.* -> 0; blocks.i.* -> i + 1; everything else
                   (rel_pos_bias.*, final norm, fc_norm, heads) -> L + 1, for L = len(model.blocks).
    lr_scale       layer_decay ** (L + 1 - layer): 1 for the heads, layer_decay ** (L + 1) for the embeddings.

A segmentation model (`beit_fast.segmentation`) names its encoder `backbone.*` and exposes `blocks`: the prefix is
read off before the assignment, as unilm's segmentation `LayerDecayOptimizerConstructor` does, so its adapter and
decode heads land in layer L + 1 with the other heads.

Each group carries "params", "weight_decay", "lr_scale" and "group_name"; `set_lr` writes lr x lr_scale into every
group each step (the schedule's value is the top layer's lr). With layer_decay = 1 there are exactly two groups,
[decay, no_decay], the groups pretraining has always had, so its checkpoints' optimizer states keep loading (a
loaded state replaces the group dicts, extra keys and all: a state saved without "lr_scale" reads as scale 1).

Schedules: per-step linear warmup to the base lr, then cosine to min_lr at max_steps (`warmup_cosine`), or mmcv's
poly with linear warmup (`warmup_poly`, segmentation); the base lr
follows the linear scaling rule (`scaled_lr`, e.g. unilm's fine-tuning lr 4e-3 is for batch 1024).
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Tuple

import torch

__all__ = [
    "layer_id",
    "parameter_groups",
    "build_optimizer",
    "apex_classes",
    "set_lr",
    "warmup_cosine",
    "warmup_poly",
    "scaled_lr",
]

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def layer_id(name: str, num_layers: int) -> int:
    """The layer a parameter belongs to for layer-wise lr decay (unilm `get_num_layer_for_vit`, with its
    `num_max_layer` = num_layers + 2).

    Args:
        name: the parameter's name in `model.named_parameters()`, e.g. "blocks.3.attn.qkv.weight".
        num_layers: L, the number of transformer blocks.

    Returns:
        0 for cls_token / mask_token / pos_embed / patch_embed.*, i + 1 for blocks.i.*, L + 1 for everything
        else (a shared rel_pos_bias table, final norms, fc_norm, heads).
    """
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    m = _BLOCK.match(name)
    if m is not None:
        return int(m.group(1)) + 1
    return num_layers + 1  # rel_pos_bias.* lands here too, as unilm's separate branch returns the same value


def _no_decay_names(model: torch.nn.Module, num_layers: int, no_decay_rel_pos_bias: bool) -> set:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if no_decay_rel_pos_bias:
        # unilm run_class_finetuning.py adds exactly these names; a shared table keeps its decay there too.
        skip.update(f"blocks.{i}.attn.relative_position_bias_table" for i in range(num_layers))
    return skip


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0, *, no_decay_rel_pos_bias: bool = False
) -> List[Dict[str, Any]]:
    """torch parameter groups with weight decay and layer-wise lr scales, as unilm assigns them (module docstring).

    Args:
        model: the unwrapped model (parameter names as in the unilm layout: cls_token, blocks.i.*, ...).
            Frozen parameters (requires_grad False) are left out.
        weight_decay: the decay of the decaying groups (the others get 0.0).
        layer_decay: in (0, 1]; 1 gives the two groups [decay, no_decay] with lr_scale 1.0, anything lower one
            group per (layer, decay or not) in order of first appearance, named "layer_{id}_{decay|no_decay}".
        no_decay_rel_pos_bias: no weight decay on the per-layer relative position tables either.

    Returns:
        a list of dicts with "params", "weight_decay", "lr_scale", "group_name".
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    blocks = getattr(model, "blocks", None)
    if layer_decay != 1.0 and blocks is None:
        raise ValueError(f"layer_decay={layer_decay} needs a model with `blocks` (its layers); "
                         f"{type(model).__name__} has none")
    num_layers = len(blocks) if blocks is not None else 0
    skip = _no_decay_names(model, num_layers, no_decay_rel_pos_bias)

    groups: Dict[str, Dict[str, Any]] = {}
    if layer_decay == 1.0:  # fixed order, even when one is empty: the optimizer-state layout of pretraining runs
        for name, wd in (("decay", weight_decay), ("no_decay", 0.0)):
            groups[name] = {"params": [], "weight_decay": wd, "lr_scale": 1.0, "group_name": name}
    for full_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = full_name[len("backbone."):] if full_name.startswith("backbone.") and blocks is not None else full_name
        decays = not (p.ndim == 1 or name.endswith(".bias") or name in skip)
        kind = "decay" if decays else "no_decay"
        if layer_decay == 1.0:
            key, scale = kind, 1.0
        else:
            lid = layer_id(name, num_layers)
            key, scale = f"layer_{lid}_{kind}", layer_decay ** (num_layers + 1 - lid)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale,
                           "group_name": key}
        groups[key]["params"].append(p)
    return list(groups.values())


def apex_classes() -> Tuple[type, type]:
    """(FusedLayerNorm, FusedAdam) from apex, or ValueError with why not (one line)."""
    try:
        from apex.normalization import FusedLayerNorm
        from apex.optimizers import FusedAdam
    except Exception as exc:
        raise ValueError(
            f"apex=true but apex does not import ({type(exc).__name__}); apex is not on the package index (build it "
            "from github.com/NVIDIA/apex), and torch's fused AdamW, the default, needs nothing"
        ) from None
    return FusedLayerNorm, FusedAdam


def _swap_layer_norms(model: torch.nn.Module, fused_cls: type) -> None:
    """apex FusedLayerNorm in place of every nn.LayerNorm, holding the same Parameter objects (so parameter groups,
    checkpoints and DeepSpeed see the same tensors)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.LayerNorm or (child.weight is None) != (child.bias is None):
                continue  # apex has no weight-without-bias LayerNorm: that one stays torch's
            affine = child.weight is not None
            fused = fused_cls(child.normalized_shape, eps=child.eps, elementwise_affine=affine)
            if affine:
                fused.weight, fused.bias = child.weight, child.bias
            setattr(parent, name, fused)


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float = 1.0,
    no_decay_rel_pos_bias: bool = False,
    apex: bool = False,
) -> torch.optim.Optimizer:
    """AdamW on `parameter_groups(model, weight_decay, layer_decay, no_decay_rel_pos_bias=...)`.

    torch's AdamW, fused when every parameter is on CUDA; `apex=True`: apex FusedAdam in AdamW mode, and every
    nn.LayerNorm of `model` replaced in place by apex FusedLayerNorm with the same Parameters (a side effect on
    `model`). Each group starts at lr x lr_scale; the schedule then sets it every step through `set_lr`.
    """
    groups = parameter_groups(model, weight_decay, layer_decay, no_decay_rel_pos_bias=no_decay_rel_pos_bias)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all have requires_grad False)")
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if apex:
        fused_ln, fused_adam = apex_classes()
        _swap_layer_norms(model, fused_ln)
        return fused_adam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    fused = {"fused": True} if all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = lr x its "lr_scale" (1 for a group without one, e.g. loaded from an older state)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def warmup_cosine(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The lr of 0-based `step`: linear warmup (step + 1) / warmup_steps x base_lr, then a cosine from base_lr to
    min_lr reached at `max_steps` (held after it)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def warmup_poly(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, max_steps: int, power: float = 1.0,
                warmup_ratio: float = 1e-6) -> float:
    """mmcv's `poly` policy with `linear` warmup, by iteration (unilm's segmentation schedule): the regular lr
    (base_lr - min_lr) x (1 - step / max_steps)^power + min_lr, scaled during the first `warmup_steps` by
    1 - (1 - warmup_ratio) x (1 - step / warmup_steps) (from warmup_ratio x the regular lr up to it)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    progress = min(1.0, step / max(1, max_steps))
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup_steps:
        lr *= 1.0 - (1.0 - warmup_ratio) * (1.0 - step / warmup_steps)
    return lr


def scaled_lr(lr: float, batch_size: int, reference_batch: int) -> float:
    """The linear scaling rule: `lr` is quoted for `reference_batch` images per step; returns it for `batch_size`."""
    if batch_size <= 0 or reference_batch <= 0:
        raise ValueError(f"batch_size and reference_batch must be positive, got {batch_size} and {reference_batch}")
    return lr * batch_size / reference_batch
