"""Run metrics: `metrics.csv` (always), TensorBoard event files (when `tensorboard` imports) and a PNG plot of loss
and mlm_acc at the end (when `matplotlib` imports). Only the main process writes."""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

log = logging.getLogger("beit_fast.pretrain")

__all__ = ["MetricsWriter", "Progress", "plot_metrics", "read_metrics"]


class MetricsWriter:
    """Appends one row per step to `out/metrics.csv`; on a resume, rows past the checkpoint's step (written after it,
    before a crash) are dropped first, so the file always describes one uninterrupted run."""

    def __init__(self, out: Path, columns: Sequence[str], start_step: int, tensorboard: bool) -> None:
        self.path, self.columns = out / "metrics.csv", list(columns)
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

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
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
                    self.tb.add_scalar(f"pretrain/{c}", v, step)

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


def plot_metrics(csv_path: Path, png_path: Path, chance: Optional[float] = None) -> Optional[Path]:
    """Loss and mlm_acc against step, side by side; None (and a log line) when matplotlib is missing or there is
    nothing to plot."""
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
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(m["step"], m["loss"], lw=1)
    a.set_xlabel("step")
    a.set_ylabel("MIM loss (cross-entropy)")
    a.grid(alpha=0.3)
    b.plot(m["step"], m["mlm_acc"], lw=1, label="mlm_acc")
    if chance is not None:
        b.axhline(chance, color="gray", ls="--", lw=1, label=f"chance {chance:.2g}")
        b.legend(loc="best")
    b.set_xlabel("step")
    b.set_ylabel("mlm_acc (masked patches)")
    b.grid(alpha=0.3)
    fig.suptitle(f"BEiT pretraining: {csv_path.parent.name}")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


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
