"""`beit-fast` command line: a table of commands, each the `main(argv) -> exit status` of a module."""

from __future__ import annotations

import argparse
import platform

import sys
from typing import List, Optional

from beit_fast.config import first_line, one_line

USAGE = """usage: beit-fast <command> [options]   (beit-fast --version; beit-fast <command> --help)

commands:
  info        versions, the device, and which kernels / attention backends can run here (and why not)
  pretrain    BEiT masked-image-modeling pretraining (beit-fast pretrain --help)
  finetune    classification fine-tuning from a pretraining run, a unilm / timm / transformers checkpoint or scratch
  linprobe    linear probing of a frozen backbone, every layer in one pass (beit-fast finetune --linear-probe)
  evaluate    top-1 / top-5 / loss, per-class accuracy and a confusion-matrix PNG of a fine-tuned checkpoint
  segment     semantic-segmentation fine-tuning: BEiT + multi-scale adapter + UperNet (beit-fast segment --help)
  segment-eval  mIoU, per-class IoU / accuracy, aAcc of a segmentation checkpoint (slide, multi-scale + flip)
  study       the paper's ablation table at your scale: pretraining variants x seeds, fine-tuned, probed, segmented
  attention-maps  self-attention maps of a checkpoint per head, and the share of attention on the query's own shape
  export      a pretraining checkpoint's weights in the unilm layout, for fine-tuning elsewhere
  mask-bench  masks per second of the blockwise mask generator on one core
  train-tokenizer  train a DALL-E-style dVAE tokenizer (beit-fast train-tokenizer --help)
  tokenize    write a token cache of a dataset with fixed views (beit-fast tokenize --help)
  make-shards  write an image folder as WebDataset tar shards, for --data (beit-fast make-shards --help)
"""
# command -> "module:function"; each function takes the remaining arguments and returns the exit status
COMMANDS = {
    "info": "beit_fast.cli:info",
    "pretrain": "beit_fast.train.pretrain:main",
    "finetune": "beit_fast.train.finetune:main",
    "linprobe": "beit_fast.train.finetune:linprobe_main",
    "evaluate": "beit_fast.train.classify:evaluate_main",
    "segment": "beit_fast.train.segment:main",
    "segment-eval": "beit_fast.train.segment:evaluate_main",
    "study": "beit_fast.train.study:main",
    "attention-maps": "beit_fast.train.attention_maps:main",
    "export": "beit_fast.cli:export",
    "mask-bench": "beit_fast.cli:mask_bench",
    "train-tokenizer": "beit_fast.train.train_tokenizer:main",
    "tokenize": "beit_fast.cli:tokenize",
    "make-shards": "beit_fast.cli:make_shards",
}


def _error(prog: str, message: str) -> int:
    """Every usage error of the CLI: one line on stderr, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block), as everywhere in this CLI."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # broken extensions raise more than ImportError
        return f"not available ({type(exc).__name__})"


def info(argv: Optional[List[str]] = None) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: beit-fast info\n\nversions, the device, and which kernels / attention backends can run here")
        return 0
    if argv:
        return _error("beit-fast info", f"unexpected argument(s) {' '.join(argv)!r}; info takes none")
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
    from beit_fast.views import resize_library

    print(f"input pipeline (--data-backend cpu | gpu | pil): {resize_library()}")
    return 0


def make_shards(argv: List[str]) -> int:
    p = _OneLineParser(prog="beit-fast make-shards",
                       description="Write the images of DIR (class subfolders or flat) as WebDataset tar shards "
                                   "(KEY.jpg + KEY.cls), plus shards.json; --data then takes the directory or pattern.")
    p.add_argument("dir", help="the image folder")
    p.add_argument("--out", required=True, help="shard file pattern with a %%d field, e.g. shards/in1k-%%06d.tar")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-size", type=float, default=1.0, help="GB per shard at most (default 1)")
    try:
        a = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    from beit_fast.shards import make_shards as write

    try:
        shards, samples = write(a.dir, a.out, max_count=a.max_count, max_bytes=int(a.max_size * 2**30))
    except (ValueError, OSError, TypeError) as exc:
        return _error(p.prog, one_line(str(exc)) or type(exc).__name__)
    print(f"{samples} images -> {shards} shard(s) {a.out} (index: shards.json beside them)")
    return 0


def mask_bench(argv: List[str]) -> int:
    import time

    from beit_fast.masking import BlockwiseMaskGenerator

    p = _OneLineParser(prog="beit-fast mask-bench")
    p.add_argument("--input-size", type=int, default=14, help="mask grid side (patches)")
    p.add_argument("--num-masking-patches", type=int, default=75, help="masked patches per mask")
    p.add_argument("--n", type=int, default=20000, help="masks to generate")
    try:
        a = p.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, reported): main() returns, never exits
        return exc.code if isinstance(exc.code, int) else 2
    if a.n <= 0:
        return _error(p.prog, f"--n must be positive, got {a.n}")
    try:
        gen = BlockwiseMaskGenerator(a.input_size, a.num_masking_patches, seed=0)
    except ValueError as exc:
        return _error(p.prog, str(exc))
    t0 = time.perf_counter()
    for _ in range(a.n):
        gen()
    dt = time.perf_counter() - t0
    print(f"{a.n / dt:.0f} masks/s on one core ({gen}); topped up: {gen.num_topped_up}/{a.n}")
    return 0


def tokenize(argv: List[str]) -> int:
    """Token ids of every image of a dataset under ONE fixed view (center crop, resize): for ablations and
    linear probes. Writes {"tokens" (N, grid*grid), "labels" (N,), "tokenizer", "image_size", "data"}."""
    import torch

    p = _OneLineParser(prog="beit-fast tokenize")
    p.add_argument("--tokenizer", required=True, help="tokenizer file (train-tokenizer's tokenizer.pt, encoder.pkl)")
    p.add_argument("--data", default="builtin", help='"builtin" or an image folder')
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--num-images", type=int, default=2048, help="size of the built-in dataset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="built-in dataset seed")
    try:
        a = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if a.batch_size <= 0 or a.num_images <= 0:
        return _error(p.prog, "--batch-size and --num-images must be positive")
    from torchvision.transforms import functional as TF

    from beit_fast.checkpoint import atomic_save
    from beit_fast.data import DataError, build_dataset
    from beit_fast.kernels import check_deferred
    from beit_fast.tokenizer import DalleTokenizer, PickleRefusedError, TokenizerFileError

    try:
        tok = DalleTokenizer.from_files(a.tokenizer, fast="auto")
    except (FileNotFoundError, TokenizerFileError, PickleRefusedError) as exc:  # every bad tokenizer file
        return _error(p.prog, first_line(exc))
    try:
        data = build_dataset(a.data, num_images=a.num_images, seed=a.seed, size=max(16, tok.image_size * 3 // 2))
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        return _error(p.prog, str(exc))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = tok.to(device)
    tokens, labels = [], []
    try:  # a folder whose images cannot be read, or an --out that cannot be written: one line, exit 1
        for start in range(0, len(data), a.batch_size):
            batch = [data[i] for i in range(start, min(len(data), start + a.batch_size))]
            views = torch.stack([TF.to_tensor(TF.resize(TF.center_crop(img, min(img.size)), [tok.image_size] * 2))
                                 for img, _ in batch])
            tokens.append(tok.tokenize(views.to(device)).cpu())
            labels += [label for _, label in batch]
            check_deferred()
        ids = torch.cat(tokens)
        ids = ids.to(torch.int16 if tok.vocab_size <= 32767 else torch.int32)
        atomic_save({"tokens": ids, "labels": torch.tensor(labels), "tokenizer": tok.description,
                     "image_size": tok.image_size, "data": a.data}, a.out)
    except (DataError, OSError) as exc:
        print(f"{p.prog}: error: {first_line(exc)}", file=sys.stderr)
        return 1
    print(f"{ids.shape[0]} images -> {tuple(ids.shape)} tokens ({tok.description}) written to {a.out}")
    return 0


def export(argv: List[str]) -> int:
    """`beit-fast export CKPT --out FILE`: {"model": unilm state dict} of a pretraining checkpoint (a plain
    engine's step_*.pt or a DeepSpeed step_*/ directory, or a run directory: its newest checkpoint)."""
    from pathlib import Path

    p = _OneLineParser(prog="beit-fast export")
    p.add_argument("checkpoint", help="step_*.pt, a DeepSpeed step_*/ directory, or a run directory (newest one)")
    p.add_argument("--out", required=True, help="output .pth file")
    p.add_argument("--layout", default="unilm", choices=["unilm"], help="state-dict layout (default unilm)")
    try:
        a = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    from beit_fast.train.pretrain import export_checkpoint
    from beit_fast.train.run import resolve_checkpoint

    try:
        path = resolve_checkpoint(Path(a.checkpoint))
    except (FileNotFoundError, ValueError) as exc:
        return _error(p.prog, str(exc))
    try:  # every file is read weights-only: a hostile checkpoint is refused, nothing in it runs
        written = export_checkpoint(path, a.out, a.layout)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # not a checkpoint, mismatched weights: exit 2
        return _error(p.prog, one_line(str(exc)) or type(exc).__name__)
    except OSError as exc:  # --out cannot be written (disk full, permissions): exit 1
        print(f"{p.prog}: error: {first_line(exc)}", file=sys.stderr)
        return 1
    print(f"{path} -> {written} ({a.layout} layout)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done, 2 usage error (one line on stderr; usage itself on stderr when no command
    is given), 1 a run that failed, as each command documents."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N right after the script; the rank is read from LOCAL_RANK.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv:
        print(USAGE, file=sys.stderr, end="")
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if cmd in ("-V", "--version"):
        import beit_fast

        print(f"beit-fast {beit_fast.__version__}")
        return 0
    if cmd in COMMANDS:
        import importlib

        module, function = COMMANDS[cmd].split(":")
        return getattr(importlib.import_module(module), function)(rest)
    what = "option" if cmd.startswith("-") else "command"
    return _error("beit-fast", f"unknown {what} {cmd!r}; commands: {', '.join(COMMANDS)} (beit-fast --help)")


if __name__ == "__main__":
    sys.exit(main())
