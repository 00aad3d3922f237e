"""Checkpoint interop: unilm, timm and transformers BEiT state dicts <-> this project's layout.

This project's parameter names ARE the unilm layout (SPEC section 2), minus the
`relative_position_index` buffers, which are derived from the patch grid: converters check a
checkpoint's index against the one the grid implies and drop it; `export_state_dict(...,
"unilm")` puts it back, so unilm -> ours -> unilm is bit-exact.

timm's `Beit` uses the same names (its index and `k_bias` buffers are not saved).
transformers' `Beit*` models are renamed key by key, with query/key/value concatenated into
one qkv weight (key has no bias in BEiT).

Nothing is dropped silently: unknown keys, missing keys and shape mismatches raise
`CheckpointError` listing every one of them (or are returned, with `strict=False`).

File I/O, the one place where this project reads and writes checkpoint files:

- `safe_load`: every file a user hands us (weights, pretraining checkpoints, DeepSpeed shards, RNG files, `model.pt`)
  is read with `torch.load(weights_only=True)`: tensors, containers and numbers only, plus an explicit allow-list
  (`SAFE_GLOBALS`: numpy's array reconstruction for RNG states written by older versions, `argparse.Namespace` that
  unilm stores beside its weights). A file that names any other global is refused with `UnsafeFileError`, one line
  naming the file and the global; nothing in it runs. Any other unreadable file raises `CheckpointReadError`.
- `atomic_save`: temporary name, fsync, rename; a write error (disk full, quota, I/O) raises `CheckpointWriteError`
  (an OSError with the errno and the file) after removing the temporary file.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from beit_fast.attention import relative_position_index
from beit_fast.config import first_line

__all__ = [
    "CheckpointError",
    "convert_state_dict",
    "detect_source",
    "export_state_dict",
    "load_into",
    "fit_problems",
    "load_state_dict_file",
    "resize_rel_pos_bias",
    "resize_pos_embed",
    "shared_to_per_layer_rel_pos_bias",
    "atomic_save",
    "safe_load",
    "write_torch_file",
    "write_error",
    "CheckpointReadError",
    "CheckpointWriteError",
    "UnsafeFileError",
    "SAFE_GLOBALS",
]

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
SOURCES = ("unilm", "timm", "hf")


class CheckpointError(ValueError):
    """A state dict that does not fit: lists every offending key."""


class CheckpointReadError(ValueError):
    """A file that cannot be read as a checkpoint (empty, truncated, not a torch file, a directory): one line."""


class UnsafeFileError(CheckpointReadError):
    """A file that names a global outside the allow-list (it could run code if unpickled): one line naming it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); str() is one line with the file and errno."""

    def __str__(self) -> str:
        why = self.strerror or "write failed"
        name = errno_codes.errorcode.get(self.errno, "") if self.errno else ""
        code = f" (errno {self.errno}{' ' + name if name else ''})" if self.errno else ""
        return f"cannot write {self.filename}: {why}{code}"


def _safe_globals() -> List[Any]:
    """The non-tensor globals our own files (and unilm's) may contain. Everything else is refused."""
    import argparse

    import numpy as np

    allowed: List[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:  # the module moved in numpy 2; files name whichever wrote them
            allowed.append((getattr(__import__(module, fromlist=["_reconstruct"]), "_reconstruct"),
                            f"{module}._reconstruct"))
        except (ImportError, AttributeError):
            pass
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes by their class
        allowed += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(dtypes, n)]
    return allowed


SAFE_GLOBALS = _safe_globals()


def safe_load(path: Union[str, Path], map_location: Any = "cpu", what: str = "file", extra_globals: Sequence[Any] = ()
              ) -> Any:
    """`torch.load(path, weights_only=True)` with `SAFE_GLOBALS` (+ `extra_globals`, named classes a caller's own
    format needs) allowed and nothing else: no code in the file runs.

    Raises FileNotFoundError (missing), `UnsafeFileError` (a refused global, named), `CheckpointReadError` (any other
    unreadable file: empty, truncated, a directory, not a torch file) - each one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointReadError(f"{path}: is a directory, not a {what}")
    if path.stat().st_size == 0:
        raise CheckpointReadError(f"{path}: empty file, not a {what}")
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra_globals]):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m:
            refused = m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"  # torch drops "builtins."
            raise UnsafeFileError(f"{path}: refused to load: it references `{refused}`, which is not on the "
                                  f"allow-list of a {what} (nothing in the file was run)") from None
        if "TorchScript" in text:
            raise UnsafeFileError(f"{path}: refused to load a TorchScript archive as a {what}") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()
                 and not ln.startswith(("Weights only load failed", "Check the documentation", "Please file"))]
        raise CheckpointReadError(f"{path}: cannot read the {what} (not a torch file the weights-only loader "
                                  f"accepts: {lines[0] if lines else 'UnpicklingError'})") from None
    except MemoryError:
        raise
    except Exception as exc:  # torch.load raises many types for a truncated or foreign file
        raise CheckpointReadError(f"{path}: cannot read the {what} (truncated or not a torch file: "
                                  f"{type(exc).__name__}: {first_line(exc)})") from None


# -- reading files ---------------------------------------------------------------------------------------------------
def load_state_dict_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a `.pth`/`.pt`/`.bin` (`safe_load`: weights only) or `.safetensors` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise CheckpointReadError(f"{path}: cannot read ({type(exc).__name__}: {first_line(exc)})") from None
    return safe_load(path, what="checkpoint")


def unwrap(obj: Mapping[str, Any]) -> StateDict:
    """Strip training wrappers: {"model": sd}, {"module": sd} (DeepSpeed), {"state_dict": sd}, "module." prefixes."""
    for key in ("model", "module", "state_dict", "model_state"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = dict(obj)
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"not a state dict: non-tensor entries {sorted(bad)[:20]}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def detect_source(sd: Mapping[str, torch.Tensor]) -> str:
    """'hf' for transformers names, else 'unilm' (timm shares the unilm names)."""
    hf_markers = ("embeddings.patch_embeddings.", "encoder.layer.", "embeddings.cls_token", "shared_position_bias.")
    if any(any(m in k for m in hf_markers) for k in sd):
        return "hf"
    if any(k.startswith("blocks.") or k in ("cls_token", "patch_embed.proj.weight") for k in sd):
        return "unilm"
    raise CheckpointError(f"cannot tell the layout of this state dict; first keys: {list(sd)[:8]}")


# -- relative position helpers ---------------------------------------------------------------------------------------
def _grid_of_table(rows: int) -> Tuple[int, int]:
    side = math.isqrt(rows - 3)
    if side * side != rows - 3 or side % 2 == 0:
        raise CheckpointError(f"relative position bias table with {rows} rows is not (2h-1)^2 + 3 for a square grid")
    g = (side + 1) // 2
    return g, g


def _grid_of_index(index: torch.Tensor) -> Tuple[int, int]:
    n = index.shape[0] - 1
    g = math.isqrt(n)
    if index.dim() != 2 or index.shape[0] != index.shape[1] or g * g != n:
        raise CheckpointError(f"relative_position_index of shape {tuple(index.shape)} is not (h*w+1)^2, square grid")
    return g, g


RESIZE_METHODS = ("geometric", "bicubic")


def _unilm_offsets(src_size: int, dst_size: int) -> Tuple[List[float], List[float]]:
    """unilm's sample positions along one axis of a (2g-1)-wide table (`beit/run_class_finetuning.py`): the source
    offsets 0, +-1, +-(1+q), +-(1+q+q^2), ... with q bisected in [1.01, 1.5] until the sum of src_size//2 powers
    reaches dst_size//2, and the target offsets -t..t, t = dst_size//2. Same float operations in the same order as
    unilm, so the positions are bit-identical to its."""
    half = src_size // 2
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        # (1 - q^n) / (1 - q): the progression's sum, as unilm writes it
        if (1.0 - q**half) / (1.0 - q) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(half):
        dis.append(cur)
        cur += q ** (i + 1)
    src = [-d for d in reversed(dis)] + [0.0] + dis
    t = dst_size // 2
    return src, [float(d) for d in range(-t, t + 1)]


def _spline_matrix(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """(len(xq), len(x)) fp64 matrix A with A @ y = the not-a-knot interpolating cubic spline through (x, y),
    evaluated at xq clamped to [x[0], x[-1]].

    This is FITPACK's s=0 spline (what `interp2d(kind="cubic")` / `RectBivariateSpline(s=0)` fit): for k=3 its
    interior knots are x[2..m-3], i.e. x[1] and x[m-2] are not knots; and its evaluation clamps a point outside the
    knot range to the end (interp2d's "nearest" extrapolation). Solved in the second-derivative (moment) form."""
    m = x.shape[0]
    h = x[1:] - x[:-1]
    K = torch.zeros(m, m, dtype=torch.float64)
    R = torch.zeros(m, m, dtype=torch.float64)
    i = torch.arange(1, m - 1)
    # C2 at interior nodes: h[i-1] M[i-1] + 2 (h[i-1] + h[i]) M[i] + h[i] M[i+1] = 6 (slope[i] - slope[i-1])
    K[i, i - 1], K[i, i], K[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
    R[i, i - 1], R[i, i], R[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    # not-a-knot: the third derivative (M[j+1] - M[j]) / h[j] is continuous at x[1] and at x[m-2]
    K[0, :3] = torch.stack([-h[1], h[0] + h[1], -h[0]])
    K[m - 1, m - 3 :] = torch.stack([-h[m - 2], h[m - 3] + h[m - 2], -h[m - 3]])
    moments = torch.linalg.solve(K, R)  # (m, m): M = moments @ y
    xq = xq.clamp(x[0], x[-1])
    j = (torch.searchsorted(x, xq, right=True) - 1).clamp(0, m - 2)
    hj = h[j]
    a, b = (x[j + 1] - xq) / hj, (xq - x[j]) / hj  # barycentric weights on the interval
    rows = torch.arange(xq.shape[0])
    values = torch.zeros(xq.shape[0], m, dtype=torch.float64)
    values[rows, j], values[rows, j + 1] = a, b
    curv = torch.zeros_like(values)  # S = a y_j + b y_j+1 + h^2/6 ((a^3 - a) M_j + (b^3 - b) M_j+1)
    curv[rows, j], curv[rows, j + 1] = hj**2 / 6 * (a**3 - a), hj**2 / 6 * (b**3 - b)
    return values + curv @ moments


def _resize_geometric(body: torch.Tensor, src_size: int, dst_size: int) -> torch.Tensor:
    """(src_size^2, H) -> (dst_size^2, H), unilm's geometric-progression cubic resampling, fp64."""
    src, dst = _unilm_offsets(src_size, dst_size)
    A = _spline_matrix(torch.tensor(src, dtype=torch.float64), torch.tensor(dst, dtype=torch.float64))
    z = body.detach().to("cpu", torch.float64).T.reshape(-1, src_size, src_size)  # (H, dy, dx) as the index
    out = A @ z @ A.T  # the tensor-product spline: rows (dy) then columns (dx), same positions on both axes
    return out.reshape(-1, dst_size * dst_size).T


def resize_rel_pos_bias(table: torch.Tensor, new_grid: Tuple[int, int], method: str = "geometric") -> torch.Tensor:
    """Resize a relative position bias table to another patch grid; the 3 cls rows are kept as they are.

    Args:
        table: (T, H), T = (2g-1)^2 + 3 for a square g x g grid.
        new_grid: (h, w), the target patch grid.
        method: "geometric" (default; unilm's fine-tuning resize, square grids, a source grid of at least 3x3):
            per head, the (2g-1)^2 part as a cubic interpolating spline over source offsets spaced as a geometric
            progression (dense near zero, stretched to the target's reach), sampled at the integer target offsets;
            equal to `scipy.interpolate.interp2d(kind="cubic")` as unilm calls it, without scipy. "bicubic":
            `F.interpolate` bicubic on the uniformly stretched table (any h, w).

    Returns:
        ((2h-1)(2w-1) + 3, H) in the table's dtype and device, computed in fp64 ("geometric") or fp32 ("bicubic").
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}")
    old = _grid_of_table(table.shape[0])
    if tuple(old) == tuple(new_grid):
        return table.clone()
    num_heads = table.shape[1]
    oh, ow = 2 * old[0] - 1, 2 * old[1] - 1
    nh, nw = 2 * new_grid[0] - 1, 2 * new_grid[1] - 1
    if method == "geometric":
        if new_grid[0] != new_grid[1] or new_grid[0] < 1:
            raise ValueError(f"geometric resize needs a square target grid, got {tuple(new_grid)}; use 'bicubic'")
        if old[0] < 3:  # a cubic spline needs 4 points per axis: 2g-1 >= 4
            raise ValueError(f"geometric resize needs a source grid of at least 3x3, got {old[0]}x{old[1]}")
        body = _resize_geometric(table[: oh * ow], oh, nh).to(table.device)
    else:
        grid = table[: oh * ow].float().T.reshape(1, num_heads, oh, ow)
        grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
        body = grid.reshape(num_heads, nh * nw).T
    return torch.cat([body.to(table.dtype), table[oh * ow :]])


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int]) -> torch.Tensor:
    """Resize a (1, 1+h*w, D) absolute position embedding (cls first) bicubically."""
    n = pos_embed.shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise CheckpointError(f"pos_embed of shape {tuple(pos_embed.shape)} is not over a square grid")
    if (g, g) == tuple(new_grid):
        return pos_embed.clone()
    D = pos_embed.shape[-1]
    body = pos_embed[:, 1:].float().reshape(1, g, g, D).permute(0, 3, 1, 2)
    body = F.interpolate(body, size=tuple(new_grid), mode="bicubic", align_corners=False)
    body = body.permute(0, 2, 3, 1).reshape(1, -1, D)
    return torch.cat([pos_embed[:, :1].float(), body], dim=1).to(pos_embed.dtype)


def shared_to_per_layer_rel_pos_bias(sd: StateDict, depth: int) -> StateDict:
    """Fine-tuning layout: copy the shared `rel_pos_bias` table into every block (as unilm does)."""
    sd = dict(sd)
    table = sd.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(depth):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return sd


# -- conversion ------------------------------------------------------------------------------------------------------
_HF_BLOCK = {
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
    # transformers >= 5 renamed the layer modules (published checkpoints keep the names above)
    "attention.q_proj.bias": "attn.q_bias",
    "attention.v_proj.bias": "attn.v_bias",
    "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}
# query / key / value weights, concatenated into qkv: (old name, transformers >= 5 name)
_HF_QKV = {
    "attention.attention.query.weight": "q", "attention.attention.key.weight": "k",
    "attention.attention.value.weight": "v", "attention.q_proj.weight": "q", "attention.k_proj.weight": "k",
    "attention.v_proj.weight": "v",
}
_HF_KEY_BIAS = ("attention.attention.key.bias", "attention.k_proj.bias")
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.layernorm.weight": "fc_norm.weight",
    "pooler.layernorm.bias": "fc_norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
_HF_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")


def _check_and_drop_index(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            grid = _grid_of_index(v)
            expected = relative_position_index(grid)
            if v.shape != expected.shape or not torch.equal(v.long().cpu(), expected):
                raise CheckpointError(f"{k} is not the standard BEiT relative position index for its grid")
            table = sd.get(k[: -len("relative_position_index")] + "relative_position_bias_table")
            if table is not None and _grid_of_table(table.shape[0]) != grid:
                raise CheckpointError(
                    f"{k} is for a {grid[0]}x{grid[1]} grid but its table has {table.shape[0]} rows "
                    f"(a {_grid_of_table(table.shape[0])[0]}-wide grid)"
                )
            continue
        if k.endswith("attn.k_bias"):  # timm keeps a zero k bias buffer
            if torch.count_nonzero(v):
                raise CheckpointError(f"{k} is non-zero, but BEiT has no key bias")
            continue
        out[k] = v
    return out


def _map_hf_key(k: str) -> Optional[str]:
    """This project's name for a transformers key (q/k/v weights and the key bias excepted); None: unknown."""
    m = _HF_LAYER_RE.match(k)
    if m:
        rest = _HF_BLOCK.get(m.group(2))
        return f"blocks.{int(m.group(1))}.{rest}" if rest else None
    return _HF_TOP.get(k)


def _convert_hf(sd: StateDict) -> StateDict:
    out: StateDict = {}
    source_of: Dict[str, str] = {}
    qkv: Dict[int, Dict[str, torch.Tensor]] = {}
    unknown, collisions = [], []
    for original, v in sd.items():
        k = original[len("beit.") :] if original.startswith("beit.") else original
        m = _HF_LAYER_RE.match(k)
        if m and m.group(2) in _HF_QKV:
            qkv.setdefault(int(m.group(1)), {})[_HF_QKV[m.group(2)]] = v
            continue
        if m and m.group(2) in _HF_KEY_BIAS:
            if torch.count_nonzero(v):
                raise CheckpointError(f"{original} is non-zero, but BEiT has no key bias")
            continue
        if k.endswith("relative_position_index"):  # renamed like its table, then checked and dropped
            table = _map_hf_key(k[: -len("relative_position_index")] + "relative_position_bias_table")
            new = table[: -len("relative_position_bias_table")] + "relative_position_index" if table else None
        else:
            new = _map_hf_key(k)
        if new is None:
            unknown.append(original)
        elif new in out:
            collisions.append(f"{source_of[new]} and {original} -> {new}")
        else:
            out[new], source_of[new] = v, original
    if collisions:
        # e.g. a BeitForMaskedImageModeling with use_mean_pooling=False: a final LayerNorm in the
        # backbone (beit.layernorm) AND one in the head (layernorm); BEiT has one, so one would be lost.
        raise CheckpointError(
            "transformers keys that map to the same parameter (this network has only one of each; refusing "
            f"to drop one): {collisions}"
        )
    for i, parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"layer {i}: missing attention weights for {missing}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise CheckpointError(f"unknown transformers BEiT keys (not converted): {sorted(unknown)}")
    return _check_and_drop_index(out)


def convert_state_dict(sd: Mapping[str, Any], source: str = "auto") -> StateDict:
    """Convert a unilm / timm / transformers ("hf") BEiT state dict (or a checkpoint holding one under
    "model" / "module" / "state_dict") into this project's layout. `source="auto"` detects it."""
    if source not in SOURCES + ("auto",):
        raise ValueError(f"source must be one of {SOURCES + ('auto',)}, got {source!r}")
    flat = unwrap(sd)
    if source == "auto":
        source = detect_source(flat)
    if source == "hf":
        return _convert_hf(flat)
    return _check_and_drop_index(flat)


def export_state_dict(sd: Mapping[str, torch.Tensor], target: str = "unilm", config: Any = None) -> StateDict:
    """This project's state dict in the unilm layout (index buffers included, as unilm saves them)."""
    if target != "unilm":
        raise ValueError(f"export target must be 'unilm', got {target!r}")
    out: StateDict = {}
    for k, v in sd.items():
        out[k] = v
        if k.endswith("relative_position_bias_table"):
            prefix = k[: -len("relative_position_bias_table")]
            out[prefix + "relative_position_index"] = relative_position_index(_grid_of_table(v.shape[0]))
    return out


def _adapt_to_model(sd: StateDict, model_sd: Mapping[str, torch.Tensor], depth: int) -> StateDict:
    """Shared -> per-layer bias (each block gets a copy, as unilm fine-tuning does), and resize to the model's grid:
    relative position tables with unilm's geometric method (`resize_rel_pos_bias`), `pos_embed` bicubically (both
    as unilm's `run_class_finetuning.py`)."""
    shared = "rel_pos_bias.relative_position_bias_table"
    per_layer = "blocks.0.attn.relative_position_bias_table"
    if shared in sd and shared not in model_sd and per_layer in model_sd and per_layer not in sd:
        sd = shared_to_per_layer_rel_pos_bias(sd, depth)
    out = {}
    for k, v in sd.items():
        if k in model_sd and v.shape != model_sd[k].shape:
            if k.endswith("relative_position_bias_table") and v.shape[1] == model_sd[k].shape[1]:
                v = resize_rel_pos_bias(v, _grid_of_table(model_sd[k].shape[0]))
            elif k == "pos_embed" and v.shape[-1] == model_sd[k].shape[-1]:
                n = model_sd[k].shape[1] - 1
                v = resize_pos_embed(v, (math.isqrt(n), math.isqrt(n)))
        out[k] = v
    return out


def fit_problems(sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor], missing: Sequence[str],
                 unexpected: Sequence[str], strict: bool) -> List[str]:
    """Why a state dict does not fit a model, one phrase each: shape mismatches always, missing and unexpected keys
    with `strict` ([] when it fits)."""
    mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
                        for k in set(sd) & set(model_sd) if sd[k].shape != model_sd[k].shape)
    problems = [f"shape mismatches {mismatched}"] if mismatched else []
    if strict and missing:
        problems.append(f"missing keys {list(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {list(unexpected)}")
    return problems


def load_into(
    model: torch.nn.Module, path_or_state_dict: Union[str, Path, Mapping[str, Any]], source: str = "auto",
    strict: bool = True, quiet: bool = False,
) -> Dict[str, List[str]]:
    """Convert, adapt (`_adapt_to_model`: shared -> per-layer tables, unilm's resize to the model's grid) and load.
    Returns {"missing": [...], "unexpected": [...]}; with `strict`, either being non-empty raises. Shape mismatches
    that adapting cannot fix (another width, head count or class count) always raise one `CheckpointError` line
    listing every one. `quiet`: no warning for missing / unexpected keys (a caller that reports them itself)."""
    obj = path_or_state_dict
    if isinstance(obj, (str, Path)):
        obj = load_state_dict_file(obj)
    sd = convert_state_dict(obj, source=source)
    model_sd = model.state_dict()
    sd = _adapt_to_model(sd, model_sd, len(getattr(model, "blocks", [])))
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    problems = fit_problems(sd, model_sd, missing, unexpected, strict)
    if problems:
        hint = ""
        if strict and (missing or unexpected):
            hint = (" (to fine-tune from a pretraining checkpoint, pass strict=False: missing keys keep their "
                    "initialisation, unexpected ones are ignored, and both are returned and logged)")
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems) + hint)
    model.load_state_dict({k: v for k, v in sd.items() if k in model_sd}, strict=False)
    if (missing or unexpected) and not quiet:
        log.warning("load_pretrained: missing keys %s; unexpected keys (ignored) %s", missing, unexpected)
    return {"missing": missing, "unexpected": unexpected}


# -- saving ----------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """A binary file whose first write error is kept: torch's zip writer turns an OSError raised by `write` into a
    RuntimeError without the errno (and raises again on close); the errno is what a user needs."""

    def __init__(self, f: Any) -> None:
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_error(exc: BaseException, path: Union[str, Path], recorded: Optional[OSError] = None
                ) -> CheckpointWriteError:
    """`exc` (or the OSError `recorded` beneath it) raised while writing `path`, as one CheckpointWriteError."""
    os_error = recorded or (exc if isinstance(exc, OSError) else None)
    if os_error is not None and os_error.errno:
        return CheckpointWriteError(os_error.errno, os.strerror(os_error.errno), str(path))
    return CheckpointWriteError(0, f"write failed ({type(exc).__name__}: {first_line(exc)})", str(path))


def write_torch_file(obj: Any, path: Union[str, Path], fsync: bool = True) -> None:
    """torch.save to `path` itself (no rename), flushed to disk; any write error -> `CheckpointWriteError`."""
    rec = None
    try:
        with open(path, "wb") as raw:
            rec = _RecordingFile(raw)
            torch.save(obj, rec)
            raw.flush()
            if fsync:
                os.fsync(raw.fileno())
    except (OSError, RuntimeError) as exc:
        raise write_error(exc, path, rec.error if rec is not None else None) from None


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`: a crash mid-write leaves
    any previous file at `path` intact. A write error (disk full...) removes the temporary file and raises
    `CheckpointWriteError` naming `path` and the errno."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        try:
            write_torch_file(obj, tmp)
        except CheckpointWriteError as exc:
            raise CheckpointWriteError(exc.errno, exc.strerror, str(path)) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself reaches the disk
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
