"""Training engines: one interface over a plain single process and DeepSpeed ZeRO (stages 0-3).

The pretraining loop (`beit_fast.train.pretrain`) drives either engine the same way, per optimizer step:

    engine.set_lr(lr)
    for each micro-batch of the step:
        out = engine.forward(...)                    # bf16 autocast when asked
        if not engine.all_finite(out.loss)[0]: break # every rank agrees (one all-reduce)
        engine.backward(out.loss)                    # accumulates, scaled by 1 / grad_accum
    all finite: engine.step()                        # clip, optimizer, zero grads -> grad norm
    else:       engine.discard()                     # drop what was accumulated: the step is skipped

`PlainEngine` is one process: torch AdamW (fused on CUDA), `clip_grad_norm_`, plain gradient accumulation.

`DeepSpeedEngine` wraps `deepspeed.initialize` with the same optimizer (the reference parameter groups; DeepSpeed
calls it an "untested optimizer" - it is torch's own AdamW) and DeepSpeed's gradient clipping. bf16 uses DeepSpeed's
`torch_autocast` mode: fp32 master weights, bf16 compute and bf16 gradient communication of the Linear weights, the
same numerics as the plain engine's autocast. Gradient accumulation runs in DeepSpeed's unmanaged mode
(`managed_gradient_accumulation=False`): `backward()` only accumulates and `step()` is the boundary, so a step can
be abandoned part-way on every rank (`discard`) without desynchronising DeepSpeed's counters.

Checkpoints: the plain engine writes one file `step_XXXXXXXX.pt`; DeepSpeed writes a directory `step_XXXXXXXX/`
(its own sharded model/optimizer files, one RNG file per rank, `meta.pt` with the run state and `model.pt` with the
consolidated fp32 weights for export). Both are written under a temporary name and renamed when complete, so a
crash mid-write leaves the previous checkpoint intact. On several nodes the run directory must be on a filesystem
that every node sees (rank 0 renames).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from beit_fast.checkpoint import _fsync_dir, atomic_save

log = logging.getLogger("beit_fast.pretrain")

__all__ = ["PlainEngine", "DeepSpeedEngine", "rng_state", "set_rng_state", "deepspeed_reasons"]


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    def all_finite(self, loss: torch.Tensor, ok: bool = True) -> Tuple[bool, bool]:
        """(is the loss finite, is `ok`) - on every process; here there is one."""
        return bool(torch.isfinite(loss)), ok  # the micro-batch's one host sync

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.clip_grad if self.clip_grad > 0 else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def discard(self) -> None:
        """Drop the gradients accumulated so far in this step (a non-finite micro-batch skips the step)."""
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def barrier(self) -> None:
        pass

    def save(self, ckpt_dir: Path, step: int, meta: Dict[str, Any]) -> Path:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng_state()}
        return atomic_save({**state, **meta}, ckpt_dir / f"step_{step:08d}.pt")

    def load(self, path: Path, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])

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
        wrapped: torch.nn.Module = model
        if zero_stage == 3:
            wrapped = _Zero3Outputs(model)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=config)
        self.model = model
        self.compiled = ""
        if zero_stage == 0:
            self._record_stage0_norm()

    def _record_stage0_norm(self) -> None:
        """DeepSpeed's stage-0 step clips (after its all-reduce) without keeping the norm: keep it."""
        from deepspeed.runtime.utils import clip_grad_norm_

        self._z0_norm = float("nan")

        def clip_and_record() -> None:
            self._z0_norm = float(clip_grad_norm_(parameters=self.ds.module.parameters(),
                                                  max_norm=self.ds.gradient_clipping(), mpu=self.ds.mpu))

        self.ds.clip_fp32_gradients = clip_and_record

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
        return out if self.zero_stage < 3 else _Zero3Outputs.unpack(out)

    def all_finite(self, loss: torch.Tensor, ok: bool = True) -> Tuple[bool, bool]:
        """(is the loss finite on every rank, is `ok` true on every rank): one all-reduce, so every rank takes the
        same path - a NaN on one rank skips the step everywhere, a failed input check on one stops them all."""
        import torch.distributed as dist

        flags = torch.stack([torch.isfinite(loss.detach()).to(torch.float32).reshape(()),
                             torch.tensor(float(ok), device=loss.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        finite, all_ok = flags.tolist()
        return bool(finite), bool(all_ok)

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

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> float:
        if self.zero_stage == 0:
            self._z0_norm = float("nan")
            self.ds.step()
            return self._z0_norm
        self.ds.step()
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
        for g in self.optimizer.param_groups:
            g["lr"] = lr

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
        tag = f"step_{step:08d}"
        final, tmp = ckpt_dir / tag, ckpt_dir / f".tmp-{tag}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a crash mid-write
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.barrier()
        self.ds.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank:05d}.pt")
        full = self.full_state_dict()
        if self.is_main:
            torch.save({"model": full}, tmp / "model.pt")
            torch.save({**meta, "engine": {"kind": self.kind, "world_size": self.world_size,
                                           "zero_stage": self.zero_stage}}, tmp / "meta.pt")
        # Every rank flushes what it wrote (on several nodes rank 0 cannot flush another node's writes): its ZeRO
        # shard and RNG file; rank 0 also the shared files (model states, model.pt, meta.pt).
        for f in tmp.iterdir():
            shard = "zero_pp_rank_" in f.name or "rng_rank" in f.name
            mine = f"zero_pp_rank_{self.rank}_" in f.name or f.name == f"rng_rank{self.rank:05d}.pt"
            if f.is_file() and (mine or (self.is_main and not shard)):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        self.barrier()
        if self.is_main:
            _fsync_dir(tmp)
            old = ckpt_dir / f".old-{tag}"
            if final.exists():  # the same step saved again (a finished run resumed and extended): swap, then drop
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load(self, path: Path, ckpt: Dict[str, Any]) -> None:
        loaded, _ = self.ds.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint {path}")
        rng = path / f"rng_rank{self.rank:05d}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))

    def close(self) -> None:
        """Nothing to wait for: the last collective is the final checkpoint's (and the token histogram's) - what
        rank 0 writes after it (summary, plot) must not keep the other ranks waiting if it fails."""


class _Zero3Outputs(torch.nn.Module):
    """ZeRO-3 gathers a module's parameters around its forward and, through hooks on the tensors it returns, around
    its backward. The MIM model returns a dataclass (no hooks attach) and its own forward reads parameters directly
    (mask and cls tokens, the shared bias table the attention kernel gathers itself, the head's LayerNorm and lm_head
    that the fused kernels take as tensors). This wrapper returns plain tensors and declares those parameters as
    its own, so they are gathered for the whole forward and backward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        from deepspeed.runtime.zero import register_external_parameter

        for p in _top_level_parameters(model):
            register_external_parameter(self, p)
        for module in model.modules():
            if hasattr(module, "qkv") and hasattr(module, "proj"):  # Attention: F.linear on its child's weight
                register_external_parameter(module, module.qkv.weight)

    def forward(self, *args: Any, **kwargs: Any):
        out = self.model(*args, **kwargs)
        return out.loss, out.accuracy, torch.tensor(out.num_masked), out.logits

    @staticmethod
    def unpack(out: Any) -> Any:
        from beit_fast.model import MaskedImageModelingOutput

        loss, accuracy, num_masked, logits = out
        return MaskedImageModelingOutput(loss=loss, accuracy=accuracy, num_masked=int(num_masked), logits=logits)


def _top_level_parameters(model: torch.nn.Module):
    yield from model.parameters(recurse=False)
    for child in ("rel_pos_bias", "norm", "lm_head"):
        module = getattr(model, child, None)
        if module is not None:
            yield from module.parameters()
