"""Run metrics, task-neutral: `metrics.csv` (always), TensorBoard event files (when `tensorboard` imports), a PNG
plot of the columns the caller names at the end (when `matplotlib` imports), and `StepReporter`: one metrics row per
step and the progress bar / log line (step | the task's values | lr | ms | img/s | data wait | MFU | memory). The
caller gives the columns, the TensorBoard tag, the plotted panels and the FLOPs per image for MFU. Only the main
process writes. `StepReporter.timed(iterator)` wraps the data iterator so each row also says which fraction of its
step was spent waiting for data (`data_wait`), with a warning, once, naming a `--num-workers` when the input pipeline
is the bottleneck."""

from __future__ import annotations

import csv
import math
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("beit_fast.pretrain")

__all__ = ["MetricsWriter", "Progress", "StepReporter", "DataWait", "plot_metrics", "read_metrics", "peak_flops",
           "no_learning", "accuracy_margin", "MIOU_MARGIN", "TOKEN_ACC_MARGIN", "PERPLEXITY_FLOOR"]

# How far above its no-learning level a final score must be to count as learned (`no_learning`):
MIOU_MARGIN = 0.02  # val mIoU over the majority-class (all-background) mIoU: 2 points
TOKEN_ACC_MARGIN = 0.01  # pretraining mlm_acc over the majority-token baseline (~30k scored tokens: noise ~0.003)
PERPLEXITY_FLOOR = 2.0  # a dVAE codebook whose batch perplexity is below 2 uses about one code


def accuracy_margin(level: float, count: int) -> float:
    """Three standard errors of an accuracy at `level` over `count` samples: what a model with no information
    (always the majority class) scores within, p +- 3 sqrt(p (1 - p) / n)."""
    return 3.0 * math.sqrt(level * (1.0 - level) / max(count, 1))


def no_learning(what: str, value: Optional[float], level: Optional[float], margin: float,
                level_name: str) -> Optional[str]:
    """The one-line verdict for a run whose final `value` is within `margin` of its no-learning `level` (chance,
    all-background, the majority token), e.g. "val top-1 0.1406 is at chance 0.1250: the model did not learn"; None
    when it is above (or nothing to judge). Summaries store it as "no_learning", the final line prints it."""
    if value is None or level is None or not math.isfinite(value) or value > level + margin:
        return None
    return f"{what} {value:.4f} is at {level_name} {level:.4f}: the model did not learn"


DATA_BOUND = 0.2  # waiting for data this share of the step time (over a log interval) or more: warn, once


class DataWait:
    """An iterator that counts the seconds its `next()` waited (for a data loader: for the workers' batches)."""

    def __init__(self, iterator: Any) -> None:
        self.iterator, self.waited = iterator, 0.0

    def __iter__(self) -> "DataWait":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.waited += time.perf_counter() - t0

    def take(self) -> float:
        """The seconds waited since the last take()."""
        waited, self.waited = self.waited, 0.0
        return waited

    def __getattr__(self, name: str) -> Any:  # the loader iterator's own (close_loader's _shutdown_workers)
        return getattr(self.__dict__["iterator"], name)


def suggested_workers(num_workers: int, wait_fraction: float) -> int:
    """Workers that would feed a step now spending `wait_fraction` of its time waiting: the loader delivers at
    (1 - f) of the rate the step could take, so scale today's workers (at least one) by 1 / (1 - f), up to the
    machine's cores."""
    need = math.ceil(max(1, num_workers) / max(1e-3, 1.0 - wait_fraction) - 1e-9)
    return max(num_workers + 1, min(need, os.cpu_count() or need))


class MetricsWriter:
    """Appends one row per step to `out/metrics.csv`; on a resume, rows past the checkpoint's step (written after it,
    before a crash) are dropped first, so the file always describes one uninterrupted run."""

    def __init__(self, out: Path, columns: Sequence[str], start_step: int, tensorboard: bool, tag: str = "train",
                 name: str = "metrics.csv") -> None:
        self.path, self.columns, self.tag = out / name, list(columns), tag
        rows: List[List[str]] = []
        if start_step > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                old = list(csv.reader(f))
            if old:
                header = old[0]
                for r in old[1:]:
                    if r and r[0].isdigit() and int(r[0]) <= start_step:
                        by_name = dict(zip(header, r))
                        rows.append([by_name.get(c, "") for c in self.columns])
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:  # then renamed: a crash here keeps the old file whole
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows(rows)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None,
                                        filename_suffix=f".{name.split('.')[0]}")
            except Exception as exc:  # ImportError without the tensorboard package
                log.info("TensorBoard logging off (%s); pip install -e '.[plot]' turns it on",
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def write(self, row: Dict[str, Any]) -> None:
        self.writer.writerow([_fmt(row.get(c)) for c in self.columns])
        if self.tb is not None:
            step = int(row["step"])
            for c in self.columns:
                v = row.get(c)
                if c != "step" and isinstance(v, (int, float)) and v == v:  # skip None and NaN
                    self.tb.add_scalar(f"{self.tag}/{c}", v, step)

    def flush(self) -> None:
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_metrics(path: Path) -> Dict[str, List[float]]:
    """metrics.csv -> {column: values} (empty cells -> NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: Dict[str, List[float]] = {}
    for r in rows:
        for k, v in r.items():
            try:
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else float("nan"))
            except ValueError:
                cols.setdefault(k, []).append(float("nan"))
    return cols


Panel = Tuple[str, str, Optional[float]]  # (column, y label, a dashed reference line or None)


def plot_metrics(csv_path: Path, png_path: Path, panels: Sequence[Panel], title: str = "",
                 extra: Optional[Dict[str, Dict[str, List[float]]]] = None) -> Optional[Path]:
    """One panel per (column, label, reference) against step, side by side; `extra` adds other series (e.g. val
    metrics at their own steps: {csv column: {"step": [...], "value": [...]}}) to the panel of that column. None (and
    a log line) when matplotlib is missing or there is nothing to plot. Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        log.info("no plot: matplotlib is not installed (pip install -e '.[plot]')")
        return None
    m = read_metrics(csv_path)
    if not m.get("step"):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (column, label, reference) in zip(axes[0], panels):
        if column in m:
            ax.plot(m["step"], m[column], lw=1, label=column)
        for name, series in (extra or {}).items():
            if name == column and series.get("step"):
                ax.plot(series["step"], series["value"], "o-", lw=1.5, ms=3, label=series.get("label", name))
        if reference is not None:
            ax.axhline(reference, color="gray", ls="--", lw=1, label=f"{reference:.2g}")
        ax.legend(loc="best")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or csv_path.parent.name)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of known cards (None: unknown, no MFU printed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return value
    return None


class StepReporter:
    """Per applied step: one metrics row (the task's values plus lr, grad_norm, ms_per_step, img_per_s, mfu, mem_gb
    and the caller's counters), and every `log_every` steps the progress bar's postfix or one log line. The time of a
    row is its own step's (`restart()` after a skipped one)."""

    TIMING = ["lr", "grad_norm", "ms_per_step", "img_per_s", "data_wait", "mfu", "mem_gb"]

    def __init__(self, out: Path, values: Sequence[Tuple[str, str]], counters: Sequence[str], *, start_step: int,
                 max_steps: int, log_every: int, batch_size: int, world: int, device: torch.device,
                 flops_per_image: Optional[float], tensorboard: bool, tag: str, enabled: bool,
                 num_workers: Optional[int] = None) -> None:
        """`values`: (column, short name for the bar) of the task's per-step values, logged as `name value`."""
        self.values, self.counters = list(values), list(counters)
        self.columns = ["step"] + [c for c, _ in self.values] + self.TIMING + self.counters
        self.writer = MetricsWriter(out, self.columns, start_step, tensorboard, tag) if enabled else None
        self.progress = Progress(max_steps, start_step, enabled=enabled)
        self.max_steps, self.log_every, self.batch_size, self.device = max_steps, log_every, batch_size, device
        peak = peak_flops(device)
        self.flops = flops_per_image * batch_size / (peak * world) if peak and flops_per_image else None
        self.t_last = time.perf_counter()
        self.data: Optional[DataWait] = None
        self.num_workers, self.warned = num_workers, False
        self.window = [0.0, 0.0]  # seconds waited, seconds of steps, since the last log line
        self.rows_seen = 0

    def timed(self, iterator: Any) -> DataWait:
        """`iterator` wrapped so that each row reports the share of its step spent waiting in it."""
        self.data = DataWait(iterator)
        return self.data

    def restart(self) -> None:
        self.t_last = time.perf_counter()
        if self.data is not None:
            self.data.take()  # a skipped step's wait is not the next row's

    def report(self, step: int, values: Sequence[float], lr: float, grad_norm: float,
               counters: Dict[str, Any]) -> None:
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        ips = self.batch_size / dt
        wait = min(1.0, self.data.take() / dt) if self.data is not None and dt > 0 else None
        if wait is not None and self.rows_seen > 0:  # the first row carries the workers' start-up: not counted
            self.window[0] += wait * dt
            self.window[1] += dt
        self.rows_seen += 1
        mfu = self.flops / dt if self.flops else None
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        log_now = step % self.log_every == 0 or step == self.max_steps
        if self.writer is not None:
            row = {"step": step, "lr": lr, "grad_norm": grad_norm, "ms_per_step": dt * 1e3, "img_per_s": ips,
                   "data_wait": wait, "mfu": mfu, "mem_gb": mem, **counters}
            row.update({c: v for (c, _), v in zip(self.values, values)})
            self.writer.write(row)
            if log_now:
                self.writer.flush()
        shown = " | ".join(f"{c} {v:.4f}" for (c, _), v in zip(self.values, values))
        mfu_s = f" | MFU {mfu:.1%}" if mfu is not None else ""
        mem_s = f" | mem {mem:.2f} GB" if mem is not None else ""
        data_s = f" | data {wait:.0%}" if wait is not None else ""
        line = (f"step {step}/{self.max_steps} | {shown} | lr {lr:.3g} | {dt * 1e3:.0f} ms | {ips:.0f} img/s"
                f"{data_s}{mfu_s}{mem_s}")
        postfix = {short: f"{v:.3f}" for (_, short), v in zip(self.values, values)}
        postfix.update({"lr": f"{lr:.2g}", "img/s": f"{ips:.0f}"})
        if mfu is not None:
            postfix["MFU"] = f"{mfu:.1%}"
        if mem is not None:
            postfix["mem"] = f"{mem:.1f}G"
        if wait is not None:
            postfix["data"] = f"{wait:.0%}"
        self.progress.update(line, postfix, log_now)
        if log_now and self.window[1] > 0:
            self._check_input_bound(self.window[0] / self.window[1])
            self.window = [0.0, 0.0]

    def _check_input_bound(self, fraction: float) -> None:
        if fraction < DATA_BOUND or self.warned or self.writer is None:
            return
        self.warned = True
        hint = ""
        if self.num_workers is not None:
            hint = (f"; with {self.num_workers} data-loader workers, try --num-workers "
                    f"{suggested_workers(self.num_workers, fraction)}")
        log.warning("the input pipeline is the bottleneck: %.0f%% of the step time waits for data%s", fraction * 100,
                    hint)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


class Progress:
    """tqdm bar on a terminal (loss, mlm_acc, lr, img/s, MFU, memory), plain log lines otherwise (CI logs, files)."""

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, line: str, postfix: Dict[str, str], log_now: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if log_now:
                self.bar.set_postfix(postfix, refresh=False)
        elif log_now:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
