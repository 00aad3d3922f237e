"""Shared plumbing of the kernels: can Triton run here, the fused switch, deferred input checks.

Deferred checks: a fused path must not synchronise with the host every step just to check
its inputs (token ids in range, equal mask counts). It computes a 0-d bool "bad" flag on the
device instead and registers it here; `check_deferred()` reads all pending flags with ONE
synchronisation and raises `ValueError` naming every check that failed. The model calls it at
the start of each forward (so a bad step is reported by the next one at the latest) and the
training loop calls it right after it reads the loss (a sync it makes anyway). On the CPU the
flags are checked at once: there is no device to wait for.
"""

from __future__ import annotations

import os
from typing import Callable, List, Tuple, Union

import torch

__all__ = ["triton_reasons", "use_fused", "defer_check", "check_deferred", "interpreting", "SM_COUNT"]

# The card the launch grids are sized for: an H100's 132 SMs. A constant, not a device query, so the launchers run on
# FakeTensors (bench/sm90_report.py) and under torch.compile; another card runs the same grids in other waves.
SM_COUNT = 132

Message = Union[str, Callable[[], str]]  # a callable is only evaluated when its check fails
_PENDING: List[Tuple[torch.Tensor, Message]] = []


def interpreting() -> bool:
    """True when Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: List[str] = []  # probed once; a plain global (not lru_cache) so torch.compile traces it cleanly


def _triton_import_error() -> str:
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_ERROR.append("")
        except Exception as exc:  # a broken install can raise more than ImportError
            _TRITON_ERROR.append(f"triton does not import: {type(exc).__name__}: {exc}".splitlines()[0])
    return _TRITON_ERROR[0]


def triton_reasons(device: Union[torch.device, str]) -> List[str]:
    """Why the Triton kernels cannot run on `device` (empty: they can)."""
    device = torch.device(device)
    reasons = []
    err = _triton_import_error()
    if err:
        reasons.append(err)
    if device.type == "cpu" and not interpreting():
        reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton compiles for GPUs only)")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"no Triton backend for device type {device.type!r}")
    return reasons


def use_fused(switch: Union[str, bool], device: Union[torch.device, str], what: str = "fused kernels") -> bool:
    """House rule 4: "auto" -> kernels where they can run, else the reference; True that cannot run raises."""
    if switch is False:
        return False
    reasons = triton_reasons(device)
    if switch is True and reasons:
        raise RuntimeError(f"{what} requested (fused_kernels=True) but cannot run: " + "; ".join(reasons))
    return not reasons


def _text(message: Message) -> str:
    return message() if callable(message) else message


def defer_check(bad: torch.Tensor, message: Message) -> None:
    """Register a 0-d bool device tensor that must be False; raise at once on the CPU.

    Inside torch.compile the flag is not registered (a compiled graph cannot append to a Python
    list); validate inputs eagerly before compiled steps if they can be bad."""
    if torch.compiler.is_compiling():
        return
    if bad.device.type == "cpu":
        if bool(bad):
            raise ValueError(_text(message))
        return
    _PENDING.append((bad.detach(), message))


def check_deferred() -> None:
    """One host synchronisation for every pending flag; raises ValueError listing those that fired."""
    if not _PENDING:
        return
    pending = list(_PENDING)
    _PENDING.clear()
    flags = torch.stack([f.reshape(()).to(pending[0][0].device) for f, _ in pending]).cpu().tolist()
    failed = [_text(msg) for (_, msg), bad in zip(pending, flags) if bad]
    if failed:
        raise ValueError("; ".join(failed))
