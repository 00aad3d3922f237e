"""Training engines: one interface over a plain single process and DeepSpeed ZeRO (stages 0-3), for any model.

Every training script drives either engine the same way, per optimizer step (`beit_fast.train.step.run_step`):

    engine.set_lr(lr)
    for each micro-batch of the step:
        out = engine.forward(...)                    # bf16 autocast when asked
        finite, *flags = engine.all_finite(out.loss, ok, not stop)  # every rank agrees (one all-reduce)
        if not finite: break
        engine.backward(out.loss)                    # accumulates, scaled by 1 / grad_accum
    all finite: norm = engine.step()                 # clip, optimizer, zero grads -> global grad norm
    else:       engine.discard()                     # drop what was accumulated: the step is skipped

`step()` applies the update only when the global gradient norm is finite (on every rank: the norm is global), and
returns the norm either way: a non-finite norm means the step was skipped and nothing changed (weights, optimizer
state, its step count). The norm's host read is the step's one sync (it was there before, for the metrics).

`PlainEngine` is one process: torch AdamW (fused on CUDA), `clip_grad_norm_`, plain gradient accumulation.

`DeepSpeedEngine` wraps `deepspeed.initialize` with the same optimizer (the reference parameter groups; DeepSpeed
calls it an "untested optimizer" - it is torch's own AdamW) and DeepSpeed's gradient clipping. bf16 uses DeepSpeed's
`torch_autocast` mode: fp32 master weights, bf16 compute and bf16 gradient communication of the Linear weights, the
same numerics as the plain engine's autocast. Gradient accumulation runs in DeepSpeed's unmanaged mode
(`managed_gradient_accumulation=False`): `backward()` only accumulates and `step()` is the boundary, so a step can
be abandoned part-way on every rank (`discard`) without desynchronising DeepSpeed's counters.

Checkpoints: the plain engine writes one file `step_XXXXXXXX.pt`; DeepSpeed writes a directory `step_XXXXXXXX/`
(its own sharded model/optimizer files, one RNG file per rank, `meta.pt` with the run state, `model.pt` with the
consolidated fp32 weights for export, and last `manifest.json` listing every file and its size: a directory is a
checkpoint only when every file its manifest lists is there). Both are written under a temporary name and renamed
when complete, so a crash mid-write leaves the previous checkpoint intact. A write error on any rank (disk full) is
agreed by every rank, the temporary directory is removed and every rank raises `CheckpointWriteError`. DeepSpeed
reads and writes its files through `SafeCheckpointEngine`: `beit_fast.checkpoint.safe_load` (weights only, nothing
in a file runs) and the errno-keeping writer. On several nodes the run directory must be on a filesystem that every
node sees (rank 0 renames).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from beit_fast.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    _fsync_dir,
    atomic_save,
    safe_load,
    write_error,
    write_torch_file,
)
from beit_fast.config import first_line, one_line
from beit_fast.train.optim import set_lr
from beit_fast.train.run import MANIFEST, atomic_save_json, checkpoint_name

log = logging.getLogger("beit_fast.pretrain")

__all__ = ["PlainEngine", "DeepSpeedEngine", "rng_state", "set_rng_state", "deepspeed_reasons", "init_distributed_env"]

def rng_state() -> Dict[str, Any]:
    """Every RNG's state as tensors, ints and strings only: a checkpoint needs no global to be allowed on load."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], where: str = "checkpoint") -> None:
    """Restore `rng_state()`'s output (or an older checkpoint's, with numpy arrays); a malformed state raises
    CheckpointError (one line) before any generator is changed."""
    try:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
        numpy_state = (str(kind), keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss))
        torch_state = state["torch"]
        if not (torch.is_tensor(torch_state) and torch_state.dtype == torch.uint8):
            raise TypeError(f"torch state is a {type(torch_state).__name__}, not a uint8 tensor")
        probe = torch.Generator()
        probe.set_state(torch_state)  # validates the size before the global generator is touched
        np.random.RandomState().set_state(numpy_state)
        random.Random().setstate(state["python"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: malformed RNG state ({type(exc).__name__}: {first_line(exc)})") from None
    torch.set_rng_state(torch_state)
    random.setstate(state["python"])
    np.random.set_state(numpy_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_finite(tensors: List[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the tensors' device: is every element of every tensor finite (no host sync)."""
    flags = [t.detach().isfinite().all() for t in tensors if t.numel()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def _load_state(what: str, module: Any, state: Any, where: str) -> None:
    """`module.load_state_dict(state)` with a hand-edited or mismatched state reported in one line. An optimizer's
    per-parameter tensors (moments) must have their parameter's shape: torch does not check, and a mismatch would
    only fail inside the first step."""
    try:
        module.load_state_dict(state)
        if isinstance(module, torch.optim.Optimizer):
            for group in module.param_groups:
                for p in group["params"]:
                    for key, value in module.state.get(p, {}).items():
                        if torch.is_tensor(value) and value.numel() > 1 and value.shape != p.shape:
                            raise ValueError(f"state {key!r} of shape {tuple(value.shape)} for a parameter of shape "
                                             f"{tuple(p.shape)}")
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        text = one_line(f"{type(exc).__name__}: {exc}")
        raise CheckpointError(f"{where}: the {what} state does not fit this run ({text[:400]})") from None


class PlainEngine:
    """One process, no DeepSpeed."""

    kind = "plain"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 bf16: bool, clip_grad: float, grad_accum: int) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.bf16, self.clip_grad, self.grad_accum = bf16, clip_grad, grad_accum
        self._forward = model
        self.compiled = ""

    def compile(self, mode: str = "default") -> None:
        """torch.compile the forward (and so the backward); checkpoints keep the plain module's names."""
        self._forward = torch.compile(self.model, mode=mode)
        self.compiled = mode

    def describe(self) -> str:
        extra = f", torch.compile ({self.compiled})" if self.compiled else ""
        return f"one process on {self.device}, {'bf16 autocast' if self.bf16 else 'fp32'}{extra}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._forward(*args, **kwargs)

    def all_finite(self, loss: torch.Tensor, *flags: bool) -> Tuple[bool, ...]:
        """(is the loss finite, is each flag true) - on every process; here there is one."""
        return (bool(torch.isfinite(loss)), *flags)  # the micro-batch's one host sync

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone()

    def gather_union(self, items: set) -> set:
        """The union of every rank's `items` (here: one rank)."""
        return set(items)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        """Clip, then the optimizer step only if the global gradient norm is finite; returns the norm (non-finite:
        nothing was changed). A fused optimizer (torch's fused AdamW on CUDA) is told through its `found_inf` input,
        as GradScaler does, so the skip needs no host sync before the update; others read the norm first."""
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.clip_grad if self.clip_grad > 0 else float("inf")
        )
        opt = self.optimizer
        if getattr(opt, "_step_supports_amp_scaling", False) and norm.is_cuda:
            opt.found_inf, opt.grad_scale = (~torch.isfinite(norm)).float(), None
            try:
                opt.step()  # skips every update, and undoes its step count, where found_inf is 1
            finally:
                del opt.found_inf, opt.grad_scale
            value = float(norm)
        else:
            value = float(norm)
            if math.isfinite(value):
                opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    def discard(self) -> None:
        """Drop the gradients accumulated so far in this step (a non-finite micro-batch skips the step)."""
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        """The schedule's lr, times each group's `lr_scale` (layer-wise decay)."""
        set_lr(self.optimizer, lr)

    def barrier(self) -> None:
        pass

    def save(self, ckpt_dir: Path, step: int, meta: Dict[str, Any]) -> Path:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng_state()}
        return atomic_save({**state, **meta}, ckpt_dir / f"{checkpoint_name(step)}.pt")

    def params_finite(self) -> bool:
        """Are all weights finite (one host sync; before a checkpoint is written)."""
        return bool(_all_finite(list(self.model.parameters())))

    def load(self, path: Path, ckpt: Dict[str, Any]) -> None:
        _load_state("model", self.model, ckpt["model"], str(path))
        _load_state("optimizer", self.optimizer, ckpt["optimizer"], str(path))
        set_rng_state(ckpt["rng"], str(path))

    def close(self) -> None:
        pass


def deepspeed_reasons() -> Optional[str]:
    """None if `import deepspeed` works here, else why not (one line)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or DeepSpeed's own accelerator errors
        why = str(exc).splitlines()[0] if str(exc) else ""
        return f"DeepSpeed does not import ({type(exc).__name__}: {why}); pip install -e '.[deepspeed]' installs it"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed_env(device_type: str) -> None:
    """Environment for `deepspeed.init_distributed` when no launcher set it (one process: `beit-fast pretrain
    --deepspeed`), and DeepSpeed's accelerator for a CPU run (it must be chosen before deepspeed is imported)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 0-3 around the model and the reference AdamW."""

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 bf16: bool, clip_grad: float, grad_accum: int, micro_batch: int, zero_stage: int) -> None:
        import deepspeed
        import torch.distributed as dist

        self.device, self.bf16, self.grad_accum, self.zero_stage = device, bf16, grad_accum, zero_stage
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        zero: Dict[str, Any] = {"stage": zero_stage}
        if zero_stage == 2:
            zero.update(overlap_comm=True, contiguous_gradients=True)
        if zero_stage == 3:
            zero.update(stage3_gather_16bit_weights_on_model_save=True)
        config: Dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * self.world_size,
            "managed_gradient_accumulation": False,
            # A huge bound when clipping is off: DeepSpeed then still computes (and we log) the global norm.
            "gradient_clipping": clip_grad if clip_grad > 0 else 1e30,
            "zero_optimization": zero,
            # torch's AdamW on the reference groups; DeepSpeed only knows its own optimizers by name.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        if bf16:
            config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        self.config = config
        self._zero3 = _Zero3Outputs(model) if zero_stage == 3 else None
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self._zero3 or model, optimizer=optimizer,
                                                             config=config)
        self.model = model
        self.compiled = ""
        self.ds.checkpoint_engine = _safe_checkpoint_engine()
        # DeepSpeed copies zero_to_fp32.py beside the checkpoints on rank 0, outside its checkpoint engine (a full
        # disk there would fail rank 0 alone); model.pt already holds the consolidated weights.
        self.ds._copy_recovery_script = lambda *args, **kwargs: None
        if zero_stage == 0:
            self._guard_stage0(optimizer)

    def _guard_stage0(self, optimizer: torch.optim.Optimizer) -> None:
        """DeepSpeed's stage-0 step clips (after its all-reduce) without keeping the norm, and applies the update
        whatever the norm (ZeRO 1-3 treat a non-finite norm as an overflow and skip): keep the norm, and skip the
        torch optimizer's step when it is not finite - the same global value on every rank."""
        from deepspeed.runtime.utils import clip_grad_norm_

        self._z0_norm = float("nan")

        def clip_and_record() -> None:
            self._z0_norm = float(clip_grad_norm_(parameters=self.ds.module.parameters(),
                                                  max_norm=self.ds.gradient_clipping(), mpu=self.ds.mpu))

        self.ds.clip_fp32_gradients = clip_and_record
        torch_step = optimizer.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if math.isfinite(self._z0_norm):
                return torch_step(*args, **kwargs)
            return None

        optimizer.step = guarded_step  # type: ignore[method-assign]

    def compile(self, mode: str = "default") -> None:
        self.ds.compile(compile_kwargs={"mode": mode})
        self.compiled = mode

    def describe(self) -> str:
        import deepspeed

        extra = f", torch.compile ({self.compiled})" if self.compiled else ""
        return (f"DeepSpeed {deepspeed.__version__} ZeRO-{self.zero_stage}, {self.world_size} process(es), "
                f"{self.device.type}, {'bf16 autocast' if self.bf16 else 'fp32'}{extra}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.ds(*args, **kwargs)
        return out if self._zero3 is None else self._zero3.unpack(out)

    def all_finite(self, loss: torch.Tensor, *flags: bool) -> Tuple[bool, ...]:
        """(is the loss finite on every rank, is each flag true on every rank): one all-reduce, so every rank takes
        the same path - a NaN on one rank skips the step everywhere, a failed input check on one stops them all, a
        signal on one stops every rank after the same step."""
        values = torch.tensor([float(f) for f in flags], dtype=torch.float32).to(loss.device, non_blocking=True)
        return self._all_true(torch.cat([torch.isfinite(loss.detach()).to(torch.float32).reshape(1), values]))

    @staticmethod
    def _all_true(flags: torch.Tensor) -> Tuple[bool, ...]:
        """Each of a float tensor of 0/1 flags, true on every rank: one all-reduce (MIN) and one read."""
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return tuple(bool(v) for v in flags.tolist())

    def agree(self, ok: bool) -> bool:
        """Is `ok` true on every rank (one all-reduce; outside the step loop)."""
        return self._all_true(torch.tensor([float(ok)], device=self.device))[0]

    def params_finite(self) -> bool:
        """Are the weights finite on every rank (each rank checks what it holds: its ZeRO-3 partitions)."""
        params = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in self.model.parameters()]
        return self._all_true(_all_finite(params).float().reshape(1).to(self.device))[0]

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.detach().to(torch.float32).clone()
        dist.all_reduce(t)
        return t / self.world_size

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def gather_union(self, items: set) -> set:
        """The union of every rank's `items` (small sets of ints: once an epoch and at checkpoints)."""
        import torch.distributed as dist

        parts: List[Any] = [None] * self.world_size
        dist.all_gather_object(parts, sorted(items))
        return set().union(*parts)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> float:
        """DeepSpeed's step; the global norm (non-finite: ZeRO 1-3 skipped it as an overflow, stage 0 by our
        guard). A skipped step reports inf, whatever DeepSpeed kept from an earlier step."""
        if self.zero_stage == 0:
            self._z0_norm = float("nan")
            self.ds.step()
            return self._z0_norm
        self.ds.step()
        if getattr(self.ds.optimizer, "overflow", False):
            return float("inf")
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def discard(self) -> None:
        """Drop the gradients accumulated so far in this step, on every rank, the way DeepSpeed itself drops them
        after an fp16 overflow (ZeRO-1/2 keep reduced partitions, ZeRO-3 partition buffers, between backwards)."""
        opt = self.ds.optimizer
        if self.zero_stage == 0:
            self.ds.zero_grad()
        elif self.zero_stage == 3:
            opt._overflow_clean_up(opt.loss_scale)
        else:
            opt.zero_grad(set_to_none=True)
            if hasattr(opt, "_release_preflattened_grad_buffers"):
                opt._release_preflattened_grad_buffers()
            if getattr(opt, "cpu_offload", False):
                opt.reset_cpu_buffers()
            for k in list(getattr(opt, "averaged_gradients", {})):
                opt.averaged_gradients[k] = None
                if hasattr(opt, "all_grad_tensors"):
                    opt.all_grad_tensors[k] = None
            opt.micro_step_id = -1  # the next backward starts a new accumulation (DeepSpeed's INITIAL_MICRO_STEP_ID)
        if hasattr(self.ds, "_unmanaged_backward_count"):
            self.ds._unmanaged_backward_count = 0

    def set_lr(self, lr: float) -> None:
        """The schedule's lr, times each group's `lr_scale` (layer-wise decay)."""
        set_lr(self.optimizer, lr)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The whole fp32 model state on rank 0 (a collective under ZeRO-3), None on the other ranks."""
        if self.zero_stage == 3:
            sd = self.ds._zero3_consolidated_16bit_state_dict()
            return {k.removeprefix("model."): v.detach().cpu().clone() for k, v in sd.items()} if self.is_main else None
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()} if self.is_main else None

    def save(self, ckpt_dir: Path, step: int, meta: Dict[str, Any]) -> Path:
        """Every rank writes its part into `.tmp-step_N/`; a write error on any rank is agreed by all (the
        collectives of DeepSpeed's save still run in order: its writer records the error instead of raising), the
        temporary directory is removed and every rank raises CheckpointWriteError. Else rank 0 writes the manifest
        last and renames the directory into place."""
        tag = checkpoint_name(step)
        final, tmp = ckpt_dir / tag, ckpt_dir / f".tmp-{tag}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a crash mid-write
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.barrier()
        writer = self.ds.checkpoint_engine
        writer.error = None
        self.ds.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)
        full = self.full_state_dict()  # a collective under ZeRO-3: every rank, in order
        error: Optional[CheckpointWriteError] = writer.error
        mine: Dict[str, int] = {}
        try:
            if error is None:
                tmp.mkdir(parents=True, exist_ok=True)
                write_torch_file(rng_state(), tmp / f"rng_rank{self.rank:05d}.pt")
                if self.is_main:
                    write_torch_file({"model": full}, tmp / "model.pt")
                    write_torch_file({**meta, "engine": {"kind": self.kind, "world_size": self.world_size,
                                                         "zero_stage": self.zero_stage}}, tmp / "meta.pt")
                mine = self._fsync_mine(tmp)
        except CheckpointWriteError as exc:
            error = exc
        except OSError as exc:
            error = write_error(exc, exc.filename or tmp)
        if not self.agree(error is None):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier()
            raise error or CheckpointWriteError(0, "another process could not write its part (its error is in its "
                                                   "log)", str(final))
        # The manifest lists what each rank wrote, as that rank sees it (on several nodes rank 0's view of another
        # node's files can lag behind).
        import torch.distributed as dist

        parts: List[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        if self.is_main:
            try:
                files = {name: size for part in parts for name, size in part.items()}
                atomic_save_json({"step": step, "files": dict(sorted(files.items()))}, tmp / MANIFEST)
                _fsync_dir(tmp)
                old = ckpt_dir / f".old-{tag}"
                if final.exists():  # the same step saved again (a finished run resumed and extended): swap, drop
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                os.replace(tmp, final)
                _fsync_dir(ckpt_dir)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = write_error(exc, exc.filename or final)
        if not self.agree(error is None):
            raise error or CheckpointWriteError(0, "rank 0 could not complete the checkpoint (its error is in its "
                                                   "log)", str(final))
        return final

    def _fsync_mine(self, tmp: Path) -> Dict[str, int]:
        """Every rank flushes what it wrote (on several nodes rank 0 cannot flush another node's writes): its ZeRO
        shard and RNG file; rank 0 also the shared files (model states, model.pt, meta.pt). Returns {name: size}
        of those files, for the manifest."""
        sizes = {}
        for f in tmp.iterdir():
            shard = "zero_pp_rank_" in f.name or "rng_rank" in f.name
            mine = f"zero_pp_rank_{self.rank}_" in f.name or f.name == f"rng_rank{self.rank:05d}.pt"
            if f.is_file() and (mine or (self.is_main and not shard)):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                    sizes[f.name] = os.fstat(fh.fileno()).st_size
        return sizes

    def load(self, path: Path, ckpt: Dict[str, Any]) -> None:
        """DeepSpeed's shards (read through `safe_load`), then this rank's RNG file, which must be there."""
        rng = path / f"rng_rank{self.rank:05d}.pt"
        here = rng.is_file()
        if not self.agree(here):  # every rank stops, not only the one whose file is missing
            what = rng.name if not here else "another rank's RNG file"
            raise CheckpointError(f"{path}: {what} is missing (every rank's RNG state is part of a checkpoint)")
        try:
            loaded, _ = self.ds.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except (CheckpointError, FileNotFoundError):
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AssertionError, IndexError, AttributeError) as exc:
            text = one_line(f"{type(exc).__name__}: {exc}")
            raise CheckpointError(f"{path}: DeepSpeed could not load it ({text[:400]})") from None
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load the checkpoint")
        set_rng_state(safe_load(rng, what="RNG state file"), str(rng))

    def close(self) -> None:
        """Nothing to wait for: the last collective is the final checkpoint's (and the token histogram's) - what
        rank 0 writes after it (summary, plot) must not keep the other ranks waiting if it fails."""


def _safe_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine with our reader (weights only: a hostile shard runs nothing) and our
    writer (a write error is recorded, with its errno, for `DeepSpeedEngine.save` to agree on across ranks)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        error: Optional[CheckpointWriteError] = None

        def save(self, state_dict: Any, path: str) -> None:
            if self.error is not None:
                return  # the disk is already failing: the save will be abandoned
            try:
                write_torch_file(state_dict, path, fsync=False)  # fsynced with the rest before the rename
            except CheckpointWriteError as exc:
                self.error = exc

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            try:
                os.makedirs(path, exist_ok=exist_ok)
            except OSError as exc:
                self.error = self.error or write_error(exc, path)

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location=map_location, what="DeepSpeed checkpoint file",
                             extra_globals=_deepspeed_globals())

    return SafeCheckpointEngine()


def _deepspeed_globals() -> List[Any]:
    """The classes DeepSpeed pickles into its optimizer shards (found by `get_unsafe_globals_in_checkpoint` on ZeRO
    0-3 checkpoints): plain records and an enum, whose unpickling sets attributes and runs nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _Zero3Outputs(torch.nn.Module):
    """ZeRO-3 gathers a module's parameters around its forward and, through hooks on the tensors it returns, around
    its backward. A model may return a dataclass (no hooks attach to it) and read parameters directly instead of
    calling their modules (tokens, a shared bias table the attention kernel gathers itself, a head's LayerNorm and
    Linear handed to a fused kernel as tensors). This wrapper returns the output's fields as a tuple (non-tensors
    as tensors; `unpack` rebuilds the dataclass) and declares as its own every parameter the model holds outside its
    `blocks` (a few MB) plus the Linear weights that attention reads with F.linear, so they are gathered for the
    whole forward and backward. Nothing here names a task's model or output type."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._output_type: Any = None
        from deepspeed.runtime.zero import register_external_parameter

        for p in _outside_blocks(model):
            register_external_parameter(self, p)
        for module in model.modules():
            if hasattr(module, "qkv") and hasattr(module, "proj"):  # Attention: F.linear on its child's weight
                register_external_parameter(module, module.qkv.weight)

    def forward(self, *args: Any, **kwargs: Any):
        out = self.model(*args, **kwargs)
        if not dataclasses.is_dataclass(out):
            self._output_type = None
            return out
        self._output_type = type(out)
        self._kinds = {f.name: type(getattr(out, f.name)) for f in dataclasses.fields(out)}
        return tuple(v if torch.is_tensor(v) or v is None else torch.tensor(v)
                     for v in (getattr(out, f.name) for f in dataclasses.fields(out)))

    def unpack(self, out: Any) -> Any:
        if self._output_type is None:
            return out
        values = {name: (kind(v.item()) if kind in (int, float, bool) else v)
                  for (name, kind), v in zip(self._kinds.items(), out)}
        return self._output_type(**values)


def _outside_blocks(model: torch.nn.Module):
    """Every parameter of `model` except those inside its `blocks` (the bulk, which ZeRO-3 gathers per block)."""
    blocks = getattr(model, "blocks", None)
    inside = {id(p) for p in blocks.parameters()} if isinstance(blocks, torch.nn.Module) else set()
    yield from (p for p in model.parameters() if id(p) not in inside)
