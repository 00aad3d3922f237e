"""Static sm_90 checks of every Triton kernel, no GPU needed: bench/sm90_report.py --quick (BEiT-B shapes, bf16).

Each kernel the launchers pick is compiled for an H100 with this Triton and read back with its bundled cuobjdump:
no register spills, shared memory within the 227 KB an sm_90 block may use, no atomics that compile with a full
GPU memory barrier, and a matrix instruction wherever the kernel does a tl.dot. Under TRITON_INTERPRET=1 (set by
conftest on CPU machines) the report compiles in a subprocess without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "sm90_report.py"
_spec = importlib.util.spec_from_file_location("sm90_report", _PATH)
sm90 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm90)


@pytest.fixture(scope="module")
def rows():
    missing = sm90.toolchain_missing()
    if missing:
        pytest.skip(missing)
    return sm90.report(quick=True)


def _failures(rows, check):
    return "\n".join(f"{r['kernel']} [{r['config']}] ({r['cases'][0]}): {why}" for r in rows
                     for why in check(r))


def test_every_kernel_module_compiles(rows):
    assert {r["module"] for r in rows} == set(sm90.MODULES)
    assert all(r["registers"] > 0 for r in rows), "res-usage not parsed"
    assert any(r["mma"] > 0 for r in rows), "SASS not parsed"


def test_no_spills(rows):
    bad = _failures(rows, lambda r: [f"{r['spill_bytes']} B/thread stack+local, {r['local_ops']} LDL/STL"]
                    if r["spill_bytes"] or r["local_ops"] else [])
    assert not bad, "register spills on sm_90:\n" + bad


def test_shared_memory_fits_sm90(rows):
    bad = _failures(rows, lambda r: [f"{r['shared_bytes']} B"] if r["shared_bytes"] > sm90.SMEM_LIMIT else [])
    assert not bad, f"shared memory over {sm90.SMEM_LIMIT} B per block:\n" + bad


def test_no_barrier_atomics(rows):
    bad = _failures(rows, lambda r: [f"{r['membar_atomics']} MEMBARs beside {r['atomics']} atomics"]
                    if r["membar_atomics"] else [])
    assert not bad, "atomics compiled with a full GPU memory barrier (use sem='relaxed' or no atomics):\n" + bad


def test_dots_use_matrix_instructions(rows):
    bad = _failures(rows, lambda r: [f"{r['dots']} tl.dot, 0 HGMMA/HMMA"] if r["dots"] > r["ieee_dots"]
                    and not r["mma"] else [])
    assert not bad, "tl.dot compiled without matrix instructions:\n" + bad


def test_problems_names_each_defect():
    ok = {"spill_bytes": 0, "local_ops": 0, "shared_bytes": 1024, "membar_atomics": 0, "dots": 2, "ieee_dots": 0,
          "mma": 8}
    assert sm90.problems(ok) == []
    bad = {**ok, "spill_bytes": 72, "local_ops": 34, "shared_bytes": sm90.SMEM_LIMIT + 1, "membar_atomics": 3,
           "mma": 0}
    assert [p.split(" ")[0] for p in sm90.problems(bad)] == ["spills", "shared", "3", "tl.dot"]
    assert sm90.problems({**ok, "ieee_dots": 2, "mma": 0}) == []  # IEEE fp32 dots are FFMA by design


def test_ieee_dot_detection():
    """TTIR leaves the default precision (ieee) unprinted; tf32 and the bf16 x3 modes are printed."""
    f32 = ": tensor<64x64xf32> * tensor<64x64xf32> -> tensor<64x64xf32>"
    assert sm90._IEEE_DOT.search("%4 = tt.dot %a, %b, %c " + f32)
    assert sm90._IEEE_DOT.search("%4 = tt.dot %a, %b, %c, inputPrecision = ieee " + f32)
    assert not sm90._IEEE_DOT.search("%4 = tt.dot %a, %b, %c, inputPrecision = tf32 " + f32)
    assert not sm90._IEEE_DOT.search("%4 = tt.dot %a, %b, %c : tensor<64x64xbf16> * tensor<64x64xbf16> -> tensor<6")


def test_autotuned_kernels_expand_to_every_config():
    """A launch of an autotuned + heuristics kernel is recorded, not run, and yields one compile per config."""
    import torch
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=4),
                              triton.Config({"BLOCK": 64}, num_warps=8, num_stages=2)], key=["n"])
    @triton.heuristics({"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})
    @triton.jit
    def _double(x_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    launches = []
    with sm90._recording(launches, ["toy"]):
        x = torch.empty(96, device="cuda")
        _double[(3,)](x, 96)
    assert len(launches) == 1 and launches[0].case == "toy"
    jobs = [kw for _, _, kw in sm90._expand(launches[0].kernel, launches[0].args, launches[0].kwargs)]
    assert [(kw["BLOCK"], kw["EVEN"], kw["num_warps"], kw["num_stages"]) for kw in jobs] == [(32, True, 4, 3),
                                                                                                (64, False, 8, 2)]
