"""The fine-tuning loop shared by the downstream tasks (classification in finetune.py, segmentation in segment.py).

`TaskLoop` wires the shared parts - `step.run_step` / `train_steps` (accumulation, skips, signals), the engine,
`metrics.StepReporter` (the log line, metrics.csv, TensorBoard), a val `MetricsWriter` (val_metrics.csv),
`run.Checkpointer` (atomic checkpoints with the loop's stats), an optional EMA of the weights - and leaves a task
four things: the loss of a batch (`loss`), the lr of a step (`lr_at`), an evaluation (`validate`, which also keeps
the task's best model) and what its checkpoints carry beyond the common record (`meta_extra`).

Resume is exact: the stats, the engine (weights, optimizer, RNG) and the EMA come back from the checkpoint, and the
data stream is step-addressed (`runtime.train_loader`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from beit_fast.train.metrics import MetricsWriter, StepReporter
from beit_fast.train.run import Checkpointer
from beit_fast.train.runtime import close_loader
from beit_fast.train.step import BadSteps, run_step, train_steps

log = logging.getLogger("beit_fast.train")

__all__ = ["TaskLoop", "pad_collective_batches"]


def pad_collective_batches(loader: Any, collective: bool) -> Iterator[Any]:
    """This rank's eval batches (`loader`, a DataLoader over (epoch, index)-keyed items with a `ShardedEvalSampler`),
    then - when every forward is a collective (ZeRO-3 gathers parameters in it) - batches of the set's first image
    with no labels (forwarded, not scored) until every rank has run `max_rank_batches` forwards."""
    yield from loader
    sampler = loader.batch_sampler
    if collective and sampler.max_rank_batches > len(sampler):
        pad = (loader.dataset[(0, 0)][0][None], torch.zeros(0, dtype=torch.long))
        yield from [pad] * (sampler.max_rank_batches - len(sampler))


class TaskLoop:
    """The shared downstream training loop; subclasses implement `loss`, `lr_at`, `validate`, `meta_extra`.

    Attributes a subclass reads: cfg, mcfg, rt (runtime.Runtime), engine, out (the run directory), stats (saved in
    every checkpoint, restored on resume), ema (timm ModelEmaV3 or None), val_writer (None off the main rank)."""

    task = "task"  # the checkpoints' "task" (run.TASK_NAMES)
    tag = "task"  # the log / TensorBoard tag
    loss_columns: Sequence[Tuple[str, str]] = (("loss", "loss"),)  # (metrics.csv column, log name): the loss + extras
    val_columns: Sequence[str] = ("step",)  # val_metrics.csv columns

    def __init__(self, cfg: Any, mcfg: Any, rt: Any, engine: Any, stats: Dict[str, Any],
                 ema_decay: Optional[float] = None) -> None:
        self.cfg, self.mcfg, self.rt, self.engine = cfg, mcfg, rt, engine
        self.stats: Dict[str, Any] = {"skipped_steps": 0, "bad_in_row": 0, "suspect_steps": [], "bad_files": [],
                                      "last_eval": None, **stats}
        self.ema = None
        if ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(engine.model, decay=ema_decay)
        self.out = Path(cfg.out)
        self.val_writer: Optional[MetricsWriter] = None
        self.lr = 0.0
        self.inputs: Dict[str, Any] = {}  # the content identity of the run's inputs (run.plan_resume compares it)

    # -- the task's part ---------------------------------------------------------------------------------------------
    def loss(self, batch: Any) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(loss to backpropagate, [the detached values of loss_columns])."""
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def validate(self, step: int) -> Any:
        """Evaluate (every rank), write a val_metrics.csv row and stats["last_eval"] (with "step"), keep the best."""
        raise NotImplementedError

    def meta_extra(self) -> Dict[str, Any]:
        return {}

    def flops_per_image(self) -> Optional[float]:
        return None

    # -- shared ------------------------------------------------------------------------------------------------------
    def resume(self, plan: Any) -> int:
        """Load the planned checkpoint (weights, optimizer, RNG, stats, EMA); returns the step to start from."""
        if plan.ckpt is None:
            return 0
        self.engine.load(plan.path, plan.ckpt)
        self.stats.update(plan.ckpt["stats"])
        if self.ema is not None and "ema" in plan.ckpt:
            self.ema.module.load_state_dict(plan.ckpt["ema"])
        log.info("resumed from %s at step %d", plan.path, plan.ckpt["step"])
        step = plan.ckpt["step"]
        plan.ckpt = None
        return step

    def one_step(self, step: int):
        self.lr = self.lr_at(step)
        self.engine.set_lr(self.lr)
        return run_step(self.engine, lambda: next(self.data_iter), self.loss, grad_accum=self.cfg.grad_accum_steps,
                        num_extras=len(self.loss_columns), stop_requested=lambda: self.signals.requested is not None)

    def applied(self, step: int, outcome: Any) -> None:
        if self.ema is not None:
            self.ema.update(self.engine.model, step=step)
        values = [float(v) for v in outcome.values[1:1 + len(self.loss_columns)]]
        self.reporter.report(step, values, self.lr, outcome.grad_norm,
                             {"skipped_steps": self.stats["skipped_steps"]})

    def after_step(self, step: int) -> None:
        every = self.cfg.eval_every
        if every and step % every == 0 and step < self.cfg.max_steps:
            self.validate(step)

    def meta(self, step: int) -> Dict[str, Any]:
        meta = {"task": self.task, "step": step, "config": self.cfg.to_dict(), "model_config": self.mcfg.to_dict(),
                "stats": self.stats, "inputs": self.inputs, **self.meta_extra()}
        if self.ema is not None:
            meta["ema"] = self.ema.module.state_dict()
        return meta

    def evaluated_at(self, step: int) -> bool:
        return (self.stats["last_eval"] or {}).get("step") == step

    def _save(self, ckpt: Checkpointer, step: int) -> Path:
        """The run's last checkpoint carries its final evaluation (and the best model is up to date before it)."""
        if step == self.cfg.max_steps and not self.evaluated_at(step):
            self.validate(step)
        return ckpt.save(step)

    def run(self, loader: Any, signals: Any, start_step: int, last: Optional[Path]) -> Tuple[int, Optional[Path]]:
        """Train from `start_step` to cfg.max_steps (or a signal); returns (last step, last checkpoint)."""
        cfg, rt = self.cfg, self.rt
        self.reporter = StepReporter(
            self.out, list(self.loss_columns), ["skipped_steps"], start_step=start_step, max_steps=cfg.max_steps,
            log_every=cfg.log_every, batch_size=cfg.batch_size, world=rt.world, device=rt.device,
            flops_per_image=self.flops_per_image(), tensorboard=cfg.tensorboard, tag=self.tag, enabled=rt.is_main,
            num_workers=cfg.num_workers)
        self.signals, self.data_iter = signals, self.reporter.timed(iter(loader))
        if rt.is_main:
            self.val_writer = MetricsWriter(self.out, list(self.val_columns), start_step, False, "val",
                                            "val_metrics.csv")
        ckpt = Checkpointer(self.out, self.engine, cfg.keep_last, rt.is_main, self.stats, self.meta,
                            self.reporter.flush)
        self.engine.model.train()
        try:
            return train_steps(start_step=start_step, max_steps=cfg.max_steps, save_every=cfg.save_every,
                               world=rt.world, signals=signals, one_step=self.one_step,
                               bad=BadSteps(self.stats, cfg.max_bad_steps), on_applied=self.applied,
                               on_skipped=lambda s: self.reporter.restart(), after_step=self.after_step,
                               save=lambda s: self._save(ckpt, s), last_checkpoint=last)
        finally:
            close_loader(loader, self.data_iter)
            self.data_iter = None
            self.reporter.close()
            if self.val_writer is not None:
                self.val_writer.close()

    def write_val_row(self, row: Dict[str, Any]) -> None:
        """A val_metrics.csv row (main rank) and stats["last_eval"] (every rank)."""
        self.stats["last_eval"] = {k: v for k, v in row.items() if v is not None}
        if self.val_writer is not None:
            self.val_writer.write(row)
            self.val_writer.flush()

    def finish(self, run_dir: Any, step: int, start_step: int, last: Optional[Path], plot_column: str,
               plot_label: str, plot_ref: Optional[float], title: str, fields: Dict[str, Any]) -> Dict[str, Any]:
        """The end of a run: a final evaluation if the last step has none (e.g. a run resumed before its first),
        metrics.png (train loss and the val column `plot_column`), summary.json = the last evaluation + the common
        record + the task's `fields` (a callable field is called with the last evaluation's row); the engine is
        closed."""
        from beit_fast.train.metrics import plot_metrics, read_metrics

        kept = run_dir.finished_summary(step, step - start_step)
        if kept is not None and self.evaluated_at(step):  # resumed after the end: nothing ran, its summary stays
            self.engine.close()
            return {**kept, "steps_run": 0, "rank": self.rt.rank}  # this call ran none
        if not self.evaluated_at(step):
            self.validate(step)
        out = run_dir.out
        plot = None
        if self.rt.is_main and self.cfg.plot and (out / "val_metrics.csv").exists():
            val = read_metrics(out / "val_metrics.csv")
            plot = plot_metrics(out / "metrics.csv", out / "metrics.png",
                                [("loss", "train loss", None), (plot_column, plot_label, plot_ref)], title=title,
                                extra={plot_column: {"step": val.get("step", []), "value": val.get(plot_column, []),
                                                     "label": plot_label}})
        last_eval = self.stats["last_eval"] or {}
        fields = {k: v(last_eval) if callable(v) else v for k, v in fields.items()}  # a field may read the last eval
        summary = {**last_eval, "step": step, "steps_run": step - start_step, **fields,
                   "skipped_steps": self.stats["skipped_steps"], "checkpoint": str(last) if last else None,
                   "metrics": str(out / "metrics.csv"), "plot": str(plot) if plot else None,
                   "engine": self.engine.describe(), "out": str(out), "rank": self.rt.rank}
        if self.rt.is_main:
            run_dir.write_json("summary.json", summary)
        self.engine.close()
        return summary

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The whole model's weights on the CPU of the main rank (None on the others): under DeepSpeed gathered from
        every rank, a collective under ZeRO-3, so every rank calls it."""
        if hasattr(self.engine, "full_state_dict"):
            return self.engine.full_state_dict()
        return {k: v.detach().cpu() for k, v in self.engine.model.state_dict().items()}
