"""Drop-in speed for the BEiT models people already have: `patch(model)` makes a timm or transformers BEiT
(or Data2VecVision, the same network) run this engine's kernels, in place.

    import beit_fast
    model = timm.create_model("beit_base_patch16_224")   # or transformers' BeitForMaskedImageModeling, ...
    beit_fast.patch(model)                                # same parameters, same state_dict, faster step

What is replaced:
- attention: timm's `beit.Attention`, transformers' `BeitAttention` (>= 5: q_proj / k_proj / v_proj, the relative
  position bias arriving as the attention mask) and `BeitSelfAttention` / `BeitSdpaSelfAttention` (< 5: query / key /
  value, the bias computed inside or passed as `relative_position_bias`), and their Data2VecVision twins. The
  attention then runs through `beit_fast.attention`'s dispatcher: `attention="auto"` (or True) takes the Triton
  relative-position kernel where it can run (CUDA, fp16 / bf16, no attention dropout in training) and otherwise leaves
  the library's own attention code running, exactly as before the patch; a backend named explicitly ("triton",
  "xformers", "sdpa", "math") runs that backend or raises with the reasons it cannot. "math" is the library's own
  eager attention order (timm's non-fused branch, transformers' eager attention), so a patched model on "math" gives
  the unpatched eager model's outputs bit for bit (the kernels take timm's per-layer table + shared bias as one sum).
- `BeitForMaskedImageModeling` (mim_head=True): in training, with `labels` and `bool_masked_pos` given, the head
  runs on the masked rows only - `gather_masked_layer_norm` + `fused_linear_cross_entropy`, where the Triton kernels
  run - and returns the same loss; transformers computes the 8192-way head on all N rows, then keeps the masked ones.
  That output's `logits` is None (the point is not to make them; Liger's `skip_logits` does the same); in eval,
  without labels, where the kernels cannot run, when a label is -100 (ignored), when nothing is masked, or with
  `return_dict=False` (a tuple without the logits would shift every later position), the reference head runs.
- Attention probabilities requested (`output_attentions=True`, or transformers >= 5 collecting them), a head mask,
  or a user's attention mask (per image, or broadcast over the heads) take the library's own path for that call.

Kept: every parameter and buffer object, every `state_dict()` key and tensor, `isinstance` (the patched module's
class is a subclass of the library's, named as it was), `save_pretrained` / `load_checkpoint` / `deepcopy` / pickling
(`torch.save(model)`), gradient checkpointing, `torch.compile` (the kernels are custom ops).

`patch` returns the model; what it replaced and what it left alone (and why) is in `patch_report(model)` and logged
at INFO on the "beit_fast" logger. `unpatch(model)` restores the library's classes. `patch_timm_models()` /
`patch_transformers_models()` patch every model built afterwards (Liger's `apply_liger_kernel_to_*` style);
`unpatch_models()` undoes that.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AUTO_ORDER, AttentionCase, RelPosBias, attention_heads, attention_qkv, select_backend

__all__ = [
    "PatchReport",
    "patch",
    "patch_report",
    "patch_timm_models",
    "patch_transformers_models",
    "unpatch",
    "unpatch_models",
]

log = logging.getLogger("beit_fast")

TIMM_MODULE = "timm.models.beit"
HF_MODULES = {  # module -> the class-name prefix of its network
    "transformers.models.beit.modeling_beit": "Beit",
    "transformers.models.data2vec.modeling_data2vec_vision": "Data2VecVision",
}
ATTENTION_CHOICES = ("auto",) + AUTO_ORDER
_REPORT_ATTR = "beit_fast_report"
_OPTION_ATTRS = ("beit_fast_attention", "beit_fast_mim_head")


@dataclass
class PatchReport:
    """What `patch` did: (module path, what it became) and (module path, why it was left alone)."""

    replaced: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"beit_fast.patch: {len(self.replaced)} module(s) replaced, {len(self.skipped)} left alone"]
        lines += [f"  replaced {name or '<model>'}: {what}" for name, what in self.replaced]
        lines += [f"  skipped  {name or '<model>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# -- the fast classes --------------------------------------------------------------------------------------------------
class _Patched:
    """Base of the fast classes (first in their MRO, so `super().forward` is the library's own)."""

    beit_fast_attention = "auto"
    beit_fast_mim_head = True

    @staticmethod
    def _beit_fast_class_attrs(orig: type) -> Dict[str, object]:
        """Facts about the library class, read once when its fast class is made."""
        return {}

    def _beit_fast_backend(self, x: torch.Tensor, head_dim: int, bias_grad: bool, dropout_p: float) -> Optional[str]:
        """The backend this call runs, or None for the library's own attention ("auto" where no kernel of ours runs
        takes the code the model had before the patch, whatever it was)."""
        requested = self.beit_fast_attention
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        case = AttentionCase(device_type=dev, dtype=dtype, head_dim=head_dim, bias_requires_grad=bias_grad,
                             dropout_p=dropout_p if self.training else 0.0)
        backend = select_backend(requested, case)
        if requested == "auto" and backend in ("sdpa", "math"):
            return None
        return backend


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _TimmAttention(_Patched):
    """timm `beit.Attention`: packed qkv Linear + q / v biases (k's a zero buffer), its own table and / or the
    shared (H, N, N) bias from `Beit.forward_features`."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        table = self.relative_position_bias_table
        head_dim = self.qkv.weight.shape[0] // (3 * self.num_heads)
        backend = self._beit_fast_backend(x, head_dim, _wants_grad(table, shared_rel_pos_bias), self.attn_drop.p)
        if backend is None:
            return super().forward(x, shared_rel_pos_bias)
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:  # as timm builds it (k's bias is a zero buffer)
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        bias = None
        if table is not None:
            bias = RelPosBias(table, self.relative_position_index)
            if shared_rel_pos_bias is not None:
                dense = bias.materialise()
                if backend == "math":  # timm's eager order: the two biases added to the scores one after the other
                    return self.proj_drop(self.proj(self._beit_fast_two_biases(qkv, dense, shared_rel_pos_bias)))
                bias = RelPosBias.from_dense(dense + shared_rel_pos_bias.reshape(dense.shape))  # one sum: the kernels'
            bias = bias.for_backend(backend)
        elif shared_rel_pos_bias is not None:
            bias = RelPosBias.from_dense(shared_rel_pos_bias)
        x = attention_qkv(qkv, self.num_heads, bias, self.scale, backend, self.attn_drop.p, self.training)
        return self.proj_drop(self.proj(x))

    def _beit_fast_two_biases(self, qkv: torch.Tensor, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + own
        attn = self.attn_drop((attn + shared).softmax(dim=-1))
        return (attn @ v).transpose(1, 2).reshape(B, N, -1)


def _hf_attentions_collected() -> bool:
    """transformers >= 5 records attention probabilities through hooks, not an argument: is it recording now?"""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _library_function(module: nn.Module, name: str) -> Callable:
    return getattr(sys.modules[type(module)._beit_fast_orig.__module__], name)


class _HFAttention(_Patched):
    """transformers >= 5 `BeitAttention`: q_proj / k_proj (no bias) / v_proj / o_proj; the relative position bias
    (shared + the layer's own, summed by the caller) arrives as the float attention mask (1, H, N, N)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        mask = attention_mask
        # the relative position bias (1, H, N, N); a per-image or per-head-broadcast mask takes the library's path
        usable = mask is None or (mask.is_floating_point() and mask.dim() == 4 and mask.shape[0] == 1
                                  and mask.shape[1] == self.num_attention_heads)
        backend = None
        if usable and not kwargs.get("output_attentions") and not _hf_attentions_collected():
            backend = self._beit_fast_backend(hidden_states, self.head_dim, _wants_grad(mask), self.attention_dropout)
        if backend is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout = self.attention_dropout if self.training else 0.0
        if backend == "math":  # the library's eager attention, its op order
            out, _ = _library_function(self, "eager_attention_forward")(self, q, k, v, mask, scaling=self.scaling,
                                                                        dropout=dropout)
            out = out.reshape(*hidden_states.shape[:-1], -1)
        else:
            bias = RelPosBias.from_dense(mask) if mask is not None else None
            out = attention_heads(q, k, v, bias, self.scaling, backend, dropout, self.training)
        return self.o_proj(out), None


def _parameters(func: Callable) -> Tuple[Tuple[str, ...], Dict[str, object]]:
    """The names of `func`'s positional parameters after self, and every named parameter's default."""
    params = [p for p in list(inspect.signature(func).parameters.values())[1:]
              if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    positional = tuple(p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY)
    return positional, {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _arguments(module: nn.Module, args: tuple, kwargs: dict) -> Dict[str, object]:
    """The call's arguments by the library forward's own parameter names, defaults filled in (read from the class
    once, when the fast class is made: nothing here for torch.compile to trace through)."""
    names, defaults = type(module)._beit_fast_parameters
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


class _HFSelfAttention(_Patched):
    """transformers < 5 `BeitSelfAttention` / `BeitSdpaSelfAttention`: query / key (no bias) / value; the layer's own
    table inside (`relative_position_bias`, a module), the shared bias as the `relative_position_bias` argument."""

    @staticmethod
    def _beit_fast_class_attrs(orig: type) -> Dict[str, object]:
        """Whether the library's relative position bias module takes the window (>= 4.4x) or nothing (older)."""
        prefix = orig.__name__.replace("Sdpa", "").replace("SelfAttention", "")
        rpb = getattr(sys.modules[orig.__module__], f"{prefix}RelativePositionBias", None)
        return {"_beit_fast_window_arg": rpb is not None and "window_size" in _parameters(rpb.forward)[0]}

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        a = _arguments(self, (hidden_states,) + args, kwargs)
        shared, own = a.get("relative_position_bias"), getattr(self, "relative_position_bias", None)
        backend = None
        if not a.get("output_attentions") and a.get("head_mask") is None:
            backend = self._beit_fast_backend(
                hidden_states, self.attention_head_size,
                _wants_grad(shared, own.relative_position_bias_table if own is not None else None),
                self.dropout.p)
        if backend is None:
            return super().forward(hidden_states, *args, **kwargs)
        if backend == "math":  # the library's eager self-attention (the SDPA subclass's base), its op order
            eager = _library_function(self, type(self)._beit_fast_orig.__name__.replace("Sdpa", ""))
            return eager.forward(self, hidden_states, *args, **kwargs)
        dense = None
        if own is not None:
            if self._beit_fast_window_arg:  # >= 4.4x: interpolated to the input's resolution
                height, width = a["resolution"]
                window = (height // self.config.patch_size, width // self.config.patch_size)
                dense = own(window, a.get("interpolate_pos_encoding", False), dim_size=hidden_states.shape[1])
            else:
                dense = own()
        if shared is not None:
            dense = shared if dense is None else dense + shared
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        bias = RelPosBias.from_dense(dense) if dense is not None else None
        out = attention_heads(q, k, v, bias, self.attention_head_size**-0.5, backend, self.dropout.p, self.training)
        return (out,)


class _HFMaskedImageModeling(_Patched):
    """transformers' `BeitForMaskedImageModeling`: the head on the masked rows only when it can (see the module
    docstring), through the backbone exactly as the library calls it."""

    def forward(self, *args, **kwargs):
        a = _arguments(self, args, kwargs)
        labels, mask = a.get("labels"), a.get("bool_masked_pos")
        if not self._beit_fast_masked_head(labels, mask, a.get("return_dict")):
            return super().forward(*args, **kwargs)
        from beit_fast.kernels import check_deferred
        from beit_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
        from beit_fast.kernels.gather_layer_norm import GatherMaskedLayerNormFunction, masked_row_index

        check_deferred()  # the previous step's device-side checks (one sync, only when some are pending)
        rows = masked_row_index(mask)  # (M,) rows of the (B*(N+1), D) hidden states, mask order (one sync)
        if rows.numel() == 0 or tuple(labels.shape) != (rows.shape[0],) or bool((labels == -100).any()):
            return super().forward(*args, **kwargs)  # the library's own error, NaN, or its ignore_index
        a.pop("return_dict", None)
        a.pop("labels")
        out = self.beit(**a, return_dict=True)
        x = out.last_hidden_state.contiguous()
        ln = self.layernorm
        h = GatherMaskedLayerNormFunction.apply(x, rows, ln.weight, ln.bias, ln.eps)
        loss, _ = fused_linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, labels)
        from transformers.modeling_outputs import MaskedLMOutput

        return MaskedLMOutput(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                              attentions=getattr(out, "attentions", None))

    def _beit_fast_masked_head(self, labels, mask, return_dict) -> bool:
        if not (self.beit_fast_mim_head and self.training and labels is not None and mask is not None):
            return False
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if not return_dict:  # a tuple without the logits would shift every later position: the reference head
            return False
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.dim() != 2:
            return False
        from beit_fast.kernels import use_fused

        return use_fused("auto", mask.device)


# -- recognition -------------------------------------------------------------------------------------------------------
def _loaded(name: str):
    """The library module if that library is installed (imported here: recognising needs its classes)."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or an incompatible version: nothing of it to recognise
        return None


def _known() -> Dict[type, Tuple[type, str]]:
    """library class -> (fast mixin, what it becomes), for the libraries installed."""
    known: Dict[type, Tuple[type, str]] = {}
    timm_beit = _loaded(TIMM_MODULE)
    if timm_beit is not None and hasattr(timm_beit, "Attention"):
        known[timm_beit.Attention] = (_TimmAttention, "timm attention -> beit-fast attention dispatcher")
    for name, prefix in HF_MODULES.items():
        mod = _loaded(name)
        if mod is None:
            continue
        if hasattr(mod, f"{prefix}SelfOutput"):  # transformers < 5: the attention is the SelfAttention class
            for cls_name in (f"{prefix}SelfAttention", f"{prefix}SdpaSelfAttention"):
                if hasattr(mod, cls_name):
                    known[getattr(mod, cls_name)] = (
                        _HFSelfAttention, f"transformers {cls_name} -> beit-fast attention dispatcher")
        elif hasattr(mod, f"{prefix}Attention"):
            known[getattr(mod, f"{prefix}Attention")] = (
                _HFAttention, f"transformers {prefix}Attention -> beit-fast attention dispatcher")
        if hasattr(mod, f"{prefix}ForMaskedImageModeling"):
            known[getattr(mod, f"{prefix}ForMaskedImageModeling")] = (
                _HFMaskedImageModeling, "MIM head on the masked rows (gather LayerNorm + fused linear CE)")
    return known


def _helpers() -> Tuple[type, ...]:
    """Library classes left as they are on purpose: transformers < 5's `BeitAttention` (it only holds the patched
    self-attention and its output Linear) and the relative position bias modules (their tables feed the patched
    attention)."""
    out = []
    timm_beit = sys.modules.get(TIMM_MODULE)
    if timm_beit is not None and hasattr(timm_beit, "RelativePositionBias"):
        out.append(timm_beit.RelativePositionBias)
    for name, prefix in HF_MODULES.items():
        mod = sys.modules.get(name)
        if mod is None:
            continue
        if hasattr(mod, f"{prefix}RelativePositionBias"):
            out.append(getattr(mod, f"{prefix}RelativePositionBias"))
        if hasattr(mod, f"{prefix}SelfOutput") and hasattr(mod, f"{prefix}Attention"):
            out.append(getattr(mod, f"{prefix}Attention"))
    return tuple(out)


_FAST: Dict[type, type] = {}  # library class -> its fast subclass


def _fast_class(orig: type, mixin: type) -> type:
    """The fast subclass of `orig`: named as `orig` (transformers writes the class name into config.json), found by
    pickle under its qualified name in this module (`__getattr__` below rebuilds it in a fresh process)."""
    cls = _FAST.get(orig)
    if cls is None:
        qualname = "Fast__" + orig.__module__.replace(".", "__") + "__" + orig.__qualname__
        cls = type(orig.__name__, (mixin, orig), {"__module__": __name__, "__qualname__": qualname,
                                                  "_beit_fast_orig": orig, "__doc__": orig.__doc__,
                                                  "_beit_fast_parameters": _parameters(orig.forward),
                                                  **mixin._beit_fast_class_attrs(orig)})
        _FAST[orig] = cls
        globals()[qualname] = cls
    return cls


def __getattr__(name: str):
    if name.startswith("Fast__"):
        *module, cls_name = name[len("Fast__"):].split("__")
        orig = getattr(importlib.import_module(".".join(module)), cls_name)
        known = _known()
        if orig in known:
            return _fast_class(orig, known[orig][0])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_fast(module: nn.Module) -> bool:
    return isinstance(module, _Patched)


# -- public ------------------------------------------------------------------------------------------------------------
def _check_options(attention: Union[bool, str], mim_head: bool) -> str:
    """The attention backend asked for ("" for off); one-line errors for anything else."""
    if not isinstance(mim_head, bool):
        raise ValueError(f"mim_head={mim_head!r}: True or False")
    if isinstance(attention, bool):
        return "auto" if attention else ""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention={attention!r}: choose True / False or one of {ATTENTION_CHOICES}")
    return attention


def patch(model: nn.Module, attention: Union[bool, str] = True, mim_head: bool = True, layer_norm: bool = False,
          mlp: bool = False, verbose: bool = False) -> nn.Module:
    """Make the timm / transformers BEiT (or Data2VecVision) modules inside `model` run beit-fast's kernels, in place;
    returns `model`. `attention`: True / "auto", a backend name ("triton", "xformers", "sdpa", "math") or False;
    `mim_head`: the masked-rows MIM head of transformers' `BeitForMaskedImageModeling`; `layer_norm`, `mlp`: fused
    full-row LayerNorm / MLP, which beit-fast does not have yet (reported as skipped, with a warning). Calling it again
    changes the options. What was replaced and what was left alone: `patch_report(model)` (also logged at INFO;
    printed with `verbose=True`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    backend = _check_options(attention, mim_head)
    report = PatchReport()
    for what, asked in (("layer_norm", layer_norm), ("mlp", mlp)):
        if asked:
            why = f"{what}=True: beit-fast has no fused full-row {what.replace('_', ' ')} kernel yet (left as is)"
            report.skipped.append(("", why))
            warnings.warn(f"beit_fast.patch: {why}", stacklevel=2)
    known, helpers = _known(), _helpers()
    recognised = 0
    for name, module in model.named_modules():
        orig = getattr(type(module), "_beit_fast_orig", type(module))
        if orig in known:
            recognised += 1
            mixin, what = known[orig]
            wanted = mim_head if mixin is _HFMaskedImageModeling else bool(backend)
            if not wanted:
                if _is_fast(module):
                    _restore(module)
                report.skipped.append((name, f"{type(module).__name__}: switched off (attention={attention!r}, "
                                             f"mim_head={mim_head!r})"))
                continue
            module.__class__ = _fast_class(orig, mixin)
            if mixin is not _HFMaskedImageModeling:
                module.beit_fast_attention = backend
            report.replaced.append((name, what + (f" ({backend})" if mixin is not _HFMaskedImageModeling else "")))
        elif type(module) in helpers:
            continue
        elif any(isinstance(module, cls) for cls in known):
            report.skipped.append((name, f"{type(module).__qualname__} subclasses a recognised class with code of its "
                                         "own: left alone"))
        elif _looks_like_attention(module):
            report.skipped.append((name, f"{type(module).__module__}.{type(module).__qualname__} is not a recognised "
                                         "timm / transformers BEiT module"))
    if not recognised:
        report.skipped.append(("", f"no timm / transformers BEiT module recognised in {type(model).__name__}"))
    setattr(model, _REPORT_ATTR, report)
    log.info("%s", report)
    if verbose:
        print(report)
    return model


def _looks_like_attention(module: nn.Module) -> bool:
    """Worth a line in the report when not recognised: a module named like a BEiT part this patch replaces."""
    return any(part in type(module).__name__ for part in ("Attention", "MaskedImageModeling"))


def _restore(module: nn.Module) -> None:
    module.__class__ = type(module)._beit_fast_orig
    for attr in _OPTION_ATTRS:
        module.__dict__.pop(attr, None)


def patch_report(model: nn.Module) -> Optional[PatchReport]:
    """The report of the last `patch(model)` (None if it was never patched)."""
    return getattr(model, _REPORT_ATTR, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Give every patched module in `model` its library class back (parameters untouched); returns `model`."""
    for module in model.modules():
        if _is_fast(module):
            _restore(module)
    model.__dict__.pop(_REPORT_ATTR, None)
    return model


# -- patching the libraries' classes -----------------------------------------------------------------------------------
_INITS: Dict[type, Callable] = {}  # model class -> its own __init__, while wrapped


def _wrap_init(cls: type, options: dict) -> None:
    orig = _INITS.setdefault(cls, cls.__init__)

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        patch(self, **options)

    cls.__init__ = __init__


def _model_classes(module_name: str, names: Tuple[str, ...]) -> List[type]:
    mod = _loaded(module_name)
    return [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]


def patch_timm_models(attention: Union[bool, str] = True, **options) -> List[str]:
    """Every timm `Beit` built after this call is patched (`patch(model, attention, **options)`); returns the
    classes wrapped. Undo with `unpatch_models()`."""
    _check_options(attention, options.get("mim_head", True))
    classes = _model_classes(TIMM_MODULE, ("Beit",))
    for cls in classes:
        _wrap_init(cls, dict(options, attention=attention))
    return [c.__qualname__ for c in classes]


def patch_transformers_models(attention: Union[bool, str] = True, mim_head: bool = True, **options) -> List[str]:
    """Every transformers Beit* / Data2VecVision* model built after this call (`from_pretrained` included) is patched
    (`patch(model, attention, mim_head, **options)`); returns the classes wrapped. Undo with `unpatch_models()`."""
    _check_options(attention, mim_head)
    classes = []
    for name, prefix in HF_MODULES.items():
        suffixes = ("Model", "ForMaskedImageModeling", "ForImageClassification", "ForSemanticSegmentation", "Backbone")
        classes += _model_classes(name, tuple(prefix + s for s in suffixes))
    for cls in classes:
        _wrap_init(cls, dict(options, attention=attention, mim_head=mim_head))
    return [c.__qualname__ for c in classes]


def unpatch_models() -> None:
    """Undo `patch_timm_models` / `patch_transformers_models` for models built from now on (built ones stay
    patched: `unpatch(model)`)."""
    while _INITS:
        cls, init = _INITS.popitem()
        cls.__init__ = init
