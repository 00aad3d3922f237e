"""The input pipeline, per worker core (issue 16): img/s of one thread for each path, side by side in one run.

    python bench/bench_data.py [--data DIR] [--seconds 3] [--out bench/results/data]

Paths, each on the same files, one thread (a data-loader worker is one process, one thread):
- `decode`: open + decode to RGB (what any path pays at least);
- `pil` (today's, `--data-backend pil`): decode + `TwoViewTransform` (jitter, flip, crop, Pillow bicubic 224 and
  Lanczos 112, to float, normalise);
- `cpu` (`--data-backend cpu`, the worker's part): `FastTwoViewTransform` - draft decode, crop, two uint8
  antialiased resizes, the augmentation parameters; its ratio to `pil` is the number the issue's target names;
- `gpu` (`--data-backend gpu`, the worker's part): draft decode and the crop only, the resizes moved to the device
  too; with the cores this path would need for 6000 img/s;
- `augment`: `augment_views` (jitter, flip, normalise), batched 64 at a time on this CPU, per image - the work the
  `cpu` path moves to the training device (on a GPU it costs the step a fraction of a millisecond per batch).
Files: JPEGs it writes (q90, 500x375 and 1280x960, 1/f-spectrum colour texture with edges and noise, the statistics
of photographs rather than flat colour), and the images of `--data DIR` if given. Also reported: the fast views'
difference from the `pil` views on the same files and seeds (max and mean absolute error in 8-bit levels), and with
`--tokenizer FILE` the share of visual tokens a trained tokenizer gives the same on both paths' tokenizer views.

Collected by pytest too (`test_bench_data`, a short run that records the rows and checks the error bounds).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beit_fast.data import TwoViewTransform, to_rgb  # noqa: E402
from beit_fast.views import FastTwoViewTransform, augment_views, resize_library  # noqa: E402

SIZES = ((500, 375), (1280, 960))
IMG, TOK = 224, 112
BATCH = 64


def textured_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photograph-like JPEG: 1/f amplitude spectrum per channel (correlated colour), a few sharp-edged discs and
    bars, mild sensor noise."""
    g = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    base = None
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        spectrum = (g.normal(size=f.shape) + 1j * g.normal(size=f.shape)) / f
        field = np.fft.irfft2(spectrum, s=(height, width))
        base = field if base is None else 0.6 * base + 0.4 * field  # channels correlated, as in photographs
        img[..., c] = base
    img = (img - img.mean()) / (img.std() + 1e-6) * 45 + 120
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(6):  # sharp edges
        cy, cx, r = g.uniform(0, height), g.uniform(0, width), g.uniform(0.03, 0.15) * min(width, height)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = g.uniform(0, 255, 3)
    img += g.normal(0, 3, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_images(folder: Path, count: int) -> Dict[str, List[Path]]:
    sets = {}
    for w, h in SIZES:
        paths = []
        for i in range(count):
            p = folder / f"{w}x{h}_{i:03d}.jpg"
            if not p.exists():
                p.write_bytes(textured_jpeg(w, h, seed=1000 * w + i))
            paths.append(p)
        sets[f"{w}x{h} q90"] = paths
    return sets


def folder_images(root: Path, count: int) -> List[Path]:
    exts = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
    if not found:
        raise SystemExit(f"bench_data: no images under {root}")
    return found[:count]


def img_per_s(fn: Callable[[bytes], object], blobs: List[bytes], seconds: float) -> float:
    fn(blobs[0])  # imports, first-call set-up
    n, t0 = 0, time.perf_counter()
    while True:
        for b in blobs:
            fn(b)
            n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def _decode(b: bytes) -> Image.Image:
    with Image.open(io.BytesIO(b)) as im:
        return to_rgb(im)


def view_errors(blobs: List[bytes]) -> Dict[str, float]:
    """Max / mean |fast - pil| in 8-bit levels of both views, same files, same seeds (same boxes, flips, jitter)."""
    pil, fast = TwoViewTransform(IMG, TOK), FastTwoViewTransform(IMG, TOK)
    errs: Dict[str, List[float]] = {"patch_max": [], "patch_mean": [], "tok_max": [], "tok_mean": []}
    for i, b in enumerate(blobs):
        torch.manual_seed(i)
        p0, t0 = pil(_decode(b))
        torch.manual_seed(i)
        with Image.open(io.BytesIO(b)) as im:
            p8, t8, aug = fast(im)
        p1, t1 = augment_views(p8[None], t8[None], aug[None])
        ep, et = (p1[0] - p0).abs() * 127.5, (t1[0] - t0).abs() * 255  # patch view is normalised by 0.5 / 0.5
        errs["patch_max"].append(float(ep.max()))
        errs["patch_mean"].append(float(ep.mean()))
        errs["tok_max"].append(float(et.max()))
        errs["tok_mean"].append(float(et.mean()))
    return {k: (max(v) if k.endswith("max") else float(np.mean(v))) for k, v in errs.items()}


def augment_per_image_ms(blobs: List[bytes]) -> float:
    fast = FastTwoViewTransform(IMG, TOK)
    items = []
    for i in range(BATCH):
        torch.manual_seed(i)
        with Image.open(io.BytesIO(blobs[i % len(blobs)])) as im:
            items.append(fast(im))
    p, t, a = (torch.stack(x) for x in zip(*items))
    augment_views(p, t, a)
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        augment_views(p, t, a)
    return (time.perf_counter() - t0) / reps / BATCH * 1e3


def token_agreement(tokenizer_file: str, count: int = 256) -> Dict[str, object]:
    """Share of visual tokens a trained tokenizer gives the same on the `cpu` path's tokenizer view (torch's
    antialiased bicubic) as on the `pil` path's (Pillow's Lanczos), same builtin images and seeds; for scale, the
    agreement of the `pil` path with itself under a one-pixel shift of the crop box."""
    from beit_fast.data import BuiltinShapes
    from beit_fast.tokenizer import DalleTokenizer

    tok = DalleTokenizer.from_files(tokenizer_file, fast=False)
    size = tok.image_size
    pil, fast = TwoViewTransform(2 * size, size), FastTwoViewTransform(2 * size, size)
    data = BuiltinShapes(num_images=count, size=3 * size, seed=7)
    views_pil, views_fast, views_shift = [], [], []
    for i in range(count):
        img = data[i][0]
        torch.manual_seed(i)
        views_pil.append(pil(img)[1])
        torch.manual_seed(i)
        views_fast.append(augment_views(*(x[None] for x in fast(img)))[1][0])
        torch.manual_seed(i)
        views_shift.append(pil(img.transform(img.size, Image.AFFINE, (1, 0, 1, 0, 1, 0)))[1])
    with torch.no_grad():
        a, b, c = (tok.tokenize(torch.stack(v)) for v in (views_pil, views_fast, views_shift))
    return {"tokenizer": tokenizer_file, "view": size, "images": count,
            "agreement_cpu_vs_pil": float((a == b).float().mean()),
            "agreement_pil_shift_1px": float((a == c).float().mean())}


def run(sets: Dict[str, List[Path]], seconds: float) -> List[Dict[str, object]]:
    torch.set_num_threads(1)
    pil, fast = TwoViewTransform(IMG, TOK), FastTwoViewTransform(IMG, TOK)

    crops = FastTwoViewTransform(IMG, TOK, resize_on_device=True)

    def fast_worker(b: bytes):
        with Image.open(io.BytesIO(b)) as im:
            return fast(im)

    def gpu_worker(b: bytes):
        with Image.open(io.BytesIO(b)) as im:
            return crops(im)

    rows = []
    for name, paths in sets.items():
        blobs = [p.read_bytes() for p in paths]
        rates = {"decode": img_per_s(_decode, blobs, seconds),
                 "pil": img_per_s(lambda b: pil(_decode(b)), blobs, seconds),
                 "cpu": img_per_s(fast_worker, blobs, seconds),
                 "gpu_worker": img_per_s(gpu_worker, blobs, seconds)}
        row: Dict[str, object] = {"images": name, "files": len(blobs),
                                  "kb_per_file": sum(map(len, blobs)) / len(blobs) / 1024}
        row.update({f"{k}_img_s": v for k, v in rates.items()})
        row["cpu_vs_pil"] = rates["cpu"] / rates["pil"]
        row["gpu_worker_vs_pil"] = rates["gpu_worker"] / rates["pil"]
        row["cores_for_6000_img_s_gpu"] = 6000 / rates["gpu_worker"]
        row["augment_ms_per_img_cpu"] = augment_per_image_ms(blobs)
        row.update(view_errors(blobs))
        rows.append(row)
    return rows


def machine() -> Dict[str, str]:
    import PIL

    return {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cores": str(os.cpu_count()), "python": platform.python_version(), "torch": torch.__version__,
            "pillow": PIL.__version__, "resize": resize_library()}


def markdown(rows: List[Dict[str, object]], env: Dict[str, str]) -> str:
    lines = [f"# Input pipeline, one worker core ({env['date']})", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "date"), "",
             "| images | KB/file | decode img/s | pil img/s | cpu img/s | cpu / pil | gpu backend, worker img/s "
             "(cores for 6000 img/s) | augment ms/img (CPU) | patch err max / mean | tok err max / mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']} ({r['files']} files) | {r['kb_per_file']:.0f} | {r['decode_img_s']:.0f} "
                     f"| {r['pil_img_s']:.0f} | {r['cpu_img_s']:.0f} | {r['cpu_vs_pil']:.2f}x "
                     f"| {r['gpu_worker_img_s']:.0f} ({r['cores_for_6000_img_s_gpu']:.1f}) "
                     f"| {r['augment_ms_per_img_cpu']:.3f} | {r['patch_max']:.0f} / {r['patch_mean']:.2f} "
                     f"| {r['tok_max']:.0f} / {r['tok_mean']:.2f} |")
    lines += ["", "Errors: |cpu - pil| of the final views in 8-bit levels, same files and seeds (same boxes, flips, "
              "jitter factors)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="also time the images of this folder (the first --count)")
    ap.add_argument("--count", type=int, default=24, help="images per set (default 24)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per path and set (default 3)")
    ap.add_argument("--out", default="bench/results/data", help="folder for the JSON + Markdown (default %(default)s)")
    ap.add_argument("--tokenizer", help="a trained tokenizer file: also measure token agreement of the two paths' "
                                        "tokenizer views (builtin images at its input size)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_images(Path(tmp), args.count)
        if args.data:
            sets[f"--data {args.data}"] = folder_images(Path(args.data), args.count)
        rows = run(sets, args.seconds)
    env = machine()
    text = markdown(rows, env)
    agreement = token_agreement(args.tokenizer) if args.tokenizer else None
    if agreement:
        text += (f"\nToken agreement ({agreement['tokenizer']}, {agreement['images']} builtin images, "
                 f"{agreement['view']}px tokenizer view): cpu vs pil {agreement['agreement_cpu_vs_pil']:.3f}; "
                 f"for scale, pil vs pil with the image shifted by one pixel "
                 f"{agreement['agreement_pil_shift_1px']:.3f}.\n")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date']}-{platform.node() or 'host'}"
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows, "tokens": agreement}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"written: {out / stem}.json, .md")
    return 0


def test_bench_data(record, tmp_path):
    """A short run: every path times, and the fast views stay within the documented error bounds."""
    rows = run(write_images(tmp_path, 4), seconds=0.3)
    for r in rows:
        record(bench=f"input pipeline {r['images']}", impl="cpu vs pil (one core)", ms=1e3 / r["cpu_img_s"],
               img_per_s=r["cpu_img_s"], note=f"{r['cpu_vs_pil']:.2f}x pil; decode {r['decode_img_s']:.0f} img/s")
        assert r["patch_mean"] < 6 and r["tok_mean"] < 6, r  # measured 1.5-3.9 levels (README "Input pipeline")


if __name__ == "__main__":
    raise SystemExit(main())


def test_gpu_two_view_batches(record, tmp_path):
    """The device half of the gpu backend on a GPU: batches of 128 crops (500x375 JPEGs' boxes, made on the CPU
    beforehand) -> pinned flat buffer -> device -> both resizes + jitter / flip / normalise; img/s of two-view
    batches (the worker half is `gpu_worker_img_s` per core above)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from beit_fast.views import collate_crops, resize_crops

    blobs = [p.read_bytes() for p in write_images(tmp_path, 16)["500x375 q90"]]
    crops = FastTwoViewTransform(IMG, TOK, resize_on_device=True)
    samples = []
    for i in range(128):
        torch.manual_seed(i)
        with Image.open(io.BytesIO(blobs[i % len(blobs)])) as im:
            crop, aug = crops(im)
        samples.append((crop, aug, torch.zeros(196, dtype=torch.bool), 0, -1))
    flat, sizes, _, _, _, aug = collate_crops(samples)
    flat, aug = flat.pin_memory(), aug.pin_memory()

    def step():
        p, t = resize_crops(flat.to("cuda", non_blocking=True), sizes, IMG, TOK)
        return augment_views(p, t, aug.to("cuda", non_blocking=True))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / reps * 1e3
    record(bench="input pipeline, gpu backend device half (B=128, 500x375 crops)", impl="resize_crops + augment_views",
           ms=ms, img_per_s=128 / ms * 1e3, note=f"{flat.numel() / 2**20:.1f} MiB uint8 per batch over PCIe")
