"""The fast two-view input path (`--data-backend cpu`): per image on the worker only what must be per image - decode
(JPEG DCT-domain downscaled where the crop allows), crop, the two resizes, as uint8 - and the colour jitter, flip
and normalisation batched on the training device (`augment_views`).

Same semantics as `beit_fast.data.TwoViewTransform` (the `pil` backend, SPEC section 5), drawn from the same random
stream in the same order (ColorJitter's order and factors, the flip, then the RandomResizedCrop box on the full
image), so a sample's box, flip and jitter factors are the ones the `pil` path draws for the same seed. What differs,
by construction and bounded (`bench/bench_data.py` measures it; README "Input pipeline"):
- draft decoding: a JPEG whose crop box, divided by k in {2, 4, 8}, still covers the larger output view in both
  dimensions is decoded at 1/k scale by libjpeg (`Image.draft`); the resize then still downsamples;
- the box is taken on whole pixels of the decoded image (outward to integers: at most one decoded pixel per side);
- both resizes are torch's antialiased bicubic on uint8 (`F.interpolate(antialias=True)`, the vectorised kernel
  torchvision's v2 transforms use), where the `pil` path uses Pillow's bicubic for the patch view and Lanczos for
  the tokenizer view;
- jitter, flip and normalisation run after the resize, in float, on the device: brightness, contrast and saturation
  in the drawn order with the drawn factors, contrast blending towards the grey mean of the whole (jittered so far)
  image as Pillow's does (computed on the worker from the decoded image; when brightness comes first it is scaled by
  the factor without Pillow's clipping of bright pixels, which can be ~15 levels off on high-contrast images); the
  `pil` path rounds to uint8 after each
  Pillow operation and jitters before resizing.
The flip is exact: the mirrored box on the unflipped image, then the views flipped.

Per sample the worker returns (patch view (3, S, S) uint8, tokenizer view (3, S/2, S/2) uint8, aug (8,) float32):
aug = (brightness, contrast, saturation, op0, op1, op2, flip, grey mean in [0, 1]), op* the jitter operations'
order (0 brightness, 1 contrast, 2 saturation).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageStat

__all__ = ["FastTwoViewTransform", "augment_views", "collate_crops", "draft_factor", "resize_crops",
           "resized_crop_params", "resize_library", "AUG_FIELDS"]

AUG_FIELDS = ("brightness", "contrast", "saturation", "op0", "op1", "op2", "flip", "grey_mean")
_GREY = (0.299, 0.587, 0.114)  # Pillow's convert("L") weights (ITU-R 601-2), what the pil path's contrast uses


def resize_library() -> str:
    """What resizes images on the worker: torch's uint8 antialiased interpolate, and the Pillow build (a
    pillow-simd build would serve the `pil` path; reported by `beit-fast info`)."""
    import PIL

    simd = "simd" in getattr(PIL, "__version__", "") or ".post" in getattr(PIL, "__version__", "")
    return (f"fast path: torch {torch.__version__} uint8 antialiased bicubic; pil path: Pillow {PIL.__version__}"
            + (" (pillow-simd)" if simd else ""))


def draft_factor(crop_w: float, crop_h: float, out: int) -> int:
    """The largest JPEG DCT scale 1/k (k in 8, 4, 2, 1) at which the crop still covers `out` pixels both ways."""
    for k in (8, 4, 2):
        if crop_w / k >= out and crop_h / k >= out:
            return k
    return 1


class FastTwoViewTransform:
    """Worker side of the fast path: an opened (not yet decoded) PIL image -> (patch u8, tokenizer u8, aug).
    `MIMDataset` hands it the opened file (`takes_file`), so the draft is chosen before anything is decoded."""

    takes_file = True

    def __init__(self, *args: Any, draft: bool = True, device_augment: bool = True, resize_on_device: bool = False,
                 **kwargs: Any) -> None:
        """`TwoViewTransform`'s parameters (sizes, scale, ratio, color_jitter, hflip, mean, std), plus: `draft` (JPEG
        DCT-domain downscaling), `device_augment` (return uint8 views + aug for `augment_views`; False: finish on the
        worker), `resize_on_device` (return the crop only: the gpu backend)."""
        from beit_fast.data import TwoViewTransform

        TwoViewTransform.__init__(self, *args, **kwargs)  # the same parameters, one definition
        self.draft = draft
        self.device_augment = device_augment or resize_on_device
        self.resize_on_device = resize_on_device
        self._log_ratio = torch.log(torch.tensor(self.ratio))
        self._one = torch.empty(1)  # the draws' scratch tensor (its float32 arithmetic is torchvision's)

    def draw(self, im: Image.Image) -> Tuple[List[float], bool, Tuple[int, int, int, int]]:
        """(jitter (b, c, s, op0, op1, op2), flip, box (top, left, h, w)) for the image `im` (only its size is read:
        an opened file is not decoded), in the `pil` path's order of draws: ColorJitter.get_params, the flip,
        RandomResizedCrop.get_params."""
        from torchvision import transforms as T

        jitter = [1.0, 1.0, 1.0, 0.0, 1.0, 2.0]
        if self.jitter is not None:
            j = self.jitter
            fn_idx, b, c, s, _ = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            jitter = [b, c, s] + [float(i) for i in fn_idx.tolist() if i < 3]  # hue (3) is never on
        flip = bool(torch.rand(()) < self.hflip)
        W, H = im.size
        return jitter, flip, resized_crop_params(W, H, self.scale, self.ratio, self._log_ratio, self._one)

    def __call__(self, im: Image.Image) -> Tuple[torch.Tensor, ...]:
        W, H = im.size
        jitter, flip, (top, left, h, w) = self.draw(im)
        if flip:  # flipping the image then cropping (top, left) == cropping the mirrored box, then flipping the crop
            left = W - left - w
        rgb, k = self.decode(im, w, h)
        # the grey mean of the whole image (the contrast's blend level) from every 8th pixel both ways: nearest
        # sampling reads 1/64 of the pixels; its error, ~sigma / sqrt(WH / 64), is about a level at 500x375 and moves
        # the contrast's output by (1 - factor) of that, <= 0.4 of a level
        sub = rgb.resize((max(1, rgb.size[0] // 8), max(1, rgb.size[1] // 8)), Image.NEAREST)
        grey = float(np.dot(ImageStat.Stat(sub).mean[:3], _GREY)) / 255.0
        box = (math.floor(left / k), math.floor(top / k), min(math.ceil((left + w) / k), rgb.size[0]),
               min(math.ceil((top + h) / k), rgb.size[1]))
        aug = jitter + [float(flip), grey]
        if self.resize_on_device:  # the gpu backend: the crop itself, (h, w, 3) uint8; resize_crops makes the views
            return torch.from_numpy(np.array(rgb.crop(box))), torch.tensor(aug, dtype=torch.float32)
        with warnings.catch_warnings():  # a read-only view of the crop's bytes: nothing writes to it
            warnings.simplefilter("ignore")
            crop = torch.from_numpy(np.asarray(rgb.crop(box))).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w)
        patch = F.interpolate(crop, size=(self.img_size,) * 2, mode="bicubic", antialias=True)[0].contiguous()
        tok = F.interpolate(crop, size=(self.tokenizer_size,) * 2, mode="bicubic", antialias=True)[0].contiguous()
        if self.device_augment:
            return patch, tok, torch.tensor(aug, dtype=torch.float32)
        return self.finish(patch, tok, aug)

    def decode(self, im: Image.Image, crop_w: int, crop_h: int) -> Tuple[Image.Image, int]:
        """(the decoded RGB image, its scale 1/k): a JPEG at the smallest DCT scale whose crop still covers the larger
        view both ways (`draft_factor`), anything else at full size."""
        from beit_fast.data import to_rgb

        k = 1
        if self.draft and getattr(im, "format", None) == "JPEG":
            k = draft_factor(crop_w, crop_h, max(self.img_size, self.tokenizer_size))
            if k > 1:
                W = im.size[0]
                im.draft(None, (W // k, im.size[1] // k))
                k = round(W / im.size[0]) if im.size[0] else 1  # the scale libjpeg took (it may not reduce)
        im.load()
        return (im if im.mode == "RGB" else to_rgb(im)), k  # (to_rgb's convert would only copy an RGB image)

    def finish(self, patch: torch.Tensor, tok: torch.Tensor, aug: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The worker-side finish (`device_augment=False`, a run without a GPU): the jitter as Pillow's uint8
        enhancers compute it (`Image.blend` with the same degenerate images), on the two small views, then flip,
        to float, normalise - the `pil` path's output format. (On a CPU, torch's float passes over a batch cost
        more than Pillow's uint8 blends of the small views.)"""
        from torchvision.transforms import functional as TF

        b, c, s = aug[0], aug[1], aug[2]
        ops = [int(o) for o in aug[3:6]]
        b_first = ops.index(0) < ops.index(1)
        level = int(min(1.0, max(0.0, aug[7] * (b if b_first else 1.0))) * 255 + 0.5)
        views = []
        for t in (patch, tok):
            im = Image.fromarray(t.permute(1, 2, 0).numpy())
            for op in ops:
                if op == 0:
                    im = Image.blend(Image.new("RGB", im.size, 0), im, b)
                elif op == 1:
                    im = Image.blend(Image.new("RGB", im.size, (level,) * 3), im, c)
                else:
                    im = Image.blend(im.convert("L").convert("RGB"), im, s)
            if aug[6] > 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            views.append(TF.to_tensor(im))
        return (views[0] - self.mean) / self.std, views[1]


def collate_crops(batch: Sequence[tuple]) -> tuple:
    """The gpu backend's collate: samples (crop (h, w, 3) uint8, aug, mask, label[, skipped]) as `MIMDataset` packs
    them -> (every crop in one flat uint8 buffer (one pinned copy, one transfer), their sizes (B, 2) int64, then the
    rest collated as usual, aug last)."""
    from torch.utils.data import default_collate

    crops = [b[0] for b in batch]
    flat = torch.cat([c.reshape(-1) for c in crops])
    sizes = torch.tensor([tuple(c.shape[:2]) for c in crops], dtype=torch.int64)
    rest = default_collate([b[2:] for b in batch])
    aug = default_collate([b[1] for b in batch])
    return (flat, sizes, *rest, aug)


def resize_crops(flat: torch.Tensor, sizes: torch.Tensor, img_size: int, tokenizer_size: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Device side of the gpu backend: each crop of the flat buffer (on the device; `sizes` stays on the host, so
    nothing syncs) resized to both views, antialiased bicubic in float, rounded to uint8 as the cpu backend's
    worker rounds: (B, 3, S, S), (B, 3, S/2, S/2) uint8, for `augment_views`."""
    patches, toks, offset = [], [], 0
    for h, w in sizes.tolist():
        n = h * w * 3
        crop = flat[offset:offset + n].view(1, h, w, 3).permute(0, 3, 1, 2).float()
        offset += n
        patches.append(F.interpolate(crop, size=(img_size,) * 2, mode="bicubic", antialias=True))
        toks.append(F.interpolate(crop, size=(tokenizer_size,) * 2, mode="bicubic", antialias=True))
    as_u8 = lambda xs: torch.cat(xs).round_().clamp_(0, 255).to(torch.uint8)  # noqa: E731
    return as_u8(patches), as_u8(toks)


def resized_crop_params(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                        log_ratio: torch.Tensor, one: torch.Tensor) -> Tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` (top, left, h, w), the same draws from the same generator in the
    same float32 arithmetic, without its per-call tensor set-up (a quarter of the fast path's Python time)."""
    area = height * width
    lo, hi = float(log_ratio[0]), float(log_ratio[1])
    for _ in range(10):
        target_area = area * one.uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(one.uniform_(lo, hi)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # torchvision's fallback: the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def augment_views(
    patches: torch.Tensor, tok_view: torch.Tensor, aug: torch.Tensor,
    mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Device side of the fast path, batched: uint8 views (B, 3, S, S), (B, 3, S/2, S/2) and aug (B, 8) -> the
    patch view normalised by (mean, std) and the tokenizer view in [0, 1], float32, jittered and flipped.

    Each jitter operation is affine in the pixels: brightness b*x, contrast c*x + (1 - c)*level, saturation
    s*x + (1 - s)*grey(x); so step t of every sample's order is one x*A + grey(x)*G + C with per-sample (A, G, C),
    clamped to [0, 1] - three fused passes for any mix of orders, no host synchronisation."""
    if patches.dtype != torch.uint8 or tok_view.dtype != torch.uint8:
        raise ValueError(f"augment_views takes the uint8 views of the fast path, got {patches.dtype}, {tok_view.dtype}")
    B = patches.shape[0]
    if tuple(aug.shape) != (B, len(AUG_FIELDS)):
        raise ValueError(f"aug must be ({B}, {len(AUG_FIELDS)}), got {tuple(aug.shape)}")
    fields = aug.to(patches.device, torch.float32).view(B, -1, 1, 1, 1).unbind(1)
    b, c, s, ops, flip, grey = fields[0], fields[1], fields[2], fields[3:6], fields[6] > 0.5, fields[7]
    # the contrast blends towards the grey mean of the image as jittered so far: brightness before it scales the
    # mean (saturation keeps it); Pillow rounds it to an integer level
    level = torch.floor(torch.clamp(grey * torch.where(_brightness_before_contrast(ops), b, 1.0), 0, 1) * 255 + 0.5)
    level = level / 255
    steps = [(torch.where(op == 0, b, torch.where(op == 1, c, s)),  # A
              torch.where(op == 2, 1 - s, 0.0),  # G
              torch.where(op == 1, (1 - c) * level, 0.0))  # C
             for op in ops]
    views = []
    for u8 in (patches, tok_view):
        x = u8.float().div_(255)
        for A, G, C in steps:
            x = torch.addcmul(_grey(x) * G + C, x, A).clamp_(0, 1)
        views.append(torch.where(flip, x.flip(-1), x))
    m = torch.tensor(mean, device=patches.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=patches.device).view(1, 3, 1, 1)
    return (views[0] - m) / sd, views[1]


def _brightness_before_contrast(ops: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, 1, 1, 1) bool: brightness comes before contrast in the sample's order."""
    pos_b = sum(torch.where(op == 0, torch.full_like(op, float(i)), torch.zeros_like(op)) for i, op in enumerate(ops))
    pos_c = sum(torch.where(op == 1, torch.full_like(op, float(i)), torch.zeros_like(op)) for i, op in enumerate(ops))
    return pos_b < pos_c
