"""Benchmark plumbing: CUDA-event timing, peak memory, and one results table per session.

Every benchmark records rows through the `record` fixture; at the end of the session the rows are
printed as a compact table and written as JSON + Markdown to $BENCH_OUT (default
bench/results/latest), with the card, versions and commit.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

_ROWS: List[Dict] = []


def environment() -> Dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "n/a"
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor()})"
    try:
        root = Path(__file__).resolve().parent.parent
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        env["commit"] = "unknown"
    return env


@pytest.fixture
def record():
    def _record(**row):
        _ROWS.append(row)
        _write(final=False)  # after every row: a suite killed by its time limit keeps what it measured

    return _record


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


_ENV: Dict[str, str] = {}


def _write(final: bool) -> None:
    if not _ROWS:
        return
    if not _ENV:
        _ENV.update(environment())
    env = _ENV
    out = Path(os.environ.get("BENCH_OUT", Path(__file__).parent / "results" / "latest"))
    out.mkdir(parents=True, exist_ok=True)
    cols: List[str] = []
    for r in _ROWS:
        cols += [k for k in r if k not in cols]
    lines = [f"# beit-fast benchmarks ({env['device']}; torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['commit']})", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in _ROWS]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    (out / "bench.json").write_text(json.dumps({"environment": env, "rows": _ROWS}, indent=2))
    if final:
        print("\n" + "\n".join(lines), file=sys.stderr)
        print(f"\nresults written to {out}/bench.md and bench.json", file=sys.stderr)


def pytest_sessionfinish(session, exitstatus):
    _write(final=True)
