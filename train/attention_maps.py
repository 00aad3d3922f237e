"""Self-attention maps (`beit-fast attention-maps CKPT --out maps.png`) and how much of a query's attention stays on
its own shape.

The paper's figure: for a few query patches (default: the cls token and patches spread over the image), the
attention of each head of the last layer (or `--layer`) over the image, overlaid on it. CKPT: a run directory or
checkpoint of this engine (pretraining, fine-tuning, linear probe, segmentation), a unilm / timm / transformers
checkpoint (backbone or segmentation), or `none` (a random initialisation of `--preset`).

The number (`--score`, on by default): on builtin images, whose per-pixel labels are known, the share of a query
patch's attention (over the patch keys) that falls on patches of its own shape's class, averaged over heads, the
shape patches as queries and the images (`own_shape_mass`), against the share the same patches have of the image
(`area`: what attention spread without regard to content would give). The same is measured for a random
initialisation of the same network (seed `--seed`), and written to `--json` (default: beside the PNG).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from beit_fast import BeitConfig
from beit_fast.model import BeitModel
from beit_fast.seg_data import IMAGENET_MEAN_255, IMAGENET_STD_255

__all__ = ["load_backbone", "patch_labels", "own_shape_attention", "builtin_probe", "score_model", "plot_maps",
           "default_queries", "main"]

Norm = Tuple[Tuple[float, ...], Tuple[float, ...]]  # (mean, std) per channel, in 0-1 units
BEIT_NORM: Norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # what BEiT pretraining and classification read (this
# engine's data pipeline, unilm, timm and transformers' BEiT processors)
SEGMENTATION_NORM: Norm = (tuple(m / 255 for m in IMAGENET_MEAN_255), tuple(s / 255 for s in IMAGENET_STD_255))
SCORE_SEED = 31_337  # the builtin images the score is measured on: fixed, so every checkpoint sees the same ones


def load_backbone(ckpt: str, preset: str = "tiny", seed: int = 0) -> Tuple[BeitModel, str, Norm]:
    """The BEiT backbone (eval mode, fp32, CPU) of any checkpoint `beit-fast segment --init` reads, or a random
    initialisation of `preset` for "none"; a description for the report; the input normalisation it was trained
    with (mmseg's ImageNet mean / std for a segmentation model, BEiT's 0.5 / 0.5 otherwise)."""
    from beit_fast.checkpoint import CheckpointError, load_into
    from beit_fast.segmentation import detect_segmentation_layout, segmentation_backbone_state
    from beit_fast.train.segment import read_seg_init

    if ckpt == "none":
        torch.manual_seed(seed)
        return BeitModel(BeitConfig.from_preset(preset)).eval(), f"random init of {preset} (seed {seed})", BEIT_NORM
    init = read_seg_init(ckpt)
    sd, norm = init.state_dict, BEIT_NORM
    if detect_segmentation_layout(sd) != "backbone":
        sd, norm = segmentation_backbone_state(sd), SEGMENTATION_NORM
    # The relative position layout the weights have (a shared table, one per block, or none), whatever the record
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    per_layer = "blocks.0.attn.relative_position_bias_table" in sd
    config = BeitConfig.from_dict({**init.model_config, "num_masking_patches": None, "attn_backend": "math",
                                   "use_shared_rel_pos_bias": shared, "use_rel_pos_bias": per_layer})
    model = BeitModel(config)
    result = load_into(model, sd, strict=False, quiet=True)
    missing = [k for k in result["missing"] if k != "mask_token"]
    if missing:
        raise CheckpointError(f"{ckpt}: not a BEiT backbone (missing {', '.join(missing[:4])}"
                              f"{', ...' if len(missing) > 4 else ''})")
    return model.eval(), init.what, norm


def patch_labels(seg: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-pixel labels (B, S, S) -> each patch's majority label (B, N), patches in raster order."""
    b, s, _ = seg.shape
    g = s // patch
    blocks = seg[:, :g * patch, :g * patch].reshape(b, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(b, g * g, -1)
    return torch.mode(blocks, dim=-1).values


def own_shape_attention(attn: torch.Tensor, labels: torch.Tensor, background: int = 0) -> Dict[str, float]:
    """attn (B, H, N+1, N+1) (token 0: cls), labels (B, N) per patch. Over every patch query whose label is not
    `background`: `own_shape_mass`, the mean share of its attention over the N patch keys that falls on patches of
    its own label; `area`, the mean share of patches that carry its label (what content-blind attention gives);
    `lift` = own_shape_mass / area; `queries` counted (per head)."""
    patches = attn[:, :, 1:, 1:].double()
    patches = patches / patches.sum(-1, keepdim=True)
    same = (labels[:, :, None] == labels[:, None, :]).double()  # (B, N, N): key k carries query q's label
    query = labels != background  # (B, N)
    mass = (patches * same[:, None]).sum(-1)  # (B, H, N)
    area = same.mean(-1)[:, None].expand_as(mass)
    keep = query[:, None].expand_as(mass)
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no query patch lies on a shape (every patch is background)")
    m, a = float(mass[keep].mean()), float(area[keep].mean())
    return {"own_shape_mass": m, "area": a, "lift": m / a, "queries": n}


def builtin_probe(img_size: int, num_images: int = 32) -> Tuple[np.ndarray, torch.Tensor]:
    """Builtin images at `img_size` (uint8 (B, S, S, 3)) and their per-pixel labels (B, S, S; 0 background), from a
    fixed stream (`SCORE_SEED`)."""
    from beit_fast.data import BuiltinShapes

    base = BuiltinShapes(num_images, img_size, seed=SCORE_SEED)
    raw, segs = zip(*[(img, seg) for img, _, seg in (base.sample(i) for i in range(num_images))])
    return np.stack(raw), torch.from_numpy(np.stack(segs).astype(np.int64))


def normalise(images: np.ndarray, norm: Norm = BEIT_NORM) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), (x / 255 - mean) / std."""
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    return (x - mean) / std


def score_model(model: BeitModel, layer: int = -1, norm: Norm = BEIT_NORM, num_images: int = 32, batch: int = 16,
                probe: Optional[Tuple[np.ndarray, torch.Tensor]] = None) -> Dict[str, float]:
    """`own_shape_attention` of `model`'s layer on `num_images` builtin images at its resolution, normalised with
    `norm` (`probe`: those images, `builtin_probe`'s output, when the caller has them already)."""
    raw, segs = probe if probe is not None else builtin_probe(model.config.img_size, num_images)
    images, num_images = normalise(raw, norm), raw.shape[0]
    labels = patch_labels(segs, model.config.patch_size)
    parts = []
    for i in range(0, num_images, batch):
        attn = model.attention_maps(images[i:i + batch], layer)
        parts.append((own_shape_attention(attn, labels[i:i + batch])))
    n = sum(p["queries"] for p in parts)
    m = sum(p["own_shape_mass"] * p["queries"] for p in parts) / n
    a = sum(p["area"] * p["queries"] for p in parts) / n
    return {"own_shape_mass": m, "area": a, "lift": m / a, "queries": n, "images": num_images}


def default_queries(grid: int) -> List[int]:
    """Query tokens: the cls token (0) and three patches on the diagonal at 1/4, 1/2 and 3/4 (1-based token ids)."""
    spots = sorted({min(grid - 1, int(grid * f)) for f in (0.25, 0.5, 0.75)})
    return [0] + [1 + r * grid + r for r in spots]


def plot_maps(images: np.ndarray, attn: torch.Tensor, queries: Sequence[int], grid: int, out: Path,
              title: str) -> Optional[Path]:
    """Rows: (image, query); columns: the image with the query marked, then each head's attention of that query over
    the patches, upsampled onto the image. Returns the PNG's path, or None without matplotlib."""
    from beit_fast.train.evaluate import pyplot, save_figure

    plt = pyplot("attention-map")
    if plt is None:
        return None
    b, h = attn.shape[:2]
    rows = [(i, q) for i in range(b) for q in queries]
    fig, axes = plt.subplots(len(rows), h + 1, figsize=(1.6 * (h + 1), 1.6 * len(rows)), squeeze=False)
    size = images.shape[1]
    cell = size / grid
    for r, (i, q) in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(images[i])
        if q == 0:
            ax.set_title("query: cls", fontsize=7)
        else:
            y, x = divmod(q - 1, grid)
            ax.add_patch(plt.Rectangle((x * cell, y * cell), cell, cell, fill=False, edgecolor="red", lw=1.5))
            ax.set_title(f"query: patch ({y}, {x})", fontsize=7)
        for head in range(h):
            weights = attn[i, head, q, 1:].float().reshape(grid, grid).numpy()
            ax = axes[r][head + 1]
            ax.imshow(images[i])
            ax.imshow(weights / max(weights.max(), 1e-12), cmap="inferno", alpha=0.65, extent=(0, size, size, 0),
                      interpolation="nearest")
            if r == 0:
                ax.set_title(f"head {head}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(plt, fig, out, dpi=100)


def _load_images(paths: Sequence[str], size: int) -> np.ndarray:
    """Image files -> (B, size, size, 3) uint8: the shorter side resized to `size`, centre-cropped."""
    from PIL import Image

    from beit_fast.data import to_rgb

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                im = to_rgb(im)
                scale = size / min(im.size)
                im = im.resize((max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))),
                               Image.BICUBIC)
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                out.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8))
        except OSError as exc:
            raise ValueError(f"{p}: not a readable image ({exc})") from None
    return np.stack(out)


def _parse_queries(text: Optional[str], grid: int) -> List[int]:
    if text is None:
        return default_queries(grid)
    queries = []
    for part in text.split(","):
        part = part.strip()
        if part == "cls":
            queries.append(0)
            continue
        try:
            y, x = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"--queries {text!r}: comma-separated 'cls' or ROW:COL patch positions") from None
        if not (0 <= y < grid and 0 <= x < grid):
            raise ValueError(f"--queries: patch {y}:{x} outside the {grid}x{grid} grid")
        queries.append(1 + y * grid + x)
    return queries


def run(a: argparse.Namespace) -> Dict[str, Any]:
    model, what, norm = load_backbone(a.checkpoint, a.preset, a.seed)
    cfg = model.config
    depth = cfg.depth
    if a.layer == 0 or not -depth <= a.layer <= depth:
        raise ValueError(f"--layer {a.layer}: the network has {depth} blocks (1..{depth}, or -1 for the last)")
    layer = a.layer - 1 if a.layer > 0 else a.layer
    grid = cfg.img_size // cfg.patch_size
    queries = _parse_queries(a.queries, grid)
    # The score's images are rendered once, for both models; the PNG's builtin images are their first ones.
    probe = builtin_probe(cfg.img_size, a.score_images) if a.score else None
    if a.images:
        raw = _load_images(a.images, cfg.img_size)
    elif probe is not None and a.num_images <= a.score_images:
        raw = probe[0][:a.num_images]
    else:
        raw, _ = builtin_probe(cfg.img_size, a.num_images)
    attn = model.attention_maps(normalise(raw, norm), layer)
    out = Path(a.out)
    png = plot_maps(raw, attn, queries, grid, out,
                    f"{what}: block {layer % depth + 1} of {depth}, {cfg.num_heads} heads")
    result: Dict[str, Any] = {"checkpoint": a.checkpoint, "what": what, "layer": layer % depth + 1,
                              "png": str(png) if png else None}
    if a.score:
        result["score"] = score_model(model, layer, norm, probe=probe)
        torch.manual_seed(a.seed)
        random_model = BeitModel(cfg).eval()
        result["random_init"] = score_model(random_model, layer, norm, probe=probe)
        from beit_fast.train.run import atomic_save_json

        atomic_save_json(result, Path(a.json) if a.json else out.with_suffix(".json"), indent=1)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    from beit_fast.train.runtime import cli_call

    p = argparse.ArgumentParser(prog="beit-fast attention-maps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run directory or checkpoint (this engine, unilm, timm, transformers), "
                                      "or none (random init of --preset)")
    p.add_argument("--out", default="attention_maps.png", help="the PNG")
    p.add_argument("--images", nargs="+", default=None, help="image files (default: builtin images)")
    p.add_argument("--num-images", type=int, default=2, help="builtin images in the PNG without --images")
    p.add_argument("--layer", type=int, default=-1, help="block, 1-based (-1: the last)")
    p.add_argument("--queries", default=None, help="'cls' and ROW:COL patches, comma-separated (default: cls and "
                                                   "three patches on the diagonal)")
    p.add_argument("--preset", default="tiny", help="the network of CKPT none")
    p.add_argument("--seed", type=int, default=0, help="the random initialisation's seed (CKPT none and the baseline)")
    p.add_argument("--score", action=argparse.BooleanOptionalAction, default=True,
                   help="measure own-shape attention on builtin images, against a random init")
    p.add_argument("--score-images", type=int, default=32, help="builtin images the score averages over")
    p.add_argument("--json", default=None, help="the score's JSON (default: --out with .json)")
    try:
        a = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if a.num_images < 1 or a.score_images < 1:
        print("beit-fast attention-maps: error: --num-images and --score-images must be positive", file=sys.stderr)
        return 2
    result, code = cli_call("beit-fast attention-maps", lambda: run(a))
    if code:
        return code
    print(f"attention maps of {result['what']}, block {result['layer']}: {result['png'] or 'no PNG (no matplotlib)'}")
    if "score" in result:
        s, r = result["score"], result["random_init"]
        print(f"attention on the query's own shape (builtin, {s['images']} images): {s['own_shape_mass']:.3f} of the "
              f"mass on {s['area']:.3f} of the area (lift {s['lift']:.2f}x) | random init: "
              f"{r['own_shape_mass']:.3f} (lift {r['lift']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
