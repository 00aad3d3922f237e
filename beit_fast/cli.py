"""`beit-fast` command line: `info`, `pretrain`, `mask-bench`."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional

USAGE = """beit-fast <command> [options]

commands:
  info        versions, the device, and which kernels / attention backends can run here (and why not)
  pretrain    BEiT masked-image-modeling pretraining (beit-fast pretrain --help)
  mask-bench  masks per second of the blockwise mask generator on one core
"""


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # broken extensions raise more than ImportError
        return f"not available ({type(exc).__name__})"


def info() -> int:
    import torch

    import beit_fast
    from beit_fast.attention import available_backends

    print(f"beit-fast {beit_fast.__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    for mod in ("torch", "triton", "torchvision", "timm", "transformers", "xformers", "deepspeed"):
        print(f"{mod:>13}: {_version(mod)}")
    if torch.cuda.is_available():
        dev, dtype = "cuda", torch.bfloat16
        n = torch.cuda.device_count()
        print(f"device: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), {n} GPU(s)")
    else:
        dev, dtype = "cpu", torch.float32
        print(f"device: CPU ({torch.get_num_threads()} threads); no CUDA device")
    print(f"attention backends ({dev}, {str(dtype).replace('torch.', '')}, bias with gradient):")
    for name, reasons in available_backends(dev, dtype).items():
        print(f"  {name:>9}: " + ("can run" if not reasons else "cannot run: " + "; ".join(reasons)))
    from beit_fast.kernels import interpreting, triton_reasons

    reasons = triton_reasons(dev)
    print("fused MIM kernels (masked_embed, gather_masked_layer_norm, fused_linear_cross_entropy):")
    if reasons:
        print("  cannot run: " + "; ".join(reasons) + " -> fused_kernels='auto' uses the torch reference path")
    else:
        print("  can run" + (" (through the Triton CPU interpreter: correct, slow)" if interpreting() else ""))
    return 0


def mask_bench(argv: List[str]) -> int:
    import time

    from beit_fast.masking import BlockwiseMaskGenerator

    p = argparse.ArgumentParser(prog="beit-fast mask-bench")
    p.add_argument("--input-size", type=int, default=14)
    p.add_argument("--num-masking-patches", type=int, default=75)
    p.add_argument("--n", type=int, default=20000)
    a = p.parse_args(argv)
    gen = BlockwiseMaskGenerator(a.input_size, a.num_masking_patches, seed=0)
    t0 = time.perf_counter()
    for _ in range(a.n):
        gen()
    dt = time.perf_counter() - t0
    print(f"{a.n / dt:.0f} masks/s on one core ({gen}); topped up: {gen.num_topped_up}/{a.n}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return info()
    if cmd == "pretrain":
        from beit_fast.train.pretrain import main as pretrain_main

        return pretrain_main(rest)
    if cmd == "mask-bench":
        return mask_bench(rest)
    print(f"beit-fast: error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
