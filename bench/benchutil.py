"""Timing and memory helpers shared by the benchmark suites.

On a CUDA machine: CUDA-event medians and the allocator's peak. `BEIT_BENCH_SMOKE=1` runs the same
suites on the CPU at tiny shapes through the Triton interpreter (wall-clock times, no memory
figures): a check that the suite's code paths work, not a measurement.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

SMOKE = os.environ.get("BEIT_BENCH_SMOKE", "0") not in ("", "0")
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
    """torch.compile as a user would (inductor); aot_eager in smoke mode (no C++ toolchain wait)."""
    return torch.compile(fn, dynamic=False, backend="aot_eager" if SMOKE else "inductor")
