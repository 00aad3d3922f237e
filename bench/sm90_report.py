"""Static sm_90 report: ahead-of-time compile every Triton kernel of `beit_fast.kernels` for an H100, no GPU needed.

    python bench/sm90_report.py [--json PATH] [--quick] [--kernels relpos_attention,masked_embed]

How: each kernel module's launchers (not its autograd Functions or custom ops) are called on FakeTensor CUDA
tensors at BEiT-B / BEiT-L shapes (the CASES table below, one entry per launcher call). Every launch is recorded
instead of run, autotuned kernels contribute every config in `.configs` and heuristics are evaluated, so the
configurations compiled are exactly those the launchers pick. Each recorded launch goes through Triton's own
argument binder (pointers assumed 16-byte aligned, ints divisible by 16 or equal to 1 specialised as this Triton
version does), identical compiles are deduplicated, and `triton.compile(ASTSource(...))` builds a cubin for
`GPUTarget("cuda", 90, 32)`. Triton's bundled `cuobjdump -res-usage` / `-sass` are then read.

Columns (one row per distinct compile; `cases` in the JSON lists the launches that produced it):
  registers       registers per thread (res-usage REG)
  spill_bytes     per-thread stack frame + local memory (res-usage STACK + LOCAL); > 0 means spills
  local_ops       LDL / STL instructions in the SASS (local-memory loads / stores)
  shared_bytes    dynamic shared memory per block (Triton metadata `shared`: what the launch requests and what
                  Triton checks against the device's opt-in limit, 227 KB = 232448 bytes on sm_90)
  static_shared   static shared memory per block (res-usage SHARED; 1 KB in many of Triton's sm_90 kernels), not
                  part of Triton's dynamic request above
  atomics         global atomic instructions (ATOM / ATOMG / RED / REDG)
  membar_atomics  GPU- or system-scope MEMBARs within 4 instructions of an atomic (an acq_rel / seq_cst atomic,
                  tl.atomic_add's default, compiles to MEMBAR.ALL.GPU + the atomic + CCTL.IVALL: slow)
  mma             matrix instructions (HGMMA, HMMA, IMMA, QGMMA, IGMMA)
  dots            tt.dot ops in the TTIR after constexpr folding; `ieee_dots` (JSON only) counts the fp32 ones at
                  input_precision="ieee", which compile to FFMA, not to MMA (fp32 at "tf32", the default, gives MMA)
  compile_s       seconds for triton.compile, cold (a private, temporary Triton cache is used)

Against another Triton (the GPU image has 3.6):
    pip install --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python bench/sm90_report.py --json /tmp/sm90_triton36.json
The compile must not run with TRITON_INTERPRET=1 (under it triton.language's own jit functions are interpreter
functions and cannot be compiled); `report()` then re-runs this file in a subprocess without that variable.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

SMEM_LIMIT = 232448  # 227 KB: the most shared memory one block may use on sm_90
MODULES = ("masked_embed", "gather_layer_norm", "fused_linear_cross_entropy", "relpos_attention", "tokenizer_head")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# -- the case table: one function per launcher call, shapes in the lists below ----------------------------------------
def _kmod(name: str) -> types.ModuleType:
    return importlib.import_module(f"beit_fast.kernels.{name}")


def _cuda(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="cuda", dtype=dtype)


def _masked_embed(B: int, N: int, D: int, dt: torch.dtype, tok_dt: torch.dtype) -> None:
    m = _kmod("masked_embed")
    x, mask, tok = _cuda(B, N, D, dtype=dt), _cuda(B, N, dtype=torch.bool), _cuda(D, dtype=tok_dt)
    out = m.masked_embed_fwd(x, mask, tok, tok, _cuda(N + 1, D, dtype=tok_dt))
    m.masked_embed_bwd(torch.empty_like(out), mask, dt)


def _gather_layer_norm(B: int, N: int, D: int, K: int, dt: torch.dtype) -> None:
    m = _kmod("gather_layer_norm")
    hidden, rows, w = _cuda(B, N + 1, D, dtype=dt), _cuda(B * K, dtype=torch.int64), _cuda(D, dtype=dt)
    y, mean, rstd = m.gather_masked_layer_norm_fwd(hidden, rows, w, w, 1e-6)
    m.gather_masked_layer_norm_bwd(torch.empty_like(y), hidden, rows, mean, rstd, w)


def _fused_linear_cross_entropy(M: int, D: int, V: int, dt: torch.dtype, grad: bool) -> None:
    m = _kmod("fused_linear_cross_entropy")
    w = _cuda(V, D, dtype=dt)
    m.fused_linear_cross_entropy_fwd(_cuda(M, D, dtype=dt), w, _cuda(V, dtype=dt), _cuda(M, dtype=torch.int64),
                                     1.0 / M, grad)


def _relpos_attention(B: int, H: int, N: int, Dh: int, dt: torch.dtype, bias: str) -> None:
    """q, k, v and the gradients as the model passes them: strided views of one packed (B, N, 3*D) buffer; the bias
    as the kernels read it, padded (H, P, P) in the compute dtype."""
    m = _kmod("relpos_attention")
    P = m.padded_len(N)
    padded = _cuda(H, P, P, dtype=dt) if bias == "padded" else None
    heads = lambda t: t.view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # noqa: E731
    q, k, v = heads(_cuda(B, N, 3 * H * Dh, dtype=dt))
    dq, dk, dv = heads(_cuda(B, N, 3 * H * Dh, dtype=dt))
    out = _cuda(B, N, H * Dh, dtype=dt).view(B, N, H, Dh).transpose(1, 2)
    lse = m.relpos_attention_fwd(q, k, v, padded, Dh**-0.5, out)
    m.relpos_attention_bwd(torch.empty_like(out), q, k, v, out, lse, padded, Dh**-0.5, dq, dk, dv, bias != "none")


def _tokenizer_head(B: int, C: int, side: int, V: int, dt: torch.dtype, channels_last: bool,
                    weight_dt: Optional[torch.dtype] = None) -> None:
    feats = _cuda(B, C, side, side, dtype=dt)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    _kmod("tokenizer_head").tokenizer_head_argmax(feats, _cuda(V, C, 1, 1, dtype=weight_dt or dt), _cuda(V))


# (module, label, quick, dtypes, call(dtype)). BEiT-B: D=768, H=12; BEiT-L: D=1024, H=16; head_dim 128: H=8, D=1024.
# N counts tokens (cls included): 197 at 224 px, 577 at 384 px; 40% of the patches masked (K rows per image).
Case = Tuple[str, str, bool, Sequence[str], Callable[[torch.dtype], None]]
CASES: List[Case] = []
for _D in (768, 1024):
    for _N in (197, 577):
        _K, _quick = int(0.4 * (_N - 1)), _D == 768 and _N == 197
        CASES.append(("masked_embed", f"B=128 N={_N} D={_D}", _quick, ("bf16", "fp32"),
                      lambda dt, N=_N, D=_D: _masked_embed(128, N - 1, D, dt, dt)))
        CASES.append(("masked_embed", f"B=128 N={_N} D={_D} x bf16, tokens fp32 (autocast)", _quick, ("bf16",),
                      lambda dt, N=_N, D=_D: _masked_embed(128, N - 1, D, dt, torch.float32)))
        CASES.append(("gather_layer_norm", f"B=128 N={_N} D={_D} K={_K}", _quick, ("bf16", "fp32"),
                      lambda dt, N=_N, D=_D, K=_K: _gather_layer_norm(128, N - 1, D, K, dt)))
    for _grad in (True, False):
        CASES.append(("fused_linear_cross_entropy", f"M=9600 D={_D} V=8192 grad={_grad}", _D == 768, ("bf16", "fp32"),
                      lambda dt, D=_D, g=_grad: _fused_linear_cross_entropy(9600, D, 8192, dt, g)))
for _H, _Dh in ((12, 64), (16, 64), (8, 128)):
    for _N in (197, 577):
        for _bias in ("padded", "none"):
            CASES.append(("relpos_attention", f"B=128 H={_H} N={_N} Dh={_Dh} bias={_bias}", (_H, _N) == (12, 197),
                          ("bf16", "fp32"), lambda dt, H=_H, N=_N, Dh=_Dh, b=_bias: _relpos_attention(128, H, N, Dh,
                                                                                                       dt, b)))
for _cl in (True, False):  # DALL-E encoder: 8 * n_hid = 2048 feature channels at 14 x 14 for 112 px images
    CASES.append(("tokenizer_head", f"B=128 C=2048 14x14 V=8192 {'channels_last' if _cl else 'NCHW'}", _cl,
                  ("bf16", "fp32"), lambda dt, cl=_cl: _tokenizer_head(128, 2048, 14, 8192, dt, cl)))
# what DalleTokenizer's fast path ships: bf16 features, fp16 head weights (channels_last)
CASES.append(("tokenizer_head", "B=128 C=2048 14x14 V=8192 channels_last, fp16 weights", True, ("bf16",),
              lambda dt: _tokenizer_head(128, 2048, 14, 8192, dt, True, torch.float16)))


# -- recording launches on fake tensors -------------------------------------------------------------------------------
class _Launch:
    def __init__(self, kernel: Any, args: tuple, kwargs: dict, case: str) -> None:
        self.kernel, self.args, self.kwargs, self.case = kernel, args, kwargs, case


def _kernel_classes() -> List[type]:
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    classes = [JITFunction, Autotuner, Heuristics]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def _recording(launches: List[_Launch], case: List[str]) -> Iterator[None]:
    """Kernel launches append to `launches` instead of running. Launchers are keyed on shapes and dtypes only
    (kernels._common.SM_COUNT, never a device query): one that asks the device fails here, on purpose."""
    from beit_fast.kernels import _common

    def record(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(_Launch(self, args, kwargs, case[0]))

    classes = _kernel_classes()
    saved = [(cls, "run", cls.__dict__["run"]) for cls in classes]
    pending = list(_common._PENDING)  # deferred input checks register fake flags: not ours to keep
    try:
        for cls in classes:
            cls.run = record
        with FakeTensorMode():
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        _common._PENDING[:] = pending


def record_launches(modules: Sequence[str] = MODULES, quick: bool = False) -> List[_Launch]:
    launches: List[_Launch] = []
    case = [""]
    with _recording(launches, case):
        for module, label, in_quick, dtypes, call in CASES:
            if module not in modules or (quick and not in_quick):
                continue
            for name in dtypes[:1] if quick else dtypes:
                case[0] = f"{module}: {label} {name}"
                call(DTYPES[name])
    return launches


# -- from a launch to a compile ---------------------------------------------------------------------------------------
class _Ptr:
    """Stands for a tensor argument in Triton's binder: its dtype, a 16-byte aligned address (as a fresh allocation)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    @staticmethod
    def data_ptr() -> int:
        return 0


def _expand(kernel: Any, args: tuple, kwargs: dict) -> Iterator[Tuple[Any, tuple, dict]]:
    """(JITFunction, args, kwargs) for each config an Autotuner / Heuristics wrapper could launch."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    if isinstance(kernel, Autotuner):
        for config in kernel.configs:
            yield from _expand(kernel.fn, args, {**kwargs, **config.all_kwargs()})
    elif isinstance(kernel, Heuristics):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        yield from _expand(kernel.fn, args, {**kwargs, **{k: h(named) for k, h in kernel.values.items()}})
    else:
        yield kernel, args, kwargs


def _bind(fn: Any, args: tuple, kwargs: dict, backend: Any) -> Tuple[Any, dict, dict, dict]:
    """Triton's own binder and packing (JITFunction.run's path): options, signature, constexprs, attrs."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = tuple(_Ptr(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: _Ptr(v.dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    # as JITFunction.run does before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):  # Triton >= 3.8
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _config_text(fn: Any, constexprs: dict, options: Any) -> str:
    consts = " ".join(f"{fn.arg_names[k[0]]}={v}" for k, v in sorted(constexprs.items()) if len(k) == 1)
    return f"{consts} w{options.num_warps} s{options.num_stages}"


def _signature_dtype(signature: dict) -> str:
    """The first floating-point pointer's element type: the kernel's input / compute dtype in this code base."""
    ptrs = [v[1:] for v in signature.values() if isinstance(v, str) and v[1:] in ("bf16", "fp16", "fp32")]
    return ptrs[0] if ptrs else "-"


# -- reading the cubin ------------------------------------------------------------------------------------------------
_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA|IGMMA)\b")
_ATOM = re.compile(r"\b(ATOM|ATOMG|RED|REDG)\b")
_MEMBAR_GPU = re.compile(r"\bMEMBAR(\.\w+)*\.(GPU|SYS|GL)(?![.\w])")  # the scope is the last part: MEMBAR.ALL.GPU
_LOCAL = re.compile(r"\b(LDL|STL)\b")
# an fp32 x fp32 tt.dot left at the default precision (ieee, not printed) or marked ieee: FFMA on purpose, no MMA
_IEEE_DOT = re.compile(r"\btt\.dot\b(?!.*inputPrecision = (?!ieee)).*: tensor<[^>]*xf32> \* tensor<[^>]*xf32>")
_SASS_INST = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+([^;]*);", re.M)  # "/*0a10*/  HGMMA.64x64x16... ;"


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"Triton's bundled {name} is missing ({path})")
    return str(path)


def toolchain_missing() -> str:
    """Why this machine cannot build and read sm_90 cubins ("" when it can): the NVIDIA backend, ptxas, cuobjdump."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"Triton {triton.__version__} has no NVIDIA backend"
    for name in ("ptxas", "cuobjdump"):
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if name == "ptxas" and os.environ.get("TRITON_PTXAS_PATH"):
            path = Path(os.environ["TRITON_PTXAS_PATH"])
        if not os.access(path, os.X_OK):
            return f"{name} is missing or not executable ({path})"
    return ""


def read_cubin(cubin: bytes) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout)}
    insts = _SASS_INST.findall(sass)
    atoms = [n for n, i in enumerate(insts) if _ATOM.search(i)]
    membars = [n for n, i in enumerate(insts) if _MEMBAR_GPU.search(i)]
    return {
        "registers": res.get("REG", 0),
        "spill_bytes": res.get("STACK", 0) + res.get("LOCAL", 0),
        "local_ops": sum(bool(_LOCAL.search(i)) for i in insts),
        "static_shared": res.get("SHARED", 0),
        "atomics": len(atoms),
        "membar_atomics": sum(any(abs(m - a) <= 4 for a in atoms) for m in membars),
        "mma": sum(bool(_MMA.search(i)) for i in insts),
    }


# -- the report -------------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    """True when triton.language's own jit functions are interpreter functions (TRITON_INTERPRET=1 at import)."""
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return not isinstance(standard.cdiv, JITFunction)


def _in_subprocess(modules: Sequence[str], quick: bool) -> List[Dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, __file__, "--json", out, "--kernels", ",".join(modules), "--no-table"]
        proc = subprocess.run(cmd + (["--quick"] if quick else []), env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)["rows"]


def report(modules: Sequence[str] = MODULES, quick: bool = False) -> List[Dict[str, Any]]:
    """One row per distinct sm_90 compile of the kernels the launchers of `modules` choose (see the docstring)."""
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise ValueError(f"unknown kernel modules {unknown}; known: {', '.join(MODULES)}")
    if _interpreted():
        return _in_subprocess(modules, quick)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    rows: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as cache, _triton_cache(cache):
        for launch in record_launches(modules, quick):
            for fn, args, kwargs in _expand(launch.kernel, launch.args, launch.kwargs):
                options, signature, constexprs, attrs = _bind(fn, args, kwargs, backend)
                key = repr((fn.fn.__module__, fn.fn.__qualname__, signature, constexprs, attrs,
                            sorted(options.__dict__.items())))
                if key in rows:
                    rows[key]["cases"].append(launch.case)
                    continue
                start = time.perf_counter()
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                seconds = time.perf_counter() - start
                stats = read_cubin(compiled.asm["cubin"])
                ttir = compiled.asm["ttir"]
                rows[key] = {
                    "module": fn.fn.__module__.rsplit(".", 1)[-1], "kernel": fn.fn.__name__,
                    "config": _config_text(fn, constexprs, options), "dtype": _signature_dtype(signature),
                    **stats, "shared_bytes": int(compiled.metadata.shared),
                    "dots": len(re.findall(r"\btt\.dot\b", ttir)),
                    "ieee_dots": sum(bool(_IEEE_DOT.search(line)) for line in ttir.splitlines()),
                    "compile_s": round(seconds, 2), "cases": [launch.case],
                }
    return list(rows.values())


@contextlib.contextmanager
def _triton_cache(path: str) -> Iterator[None]:
    """Cold compiles (honest compile_s) that leave the user's Triton cache alone."""
    before = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = before


def problems(row: Dict[str, Any]) -> List[str]:
    """Why a compiled kernel is not fit to ship on sm_90 (empty: it is)."""
    out = []
    if row["spill_bytes"] or row["local_ops"]:
        out.append(f"spills ({row['spill_bytes']} B/thread stack+local, {row['local_ops']} LDL/STL)")
    if row["shared_bytes"] > SMEM_LIMIT:
        out.append(f"shared memory {row['shared_bytes']} B > {SMEM_LIMIT}")
    if row["membar_atomics"]:
        out.append(f"{row['membar_atomics']} GPU-scope MEMBARs beside atomics")
    if row["dots"] > row["ieee_dots"] and not row["mma"]:
        out.append("tl.dot without a matrix instruction")
    return out


COLUMNS = ("registers", "spill_bytes", "local_ops", "shared_bytes", "atomics", "membar_atomics", "mma", "dots",
           "compile_s")


def _short_case(cases: List[str]) -> str:
    first = cases[0].split(": ", 1)[-1].replace("B=128 ", "")
    return first + (f" (+{len(cases) - 1})" if len(cases) > 1 else "")


def format_table(rows: List[Dict[str, Any]]) -> str:
    heads = ("kernel", "dtype", "config", "regs", "spill", "LDL/STL", "smem", "atom", "membar", "mma", "dots", "s",
             "first case (+ more with this compile)", "problems")
    body = [(r["kernel"], r["dtype"], r["config"], *(str(r[c]) for c in COLUMNS), _short_case(r["cases"]),
             "; ".join(problems(r)) or "ok") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(heads, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [heads, *body])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--json", help="write the rows, the Triton / torch versions and the date here")
    p.add_argument("--quick", action="store_true", help="BEiT-B shapes in bf16 only (the CI test's set)")
    p.add_argument("--kernels", default=",".join(MODULES), help="comma-separated kernel modules")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    start = time.perf_counter()
    rows = report([m for m in a.kernels.split(",") if m], a.quick)
    if not a.no_table:
        print(format_table(rows))
        print(f"{len(rows)} compiles for sm_90, Triton {triton.__version__}, {time.perf_counter() - start:.0f} s; "
              f"{sum(bool(problems(r)) for r in rows)} with problems")
    if a.json:
        doc = {"triton": triton.__version__, "torch": torch.__version__, "target": "cuda sm_90 (warp 32)",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "quick": a.quick, "rows": rows}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
