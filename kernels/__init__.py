"""Triton kernels of beit-fast (installed as `beit_fast.kernels`); each has a plain-torch `*_ref` beside it.

- `masked_embed`: cls prepend + mask-token replacement + position add, one pass.
- `gather_masked_layer_norm`: the MIM head's LayerNorm on the masked rows only, gathered in-kernel.
- `fused_linear_cross_entropy`: lm_head + softmax cross-entropy (+ mlm_acc) without (M, V) logits.
- `relpos_attention` / `relpos_attention_qkv`: flash attention with BEiT's relative position bias
  (`relpos_bias_padded`: the padded dense bias, built once and shared by layers).
- `tokenizer_head_argmax`: the dVAE encoder's ReLU + 1x1 conv + argmax, logits never written.

The kernel modules import Triton; without it `import beit_fast.kernels` still works (the kernel
names then raise the ImportError on use), and `beit_fast.kernels.triton_reasons(device)` says why
the kernels cannot run somewhere. On the CPU, set TRITON_INTERPRET=1 before importing this package.
"""

import sys as _sys

if __name__ == "kernels":
    # This folder is `beit_fast.kernels`' source. From a clone's root (the working directory on sys.path) it would
    # shadow an installed distribution named `kernels` (Hugging Face's, which transformers >= 5 imports): hand the
    # import over to that one, or fail as if this folder were not there.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = None
    for _entry in _sys.path:
        if _os.path.abspath(_entry or _os.getcwd()) != _root:
            _spec = _machinery.PathFinder.find_spec("kernels", [_entry or _os.getcwd()])
            if _spec is not None:
                break
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the kernels/ folder of a beit-fast clone is "
                                  "beit_fast.kernels: import that)", name="kernels")
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds after this file ran
    _spec.loader.exec_module(_real)
else:
    from importlib import import_module

    from ._common import check_deferred, defer_check, interpreting, triton_reasons, use_fused

    _KERNELS = {
        "masked_embed": ("masked_embed", "masked_embed_ref"),
        "gather_layer_norm": ("gather_masked_layer_norm", "gather_masked_layer_norm_ref", "masked_row_index"),
        "fused_linear_cross_entropy": ("fused_linear_cross_entropy", "fused_linear_cross_entropy_ref"),
        "relpos_attention": ("relpos_attention", "relpos_attention_qkv", "relpos_attention_ref", "relpos_bias_padded"),
        "tokenizer_head": ("tokenizer_head_argmax", "tokenizer_head_argmax_ref"),
    }

    __all__ = ["check_deferred", "defer_check", "interpreting", "triton_reasons", "use_fused"]
    __all__ += [name for names in _KERNELS.values() for name in names]

    # Bind the functions now: several share their module's name (masked_embed, ...), and importing a
    # submodule sets the package attribute of that name to the MODULE. Without Triton the names stay
    # unbound and __getattr__ below reports why.
    if not triton_reasons("cuda"):
        for _module, _names in _KERNELS.items():
            _mod = import_module(f".{_module}", __name__)
            for _name in _names:
                globals()[_name] = getattr(_mod, _name)


    def __getattr__(name):
        for module, names in _KERNELS.items():
            if name in names:
                return getattr(import_module(f".{module}", __name__), name)  # raises the ImportError if any
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
