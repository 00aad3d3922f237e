"""Triton kernels of beit-fast (installed as `beit_fast.kernels`); each has a plain-torch `*_ref` beside it.

- `masked_embed`: cls prepend + mask-token replacement + position add, one pass.
- `gather_masked_layer_norm`: the MIM head's LayerNorm on the masked rows only, gathered in-kernel.
- `fused_linear_cross_entropy`: lm_head + softmax cross-entropy (+ mlm_acc) without (M, V) logits.

Submodules import Triton, so they load lazily: `import beit_fast.kernels` works without it, and
`beit_fast.kernels.triton_reasons(device)` says why the kernels cannot run somewhere.
"""

from importlib import import_module

from ._common import check_deferred, defer_check, interpreting, triton_reasons, use_fused

_LAZY = {
    "masked_embed": "masked_embed",
    "masked_embed_ref": "masked_embed",
    "gather_masked_layer_norm": "gather_layer_norm",
    "gather_masked_layer_norm_ref": "gather_layer_norm",
    "masked_row_index": "gather_layer_norm",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref": "fused_linear_cross_entropy",
}

__all__ = ["check_deferred", "defer_check", "interpreting", "triton_reasons", "use_fused", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
