"""`BeitConfig`: the network's hyper-parameters, with presets and checked overrides.

Field names follow timm's `Beit` constructor where timm has one, so a timm user can carry
arguments over unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

__all__ = ["BeitConfig", "PRESETS", "ATTN_BACKENDS", "parse_options", "first_line", "one_line"]

ATTN_BACKENDS = ("auto", "triton", "xformers", "sdpa", "math")
MIM_TARGETS = ("tokens", "pixels")
MIM_LOSS_ON = ("masked", "all")

FusedSwitch = Union[str, bool]


@dataclass
class BeitConfig:
    img_size: int = 224  # input resolution (square)
    patch_size: int = 16  # patch side; the grid is img_size // patch_size per side
    in_chans: int = 3  # image channels
    embed_dim: int = 768  # width D
    depth: int = 12  # number of Transformer blocks
    num_heads: int = 12  # attention heads; embed_dim must divide evenly
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * embed_dim
    qkv_bias: bool = True  # learned q_bias and v_bias (k never has a bias in BEiT)
    drop_path_rate: float = 0.1  # stochastic depth; grows linearly over depth to this value
    attn_drop_rate: float = 0.0  # dropout on attention probabilities (0 in every BEiT recipe)
    init_values: Optional[float] = 0.1  # layer-scale init (gamma); None or 0 disables layer scale
    use_abs_pos_emb: bool = False  # absolute position embedding (off in BEiT pretraining)
    use_rel_pos_bias: bool = False  # per-layer relative position bias tables (fine-tuning layout)
    use_shared_rel_pos_bias: bool = True  # ONE table shared by every layer (pretraining layout)
    vocab_size: int = 8192  # visual-token vocabulary of the tokenizer (DALL-E dVAE: 8192)
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon (unilm and timm use 1e-6)
    init_std: float = 0.02  # normal std (cut at +-1 std, as unilm) for Linear, patch conv, cls/mask token, lm head
    num_masking_patches: Optional[int] = None  # masked per image; None: 75 per 196 patches of the grid (75 at 224/16)
    attn_backend: str = "auto"  # one of ATTN_BACKENDS; "auto" picks the fastest that supports the case
    fused_kernels: FusedSwitch = "auto"  # Triton MIM kernels: "auto" | True | False
    mim_target: str = "tokens"  # MIM target: "tokens" (BEiT: the tokenizer's visual tokens, CE) or "pixels" (ablation:
    # the patches' pixels, MSE through a Linear(D, P*P*C) head)
    mim_loss_on: str = "masked"  # rows the MIM loss scores: "masked" (BEiT) or "all" (ablation: every patch)
    pixel_norm: bool = True  # pixel target: each patch normalised by its own mean / std (MAE's norm_pix_loss)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)  # free-form notes, saved with the config

    def __post_init__(self) -> None:
        if self.num_masking_patches is None and _is_int(self.img_size) and _is_int(self.patch_size):
            if self.patch_size > 0 and self.img_size >= self.patch_size:
                self.num_masking_patches = max(1, round((self.img_size // self.patch_size) ** 2 * 75 / 196))
        self.validate()

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def train_flops_per_image(self, head_rows: int, head_out: int) -> float:
        """Training FLOPs per image (3x the forward; matmuls only), for MFU: patch embedding, the blocks, and a head
        of `head_out` outputs on `head_rows` rows (MIM: the masked patches x vocab; classification: 1 x classes)."""
        n, d, m = self.num_patches + 1, self.embed_dim, self.mlp_hidden_dim
        block = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
        fwd = self.depth * block + 2 * self.num_patches * d * self.in_chans * self.patch_size**2
        return 3.0 * (fwd + 2 * head_rows * d * head_out)

    # -- checks --------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"BeitConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "vocab_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "must be a positive int")
        for name in ("qkv_bias", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        for name in ("mlp_ratio", "drop_path_rate", "attn_drop_rate", "layer_norm_eps", "init_std"):
            if not _is_real(getattr(self, name)):
                bad(name, "must be a finite number")
        if self.init_values is not None and not _is_real(self.init_values):
            bad("init_values", "must be None (no layer scale) or a finite number")
        if self.img_size % self.patch_size:
            bad("img_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            bad("embed_dim", f"must be divisible by num_heads={self.num_heads}")
        if not self.mlp_ratio > 0 or int(self.embed_dim * self.mlp_ratio) < 1:
            bad("mlp_ratio", "must be positive (and give an MLP width of at least 1)")
        for name in ("drop_path_rate", "attn_drop_rate"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                bad(name, "must be in [0, 1)")
        if self.init_values is not None and self.init_values < 0:
            bad("init_values", "must be None, 0 (off) or positive")
        if not self.layer_norm_eps > 0:
            bad("layer_norm_eps", "must be positive")
        if not self.init_std > 0:
            bad("init_std", "must be positive")
        if self.use_rel_pos_bias and self.use_shared_rel_pos_bias:
            bad("use_rel_pos_bias", "per-layer and shared relative position bias are exclusive; pick one")
        if not _is_int(self.num_masking_patches):
            bad("num_masking_patches", "must be an int (or None: 75 per 196 patches)")
        if not 0 < self.num_masking_patches <= self.num_patches:
            bad("num_masking_patches", f"must be in [1, num_patches={self.num_patches}]")
        if not isinstance(self.attn_backend, str) or self.attn_backend not in ATTN_BACKENDS:
            bad("attn_backend", f"must be one of {ATTN_BACKENDS}")
        if not (self.fused_kernels == "auto" or self.fused_kernels is True or self.fused_kernels is False):
            bad("fused_kernels", 'must be "auto", True or False')
        if self.mim_target not in MIM_TARGETS:
            bad("mim_target", f"must be one of {MIM_TARGETS}")
        if self.mim_loss_on not in MIM_LOSS_ON:
            bad("mim_loss_on", f"must be one of {MIM_LOSS_ON}")
        if not isinstance(self.pixel_norm, bool):
            bad("pixel_norm", "must be True or False")
        if not isinstance(self.extra, dict):
            bad("extra", "must be a dict")

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "BeitConfig":
        """A preset (`tiny`, `small`, `base`, `large`) with overrides; unknown keys raise ValueError."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "BeitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BeitConfig key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def replace(self, **overrides: Any) -> "BeitConfig":
        values = {**self.to_dict(), **overrides}
        if ("img_size" in overrides or "patch_size" in overrides) and "num_masking_patches" not in overrides:
            values["num_masking_patches"] = None  # re-derive for the new grid
        return self.from_dict(values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def parse_options(args: List[str], flags: Union[Iterable[str], Dict[str, str]] = ()) -> List[Tuple[str, str]]:
    """`--key=value` / `--key value` command-line options -> [(key, value)], dashes in keys read as
    underscores. A key in `flags` may also stand alone: `--deepspeed` means `--deepspeed=true`, or the value
    `flags` maps it to (a dict). Anything else raises ValueError (one line, for the CLIs)."""
    bare = flags if isinstance(flags, dict) else {f: "true" for f in flags}
    flag_set = {f.replace("-", "_"): v for f, v in bare.items()}
    pairs: List[Tuple[str, str]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r} (options are --key=value)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif a[2:].replace("-", "_") in flag_set and (i + 1 == len(args) or args[i + 1].startswith("--")):
            k, v = a[2:], flag_set[a[2:].replace("-", "_")]
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = a[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"option {a} needs a value")
        pairs.append((k.replace("-", "_"), v))
        i += 1
    return pairs


def first_line(what: Union[str, BaseException]) -> str:
    """The first non-blank line of a message, stripped (for one-line CLI errors); an exception whose message is
    empty gives its type's name, an empty message ''."""
    lines = [ln.strip() for ln in str(what).splitlines() if ln.strip()]
    if lines:
        return lines[0]
    return type(what).__name__ if isinstance(what, BaseException) else ""


def one_line(text: str) -> str:
    """Every non-blank line of `text`, stripped and joined by spaces (a multi-line message kept whole, on one
    line)."""
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Presets. `base` and `large` are SPEC section 1; `tiny` trains in minutes on 2 CPU cores.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=4, vocab_size=512, drop_path_rate=0.0,
    ),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12, init_values=0.1),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}
