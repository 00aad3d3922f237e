"""Helpers shared by the test modules (independent of the library code they check)."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int, std: float = 0.02, table_std: float = 0.3) -> None:
    """Add noise to every parameter (larger on the relative position tables so the bias matters)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        s = table_std if name.endswith("relative_position_bias_table") else std
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * s)


def spec_index(h: int = 14, w: int = 14) -> torch.Tensor:
    """SPEC section 1, written independently of the library with loops: (hi-hj+h-1)*(2w-1) + (wi-wj+w-1) for
    patches, row 0 = T-3 (cls -> patch), column 0 = T-2 (patch -> cls), [0, 0] = T-1; for 14x14: 27, 729-731."""
    rows = (2 * h - 1) * (2 * w - 1) + 3
    n = h * w
    idx = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n):
        hi, wi = divmod(i, w)
        for j in range(n):
            hj, wj = divmod(j, w)
            idx[i + 1, j + 1] = (hi - hj + h - 1) * (2 * w - 1) + (wi - wj + w - 1)
    idx[0, :] = rows - 3
    idx[:, 0] = rows - 2
    idx[0, 0] = rows - 1
    return idx


def pretrain_config(out, default_model: dict, **kw):
    """A small `PretrainConfig` for loop tests: the tiny preset with model overrides (`model=` in kw, else
    `default_model`), in-process data, fp32."""
    from beit_fast.train.pretrain import PretrainConfig

    base = dict(preset="tiny", out=str(out), max_steps=6, batch_size=8, num_images=64,
                num_workers=0, warmup_steps=2, save_every=3, log_every=1, seed=3, lr=1e-3)
    base.update(kw)
    base["model"] = dict(kw.get("model", default_model))
    return PretrainConfig(**base)


def metrics_rows(out) -> list:
    """The rows of a run's metrics.csv as dicts."""
    import csv
    from pathlib import Path

    with open(Path(out) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def run_cli(*args, env_extra=None, cwd=None, timeout: int = 300):
    """`python -m beit_fast.cli ARGS` as a user's shell runs it: without TRITON_INTERPRET (the CPU takes the
    reference path), plus `env_extra`. Returns the CompletedProcess (text output)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "beit_fast.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def crash_after_checkpoint(monkeypatch, run, at_step: int) -> None:
    """`run()` with the plain engine raising right after writing its step-`at_step` checkpoint (a crash), checked to
    have crashed; the engine is restored afterwards."""
    import pytest

    from beit_fast.train.engine import PlainEngine

    original = PlainEngine.save

    def save_then_crash(self, ckpt_dir, step, meta):
        path = original(self, ckpt_dir, step, meta)
        if step == at_step:
            raise RuntimeError("simulated crash")
        return path

    monkeypatch.setattr(PlainEngine, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(PlainEngine, "save", original)
