"""`make demo`'s last line (`python -m beit_fast.train.demo DIR`): both fine-tunes' val top-1 against chance, any
"did not learn" verdict, and the pretrained network's attention on the query's own shape against a random init's."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["demo_line", "main"]


def demo_line(out: Path) -> str:
    """The line, from DIR/finetune/summary.json, DIR/scratch/summary.json and DIR/attention.json."""
    runs = {k: json.loads((out / k / "summary.json").read_text()) for k in ("finetune", "scratch")}
    attn = json.loads((out / "attention.json").read_text())
    ft, sc = runs["finetune"], runs["scratch"]
    cfg = json.loads((out / "finetune" / "config.json").read_text())["finetune"]
    line = (f"val top-1 after {ft['step']} fine-tuning steps (seed {cfg['seed']}): from the demo pretraining "
            f"{ft['val_top1']:.4f} | from scratch {sc['val_top1']:.4f} (chance {ft['chance']:.4f})")
    line += "".join(f" | {name}: {r['no_learning']}" for name, r in runs.items() if r.get("no_learning"))
    return line + (f" | attention on the query's own shape: pretrained {attn['score']['own_shape_mass']:.3f} vs "
                   f"random init {attn['random_init']['own_shape_mass']:.3f} (the shapes' area "
                   f"{attn['score']['area']:.3f})")


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m beit_fast.train.demo DEMO_OUT", file=sys.stderr)
        return 2
    print(demo_line(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
