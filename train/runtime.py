"""Where a run executes: process layout, device, precision, backend checks, distributed init, seeds.

`setup_runtime(cfg, mcfg)` is every training script's first step after its config: it reads the process layout a
launcher set (deepspeed, torchrun; a plain run is one process), resolves the device and precision, and checks that
the attention backend and fused kernels the model config asks for can run here - all before any work starts, so a
bad combination is one line, not a failure at step 1. `start_distributed` brings up DeepSpeed's process group with a
bounded collective timeout (a hung rank ends the job instead of blocking it).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from beit_fast.attention import AttentionCase, select_backend
from beit_fast.config import BeitConfig
from beit_fast.kernels import use_fused
from beit_fast.train.engine import deepspeed_reasons, init_distributed_env

__all__ = ["Runtime", "setup_runtime", "process_layout", "resolve_device", "check_backends", "start_distributed",
           "end_distributed", "seed_all", "worker_init", "is_distributed_error", "train_loader", "build_engine",
           "close_loader", "run_main", "one_line_error"]


@dataclass
class Runtime:
    world: int  # processes
    rank: int
    local_rank: int
    device: torch.device
    bf16: bool  # bf16 autocast (CUDA only)
    deepspeed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_layout() -> Tuple[int, int, int]:
    """(world size, rank, local rank) as a launcher (deepspeed, torchrun) sets them; a plain run is one process."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"),  # type: ignore
                                                        ("LOCAL_RANK", "0")))


def resolve_device(device: str, deepspeed: bool = False, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU if CUDA is available, else the CPU; under deepspeed each process takes the GPU of
    its LOCAL_RANK."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if deepspeed else torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here")
    if dev.type == "cuda" and deepspeed:
        if dev.index is not None:
            raise ValueError(f"device={device!r}: under deepspeed each process takes the GPU of its LOCAL_RANK; "
                             "use device=cuda (pick GPUs with CUDA_VISIBLE_DEVICES or the launcher)")
        dev = torch.device("cuda", local_rank)
    return dev


def check_backends(mcfg: BeitConfig, device: torch.device, bf16: bool) -> None:
    """An explicit attention backend or fused_kernels=True that cannot run here fails now, not at step 1."""
    try:
        use_fused(mcfg.fused_kernels, device, "fused MIM kernels")
        case = AttentionCase(
            device_type=device.type,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            head_dim=mcfg.head_dim,
            bias_requires_grad=mcfg.use_shared_rel_pos_bias or mcfg.use_rel_pos_bias,
            dropout_p=mcfg.attn_drop_rate,
        )
        select_backend(mcfg.attn_backend, case)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def setup_runtime(cfg, mcfg: Optional[BeitConfig] = None) -> Runtime:
    """The process layout, device and precision of a run of `cfg` (a BeitTrainConfig: device, precision,
    deepspeed, batch_size, grad_accum_steps), checked: one-line ValueErrors before anything starts."""
    world, rank, local_rank = process_layout()
    deepspeed = bool(getattr(cfg, "deepspeed", False))
    if not deepspeed and world > 1:
        raise ValueError(f"launched as {world} processes, but the plain engine is one process: "
                         "add --deepspeed (with --zero-stage 0-3)")
    device = resolve_device(cfg.device, deepspeed, local_rank)
    precision = getattr(cfg, "precision", "auto")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise ValueError("precision=bf16 needs a CUDA device (bf16 autocast on the CPU is slow and untested here)")
    if mcfg is not None:
        check_backends(mcfg, device, bf16)
    accum = getattr(cfg, "grad_accum_steps", 1)
    if cfg.batch_size % (world * accum):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by processes x grad_accum_steps = "
                         f"{world} x {accum}")
    return Runtime(world=world, rank=rank, local_rank=local_rank, device=device, bf16=bf16, deepspeed=deepspeed)


def start_distributed(device: torch.device, timeout_s: float) -> None:
    """DeepSpeed's process group (from the launcher's environment, or a one-process group when run plainly); every
    collective waits at most `timeout_s` (a hung rank ends the job instead of blocking it)."""
    init_distributed_env(device.type)
    reason = deepspeed_reasons()
    if reason:
        raise ValueError(f"deepspeed=true: {reason}")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(device)


def end_distributed() -> None:
    """Tear the process group down after a run that finished: an interpreter exiting with gloo's threads still
    joinable aborts ('terminate called without an active exception', SIGABRT) - a finished run reported as failed.
    Not called on a failure, where a dead peer would hang the teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while a peer is still in a collective of the run
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """torch, python and numpy global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def worker_init(_: int) -> None:
    """Data-loader worker start-up."""
    # One intra-op thread per worker: the workers' small tensor ops otherwise fight the training
    # step for the same cores (OpenMP spin-waits made steps 10x slower on 2 cores).
    torch.set_num_threads(1)
    # A Ctrl-C (the whole process group) or a scheduler's SIGTERM to every process must not kill the workers
    # while the main process finishes its step and checkpoint; they end with it.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def is_distributed_error(exc: BaseException) -> bool:
    """A torch.distributed failure (a collective's timeout, a peer gone): DistError and its kinds, or gloo's and
    NCCL's RuntimeErrors, which name themselves."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Timed out", "timed out"))


def train_loader(dataset: torch.utils.data.Dataset, cfg: Any, rt: Runtime, start_step: int,
                 collate_fn: Optional[Any] = None) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of the global step-addressed stream (`StepBatchSampler`: step k's batch is a pure
    function of (seed, k), so a resumed run sees exactly the batches an uninterrupted one would)."""
    from beit_fast.data import MicroBatchSampler, StepBatchSampler

    sampler = MicroBatchSampler(StepBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start_step),
                                rank=rt.rank, world_size=rt.world, grad_accum=cfg.grad_accum_steps)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched by workers
        worker_init_fn=worker_init,
        collate_fn=collate_fn,
    )


def close_loader(loader: Any, iterator: Any = None) -> None:
    """Stop a loader's worker processes now. The workers ignore SIGTERM (`worker_init`), so ones still alive when the
    interpreter exits - a persistent iterator kept by the loader, or one that outlives the loop in a reference cycle -
    would leave multiprocessing's exit handler waiting on them forever."""
    for it in (iterator, getattr(loader, "_iterator", None)):
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    if hasattr(loader, "_iterator"):
        loader._iterator = None


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, rt: Runtime) -> Any:
    """The plain engine, or DeepSpeed ZeRO `cfg.zero_stage` (the process group must be up: `start_distributed`);
    torch.compile'd when asked."""
    from beit_fast.train.engine import DeepSpeedEngine, PlainEngine

    common = dict(device=rt.device, bf16=rt.bf16, clip_grad=cfg.clip_grad, grad_accum=cfg.grad_accum_steps)
    if rt.deepspeed:
        engine: Any = DeepSpeedEngine(model, optimizer, micro_batch=cfg.batch_size // (rt.world * cfg.grad_accum_steps),
                                      zero_stage=cfg.zero_stage, **common)
    else:
        engine = PlainEngine(model, optimizer, **common)
    if cfg.compile:
        engine.compile(cfg.compile_mode)
    return engine


def one_line_error(exc: BaseException) -> str:
    """An exception's message as one line. A DataLoader worker re-raises with the worker's traceback in the
    message ("Caught X in DataLoader worker process 0. Original Traceback ..."): keep its last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in lines[1]:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines)


def cli_call(prog: str, fn: Callable[[], Any]) -> Tuple[Any, int]:
    """(fn(), 0) for a command that is not a training run (`beit-fast evaluate`, `segment-eval`); on an error one line
    on stderr and (None, 2) for bad input (ValueError, a missing file or folder, a checkpoint that does not fit) or
    (None, 1) for data that cannot be read mid-way and I/O errors - the exit codes of `run_main`."""
    from beit_fast.checkpoint import CheckpointError
    from beit_fast.data import DataError

    try:
        return fn(), 0
    except (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError) as exc:
        code, message = 2, one_line_error(exc)
    except (DataError, OSError) as exc:
        code, message = 1, one_line_error(exc)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return None, code


def run_main(prog: str, doc: str, config_cls: Any, run: Callable[[Any], Dict[str, Any]], argv: Optional[List[str]],
             report: Callable[[Dict[str, Any]], None]) -> int:
    """A training script's `main`: `--help`, the config from `argv`, `run(cfg)`, then `report(summary)` on rank 0.

    Exit 0 done; 2 bad input (config, arguments, missing data, a bad checkpoint or tokenizer file, a run
    directory in use); 1 the data or the run failed (too many skipped steps, a write error such as a full disk, a
    hung or dead rank); 128 + N stopped by signal N (SIGTERM 143, SIGINT 130) after writing a checkpoint.
    Every expected failure is one line on stderr; anything else keeps its traceback (a bug to report)."""
    from beit_fast.data import DataError
    from beit_fast.train.step import StoppedBySignal, TrainingStopped

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(config_cls.help_text(doc))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    timeout = getattr(config_cls, "dist_timeout", 600.0)
    try:
        cfg = config_cls.from_args(argv)
        timeout = getattr(cfg, "dist_timeout", timeout)
        summary = run(cfg)
        end_distributed()
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"{prog}: error: {one_line_error(exc)}", file=sys.stderr)
        return 2
    except (DataError, TrainingStopped, OSError) as exc:
        print(f"{prog}: error: {one_line_error(exc)}", file=sys.stderr)
        return 1
    except StoppedBySignal as exc:
        if process_layout()[1] == 0:  # one line for the job, not one per rank
            print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except RuntimeError as exc:
        if not is_distributed_error(exc):
            raise
        print(f"{prog}: error: a collective failed or timed out (dist_timeout={timeout:g} s): another process is "
              f"hung or dead ({type(exc).__name__}: {one_line_error(exc)[:300]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last checkpoint is intact (resume with --resume auto)", file=sys.stderr)
        return 130
    if summary.get("rank", 0) == 0:
        report(summary)
    return 0
