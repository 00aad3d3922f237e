"""The end-to-end peers of `../shared/ANCHORS.md`, built in this process for `bench_e2e.py`.

- `TimmComposedMIM`: what a user composes from timm today. timm's `Beit` (SDPA with the shared relative position
  bias as `attn_mask`, layer scale, no absolute position embedding) plus the unilm MIM parts: the mask-token blend
  `x * (1 - w) + mask_token * w`, the final LayerNorm on every row, `lm_head(x[:, 1:][mask])` and
  `F.cross_entropy` on fp32 logits. Run eager or under `torch.compile`.
- `hf_mim`: transformers' `BeitForMaskedImageModeling` (SDPA attention; its head runs on all 196 rows).
- `dalle_encoder`: the `dall_e` package's Encoder (fp16 convs, the reference tokenizer) when it imports; otherwise
  the same architecture as plain `nn.Conv2d` under fp16 autocast, and the returned label says which one ran.
- `timm_finetune`: timm's registered `beit_base_patch16_224` classifier (per-layer relative position tables, SDPA
  attention with the bias as `attn_mask`) with AdamW on timm's own layer-decay groups, `SoftTargetCrossEntropy`.
- `hf_segment`: transformers' `BeitForSemanticSegmentation` (SDPA attention, its FPN adapter, UperNet and auxiliary
  FCN head, its own loss: CE + 0.4 x aux CE, ignore index 255) with AdamW on unilm's layer-decay groups.

Every MIM peer is a callable step `fn(pixels, mask, tokens)` built on the same shapes as ours, with fused AdamW on
the reference parameter groups, so a step is forward + backward + optimizer, as in the training loop; the
fine-tuning peer's step is `fn(pixels, soft_targets)`, the segmentation peer's `fn(pixels, labels)`.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_fast.config import BeitConfig

__all__ = ["TimmComposedMIM", "timm_composed", "hf_mim", "dalle_encoder", "adamw", "timm_beit_classifier",
           "timm_finetune", "hf_out_indices", "hf_beit_segmenter", "hf_layer_decay_groups", "hf_segment"]


class TimmComposedMIM(nn.Module):
    """timm `Beit` blocks + unilm's MIM head, written the way unilm's `modeling_pretrain.py` does it."""

    def __init__(self, c: BeitConfig) -> None:
        super().__init__()
        from timm.models.beit import Beit

        self.beit = Beit(
            img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
            mlp_ratio=c.mlp_ratio, qkv_bias=True, init_values=c.init_values, use_abs_pos_emb=False,
            use_rel_pos_bias=False, use_shared_rel_pos_bias=True, drop_path_rate=c.drop_path_rate, num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=c.layer_norm_eps),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.embed_dim, c.vocab_size)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        b = self.beit
        x = b.patch_embed(pixels)
        B, N, _ = x.shape
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(B, N, -1) * w
        x = torch.cat((b.cls_token.expand(B, -1, -1), x), dim=1)
        rel_pos_bias = b.rel_pos_bias()
        for blk in b.blocks:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        x = self.norm(x)
        logits = self.lm_head(x[:, 1:][mask])
        targets = tokens[mask]
        loss = F.cross_entropy(logits.float(), targets)
        return loss, (logits.argmax(-1) == targets).float().mean()


def adamw(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """Fused AdamW (CUDA) on the reference groups (no decay on 1-D parameters and biases), as ours gets them."""
    from beit_fast.train.optim import parameter_groups

    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(parameter_groups(model, 0.05), lr=lr, **fused)


def _train_step(loss_fn: Callable, model: nn.Module, bf16: bool, device: str) -> Callable:
    opt = adamw(model)

    def step(pixels, mask, tokens):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(pixels, mask, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def timm_composed(c: BeitConfig, device: str, bf16: bool, compile_backend: str = "") -> Tuple[nn.Module, Callable]:
    """(module, step). `compile_backend`: "" eager, else torch.compile of the forward with that backend."""
    model = TimmComposedMIM(c).to(device).train()
    fwd = torch.compile(model, backend=compile_backend, dynamic=False) if compile_backend else model
    return model, _train_step(fwd, model, bf16, device)


def hf_mim(c: BeitConfig, device: str, bf16: bool) -> Tuple[nn.Module, Callable]:
    import transformers

    cfg = transformers.BeitConfig(
        image_size=c.img_size, patch_size=c.patch_size, hidden_size=c.embed_dim, num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads, intermediate_size=c.mlp_hidden_dim, use_mask_token=True,
        use_shared_relative_position_bias=True, use_relative_position_bias=False,
        layer_scale_init_value=c.init_values or 0.0, layer_norm_eps=c.layer_norm_eps,
        use_absolute_position_embeddings=False, vocab_size=c.vocab_size, drop_path_rate=c.drop_path_rate,
        attn_implementation="sdpa",
    )
    model = transformers.BeitForMaskedImageModeling(cfg).to(device).train()

    def loss_fn(pixels, mask, tokens):
        out = model(pixel_values=pixels, bool_masked_pos=mask, labels=tokens[mask])
        return out.loss, None

    return model, _train_step(loss_fn, model, bf16, device)


def dalle_encoder(n_hid: int, n_blk_per_group: int, vocab_size: int, device: str) -> Tuple[str, Callable]:
    """(label, tokenize(images in [0, 1]) -> (B, grid*grid) ids) with fresh random weights."""
    from beit_fast.tokenizer import DalleEncoder, map_pixels

    try:
        import dall_e

        enc = dall_e.Encoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size,
                             device=torch.device(device), requires_grad=False,
                             use_mixed_precision=device == "cuda")
        label = "dall_e package Encoder (fp16)"

        def tokenize(images):
            with torch.no_grad():
                return enc(map_pixels(images)).argmax(1).flatten(1)

        return label, tokenize
    except Exception as exc:
        why = f"{type(exc).__name__}"
        plain = DalleEncoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size).to(device).eval()

        def tokenize(images):
            with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
                return plain(map_pixels(images)).argmax(1).flatten(1)

        return f"dall_e architecture as nn.Conv2d fp16 (package not importable: {why})", tokenize


def timm_beit_classifier(num_classes: int, drop_path_rate: float = 0.1, **shapes: int) -> nn.Module:
    """timm's registered `beit_base_patch16_224` with random weights (its fused SDPA attention unless TIMM_FUSED_ATTN
    turns it off); `shapes` (img_size, patch_size, embed_dim, depth, num_heads) override its own: the smoke run's
    tiny model."""
    import timm

    return timm.create_model("beit_base_patch16_224", pretrained=False, drop_path_rate=drop_path_rate,
                             num_classes=num_classes, **shapes)


def timm_finetune(num_classes: int, device: str, bf16: bool, lr: float, **shapes: int) -> Tuple[nn.Module, Callable]:
    """(module, step(pixels (B, 3, H, W), soft_targets (B, num_classes))): one fine-tuning step on timm's parts.

    AdamW (fused on CUDA) on `timm.optim.create_optimizer_v2`'s layer-decay groups (decay 0.65, weight decay 0.05),
    each group at lr x its `lr_scale` as timm's scheduler would set it; the forward under bf16 autocast;
    `SoftTargetCrossEntropy` on the fp32 logits (the loss our row computes, the same way); backward; step.
    """
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    model = timm_beit_classifier(num_classes, **shapes).to(device).train()
    fused = {"fused": True} if device == "cuda" else {}
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05, layer_decay=0.65, **fused)
    for g in opt.param_groups:  # timm's scheduler applies lr_scale; without one, the groups would all run at lr
        g["lr"] = lr * g.get("lr_scale", 1.0)
    criterion = SoftTargetCrossEntropy()

    def step(pixels: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixels)
        loss = criterion(logits.float(), soft_targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def hf_out_indices(blocks: Sequence[int], depth: int) -> List[int]:
    """transformers' `out_indices` for `BeitForSemanticSegmentation` that feed its pyramid from our 0-based `blocks`,
    as far as its config allows.

    It reads `hidden_states[i - 1]` for each i (index 0: the embeddings, so block i - 2) and accepts only
    0 <= i <= depth in increasing order (its backbone stage names), so the last block (depth - 1, i = depth + 1) is
    out of its reach: that entry becomes i = depth, block depth - 2 (ours [3, 5, 7, 11] at depth 12 -> [5, 7, 9, 12],
    blocks 3, 5, 7, 10). Raises ValueError when the result repeats a block or leaves [1, depth].
    """
    hf = [min(int(b) + 2, depth) for b in blocks]
    if len(set(hf)) != len(hf) or hf != sorted(hf) or not all(1 <= i <= depth for i in hf):
        raise ValueError(f"blocks {list(blocks)} at depth {depth} have no transformers out_indices (got {hf}: "
                         f"it needs 4 increasing values in [1, {depth}])")
    return hf


def hf_beit_segmenter(c: BeitConfig, num_classes: int, out_indices: Sequence[int]) -> nn.Module:
    """transformers' `BeitForSemanticSegmentation` with random weights in `c`'s shapes (width, depth, heads, patch,
    resolution, per-layer relative position tables, layer scale, eps, drop path), SDPA attention, UperNet at
    `hidden_size` channels (its fixed choice, = unilm's base config) with pool scales 1, 2, 3, 6, the auxiliary FCN
    head (256 channels, one conv, loss weight 0.4), ignore index 255. `out_indices`: transformers' (`hf_out_indices`).
    """
    import transformers

    if c.use_shared_rel_pos_bias or not c.use_rel_pos_bias:
        raise ValueError("the segmentation peer is built in the fine-tuning layout (use_rel_pos_bias=True, "
                         f"use_shared_rel_pos_bias=False), got {c.use_rel_pos_bias=}, {c.use_shared_rel_pos_bias=}")
    cfg = transformers.BeitConfig(
        image_size=c.img_size, patch_size=c.patch_size, num_channels=c.in_chans, hidden_size=c.embed_dim,
        num_hidden_layers=c.depth, num_attention_heads=c.num_heads, intermediate_size=c.mlp_hidden_dim,
        use_relative_position_bias=True, use_shared_relative_position_bias=False,
        use_absolute_position_embeddings=c.use_abs_pos_emb, layer_scale_init_value=c.init_values or 0.0,
        layer_norm_eps=c.layer_norm_eps, drop_path_rate=c.drop_path_rate, out_indices=list(out_indices),
        num_labels=num_classes, pool_scales=[1, 2, 3, 6], use_auxiliary_head=True, auxiliary_channels=256,
        auxiliary_num_convs=1, auxiliary_concat_input=False, auxiliary_loss_weight=0.4, semantic_loss_ignore_index=255,
        attn_implementation="sdpa",
    )
    return transformers.BeitForSemanticSegmentation(cfg)


# transformers' blocks: `beit.encoder.layer.i.` (< 5) and `beit.layers.i.` (>= 5)
_HF_LAYER = re.compile(r"beit\.(?:encoder\.layer|layers)\.(\d+)\.")


def hf_layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> List[Dict[str, Any]]:
    """unilm's layer-decay assignment (as `beit_fast.train.optim.parameter_groups`) on a transformers BEiT's names:
    embeddings layer 0, block i layer i + 1, everything else (adapter, heads) L + 1; lr x layer_decay^(L + 1 -
    layer); no weight decay on 1-D parameters, biases and the cls token. One group per (layer, decay or not)."""
    depth = model.config.num_hidden_layers
    groups: Dict[str, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        m = _HF_LAYER.match(name)
        lid = 0 if name.startswith("beit.embeddings.") else int(m.group(1)) + 1 if m else depth + 1
        decays = not (p.ndim == 1 or name.endswith((".bias", "cls_token", "position_embeddings")))
        key = f"layer_{lid}_{'decay' if decays else 'no_decay'}"
        if key not in groups:
            scale = layer_decay ** (depth + 1 - lid)
            groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def hf_segment(c: BeitConfig, num_classes: int, out_indices: Sequence[int], device: str, bf16: bool, lr: float
               ) -> Tuple[nn.Module, Callable]:
    """(module, step(pixels (B, 3, S, S), labels (B, S, S) int64)): one training step of transformers'
    `BeitForSemanticSegmentation` (`hf_beit_segmenter`) as its users write it: the forward with `labels` under bf16
    autocast (its own loss: logits upsampled to the labels, CE + 0.4 x the auxiliary head's, ignore index 255),
    backward, torch AdamW (fused on CUDA) on `hf_layer_decay_groups` (layer decay 0.65, weight decay 0.05)."""
    model = hf_beit_segmenter(c, num_classes, out_indices).to(device).train()
    fused = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.AdamW(hf_layer_decay_groups(model, lr, 0.05, 0.65), lr=lr, **fused)

    def step(pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step
