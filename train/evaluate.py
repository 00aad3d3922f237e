"""Evaluation over a (sharded) validation set, reduced over ranks: of a classifier (fine-tuning, linear probing,
`beit-fast evaluate`: top-1, top-5, mean cross-entropy and the confusion matrix) and of a semantic segmenter
(`evaluate_segmentation`: mmseg's per-class IoU / accuracy, mIoU, mAcc, aAcc from the pixel confusion matrix).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

log = logging.getLogger("beit_fast.train")

__all__ = ["EvalResult", "evaluate", "format_report", "plot_confusion", "SegEvalResult", "evaluate_segmentation",
           "format_seg_report", "plot_segmentation"]

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

    @property
    def majority_top1(self) -> float:
        """The top-1 of always answering the most frequent true class: chance (1 / C) on balanced data."""
        return float(self.confusion.sum(dim=1).max()) / self.count if self.count else math.nan

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


def reduce_once(packed: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor], who: str) -> torch.Tensor:
    """An evaluation's one reduction over ranks and its one read: `reduce_sum(packed)` checked for shape, on the CPU in
    float64 (which carries every count exactly, < 2^53)."""
    total = reduce_sum(packed)
    if not isinstance(total, torch.Tensor) or total.shape != packed.shape:
        raise ValueError(f"{who}: reduce_sum must return a tensor of shape {tuple(packed.shape)}, got "
                         f"{getattr(total, 'shape', type(total).__name__)}")
    return total.to("cpu", torch.float64)


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
        total = reduce_once(packed, reduce_sum, "evaluate")
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
        return _label_error("evaluate", lo, hi, C, f"[0, {C}) (num_classes={C}); {bad} such label(s) in all")


def _label_error(who: str, lo: int, hi: int, num_classes: int, where: str) -> str:
    """The one line for labels out of range: this rank's extreme one, else that another rank had one."""
    if lo < 0:
        return f"{who}: label {lo} is out of range {where}"
    if hi >= num_classes:
        return f"{who}: label {hi} is out of range {where}"
    return f"{who}: a label is out of range {where}, on another process"


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
    plt = pyplot("confusion-matrix")
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
    return save_figure(plt, fig, path)


def pyplot(what: str) -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), or None, with one log line, when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        log.info(f"no {what} plot: matplotlib is not installed (pip install -e '.[plot]')")
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path, dpi: int = 110) -> Path:
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


# --- semantic segmentation ---------------------------------------------------------------------------------------

# elements of the fp32 full-resolution logits resized at once (512 MiB): 150 classes at 2048x512 is one image
_RESIZE_ELEMENTS = 1 << 27


@dataclass
class SegEvalResult:
    """A segmenter's pixel scores over the whole (all ranks') validation set, with mmseg 0.x's definitions
    (`mmseg.core.evaluation.metrics.intersect_and_union` summed over images, then `total_area_to_metrics`; the means
    are `np.nanmean` over classes, as its `CustomDataset.evaluate`).

    Attributes:
        confusion: (C, C) int64 on the CPU, rows = true class, columns = predicted class; labelled pixels only
            (pixels whose label is the ignore index are not counted).
        classes: C class names for reports, or None (the class indices).
        images: number of images scored.
        samples: the first `keep` (image (3, h, w) float as fed to the forward, label (H, W), prediction (H, W)
            int64) triples of this rank, on the CPU, for `plot_segmentation`.
    """

    confusion: torch.Tensor
    classes: Optional[List[str]] = None
    images: int = 0
    samples: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.confusion.dim() != 2 or self.confusion.shape[0] != self.confusion.shape[1]:
            raise ValueError(f"SegEvalResult: confusion must be a square (C, C) matrix, got "
                             f"{tuple(self.confusion.shape)}")
        if self.classes is not None:
            self.classes = _class_names(self.classes, self.num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def pixels(self) -> int:
        """Labelled pixels scored."""
        return int(self.confusion.sum())

    @property
    def area_intersect(self) -> torch.Tensor:
        """(C,) float64: pixels of class c predicted as c."""
        return self.confusion.diagonal().double()

    @property
    def area_label(self) -> torch.Tensor:
        """(C,) float64: pixels labelled c."""
        return self.confusion.sum(dim=1).double()

    @property
    def area_pred(self) -> torch.Tensor:
        """(C,) float64: labelled pixels predicted as c."""
        return self.confusion.sum(dim=0).double()

    @property
    def area_union(self) -> torch.Tensor:
        """(C,) float64: pixels labelled c or predicted as c."""
        return self.area_pred + self.area_label - self.area_intersect

    @property
    def iou(self) -> torch.Tensor:
        """(C,) float64: intersect / union; NaN for a class neither labelled nor predicted anywhere."""
        return _ratio(self.area_intersect, self.area_union)

    @property
    def acc(self) -> torch.Tensor:
        """(C,) float64: intersect / label area (the class's recall); NaN for a class with no labelled pixel."""
        return _ratio(self.area_intersect, self.area_label)

    @property
    def aacc(self) -> float:
        """Pixel accuracy over all labelled pixels (mmseg's aAcc); NaN when there is none."""
        pixels = self.pixels
        return float(self.area_intersect.sum()) / pixels if pixels else math.nan

    @property
    def miou(self) -> float:
        """Mean IoU over the classes with a defined IoU: a class absent from both the labels and the predictions is
        left out (NaN), a class predicted but never labelled counts with IoU 0 (mmseg's mIoU)."""
        return float(torch.nanmean(self.iou))

    @property
    def macc(self) -> float:
        """Mean per-class accuracy over the classes with a labelled pixel (mmseg's mAcc)."""
        return float(torch.nanmean(self.acc))

    @property
    def majority_miou(self) -> float:
        """The mIoU of predicting the most frequent labelled class everywhere (all-background on most data): that
        class's IoU is its pixel share, every other labelled class scores 0. NaN when no pixel is labelled."""
        label = self.area_label
        if not self.pixels:
            return math.nan
        return float(label.max() / label.sum()) / int((label > 0).sum())

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able summary: means, counts, per-class IoU and accuracy (None for NaN); no matrix, no samples."""
        return {"miou": _none_if_nan(self.miou), "macc": _none_if_nan(self.macc), "aacc": _none_if_nan(self.aacc),
                "pixels": self.pixels, "images": self.images, "num_classes": self.num_classes,
                "classes": self.classes,
                "iou": [_none_if_nan(v) for v in self.iou.tolist()],
                "acc": [_none_if_nan(v) for v in self.acc.tolist()]}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, math.nan))


def _none_if_nan(x: float) -> Optional[float]:
    return None if math.isnan(x) else x


@torch.no_grad()
def evaluate_segmentation(forward: Callable[[torch.Tensor], torch.Tensor],
                          batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
                          ignore_index: int = 255, device: torch.device, bf16: bool = False,
                          reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                          progress: bool = False, keep: int = 0,
                          classes: Optional[Sequence[str]] = None) -> SegEvalResult:
    """Scores a segmenter on `batches` (this rank's shard) by the pixel confusion matrix, reduced over ranks.

    Args:
        forward: images (B, 3, h, w) on `device` -> logits (B, C, h', w') at any resolution (a sliding-window or
            multi-scale test lives in the forward). The model must already be in eval mode.
        batches: (images (B, 3, h, w), integer labels (B, H, W)) pairs, labels usually on the CPU (uint8 is fine).
            Logits of another size than the labels are resized bilinearly (align_corners=False, as mmseg's
            `resize`) to (H, W) before the argmax. A pair with empty labels (shape (0,)) is forwarded but not
            scored: padding for a rank with fewer batches when the forward is a collective (ZeRO-3).
        num_classes: C; every label is in [0, C) or equal to `ignore_index`.
        ignore_index: the label of unlabelled pixels, left out of every score.
        device: where the images go and the accumulators live.
        bf16: run `forward` under bf16 autocast (CUDA only); a resize of its logits is done in fp32.
        reduce_sum: called once, on every rank, with one packed float64 tensor; must return its sum over ranks (an
            all-reduce). The identity for one process.
        progress: a tqdm bar (batches, images/s) on stderr when stderr is a terminal.
        keep: keep the first `keep` (image, label, prediction) triples of this rank on the CPU, in
            `result.samples` (one device-to-host copy each, only for those).
        classes: C class names, stored in the result for reports.

    Returns:
        A `SegEvalResult` (its confusion summed over ranks).

    Raises:
        ValueError: bf16 off CUDA, num_classes < 1, keep < 0, labels that are not (B, H, W) integers, logits of the
            wrong shape, a label outside [0, num_classes) other than `ignore_index` on any rank (after the reduction,
            so that every rank raises and none waits in a collective), or no labelled pixel at all.
    """
    if num_classes < 1:
        raise ValueError(f"evaluate_segmentation: num_classes must be >= 1, got {num_classes}")
    if keep < 0:
        raise ValueError(f"evaluate_segmentation: keep must be >= 0, got {keep}")
    device = torch.device(device)
    if bf16 and device.type != "cuda":
        raise ValueError(f"evaluate_segmentation: bf16=True needs a CUDA device (autocast is CUDA-only here), got "
                         f"{device}")
    names = None if classes is None else _class_names(classes, num_classes)
    acc = _SegAccumulator(num_classes, ignore_index, device)
    samples: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    bar = _bar(batches) if progress else None
    t0 = time.perf_counter()
    try:
        for images, labels in batches:
            _check_seg_labels(labels)
            x = images.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                logits = forward(x)
            if labels.numel():  # else a padding forward (ZeRO-3), not scored
                B, H, W = labels.shape
                pred = _seg_predict(logits, B, num_classes, (H, W))
                acc.add(pred, labels.to(device, non_blocking=True))
                if len(samples) < keep:
                    n = min(keep - len(samples), B)
                    kept = pred[:n].cpu()
                    samples += [(images[i].detach().float().cpu(), labels[i].cpu(), kept[i]) for i in range(n)]
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"img/s": f"{acc.images / max(time.perf_counter() - t0, 1e-9):.0f}"}, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    confusion, images = acc.finish(reduce_sum)
    return SegEvalResult(confusion=confusion, classes=names, images=images, samples=samples)


class _SegAccumulator:
    """The flattened pixel confusion matrix (int64), the number of bad labels and the extreme bad labels seen here
    (to name one) on the device; the image count on the host (known from the shapes)."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device) -> None:
        self.num_classes, self.ignore_index, self.device = num_classes, ignore_index, device
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.bad = torch.zeros((), dtype=torch.int64, device=device)
        self.lo = torch.zeros((), dtype=torch.int64, device=device)
        self.hi = torch.zeros((), dtype=torch.int64, device=device)
        self.images = 0

    def add(self, pred: torch.Tensor, labels: torch.Tensor) -> None:
        C = self.num_classes
        labels = labels.long()
        labelled = labels != self.ignore_index
        valid = labelled & (labels >= 0) & (labels < C)
        # bad labels are masked out and reported after the reduction, as `evaluate` does for its labels: checking
        # now would sync, and raising on one rank alone would leave the others waiting in the all-reduce
        bad = labelled & ~valid
        self.bad += bad.sum()
        bad_values = torch.where(bad, labels, 0)
        self.lo = torch.minimum(self.lo, bad_values.min())
        self.hi = torch.maximum(self.hi, bad_values.max())
        # index_add_ with 0/1 weights, not bincount on the masked pixels: CUDA's bincount reads the input's min and
        # max on the host and boolean masking reads the count (a sync per batch either way)
        index = torch.where(valid, labels, 0) * C + pred
        self.confusion.index_add_(0, index.flatten(), valid.flatten().long())
        self.images += labels.shape[0]

    def finish(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, int]:
        C = self.num_classes
        head = torch.tensor([float(self.images)], dtype=torch.float64, device=self.device)
        # float64 carries every count exactly (< 2^53), so one tensor makes one all-reduce
        packed = torch.cat([head, self.bad.double()[None], self.confusion.double()])
        total = reduce_once(packed, reduce_sum, "evaluate_segmentation")
        images, bad = int(total[0]), int(total[1])
        if bad:
            raise ValueError(self._bad_label_message(bad))
        confusion = total[2:].round().long().view(C, C)
        if images == 0:
            raise ValueError("evaluate_segmentation: no image to evaluate (the validation batches are empty on every "
                             "rank)")
        if int(confusion.sum()) == 0:
            raise ValueError(f"evaluate_segmentation: no labelled pixel to evaluate (every label of the {images} "
                             f"image(s) is the ignore index {self.ignore_index})")
        return confusion, images

    def _bad_label_message(self, bad: int) -> str:
        C = self.num_classes
        lo, hi = int(self.lo), int(self.hi)  # local values, read only on this error path
        where = (f"[0, {C}) (num_classes={C}) and is not the ignore index {self.ignore_index}; {bad} such pixel(s) "
                 f"in all")
        return _label_error("evaluate_segmentation", lo, hi, C, where)


def _check_seg_labels(labels: Any) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"evaluate_segmentation: labels must be a (B, H, W) integer tensor, got "
                         f"{type(labels).__name__}")
    if labels.numel() and labels.dim() != 3:
        raise ValueError(f"evaluate_segmentation: labels must be (B, H, W) class maps, got shape "
                         f"{tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"evaluate_segmentation: labels must be integer class indices, got dtype {labels.dtype}")


def _seg_predict(logits: Any, batch: int, num_classes: int, size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) logits -> (B, H, W) int64 class map at the label's size."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or tuple(logits.shape[:2]) != (batch, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"evaluate_segmentation: forward must return logits (B, C, h, w) = ({batch}, {num_classes}, "
                         f"h, w), got {got}")
    if tuple(logits.shape[-2:]) == size:
        return logits.argmax(dim=1)
    # resized in fp32 whatever the forward's dtype, a few images at a time so that the full-resolution logits stay
    # bounded (mmseg resizes the whole batch at once, then takes the argmax: the same numbers)
    per = max(1, _RESIZE_ELEMENTS // (num_classes * size[0] * size[1]))
    return torch.cat([F.interpolate(chunk.float(), size=size, mode="bilinear", align_corners=False).argmax(dim=1)
                      for chunk in logits.split(per)])


def format_seg_report(result: SegEvalResult, classes: Optional[Sequence[str]] = None) -> str:
    """An mmseg-like table: one `class  IoU  Acc` line per class (percent, 2 decimals, `nan` where undefined), then
    the summary `aAcc  mIoU  mAcc` and the pixel / image counts. `classes` overrides `result.classes`."""
    names = _class_names(classes if classes is not None else result.classes, result.num_classes)
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(names, result.iou.tolist(), result.acc.tolist()):
        lines.append(f"{name:<{width}}  {_percent(iou)}  {_percent(acc)}")
    lines += ["", f"{'aAcc':>6}  {'mIoU':>6}  {'mAcc':>6}",
              f"{_percent(result.aacc)}  {_percent(result.miou)}  {_percent(result.macc)}",
              f"({result.pixels} labelled pixels, {result.images} images, {result.num_classes} classes)"]
    return "\n".join(lines)


def _percent(x: float) -> str:
    return f"{'nan':>6}" if math.isnan(x) else f"{100 * x:>6.2f}"


def plot_segmentation(samples: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path, *,
                      num_classes: int, ignore_index: int = 255,
                      mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                      title: str = "", classes: Optional[Sequence[str]] = None) -> Optional[Path]:
    """A grid with one row per sample: image | ground truth over the image | prediction over the image, in a fixed
    palette (ignored pixels greyed in the ground truth), with a legend of the classes shown; written
    atomically (a temporary name, then renamed). None, with one log line, when matplotlib is missing.

    Args:
        samples: (image (3, h, w) normalised, label (H, W), prediction (H, W)) triples, e.g.
            `SegEvalResult.samples`; an image of another size than its label is resized bilinearly to it.
        path: the image file (its suffix picks the format, e.g. .png).
        num_classes: C, the palette's size.
        ignore_index: the label of unlabelled pixels.
        mean, std: the normalisation of the images, undone for display.
        title: figure title.
        classes: C class names for the legend; default the class indices.
    """
    if not samples:
        raise ValueError("plot_segmentation: no sample to plot (evaluate_segmentation(keep=K) keeps K of them)")
    if num_classes < 1:
        raise ValueError(f"plot_segmentation: num_classes must be >= 1, got {num_classes}")
    names = _class_names(classes, num_classes)
    for i, (image, label, pred) in enumerate(samples):
        if image.dim() != 3 or image.shape[0] != 3 or label.dim() != 2 or tuple(pred.shape) != tuple(label.shape):
            raise ValueError(f"plot_segmentation: sample {i} must be (image (3, h, w), label (H, W), prediction "
                             f"(H, W)), got shapes {tuple(image.shape)}, {tuple(label.shape)}, {tuple(pred.shape)}")
    plt = pyplot("segmentation")
    if plt is None:
        return None
    from matplotlib.colors import hsv_to_rgb
    from matplotlib.patches import Patch

    # golden-ratio hue steps: neighbouring class ids get distant hues; value and saturation alternate for many classes
    i = torch.arange(num_classes, dtype=torch.float64)
    hsv = torch.stack([(i * 0.6180339887) % 1.0, 0.9 - 0.3 * ((i // 5) % 2), 0.95 - 0.3 * ((i // 10) % 2)], dim=1)
    palette = torch.from_numpy(hsv_to_rgb(hsv.numpy())).float()  # (C, 3)
    m, s = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    counts = torch.zeros(num_classes, dtype=torch.int64)

    def overlay(rgb: torch.Tensor, classes_map: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        color = palette[classes_map.clamp(0, num_classes - 1)].permute(2, 0, 1)
        return torch.where(shown, 0.45 * rgb + 0.55 * color, 0.3 * rgb + 0.35).permute(1, 2, 0)  # unshown: grey

    rows = len(samples)
    fig, axes = plt.subplots(rows, 3, figsize=(9.0, 1.0), squeeze=False)  # the height is set with the legend's
    for r, (image, label, pred) in enumerate(samples):
        rgb = (image.detach().float().cpu() * s + m).clamp(0, 1)
        label, pred = label.detach().cpu().long(), pred.detach().cpu().long()
        if tuple(rgb.shape[-2:]) != tuple(label.shape):
            rgb = F.interpolate(rgb[None], size=tuple(label.shape), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        labelled = (label != ignore_index) & (label >= 0) & (label < num_classes)
        counts += torch.bincount(label[labelled], minlength=num_classes)
        counts += torch.bincount(pred.clamp(0, num_classes - 1).flatten(), minlength=num_classes)
        hits = int((pred[labelled] == label[labelled]).sum())
        total = int(labelled.sum())
        panels = [(rgb.permute(1, 2, 0), "image"), (overlay(rgb, label, labelled), "ground truth"),
                  (overlay(rgb, pred, torch.ones_like(labelled)),
                   f"prediction ({100 * hits / total:.1f}% of pixels)" if total else "prediction")]
        for ax, (panel, name) in zip(axes[r], panels):
            ax.imshow(panel.numpy(), interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    shown = counts.argsort(descending=True)[:20]  # the legend keeps to the classes covering the most pixels
    handles = [Patch(color=palette[c].tolist(), label=names[c]) for c in shown.tolist() if counts[c] > 0]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5) or 1, fontsize=7, frameon=False)
    fig.suptitle(title or f"segmentation: image | ground truth | prediction ({rows} sample{'s' * (rows > 1)})",
                 fontsize=10)
    # margins in inches and rows as tall as the tallest panel (a panel is ~2.9 in wide): tight_layout let the panel
    # titles of a row overlap the row above
    aspect = min(max(max(label.shape[0] / max(label.shape[1], 1) for _, label, _ in samples), 0.25), 3.0)
    top, legend = 0.5, 0.25 + 0.2 * ((max(len(handles), 1) + 4) // 5)
    height = (2.9 * aspect + 0.45) * rows + top + legend
    fig.set_size_inches(9.0, height)
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.04, hspace=0.15, top=1 - top / height, bottom=legend / height)
    return save_figure(plt, fig, path)
