"""Runs `beit_fast.train.pretrain` with one fault injected (for tests/test_reliability.py).

usage: python tests/fault_driver.py FAULT[,FAULT...] [pretrain options...]   (also under torchrun)

FAULT, with N counting forward calls from 1 on each rank (the fault fires during that call's step):
  grad@N          after forward N, +inf into one element of cls_token's gradient (the loss stays finite)
  nanweight@N     before forward N, one weight becomes NaN (so the loss is NaN from then on)
  signal@N:SIG    at forward N this process sends itself SIG (TERM, INT); with :SIG:RANK only that rank does
  stop@N:RANK     at forward N rank RANK stops itself (SIGSTOP: hung, not dead)
  sleep@N:S       at forward N sleep S seconds (a run to kill at a known step)
  enospc@K        the K-th checkpoint file write (counted from 1) fails with ENOSPC, as on a full disk
"""

import errno
import os
import signal
import sys
import time

import torch

from beit_fast import checkpoint
from beit_fast.train import engine, pretrain


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _on_forward(call: int, action) -> None:
    for cls in (engine.PlainEngine, engine.DeepSpeedEngine):
        original = cls.forward
        count = {"n": 0}

        def forward(self, *args, _original=original, _count=count, **kwargs):
            _count["n"] += 1
            if _count["n"] == call:
                action(self, "before")
            out = _original(self, *args, **kwargs)
            if _count["n"] == call:
                action(self, "after")
            return out

        cls.forward = forward


def inject(fault: str) -> None:
    kind, _, arg = fault.partition("@")
    if kind == "grad":
        def inf_grad(eng, when):
            if when == "after":
                def hook(g):
                    handle.remove()  # this backward only
                    g = g.clone()
                    g.view(-1)[0] = float("inf")
                    return g

                handle = eng.model.cls_token.register_hook(hook)

        _on_forward(int(arg), inf_grad)
    elif kind == "nanweight":
        def nan_weight(eng, when):
            if when == "before":
                with torch.no_grad():
                    eng.model.cls_token.view(-1)[0] = float("nan")

        _on_forward(int(arg), nan_weight)
    elif kind == "signal":
        call, sig, *rank = arg.split(":")

        def send(eng, when):
            if when == "before" and (not rank or int(rank[0]) == _rank()):
                os.kill(os.getpid(), getattr(signal, "SIG" + sig))

        _on_forward(int(call), send)
    elif kind == "sleep":
        call, seconds = arg.split(":")

        def sleep(eng, when):
            if when == "before":
                time.sleep(float(seconds))

        _on_forward(int(call), sleep)
    elif kind == "stop":
        call, rank = arg.split(":")

        def stop(eng, when):
            if when == "before" and int(rank) == _rank():
                os.kill(os.getpid(), signal.SIGSTOP)

        _on_forward(int(call), stop)
    elif kind == "enospc":
        original = checkpoint.write_torch_file
        count = {"n": 0}

        def write_torch_file(obj, path, fsync=True):
            count["n"] += 1
            if count["n"] == int(arg):
                with open(path, "wb") as f:  # a part of the file reaches the disk, then it is full
                    f.write(b"partial")
                raise checkpoint.CheckpointWriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return original(obj, path, fsync)

        checkpoint.write_torch_file = write_torch_file
        engine.write_torch_file = write_torch_file
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    for f in sys.argv[1].split(","):
        inject(f)
    sys.exit(pretrain.main(sys.argv[2:]))
