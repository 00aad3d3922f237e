"""Evaluation of a classifier over a (sharded) validation set, shared by fine-tuning, linear probing and
`beit-fast evaluate`: top-1, top-5, mean cross-entropy and the confusion matrix, reduced over ranks.

Model- and engine-agnostic: the caller passes `forward(images) -> logits` (or a list of logits, one per head: the
linear probe scores a head per backbone layer in one pass) and, under data parallelism, the engine's `reduce_sum`.
Each rank evaluates its own shard (no padding, no duplicates). Everything is accumulated on the device with no host
sync per batch; at the end one packed float64 tensor goes through `reduce_sum` and is read once.

The caller puts the model in eval mode (dropout, drop path, BatchNorm statistics) and back into train mode after:
`evaluate` never touches the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

log = logging.getLogger("beit_fast.train")

__all__ = ["EvalResult", "evaluate", "format_report", "plot_confusion"]

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class EvalResult:
    """One head's scores over the whole (all ranks') validation set.

    Attributes:
        top1, top5: accuracies in [0, 1] (top-5 is top-min(5, C)).
        loss: mean cross-entropy over the `count` images (fp32 logits, summed in fp64).
        count: number of images scored.
        confusion: (C, C) int64 on the CPU, rows = true class, columns = predicted class.
    """

    top1: float
    top5: float
    loss: float
    count: int
    confusion: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def per_class_accuracy(self) -> torch.Tensor:
        """(C,) float64: correct / images of each true class; NaN for a class with no validation image."""
        total = self.confusion.sum(dim=1).double()
        correct = self.confusion.diagonal().double()
        return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, math.nan))

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able summary: scores, count, per-class accuracy (None for a class with no image); no matrix."""
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count,
                "num_classes": self.num_classes,
                "per_class_accuracy": [None if math.isnan(a) else a for a in self.per_class_accuracy().tolist()]}


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], Logits], batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *,
             num_classes: int, device: torch.device, bf16: bool = False,
             reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             progress: bool = False) -> Union[EvalResult, List[EvalResult]]:
    """Scores `forward` on `batches` (this rank's shard), reduced over ranks by `reduce_sum`.

    Args:
        forward: images (B, 3, H, W) on `device` -> logits (B, C), or a list of H such tensors (one per head). The
            model must already be in eval mode.
        batches: (images (B, 3, H, W), integer labels (B,)) pairs; labels usually on the CPU (from a loader).
            Batch sizes may differ. A pair with empty labels (0,) is forwarded but not scored: padding for a rank
            with fewer batches when the forward is a collective (ZeRO-3), which also tells an otherwise empty
            shard how many heads the forward has.
        num_classes: C; every label must lie in [0, C).
        device: where the images go and the accumulators live.
        bf16: run `forward` under bf16 autocast (CUDA only).
        reduce_sum: called once, on every rank, with one packed float64 tensor; must return its sum over ranks
            (an all-reduce). The identity for one process. Every rank must call `evaluate` with the same
            `num_classes` and a forward with the same number of heads; a rank that forwards nothing assumes one.
        progress: a tqdm bar (batches, images/s) on stderr when stderr is a terminal.

    Returns:
        An `EvalResult` when `forward` returns a tensor, a list of them (one per head, in order) when it returns a
        list or tuple.

    Raises:
        ValueError: bf16 off CUDA, num_classes < 1, a label outside [0, num_classes) on any rank (after the
            reduction, so that every rank raises and none waits in a collective), logits of the wrong shape, or no
            image at all.
    """
    if num_classes < 1:
        raise ValueError(f"evaluate: num_classes must be >= 1, got {num_classes}")
    device = torch.device(device)
    if bf16 and device.type != "cuda":
        raise ValueError(f"evaluate: bf16=True needs a CUDA device (autocast is CUDA-only here), got {device}")
    acc: Optional[_Accumulator] = None
    single = True
    bar = _bar(batches) if progress else None
    t0, seen = time.perf_counter(), 0
    try:
        for images, labels in batches:
            _check_label_type(labels)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                out = forward(images)
            # a batch without labels is forwarded and not scored: a rank with fewer batches runs such padding forwards
            # when the forward is a collective (ZeRO-3 gathers parameters in it)
            heads = _heads(out, images.shape[0] if labels.numel() == 0 else labels.shape[0], num_classes)
            if acc is None:
                single = isinstance(out, torch.Tensor)
                acc = _Accumulator(len(heads), num_classes, device)
            elif len(heads) != acc.num_heads:
                raise ValueError(f"evaluate: forward returned {len(heads)} heads, earlier batches {acc.num_heads}")
            acc.add(heads, labels)
            if bar is not None:
                seen += labels.shape[0]
                bar.update(1)
                bar.set_postfix({"img/s": f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}"}, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if acc is None:  # an empty shard still joins the reduction (see `reduce_sum` above)
        acc = _Accumulator(1, num_classes, device)
    results = acc.finish(reduce_sum)
    return results[0] if single else results


class _Accumulator:
    """Per-head device sums: CE loss (fp64), top-5 hits and the flattened confusion matrix (int64); the image count
    and the number of out-of-range labels (shared by the heads); the extreme labels seen here, to name a bad one."""

    def __init__(self, num_heads: int, num_classes: int, device: torch.device) -> None:
        self.num_heads, self.num_classes, self.k = num_heads, num_classes, min(5, num_classes)
        self.loss = torch.zeros(num_heads, dtype=torch.float64, device=device)
        self.top5 = torch.zeros(num_heads, dtype=torch.int64, device=device)
        self.confusion = torch.zeros(num_heads, num_classes * num_classes, dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.bad = torch.zeros((), dtype=torch.int64, device=device)
        self.lo = torch.zeros((), dtype=torch.int64, device=device)
        self.hi = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, heads: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        if labels.numel() == 0:
            return
        C = self.num_classes
        labels = labels.long()
        # Bad labels are masked out here and reported after the reduction: checking now would sync (labels on the
        # device), an index out of range would be a device-side assert on CUDA, and raising on one rank alone would
        # leave the others waiting in the all-reduce.
        valid = (labels >= 0) & (labels < C)
        safe = labels.clamp(0, C - 1)
        self.bad += (~valid).sum()
        self.lo = torch.minimum(self.lo, labels.min())
        self.hi = torch.maximum(self.hi, labels.max())
        self.count += valid.sum()
        ones = valid.long()
        for h, logits in enumerate(heads):
            logits = logits.float()  # the loss in fp32 whatever the forward's dtype
            ce = F.cross_entropy(logits, safe, reduction="none")
            self.loss[h] += (ce * valid).sum(dtype=torch.float64)
            top = logits.topk(self.k, dim=1).indices  # column 0 is the top-1 prediction: top-1 hits are top-5 hits
            self.top5[h] += ((top == safe[:, None]).any(dim=1) & valid).sum()
            # index_add_, not bincount: CUDA's bincount reads the input's min and max on the host (a sync per batch)
            self.confusion[h].index_add_(0, safe * C + top[:, 0], ones)

    def finish(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> List[EvalResult]:
        C, H = self.num_classes, self.num_heads
        # float64 carries every count exactly (< 2^53) next to the loss sums, so one tensor makes one all-reduce
        packed = torch.cat([torch.stack([self.count, self.bad]).double(), self.loss, self.top5.double(),
                            self.confusion.flatten().double()])
        total = reduce_sum(packed)
        if not isinstance(total, torch.Tensor) or total.shape != packed.shape:
            raise ValueError(f"evaluate: reduce_sum must return a tensor of shape {tuple(packed.shape)}, got "
                             f"{getattr(total, 'shape', type(total).__name__)}")
        total = total.to("cpu", torch.float64)  # the one read
        count, bad = int(total[0]), int(total[1])
        if bad:
            raise ValueError(self._bad_label_message(bad))
        if count == 0:
            raise ValueError("evaluate: no image to evaluate (the validation batches are empty on every rank)")
        loss, top5 = total[2:2 + H], total[2 + H:2 + 2 * H]
        confusion = total[2 + 2 * H:].round().long().view(H, C, C)
        return [EvalResult(top1=int(confusion[h].diagonal().sum()) / count, top5=float(top5[h]) / count,
                           loss=float(loss[h]) / count, count=count, confusion=confusion[h].clone())
                for h in range(H)]

    def _bad_label_message(self, bad: int) -> str:
        C = self.num_classes
        lo, hi = int(self.lo), int(self.hi)  # local values, read only on this error path
        where = f"[0, {C}) (num_classes={C}); {bad} such label(s) in all"
        if lo < 0:
            return f"evaluate: label {lo} is out of range {where}"
        if hi >= C:
            return f"evaluate: label {hi} is out of range {where}"
        return f"evaluate: a label out of range {where}, on another process"


def _check_label_type(labels: Any) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"evaluate: labels must be a 1-D integer tensor of class indices, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"evaluate: labels must be integer class indices, got dtype {labels.dtype}")


def _heads(out: Logits, batch: int, num_classes: int) -> List[torch.Tensor]:
    heads = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (list, tuple)) else None
    if not heads or not all(isinstance(h, torch.Tensor) for h in heads):
        raise ValueError(f"evaluate: forward must return logits (B, C) or a list of them, got {type(out).__name__}")
    for i, h in enumerate(heads):
        if tuple(h.shape) != (batch, num_classes):
            name = "logits" if isinstance(out, torch.Tensor) else f"head {i}'s logits"
            raise ValueError(f"evaluate: {name} have shape {tuple(h.shape)}, expected ({batch}, {num_classes}) "
                             f"(batch, num_classes)")
    return heads


def _bar(batches: Iterable) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True, leave=False)


def format_report(result: EvalResult, class_names: Optional[Sequence[str]] = None) -> str:
    """Top-1, top-5, loss and count, then one `class  acc  (correct/total)` line per class (`nan` for none)."""
    C = result.num_classes
    names = _class_names(class_names, C)
    per_class = result.per_class_accuracy().tolist()
    correct = result.confusion.diagonal().tolist()
    totals = result.confusion.sum(dim=1).tolist()
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"top-1  {result.top1:.4f}", f"top-5  {result.top5:.4f}", f"loss   {result.loss:.4f}",
             f"count  {result.count}", "", f"{'class':<{width}}  {'acc':>6}  (correct/total)"]
    for name, a, c, t in zip(names, per_class, correct, totals):
        lines.append(f"{name:<{width}}  {a:>6.4f}  ({c}/{t})" if t else f"{name:<{width}}  {'nan':>6}  (0/0)")
    return "\n".join(lines)


def plot_confusion(confusion: torch.Tensor, path: Path, class_names: Optional[Sequence[str]] = None,
                   title: str = "") -> Optional[Path]:
    """The row-normalised confusion matrix (each true class sums to 1) as an image, with the counts written in the
    cells when C <= 30; written atomically (a temporary name, then renamed). None, with one log line, when
    matplotlib is missing.

    Args:
        confusion: (C, C) counts, rows = true class, columns = predicted.
        path: the image file (its suffix picks the format, e.g. .png).
        class_names: C tick labels (shown when C <= 30); default the class indices.
        title: figure title.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"plot_confusion: confusion must be a square (C, C) matrix, got {tuple(confusion.shape)}")
    C = int(confusion.shape[0])
    names = _class_names(class_names, C)
    plt = _pyplot("confusion-matrix")
    if plt is None:
        return None
    counts = confusion.detach().to("cpu", torch.float64)
    rows = counts.sum(dim=1, keepdim=True)
    norm = (counts / rows.clamp(min=1)).numpy()
    small = C <= 30
    side = min(max(4.0, 0.45 * C + 2.0), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if small:
        few = C <= 8
        ax.set_xticks(range(C), names, rotation=45 if few else 90, ha="right" if few else "center", fontsize=8)
        ax.set_yticks(range(C), names, fontsize=8)
        size = 8 if C <= 12 else 6 if C <= 20 else 5
        for i in range(C):
            for j in range(C):
                n = int(counts[i, j])
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=size,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix ({C} classes, {int(counts.sum())} images)", fontsize=10)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def _pyplot(what: str) -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), or None, with one log line, when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        log.info(f"no {what} plot: matplotlib is not installed (pip install -e '.[plot]')")
        return None
    return plt


def _save_figure(plt: Any, fig: Any, path: Path, dpi: int = 110) -> Path:
    """Writes `fig` to `path` atomically (a temporary name, then renamed: a reader never sees half an image) and
    closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix or '.png'}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)  # only left behind when saving failed
    return path


def _class_names(class_names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class result")
    return [str(n) for n in class_names]

