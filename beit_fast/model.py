"""BEiT (Bao et al. 2021) in one file: backbone, masked-image-modeling head, classification head.

Exactly the network of SPEC section 1 (microsoft/unilm `beit/`). Parameter names are the
unilm layout, so a unilm checkpoint loads as is and timm / transformers checkpoints go
through `beit_fast.checkpoint.convert_state_dict`.

Shapes: B images, N = (img_size / patch_size)^2 patches, D = embed_dim, H heads,
Dh = D / H, M masked patches in the batch, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (
    AttentionCase,
    RelativePositionBias,
    RelPosBias,
    attention_probs,
    attention_qkv,
    relative_position_index,
    select_backend,
)
from .config import BeitConfig

__all__ = [
    "BeitModel",
    "BeitForMaskedImageModeling",
    "BeitForImageClassification",
    "MaskedImageModelingOutput",
    "relative_position_index",
]


class PatchEmbed(nn.Module):
    """Conv2d(in_chans, D, k=p, s=p) -> (B, N, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero the residual branch of whole images, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Attention(nn.Module):
    """qkv Linear without bias plus learned q_bias / v_bias (k has none), relative position bias."""

    def __init__(self, config: BeitConfig, grid: Optional[Tuple[int, int]]) -> None:
        super().__init__()
        dim, self.num_heads = config.embed_dim, config.num_heads
        self.scale = config.head_dim**-0.5
        self.backend = config.attn_backend
        self.attn_drop = config.attn_drop_rate
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if config.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias, self.v_bias = None, None
        if grid is not None:  # per-layer table (fine-tuning layout)
            num_rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rows, self.num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rel_pos: Optional[RelPosBias], backend: str) -> torch.Tensor:
        """x (B, N, D); rel_pos: the shared bias (or None); backend: a resolved attention backend name."""
        qkv, rel_pos = self._qkv(x, rel_pos, backend)
        x = attention_qkv(qkv, self.num_heads, rel_pos, self.scale, backend, self.attn_drop, self.training)
        return self.proj(x)

    def probs(self, x: torch.Tensor, rel_pos: Optional[RelPosBias]) -> torch.Tensor:
        """The attention matrix of x (B, N, D): (B, H, N, N), each row a distribution over the N keys."""
        qkv, rel_pos = self._qkv(x, rel_pos, "math")
        return attention_probs(qkv, self.num_heads, rel_pos, self.scale)

    def _qkv(self, x: torch.Tensor, rel_pos: Optional[RelPosBias], backend: str):
        """The packed projection (B, N, 3D) and this layer's bias in the form `backend` reads."""
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (B, N, 3D), stays packed: the backends split views
        if self.relative_position_bias_table is not None:  # this layer's own table (plus the shared one)
            table = self.relative_position_bias_table
            if rel_pos is not None:
                table = rel_pos.table + table  # same index: summing the tables sums the biases
            rel_pos = RelPosBias(table, self.relative_position_index).for_backend(backend)
        return qkv, rel_pos


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x += drop_path(gamma_1 * attn(norm1(x))); x += drop_path(gamma_2 * mlp(norm2(x)))."""

    def __init__(self, config: BeitConfig, drop_path_rate: float, grid: Optional[Tuple[int, int]]) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(config, grid)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, config.mlp_hidden_dim)
        if config.init_values:
            self.gamma_1 = nn.Parameter(config.init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(config.init_values * torch.ones(dim))
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x: torch.Tensor, rel_pos: Optional[RelPosBias], backend: str) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos, backend))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos, backend))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class BeitModel(nn.Module):
    """The BEiT backbone: patch embedding, optional mask token, relative position bias, blocks.

    `forward` returns the last block's output (B, N+1, D), cls first, before any final norm
    (the heads own theirs). With `return_layers`, it also returns the outputs of those blocks
    (0-based; -1 is the embedding output, the input of block 0, which transformers' segmentation model can
    select), e.g. (3, 5, 7, 11) for the segmentation pyramid; `feature_maps` reshapes them into (B, D, h, w).
    """

    def __init__(self, config: BeitConfig, use_mask_token: bool = False) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, D)
        grid = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, D)) if config.use_abs_pos_emb else None
        self.rel_pos_bias = RelativePositionBias(grid, config.num_heads) if config.use_shared_rel_pos_bias else None
        dpr = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.depth)]
        self.blocks = nn.ModuleList(
            Block(config, dpr[i], grid if config.use_rel_pos_bias else None) for i in range(config.depth)
        )
        if type(self) is BeitModel:  # the heads call it themselves, after adding their layers
            self.init_weights(pretraining=False)

    # -- init (SPEC section 1) ---------------------------------------------------------------------------------
    def init_weights(self, pretraining: bool = True) -> None:
        """The reference initialisation. Pretraining (unilm `modeling_pretrain.py`): its `trunc_normal_`
        wraps timm's with a=-std, b=std, so every draw is cut at ONE standard deviation (effective std
        ~0.54 * init_std), the patch conv included. Fine-tuning (`modeling_finetune.py`): timm's
        `trunc_normal_` as is (cut at +-2, i.e. a plain N(0, init_std)), the patch conv left at
        PyTorch's default. Then proj / fc2 of layer l are divided by sqrt(2 l)."""
        std = self.config.init_std
        lo, hi = (-std, std) if pretraining else (-2.0, 2.0)

        def trunc(t: torch.Tensor) -> None:
            nn.init.trunc_normal_(t, std=std, a=lo, b=hi)

        for m in self.modules():
            if isinstance(m, nn.Linear) or (pretraining and isinstance(m, nn.Conv2d)):
                trunc(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc(p)
        with torch.no_grad():
            for layer_id, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay besides 1-D params and biases: the reference's set
        (unilm decays the mask token and the relative position bias table, which are not 1-D)."""
        return {"cls_token", "pos_embed"}

    # -- input checks ------------------------------------------------------------------------------------------
    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        c = self.config
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (B, {c.in_chans}, H, W) tensor, got {shape}")
        expected = (c.in_chans, c.img_size, c.img_size)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected (B, {c.in_chans}, {c.img_size}, "
                f"{c.img_size}); for another resolution build a config with that img_size and resize the "
                "relative position bias (beit_fast.checkpoint.resize_rel_pos_bias)"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")

    def check_mask(self, bool_masked_pos: torch.Tensor, batch: int) -> torch.Tensor:
        """Validates and flattens a (B, N) or (B, h, w) bool mask to (B, N)."""
        if not torch.is_tensor(bool_masked_pos):
            raise ValueError(f"bool_masked_pos must be a torch.bool tensor, got {type(bool_masked_pos).__name__}")
        if bool_masked_pos.dtype != torch.bool:
            raise ValueError(f"bool_masked_pos must have dtype torch.bool, got {bool_masked_pos.dtype}")
        gh, gw = self.patch_embed.grid_size
        shape = tuple(bool_masked_pos.shape)
        if shape not in ((batch, gh * gw), (batch, gh, gw)):
            raise ValueError(
                f"bool_masked_pos has shape {shape}, expected ({batch}, {gh * gw}) or ({batch}, {gh}, {gw})"
            )
        return bool_masked_pos.reshape(batch, gh * gw)

    # -- forward -----------------------------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch embedding, mask-token replacement, cls prepend, absolute position: (B, N+1, D)."""
        x = self.patch_embed(pixel_values)
        B, N, D = x.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos given, but this model has no mask token")
            w = bool_masked_pos.unsqueeze(-1).type_as(x)
            x = x * (1 - w) + self.mask_token.expand(B, N, -1) * w
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: Optional[torch.Tensor] = None,
        return_layers: Optional[Sequence[int]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        self.check_pixels(pixel_values)
        if bool_masked_pos is not None:
            bool_masked_pos = self.check_mask(bool_masked_pos, pixel_values.shape[0])
        if return_layers is not None:
            bad = [i for i in return_layers if not -1 <= i < len(self.blocks)]
            if bad:
                raise ValueError(f"return_layers {bad} out of range for depth {len(self.blocks)} "
                                 "(-1: the embedding output)")
        x = self.embed(pixel_values, bool_masked_pos)
        return self.run_blocks(x, return_layers)

    def run_blocks(
        self, x: torch.Tensor, return_layers: Optional[Sequence[int]] = None
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The Transformer blocks on embedded tokens (B, N+1, D), with the shared bias computed once."""
        backend = self.attention_backend(x)
        rel_pos = None
        if self.rel_pos_bias is not None:
            rpb = self.rel_pos_bias
            # built once here, shared by every layer (the table's gradient: one scatter per step)
            rel_pos = RelPosBias(rpb.relative_position_bias_table, rpb.relative_position_index).for_backend(backend)
        wanted = set(return_layers or ())
        layers = [x] if -1 in wanted else []
        for i, blk in enumerate(self.blocks):
            x = blk(x, rel_pos, backend)
            if i in wanted:
                layers.append(x)
        if return_layers is not None:
            order = {i: j for j, i in enumerate(sorted(wanted))}
            return x, [layers[order[i]] for i in return_layers]
        return x

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: Optional[torch.Tensor] = None,
        return_layers: Optional[Sequence[int]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        return self.forward_features(pixel_values, bool_masked_pos, return_layers)

    @torch.no_grad()
    def attention_maps(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """The self-attention matrix of block `layer` (0-based; -1: the last) on these images: (B, H, N+1, N+1),
        token 0 the cls token, row i the distribution of query i over the keys (the math backend's, exact)."""
        depth = len(self.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} out of range for depth {depth}")
        layer %= depth
        self.check_pixels(pixel_values)
        x = self.embed(pixel_values)
        rel_pos = None
        if self.rel_pos_bias is not None:
            rpb = self.rel_pos_bias
            rel_pos = RelPosBias(rpb.relative_position_bias_table, rpb.relative_position_index).for_backend("math")
        for blk in self.blocks[:layer]:
            x = blk(x, rel_pos, "math")
        blk = self.blocks[layer]
        return blk.attn.probs(blk.norm1(x), rel_pos)

    def attention_backend(self, x: torch.Tensor) -> str:
        """The attention backend this forward uses (config.attn_backend resolved for x's device and dtype)."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        tables = [blk.attn.relative_position_bias_table for blk in self.blocks]
        if self.rel_pos_bias is not None:
            tables.append(self.rel_pos_bias.relative_position_bias_table)
        case = AttentionCase(
            device_type=dev, dtype=dtype, head_dim=self.config.head_dim,
            bias_requires_grad=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tables),
            dropout_p=self.config.attn_drop_rate if self.training else 0.0,
        )
        return select_backend(self.config.attn_backend, case)

    def feature_maps(self, pixel_values: torch.Tensor, layers: Sequence[int] = (3, 5, 7, 11)) -> List[torch.Tensor]:
        """Outputs of `layers` (0-based) as (B, D, h, w) maps, cls dropped (segmentation backbone)."""
        _, feats = self.forward_features(pixel_values, return_layers=layers)
        h, w = self.patch_embed.grid_size
        return [f[:, 1:].transpose(1, 2).reshape(f.shape[0], -1, h, w) for f in feats]

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_pretrained(
        self, path_or_state_dict: Union[str, Path, Dict[str, Any]], source: str = "auto", strict: bool = True
    ) -> Dict[str, List[str]]:
        """Load a unilm / timm / transformers checkpoint (file or state dict) into this model.

        The state dict is converted to this layout (`beit_fast.checkpoint.convert_state_dict`),
        adapted (shared <-> per-layer relative position bias, table resize for another
        resolution) and loaded. With `strict`, missing or unexpected keys and shape mismatches
        raise `CheckpointError` listing them all; otherwise they are returned.
        """
        from .checkpoint import load_into

        return load_into(self, path_or_state_dict, source=source, strict=strict)

    def export_state_dict(self, target: str = "unilm") -> Dict[str, torch.Tensor]:
        """This model's weights in another layout (`unilm`)."""
        from .checkpoint import export_state_dict

        return export_state_dict(self.state_dict(), target=target, config=self.config)


@dataclass
class MaskedImageModelingOutput:
    """`loss`: mean CE over all masked rows (None without targets); `accuracy`: mlm_acc, a 0-d
    tensor (no gradient); `num_masked`: M; `logits`: (M, V) masked-row logits, only when asked."""

    loss: Optional[torch.Tensor]
    accuracy: Optional[torch.Tensor]
    num_masked: int
    logits: Optional[torch.Tensor] = None


class BeitForMaskedImageModeling(BeitModel):
    """BEiT pretraining: predict the visual token of every masked patch."""

    def __init__(self, config: BeitConfig) -> None:
        super().__init__(config, use_mask_token=True)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        if config.mim_target == "pixels":  # the ablation's regression head: a patch's P*P*C pixels
            self.pixel_head = nn.Linear(config.embed_dim, config.patch_size**2 * config.in_chans)
        else:
            self.lm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.init_weights()

    @property
    def mim_head(self) -> nn.Linear:
        """The MIM head: `lm_head` (visual tokens) or `pixel_head` (pixel regression)."""
        return self.pixel_head if self.config.mim_target == "pixels" else self.lm_head

    def pixel_targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, P*P*C) float32 regression targets: each patch's pixels in (row, column, channel) order, normalised by
        the patch's own mean and (unbiased) variance + 1e-6 with `pixel_norm` (MAE's norm_pix_loss), else as given."""
        P, C = self.config.patch_size, self.config.in_chans
        B, _, H, W = pixel_values.shape
        t = pixel_values.float().reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 3, 5, 1)
        t = t.reshape(B, (H // P) * (W // P), P * P * C)
        if self.config.pixel_norm:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def _scored(self, mask: torch.Tensor) -> torch.Tensor:
        """The rows the loss scores: the masked patches, or every patch (mim_loss_on="all")."""
        return mask if self.config.mim_loss_on == "masked" else torch.ones_like(mask)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        visual_tokens: Optional[torch.Tensor] = None,
        return_logits: bool = False,
        num_masked_per_image: Optional[int] = None,
    ) -> MaskedImageModelingOutput:
        """pixel_values (B, C, H, W); bool_masked_pos (B, N) or (B, h, w) bool; visual_tokens (B, N) int token
        ids of the full grid (the tokenizer's output) or None (then no loss).

        `num_masked_per_image=K` promises exactly K masked patches in every image (BlockwiseMaskGenerator
        guarantees it): the fused path then runs without any host synchronisation and checks the promise
        (and the token range) on the device, reported by the next forward or `beit_fast.kernels.check_deferred`.
        """
        if bool_masked_pos is None:
            raise ValueError("BeitForMaskedImageModeling needs bool_masked_pos")
        self.check_pixels(pixel_values)
        B = pixel_values.shape[0]
        mask = self.check_mask(bool_masked_pos, B)
        K = self._fused_count(mask, num_masked_per_image, pixel_values.device)
        if K is not None:
            return self._forward_fused(pixel_values, mask, visual_tokens, return_logits, K)

        scored = self._scored(mask)
        pixels = self.config.mim_target == "pixels"
        if pixels:
            targets = self.pixel_targets(pixel_values)[scored]
        else:
            targets = self._masked_targets(visual_tokens, scored) if visual_tokens is not None else None
        x = self.run_blocks(self.embed(pixel_values, mask))  # inputs already checked above
        h = self.norm(x[:, 1:][scored])  # (M, D): the head runs on the scored rows only
        logits = self.mim_head(h)
        loss = accuracy = None
        if pixels:
            loss = F.mse_loss(logits.float(), targets)
        elif targets is not None:
            loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
            with torch.no_grad():
                accuracy = (logits.argmax(-1) == targets).float().mean()
        return MaskedImageModelingOutput(
            loss=loss, accuracy=accuracy, num_masked=int(h.shape[0]), logits=logits if return_logits else None
        )

    def _fused_count(self, mask: torch.Tensor, promised: Optional[int], device: torch.device) -> Optional[int]:
        """Masked patches per image when the fused path runs, else None (reference path).

        The fused kernels need the same count in every image (static shapes). Without a promise the
        counts are read once (a host sync); unequal counts raise with fused_kernels=True and fall back
        to the reference with "auto"."""
        switch = self.config.fused_kernels
        if switch is False:
            return None
        if promised is None:
            counts = mask.sum(1)
            if bool((counts != counts[0]).any()):
                if switch is True:
                    raise ValueError(
                        "fused_kernels=True needs the same number of masked patches in every image, got counts "
                        f"{counts.tolist()}; use BlockwiseMaskGenerator (exact counts) or fused_kernels='auto'/False"
                    )
                return None
            promised = int(counts[0])
            if promised == 0:
                return None  # nothing masked: the reference path reports it
        elif not 0 < int(promised) <= mask.shape[1]:
            raise ValueError(f"num_masked_per_image={promised} outside [1, {mask.shape[1]}]")
        from beit_fast.kernels import use_fused

        return int(promised) if use_fused(switch, device, "fused MIM kernels") else None

    def _forward_fused(
        self, pixel_values: torch.Tensor, mask: torch.Tensor, visual_tokens: Optional[torch.Tensor],
        return_logits: bool, K: int,
    ) -> MaskedImageModelingOutput:
        """Same math as the reference path through the Triton kernels (beit_fast.kernels)."""
        from beit_fast.kernels import check_deferred
        from beit_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
        from beit_fast.kernels.gather_layer_norm import GatherMaskedLayerNormFunction, masked_row_index
        from beit_fast.kernels.masked_embed import masked_embed

        check_deferred()  # flags of the previous step (one sync, only when some are pending)
        B, N = mask.shape
        D = self.config.embed_dim
        x = masked_embed(
            self.patch_embed(pixel_values), mask, self.mask_token.view(D), self.cls_token.view(D),
            self.pos_embed.view(N + 1, D) if self.pos_embed is not None else None,
        )
        x = self.run_blocks(x)
        if self.config.mim_loss_on == "masked":
            rows = masked_row_index(mask, K)  # (B*K,) rows of x viewed as (B*(N+1), D), row-major mask order
        else:  # every patch row (the cls row of each image left out)
            rows = (torch.arange(B, device=x.device)[:, None] * (N + 1) + 1 + torch.arange(N, device=x.device))
            rows = rows.reshape(-1)
        h = GatherMaskedLayerNormFunction.apply(x, rows, self.norm.weight, self.norm.bias, self.norm.eps)
        M = rows.shape[0]
        flat = rows - rows // (N + 1) - 1  # the same positions in the (B*N) patch grid
        loss = accuracy = logits = None
        if self.config.mim_target == "pixels":
            # no fused head: a (M, P*P*C) output is small (768 wide for P=16), so F.linear + MSE in torch cost little
            # next to the 8192-wide token head the fused CE replaces
            logits = self.pixel_head(h)
            targets = self.pixel_targets(pixel_values).reshape(B * N, -1)[flat]
            loss = F.mse_loss(logits.float(), targets)
        elif visual_tokens is not None:
            self._check_token_tensor(visual_tokens, mask)
            targets = visual_tokens.reshape(-1)[flat]
            loss, num_correct = fused_linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, targets)
            accuracy = num_correct.float() / M
        if return_logits and logits is None:
            logits = self.lm_head(h)
        return MaskedImageModelingOutput(loss=loss, accuracy=accuracy, num_masked=M,
                                         logits=logits if return_logits else None)

    def _check_token_tensor(self, visual_tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Host-side checks (no sync): type, dtype, shape of the token grid."""
        if not torch.is_tensor(visual_tokens):
            raise ValueError(f"visual_tokens must be a tensor, got {type(visual_tokens).__name__}")
        if visual_tokens.dtype.is_floating_point or visual_tokens.dtype == torch.bool:
            raise ValueError(f"visual_tokens must be an integer tensor of token ids, got {visual_tokens.dtype}")
        gh, gw = self.patch_embed.grid_size
        B = mask.shape[0]
        if tuple(visual_tokens.shape) not in ((B, gh * gw), (B, gh, gw)):
            raise ValueError(
                f"visual_tokens has shape {tuple(visual_tokens.shape)}, expected the full token grid "
                f"({B}, {gh * gw}) or ({B}, {gh}, {gw}) (the head selects the masked positions itself)"
            )

    def _masked_targets(self, visual_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check_token_tensor(visual_tokens, mask)
        visual_tokens = visual_tokens.reshape(mask.shape)
        # Only the masked positions are targets, so only they are checked.
        targets = visual_tokens[mask].long()
        if targets.numel() == 0:
            raise ValueError("bool_masked_pos masks no patch in this batch: the MIM loss is undefined")
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"visual_tokens out of range: min {lo}, max {hi}, vocab_size {self.config.vocab_size}")
        return targets


class BeitForImageClassification(BeitModel):
    """Fine-tuning head: mean of the patch tokens (no cls) -> LayerNorm (fc_norm) -> Linear."""

    def __init__(self, config: BeitConfig, num_classes: int = 1000, head_init_scale: float = 0.001) -> None:
        super().__init__(config, use_mask_token=False)
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.fc_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.embed_dim, num_classes)
        self.init_weights(pretraining=False)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(pixel_values)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))
