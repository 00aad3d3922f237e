"""One optimizer step, shared by every training script: accumulation, agreement across ranks, skip, bad-step limit.

`run_step` drives an engine (`beit_fast.train.engine`) through one optimizer step of `grad_accum` micro-batches:

    for each micro-batch: batch = next_batch(); loss, extras = loss_fn(batch)
        deferred kernel checks (check_deferred) -> the input error, if any
        engine.all_finite(loss, inputs ok, no signal)   # the micro-batch's one sync, agreed by every rank
        all finite: engine.backward(loss)
        else: the rest of the step's micro-batches are drawn (steps stay addressable) but not run
    every rank's loss finite: grad_norm = engine.step()  (skipped inside when the global norm is not finite)
    else:                     engine.discard()

The task supplies only `next_batch` and `loss_fn`; the step does not know what a batch or a model is.
`BadSteps` counts skipped steps and stops the run after `max_bad_steps` in a row.
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from beit_fast.kernels import check_deferred

log = logging.getLogger("beit_fast.train")

__all__ = ["TrainingStopped", "StoppedBySignal", "StepOutcome", "run_step", "BadSteps", "train_steps"]


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many skipped steps in a row, non-finite weights); the CLI reports one line."""


class StoppedBySignal(RuntimeError):
    """SIGTERM / SIGINT: the run finished its step, wrote a checkpoint and stopped; the CLI exits 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step ran)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where} "
                         "(resume with --resume auto)")


@dataclass
class StepOutcome:
    loss_finite: bool  # every rank's every micro-batch loss was finite (else the step was discarded)
    grad_norm: float  # the global gradient norm (NaN when discarded; non-finite: the engine skipped the update)
    stop_requested: bool  # some rank was asked to stop (a signal), as the agreements said
    values: torch.Tensor  # mean over ranks of [mean loss, mean of each extra, *host values]; NaN where none ran

    @property
    def applied(self) -> bool:
        return self.loss_finite and math.isfinite(self.grad_norm)


def run_step(engine: Any, next_batch: Callable[[], Any],
             loss_fn: Callable[[Any], Tuple[torch.Tensor, Sequence[torch.Tensor]]], *, grad_accum: int,
             num_extras: int, stop_requested: Callable[[], bool],
             host_values: Callable[[], List[float]] = lambda: []) -> StepOutcome:
    """One optimizer step (see the module docstring). `loss_fn(batch)` returns (loss, extras): the loss to
    backpropagate and `num_extras` 0-d tensors to average for the log (e.g. accuracy). `host_values()` is called
    after the micro-batches; its floats are averaged over ranks with the rest (in the same collective)."""
    device = engine.device
    losses: List[torch.Tensor] = []
    extras: List[List[torch.Tensor]] = [[] for _ in range(num_extras)]
    loss_ok = no_stop = True
    for _ in range(grad_accum):
        batch = next_batch()
        if not loss_ok:
            continue  # the rest of a skipped step: its data is consumed (steps stay addressable), not run
        loss, more = loss_fn(batch)
        try:  # the kernels' device-side input checks (on the CPU they raised already)
            check_deferred()
            input_error = None
        except ValueError as exc:
            input_error = exc
        # The micro-batch's one sync; every rank learns whether any rank's loss or inputs were bad, and whether any
        # rank was asked to stop (a signal).
        loss_ok, inputs_ok, go_on = engine.all_finite(loss, input_error is None, not stop_requested())
        no_stop = no_stop and go_on
        if input_error is not None:
            raise input_error
        if not inputs_ok:
            raise TrainingStopped("another process failed its input checks (its error is in its log)")
        if loss_ok:
            engine.backward(loss)
            losses.append(loss.detach().float())
            for acc, value in zip(extras, more):
                acc.append(value.detach().float())
    nan = torch.tensor(float("nan"), device=device)
    mean = [torch.stack(v).mean() if v else nan for v in [losses, *extras]]
    mean += [torch.tensor(float(v), device=device) for v in host_values()]
    values = engine.reduce_mean(torch.stack(mean))
    grad_norm = engine.step() if loss_ok else float("nan")
    if not loss_ok:  # a non-finite loss on some rank: every rank drops the step's gradients
        engine.discard()
    return StepOutcome(loss_finite=loss_ok, grad_norm=grad_norm, stop_requested=not no_stop, values=values)


class BadSteps:
    """Counts skipped steps in `stats` ("skipped_steps", "bad_in_row"); `max_bad` in a row stop the run."""

    def __init__(self, stats: Dict[str, Any], max_bad: int) -> None:
        self.stats, self.max_bad = stats, max_bad
        stats.setdefault("skipped_steps", 0)
        stats.setdefault("bad_in_row", 0)

    def record(self, step: int, outcome: StepOutcome) -> bool:
        """True when the step was applied; else logs it, counts it, and raises TrainingStopped at the limit."""
        if outcome.applied:
            self.stats["bad_in_row"] = 0
            return True
        self.stats["bad_in_row"] += 1
        self.stats["skipped_steps"] += 1
        what = "loss" if not outcome.loss_finite else f"gradient norm ({outcome.grad_norm})"
        log.warning("step %d: non-finite %s, step skipped (%d in a row)", step, what, self.stats["bad_in_row"])
        if self.stats["bad_in_row"] >= self.max_bad:
            raise TrainingStopped(
                f"{self.stats['bad_in_row']} skipped steps in a row (non-finite loss or gradient norm; "
                f"max_bad_steps={self.max_bad}); stopping. The newest checkpoint written before them is "
                f"intact: lower the lr, raise warmup, or resume from an earlier checkpoint."
            )
        return False


def train_steps(*, start_step: int, max_steps: int, save_every: int, world: int, signals: Any,
                one_step: Callable[[int], StepOutcome], bad: BadSteps,
                on_applied: Callable[[int, StepOutcome], None], on_skipped: Callable[[int], None],
                after_step: Callable[[int], None], save: Callable[[int], Path],
                last_checkpoint: Optional[Path]) -> Tuple[int, Optional[Path]]:
    """The loop every script runs: steps `start_step + 1 .. max_steps`, each `one_step(step)` (the step about to
    run, 0-based), counted by `bad`; a checkpoint every `save_every` steps and at the end (not again for a finished
    run resumed: its checkpoint stays as it is). A signal (agreed by every rank) finishes the step, checkpoints and
    raises StoppedBySignal. Returns (the last step, the last checkpoint)."""
    step = start_step
    while step < max_steps:
        outcome = one_step(step)
        step += 1
        if bad.record(step, outcome):
            on_applied(step, outcome)
        else:
            on_skipped(step)
        after_step(step)
        # One process reads its own flag (a signal after the last agreement counts); ranks go by the agreement.
        stop = outcome.stop_requested or (world == 1 and signals.requested is not None)
        if stop or (save_every and step % save_every == 0 and step < max_steps):
            last_checkpoint = save(step)
        if stop:
            raise StoppedBySignal(signals.requested or signal.SIGTERM, step, last_checkpoint)
    if step > start_step or last_checkpoint is None:
        last_checkpoint = save(step)
    elif signals.requested is not None:
        raise StoppedBySignal(signals.requested, step, last_checkpoint)
    return step, last_checkpoint
