"""Timing and memory helpers shared by the benchmark suites.

On a CUDA machine: CUDA-event medians and the allocator's peak. `BEIT_BENCH_SMOKE=1` runs the same
suites on the CPU at tiny shapes through the Triton interpreter (wall-clock times, no memory
figures): a check that the suite's code paths work, not a measurement.

`graph_ms` times the replay of a CUDA graph of fn (for launch-bound ops: what a graph-captured training
step pays), falling back to plain launches on the CPU or when fn cannot be captured (a host sync).
`BEIT_BENCH_QUICK=1` (`SUITE=quick` of bench/gpu_suite.sh): the suites run their quick shapes and no
inductor-compiled peer; `BEIT_BENCH_NO_COMPILE=1` alone drops only the compiled peers: `compile_fn` returns
None and suites record that peer as "not run" instead of compiling it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, List, Optional, Tuple

import torch

SMOKE = os.environ.get("BEIT_BENCH_SMOKE", "0") not in ("", "0")
QUICK = os.environ.get("BEIT_BENCH_QUICK", "0") not in ("", "0")
NO_COMPILE = QUICK or os.environ.get("BEIT_BENCH_NO_COMPILE", "0") not in ("", "0")
NO_COMPILE_NOTE = "not run: no inductor compile in the quick suite (BEIT_BENCH_QUICK / BEIT_BENCH_NO_COMPILE)"
DEVICE = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
AVAILABLE = DEVICE == "cuda" or SMOKE


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 30) -> float:
    """Median time of fn() over `iters` calls after `warmup` (CUDA events on a GPU)."""
    if SMOKE:
        warmup, iters = 1, 3
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_extra_gb(fn: Callable[[], object]) -> float:
    """Peak memory allocated during fn() above what was allocated before it, in GB (nan on the CPU)."""
    if DEVICE != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def compile_fn(fn):
    """torch.compile as a user would (inductor); aot_eager in smoke mode (no C++ toolchain wait);
    None under BEIT_BENCH_NO_COMPILE=1 (callers record the peer as not run, with NO_COMPILE_NOTE)."""
    if NO_COMPILE:
        return None
    return torch.compile(fn, dynamic=False, backend="aot_eager" if SMOKE else "inductor")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """`Type: message`, first line, shortened: the note of a peer row that failed."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:limit]


def graph_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 30) -> Tuple[float, str]:
    """(median ms of one replay of a CUDA graph of fn(), how it was timed). fn's tensors must stay alive and in
    place (the graph replays on the same memory). Plain launches (median_ms) on the CPU, or when capture fails
    (fn synchronises with the host, e.g. a boolean-mask index): the second item says which."""
    if DEVICE != "cuda":
        return median_ms(fn, warmup, iters), "plain launches (no CUDA)"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
    except Exception as exc:  # not capturable: time the launches instead, and say so
        torch.cuda.synchronize()
        return median_ms(fn, warmup, iters), f"plain launches (graph capture failed: {first_line(exc, 80)})"
    _GRAPHS.append(graph)  # keep its memory pool alive until the session ends (replays may be timed again)
    return median_ms(graph.replay, warmup, iters), "CUDA graph replay"


_GRAPHS: List[object] = []
_COPY_GBPS: List[float] = []


def copy_gbps(nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9), measured once per session: the
    roofline of the memory-bound kernels, reported beside them as a fraction."""
    if not _COPY_GBPS:
        n = nbytes or (2 if SMOKE else 512) * 2**20
        src = torch.empty(n, device=DEVICE, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), warmup=3, iters=20)
        _COPY_GBPS.append(2 * n / ms / 1e6)
    return _COPY_GBPS[0]
