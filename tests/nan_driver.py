"""Runs `beit_fast.train.pretrain` with a non-finite loss injected at one forward call (for tests/test_engine.py).

usage: python tests/nan_driver.py CALL [pretrain options...]   (also under torchrun); CALL counts forward calls from 1
on every rank alike, so each rank's loss at that call becomes NaN.
"""

import sys

from beit_fast.train import engine, pretrain


def inject(call: int) -> None:
    for cls in (engine.PlainEngine, engine.DeepSpeedEngine):
        original = cls.forward
        count = {"n": 0}

        def forward(self, *args, _original=original, _count=count, **kwargs):
            out = _original(self, *args, **kwargs)
            _count["n"] += 1
            if _count["n"] == call:
                out.loss = out.loss * float("nan")
            return out

        cls.forward = forward


if __name__ == "__main__":
    inject(int(sys.argv[1]))
    sys.exit(pretrain.main(sys.argv[2:]))
