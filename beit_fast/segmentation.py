"""BEiT for semantic segmentation: the BEiT backbone, its multi-scale adapter, UperNet (or a deconvolution decoder).

The network of unilm `beit/semantic_segmentation` (mmseg 0.11; SPEC sections 1 and 8) and of transformers'
`BeitForSemanticSegmentation`:

    backbone   BEiT blocks (fine-tuning layout: per-layer relative position tables), the outputs of the blocks
               `out_indices` (0-based; default [3, 5, 7, 11] at depth 12) as (B, D, h, w) maps, h = H / patch
    adapter    patch 16: fpn1 = ConvT 2x2 s2 -> BatchNorm -> GELU -> ConvT 2x2 s2 (4x up), fpn2 = ConvT 2x2 s2 (2x up),
               fpn3 = identity, fpn4 = MaxPool 2 (2x down): strides 4, 8, 16, 32. patch 8 (unilm's other branch):
               fpn1 = ConvT (2x up), fpn2 = identity, fpn3 = MaxPool 2, fpn4 = MaxPool 4: the same strides
    upernet    UPerHead: pyramid pooling (scales 1, 2, 3, 6) on the last level + bottleneck, FPN lateral (1x1) and
               fpn (3x3) convs, fused bottleneck (3x3) over the four levels at stride 4, dropout 0.1, 1x1 classifier;
               channels = embed_dim (unilm's base config: 768); every conv is mmseg's ConvModule (conv without bias
               -> BatchNorm -> ReLU). Auxiliary FCNHead on the third level: one 3x3 ConvModule (256 channels),
               dropout 0.1, 1x1 classifier; loss weight 0.4
    deconv     the paper's "few deconvolution layers": the last selected block's map, ConvT 2x2 s2 -> BatchNorm ->
               ReLU until stride 4, dropout, 1x1 classifier

`forward(pixels)` gives logits at 1/4 of the input resolution (as mmseg and transformers); `predict` upsamples them
to the input size ("whole" or mmseg's "slide" windows), `predict_aug` averages softmax over scales and flips
(mmseg's aug_test). BatchNorm becomes SyncBatchNorm under several processes (`convert_sync_batchnorm`).

Parameter names are mmseg's (`backbone.*` in the unilm layout, `backbone.fpn1.*`, `decode_head.*`,
`auxiliary_head.*`), so an mmseg/unilm segmentation checkpoint loads as is; `load_pretrained` also takes a
pretraining or classification checkpoint (backbone only) and transformers' state dicts (its names of < 5 and >= 5).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (
    CheckpointError,
    convert_state_dict,
    export_state_dict,
    fit_problems,
    load_into,
    load_state_dict_file,
    unwrap,
)
from .config import BeitConfig
from .model import BeitModel

__all__ = [
    "BeitForSemanticSegmentation",
    "SegmentationBackbone",
    "UPerHead",
    "FCNHead",
    "DeconvHead",
    "default_out_indices",
    "detect_segmentation_layout",
    "segmentation_backbone_state",
    "segmentation_loss",
    "slide_windows",
    "DECODERS",
]

log = logging.getLogger(__name__)

DECODERS = ("upernet", "deconv")
StateDict = Dict[str, torch.Tensor]


def default_out_indices(depth: int) -> List[int]:
    """The blocks (0-based) whose outputs feed the pyramid: unilm's [3, 5, 7, 11] at depth 12 and [7, 11, 15, 23] at
    24, else the ends of four even quarters of the depth (depth 4: [0, 1, 2, 3])."""
    if depth == 12:
        return [3, 5, 7, 11]
    if depth == 24:
        return [7, 11, 15, 23]
    if depth < 4:
        raise ValueError(f"the segmentation pyramid needs 4 feature maps, a backbone of depth >= 4 (got {depth})")
    return [round(depth * (k + 1) / 4) - 1 for k in range(4)]


class ConvModule(nn.Sequential):
    """mmseg's ConvModule with a norm: Conv2d (no bias) -> BatchNorm2d -> ReLU; named conv / bn as mmseg."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """mmseg's `resize` as its BEiT configs use it: bilinear, align_corners=False (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _ClassifierMixin:
    """Dropout2d then the 1x1 classifier `conv_seg` (mmseg's `cls_seg`)."""

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(_ClassifierMixin, nn.Module):
    """UperNet decode head over four (B, C_i, h_i, w_i) levels (finest first) -> (B, num_classes, h_0, w_0)."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1)) for s in self.pool_scales)
        self.bottleneck = ConvModule(top + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [_resize(ppm(top), top.shape[2:]) for ppm in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the upsampled coarser one
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classify(fused)


class FCNHead(_ClassifierMixin, nn.Module):
    """mmseg's FCNHead (concat_input=False): `num_convs` 3x3 ConvModules on level `in_index`, classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2, num_convs: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs num_convs >= 1, got {num_convs}")
        self.in_index = in_index
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.convs(feats[self.in_index]))


class DeconvHead(_ClassifierMixin, nn.Module):
    """The paper's light decoder: ConvTranspose 2x2 s2 -> BatchNorm -> ReLU `num_up` times on the last level, then the
    classifier (stride patch -> 4 with num_up = log2(patch / 4))."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_up: int, dropout: float = 0.1) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        for i in range(num_up):
            layers += [nn.ConvTranspose2d(in_channels if i == 0 else channels, channels, 2, stride=2),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        if not layers:  # patch 4: already at stride 4
            layers = [ConvModule(in_channels, channels, 1)]
        self.deconvs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.deconvs(feats[-1]))


class SegmentationBackbone(BeitModel):
    """The BEiT encoder with unilm's multi-scale adapter (`fpn1`..`fpn4`): `forward(pixels)` -> four maps at strides
    4, 8, 16, 32 (adapter) or the raw (B, D, h, w) maps of the `out_indices` blocks (`adapter=False`)."""

    def __init__(self, config: BeitConfig, out_indices: Sequence[int], adapter: bool = True) -> None:
        super().__init__(config, use_mask_token=False)
        if len(out_indices) != 4:
            raise ValueError(f"out_indices must name 4 blocks (the pyramid's levels), got {list(out_indices)}")
        bad = [i for i in out_indices if not -1 <= i < config.depth]
        if bad:
            raise ValueError(f"out_indices {bad} outside [0, {config.depth}) (0-based blocks; -1: the embeddings)")
        self.out_indices = [int(i) for i in out_indices]
        self.has_adapter = adapter
        D, p = config.embed_dim, config.patch_size
        if adapter:
            if p == 16:
                self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, stride=2), nn.BatchNorm2d(D), nn.GELU(),
                                          nn.ConvTranspose2d(D, D, 2, stride=2))
                self.fpn2 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, stride=2))
                self.fpn3, self.fpn4 = nn.Identity(), nn.MaxPool2d(2, stride=2)
            elif p == 8:
                self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, stride=2))
                self.fpn2 = nn.Identity()
                self.fpn3 = nn.Sequential(nn.MaxPool2d(2, stride=2))
                self.fpn4 = nn.Sequential(nn.MaxPool2d(4, stride=4))
            else:
                raise ValueError(f"the multi-scale adapter is defined for patch 16 or 8 (unilm), got patch {p}")
        self.init_weights(pretraining=False)

    def forward(self, pixel_values: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        maps = self.feature_maps(pixel_values, layers=self.out_indices)
        if not self.has_adapter:
            return maps
        return [op(m) for op, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class BeitForSemanticSegmentation(nn.Module):
    """BEiT + multi-scale adapter + UperNet (or the deconvolution decoder), with an auxiliary FCN head.

    Args:
        config: the backbone (use the fine-tuning layout, `use_rel_pos_bias=True, use_shared_rel_pos_bias=False`,
            as unilm; `img_size` is the crop the model sees, e.g. 512).
        num_classes: classes of the per-pixel classifier.
        decoder: "upernet" (unilm's) or "deconv" (the paper's light decoder).
        out_indices: the 4 blocks (0-based) feeding the pyramid; None: `default_out_indices(depth)`.
        aux_head: an auxiliary FCNHead on the third level (mmseg: loss weight 0.4; not used by `predict`).
        channels: decoder width; None: embed_dim for upernet (unilm's base config: 768), 256 for deconv.
        aux_channels, aux_num_convs, pool_scales, dropout, aux_loss_weight, ignore_index: mmseg's head settings.

    Shapes: pixels (B, 3, H, W) with H = W = config.img_size -> logits (B, num_classes, H / 4, W / 4).
    """

    def __init__(self, config: BeitConfig, num_classes: int, decoder: str = "upernet",
                 out_indices: Optional[Sequence[int]] = None, aux_head: bool = True, channels: Optional[int] = None,
                 aux_channels: int = 256, aux_num_convs: int = 1, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, aux_loss_weight: float = 0.4, ignore_index: int = 255) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.config, self.num_classes, self.decoder = config, num_classes, decoder
        self.aux_loss_weight, self.ignore_index = aux_loss_weight, ignore_index
        out_indices = default_out_indices(config.depth) if out_indices is None else list(out_indices)
        self.backbone = SegmentationBackbone(config, out_indices, adapter=decoder == "upernet")
        D = config.embed_dim
        if decoder == "upernet":
            self.decode_head: nn.Module = UPerHead([D] * 4, channels or D, num_classes, pool_scales, dropout)
        else:
            num_up = int(round(math.log2(config.patch_size / 4)))
            if config.patch_size != 4 * 2**num_up:
                raise ValueError(f"the deconv decoder needs a patch size of 4 x 2^k, got {config.patch_size}")
            self.decode_head = DeconvHead(D, channels or 256, num_classes, num_up, dropout)
        self.auxiliary_head = FCNHead(D, aux_channels, num_classes, 2, aux_num_convs, dropout) if aux_head else None
        self._init_heads()

    # -- init (mmcv: kaiming fan_out on ConvModule convs, BN (1, 0), conv_seg N(0, 0.01)) ----------------------------
    def _init_heads(self) -> None:
        for head in (self.decode_head, self.auxiliary_head):
            if head is None:
                continue
            for m in head.modules():
                if isinstance(m, ConvModule):
                    nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.normal_(head.conv_seg.weight, std=0.01)
            nn.init.zeros_(head.conv_seg.bias)

    # -- what the shared training parts ask of a model ---------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks (layer-wise lr decay counts them)."""
        return self.backbone.blocks

    @property
    def out_indices(self) -> List[int]:
        return self.backbone.out_indices

    @out_indices.setter
    def out_indices(self, value: Sequence[int]) -> None:
        bad = [i for i in value if not -1 <= i < self.config.depth]
        if len(value) != 4 or bad:
            raise ValueError(f"out_indices must be 4 blocks in [-1, {self.config.depth}), got {list(value)}")
        self.backbone.out_indices = [int(i) for i in value]

    def no_weight_decay(self) -> set:
        """The backbone's names (cls_token, pos_embed) without the "backbone." prefix, which
        `beit_fast.train.optim.parameter_groups` reads off (as unilm's segmentation optimizer constructor)."""
        return set(self.backbone.no_weight_decay())

    def convert_sync_batchnorm(self) -> "BeitForSemanticSegmentation":
        """Every BatchNorm -> SyncBatchNorm (statistics over all processes, as unilm's SyncBN); same names."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(self)

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, return_aux: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """pixels (B, 3, S, S) -> logits (B, num_classes, S/4, S/4); with `return_aux`, (logits, aux logits or None)
        (the aux head's logits at its level's resolution, stride 16 for patch 16)."""
        feats = self.backbone(pixel_values)
        logits = self.decode_head(feats)
        if not return_aux:
            return logits
        return logits, self.auxiliary_head(feats) if self.auxiliary_head is not None else None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, aux_logits: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(total, decode-head loss, aux loss or None): `segmentation_loss` with this model's ignore index and aux
        weight."""
        return segmentation_loss(logits, labels, aux_logits, ignore_index=self.ignore_index,
                                 aux_weight=self.aux_loss_weight)

    def _check_size(self, pixel_values: torch.Tensor) -> None:
        S = self.config.img_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[2:]) != (S, S):
            raise ValueError(f"pixels of shape {tuple(pixel_values.shape)}: whole-image inference needs (B, 3, {S}, "
                             f"{S}) (the backbone's resolution); use mode='slide' for other sizes")

    def inference_mode(self, mode: str, pixel_values: torch.Tensor) -> str:
        """`mode` ("whole", "slide" or "auto") resolved for this input: "auto" is whole-image inference when the input
        is the backbone's size, else sliding windows."""
        if mode == "auto":
            S = self.config.img_size
            return "whole" if tuple(pixel_values.shape[2:]) == (S, S) else "slide"
        return mode

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, mode: str = "whole", crop_size: Optional[int] = None,
                stride: Optional[int] = None) -> torch.Tensor:
        """Logits upsampled to the input size (B, num_classes, H, W) (mmseg's inference before softmax).

        mode "whole": the input must be the backbone's size. mode "slide" (mmseg's `slide_inference`): windows of
        `crop_size` (default img_size) every `stride` (default 2/3 of the crop, 341 for 512) over any H, W; a window
        past the image is shifted back inside it, an image smaller than the crop is zero-padded bottom/right; the
        windows' upsampled logits are summed and divided by how many windows saw each pixel. mode "auto": whole when
        the input is the backbone's size, else slide (`inference_mode`)."""
        mode = self.inference_mode(mode, pixel_values)
        if mode == "whole":
            self._check_size(pixel_values)
            return _resize(self(pixel_values), pixel_values.shape[2:])
        if mode != "slide":
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        crop = self.config.img_size if crop_size is None else crop_size
        if crop != self.config.img_size:
            raise ValueError(f"crop_size {crop} != the backbone's img_size {self.config.img_size}")
        stride = (2 * crop) // 3 if stride is None else stride
        if not 0 < stride <= crop:
            raise ValueError(f"stride must be in [1, crop_size={crop}] (a longer stride leaves pixels that no window "
                             f"sees), got {stride}")
        B, _, H, W = pixel_values.shape
        out = pixel_values.new_zeros((B, self.num_classes, H, W), dtype=torch.float32)
        count = pixel_values.new_zeros((1, 1, H, W), dtype=torch.float32)
        for y1, y2, x1, x2 in slide_windows(H, W, crop, stride):
            window = pixel_values[:, :, y1:y2, x1:x2]
            h, w = window.shape[2:]
            if (h, w) != (crop, crop):
                window = F.pad(window, (0, crop - w, 0, crop - h))
            logits = _resize(self(window).float(), (crop, crop))[:, :, :h, :w]
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
        return out / count

    @torch.no_grad()
    def predict_aug(self, pixel_values: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                    mode: str = "slide", crop_size: Optional[int] = None, stride: Optional[int] = None
                    ) -> torch.Tensor:
        """mmseg's aug_test: the mean over `scales` (x flips) of the softmax of `predict` on the image resized by each
        scale (bilinear), each resized back to the input size. Returns probabilities (B, num_classes, H, W)."""
        H, W = pixel_values.shape[2:]
        total, n = None, 0
        for s in scales:
            size = (int(H * s + 0.5), int(W * s + 0.5))
            x = _resize(pixel_values, size)
            for flipped in ((False, True) if flip else (False,)):
                xi = x.flip(3) if flipped else x
                logits = self.predict(xi, mode=mode, crop_size=crop_size, stride=stride)
                logits = logits.flip(3) if flipped else logits
                prob = _resize(logits, (H, W)).softmax(dim=1)
                total = prob if total is None else total + prob
                n += 1
        return total / n

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def load_pretrained(self, source: Union[str, Path, Mapping[str, Any], nn.Module], strict: bool = True
                        ) -> Dict[str, List[str]]:
        """Load weights; returns {"missing": [...], "unexpected": [...]}.

        Accepts (a file, a state dict, a checkpoint dict holding one, or a transformers model object):
          - a pretraining or classification checkpoint of this engine / unilm / timm / transformers: the backbone
            only (a shared relative position table is copied into every block; tables and absolute position
            embeddings are resized for this model's resolution as unilm does); the adapter and heads keep their
            initialisation; MIM / classification heads are left out;
          - a transformers `BeitForSemanticSegmentation` state dict (`beit.*`, `fpn*`, `decode_head.*`,
            `auxiliary_head.*`, names of transformers < 5 and >= 5). transformers picks its features as
            `hidden_states[i - 1]` for i in its `config.out_indices` (block i - 2, 0-based): pass the transformers
            MODEL to have this model's out_indices set to match, or use `from_transformers`;
          - an mmseg / unilm segmentation checkpoint (`backbone.*`, `decode_head.*`, `auxiliary_head.*`).
        With `strict`, missing or unexpected keys (beyond the backbone-only case's adapter and heads) and shape
        mismatches raise `CheckpointError` listing them."""
        if isinstance(source, nn.Module):
            hf_indices = getattr(getattr(source, "config", None), "out_indices", None)
            state = source.state_dict()
            if hf_indices is not None and detect_segmentation_layout(state) == "hf":  # a segmentation model's only
                self.out_indices = [int(i) - 2 for i in hf_indices]
                log.info("transformers out_indices %s -> blocks %s", list(hf_indices), self.out_indices)
            source = state
        obj = load_state_dict_file(source) if isinstance(source, (str, Path)) else source
        sd = unwrap(obj)
        kind = detect_segmentation_layout(sd)
        before = {k: v.clone() for k, v in self.state_dict().items()}
        try:
            if kind == "backbone":
                return self._load_backbone(sd, strict)
            return self._load_full(_from_hf(sd) if kind == "hf" else _from_mmseg(sd), strict)
        except CheckpointError:  # a refused checkpoint leaves the model as it was (the backbone loads first)
            self.load_state_dict(before)
            raise

    def _load_backbone(self, sd: StateDict, strict: bool) -> Dict[str, List[str]]:
        sd = convert_state_dict(sd)
        dropped = sorted(k for k in sd if k.startswith(_NOT_BACKBONE))
        sd = {k: v for k, v in sd.items() if not k.startswith(_NOT_BACKBONE)}
        if dropped:
            log.info("load_pretrained: left out the checkpoint's heads %s", dropped)
        result = load_into(self.backbone, sd, strict=False, quiet=True)
        unexplained = [k for k in result["missing"] if not re.match(r"fpn\d\.", k)]
        if strict and (unexplained or result["unexpected"]):
            raise CheckpointError(f"backbone checkpoint does not fit: missing {unexplained}, unexpected "
                                  f"{result['unexpected']}")
        return {"missing": [f"backbone.{k}" for k in result["missing"]] + self._head_keys(),
                "unexpected": result["unexpected"]}

    def _head_keys(self) -> List[str]:
        return sorted(k for k in self.state_dict() if not k.startswith("backbone."))

    def _load_full(self, sd: StateDict, strict: bool) -> Dict[str, List[str]]:
        backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        heads = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
        fpn = {k: v for k, v in backbone.items() if re.match(r"fpn\d\.", k)}
        core = {k: v for k, v in backbone.items() if k not in fpn}
        result = load_into(self.backbone, core, strict=False, quiet=True)  # converts, adapts (tables), loads
        missing = [k for k in result["missing"] if not re.match(r"fpn\d\.", k)]
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") or
               re.match(r"backbone\.fpn\d\.", k)}
        rest = {**{f"backbone.{k}": v for k, v in fpn.items()}, **heads}
        missing += sorted(set(own) - set(rest))
        unexpected = result["unexpected"] + sorted(set(rest) - set(own))
        problems = fit_problems(rest, own, missing, unexpected, strict)
        if problems:
            raise CheckpointError("segmentation checkpoint does not fit the model: " + "; ".join(problems))
        self.load_state_dict({k: v for k, v in rest.items() if k in own}, strict=False)
        return {"missing": missing, "unexpected": unexpected}

    def export_state_dict(self, target: str = "mmseg") -> StateDict:
        """This model's weights in the mmseg / unilm segmentation layout (`backbone.*` with the
        relative_position_index buffers unilm saves, `decode_head.*`, `auxiliary_head.*`)."""
        if target != "mmseg":
            raise ValueError(f"export target must be 'mmseg', got {target!r}")
        sd = self.state_dict()
        backbone = export_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
        return {**{f"backbone.{k}": v for k, v in backbone.items()},
                **{k: v for k, v in sd.items() if not k.startswith("backbone.")}}

    @classmethod
    def from_transformers(cls, hf_model: nn.Module, **overrides: Any) -> "BeitForSemanticSegmentation":
        """This model built from a transformers `BeitForSemanticSegmentation` (its config: width, depth, heads,
        resolution, eps, layer scale, position layout, head settings, out_indices) with its weights loaded."""
        c = hf_model.config
        if getattr(c, "auxiliary_concat_input", False):
            raise ValueError("transformers auxiliary_concat_input=True is not supported (mmseg's BEiT configs use "
                             "concat_input=False)")
        if getattr(c, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {c.hidden_act!r}: BEiT uses gelu")
        init = c.layer_scale_init_value if c.layer_scale_init_value and c.layer_scale_init_value > 0 else None
        config = BeitConfig(
            img_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels, embed_dim=c.hidden_size,
            depth=c.num_hidden_layers, num_heads=c.num_attention_heads, mlp_ratio=c.intermediate_size / c.hidden_size,
            init_values=init, use_abs_pos_emb=c.use_absolute_position_embeddings,
            use_rel_pos_bias=c.use_relative_position_bias, use_shared_rel_pos_bias=c.use_shared_relative_position_bias,
            layer_norm_eps=c.layer_norm_eps, drop_path_rate=c.drop_path_rate, **overrides.pop("config", {}))
        model = cls(config, c.num_labels, out_indices=[int(i) - 2 for i in c.out_indices],
                    aux_head=bool(c.use_auxiliary_head), aux_channels=c.auxiliary_channels,
                    aux_num_convs=c.auxiliary_num_convs, pool_scales=tuple(c.pool_scales),
                    aux_loss_weight=c.auxiliary_loss_weight, ignore_index=c.semantic_loss_ignore_index, **overrides)
        model.load_pretrained(hf_model.state_dict())
        return model


# heads a segmentation backbone leaves out
_NOT_BACKBONE = ("mask_token", "lm_head.", "pixel_head.", "norm.", "fc_norm.", "head.")


def detect_segmentation_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'mmseg' (backbone.* names), 'hf' (transformers' beit.* with fpn / decode_head), or 'backbone' (any
    pretraining / classification checkpoint: no segmentation head)."""
    keys = list(sd)
    if any(k.startswith("backbone.") for k in keys):
        return "mmseg"
    if any(k.startswith("beit.") for k in keys) and any(k.startswith(("decode_head.", "fpn")) for k in keys):
        return "hf"
    return "backbone"


def segmentation_backbone_state(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The backbone's weights (no adapter), in this project's layout, of an mmseg or transformers segmentation
    state dict (e.g. to read its network's shape off with `beit_fast.train.classify.infer_model_config`)."""
    full = _from_hf(sd) if detect_segmentation_layout(sd) == "hf" else dict(sd)
    backbone = {k[len("backbone."):]: v for k, v in full.items()
                if k.startswith("backbone.") and not re.match(r"backbone\.fpn\d\.", k)}
    return convert_state_dict(backbone)


def _from_mmseg(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return dict(sd)  # our names are mmseg's; load_into drops and checks the index buffers of the backbone


# transformers' head names -> mmseg's (both generations: < 5 `conv`/`bn`, `fpn1.0`; >= 5 `convolution`/`normalization`,
# `fpn.fpn1.conv_transpose1`, `psp_modules.blocks.i.conv`, `psp_bottleneck`)
_HF_HEAD_RULES = [
    (r"^fpn\.fpn1\.conv_transpose1\.", "backbone.fpn1.0."),
    (r"^fpn\.fpn1\.normalization\.", "backbone.fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "backbone.fpn1.3."),
    (r"^fpn\.fpn2\.(weight|bias)$", r"backbone.fpn2.0.\1"),
    (r"^(fpn\d\.)", r"backbone.\1"),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.", r"decode_head.psp_modules.\1.1."),
    (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
    (r"\.classifier\.", ".conv_seg."),
]


def _from_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    backbone = {k: v for k, v in sd.items() if k.startswith("beit.")}
    dropped = sorted(k for k in backbone if k.startswith(("beit.layernorm.", "beit.pooler.")))
    if dropped:  # a final LayerNorm / pooler after the blocks: segmentation reads the blocks' outputs before them
        log.info("load_pretrained: left out transformers' %s (not on the segmentation path)", dropped)
    converted = convert_state_dict({k: v for k, v in backbone.items() if k not in dropped}, source="hf")
    out = {f"backbone.{k}": v for k, v in converted.items()}
    for k, v in sd.items():
        if k.startswith("beit."):
            continue
        for pattern, repl in _HF_HEAD_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, aux_logits: Optional[torch.Tensor] = None, *,
                      ignore_index: int = 255, aux_weight: float = 0.4
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-pixel cross-entropy of the decode head (+ aux_weight x the auxiliary head's), each head's logits upsampled
    bilinearly to the labels' (H, W) first (as mmseg's `losses`), in fp32, mean over labelled pixels (pixels equal to
    `ignore_index` do not count: transformers' loss and mmseg's later `avg_non_ignore=True`; mmseg 0.11, which unilm
    ran, divided by all pixels, a constant factor per batch). Returns (total, decode loss, aux loss or None)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W) class ids, got shape {tuple(labels.shape)}")
    size = labels.shape[1:]
    labels = labels.long()
    main = F.cross_entropy(_resize(logits.float(), size), labels, ignore_index=ignore_index)
    if aux_logits is None:
        return main, main, None
    aux = F.cross_entropy(_resize(aux_logits.float(), size), labels, ignore_index=ignore_index)
    return main + aux_weight * aux, main, aux


def slide_windows(height: int, width: int, crop: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """mmseg's sliding-window grid: (y1, y2, x1, x2) boxes of at most crop x crop every `stride`, the last ones shifted
    back to end at the image border (boxes may overlap); one box when the image fits the crop."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes
