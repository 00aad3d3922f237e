"""Mask generators for masked image modeling.

`BlockwiseMaskGenerator` is the block-wise masking of BEiT (unilm `masking_generator.py`,
SPEC section 3) with one deliberate change: it always returns exactly
`num_masking_patches` masked patches. The reference stops early when a round of ten
block attempts adds nothing; here, and only then, the remainder is topped up with
random patches on the border of the blocks already masked (so the top-up adds no new
connected region). That is not rare: at the BEiT default (14x14, 75) the reference stops
short in about one mask in three (74.5 patches on average, as few as 66), and about a third
of our masks carry ~1-2 extra border patches. Masks where the reference reaches the target
are identical to its masks for the same random stream. Every image of a batch then has the same number of
masked rows, which gives the MIM head static shapes (fused kernels, CUDA graphs,
torch.compile). `RandomMaskGenerator` is the uniform ablation of the paper with the same
interface.

Both use Python's `random.Random` (not numpy) for the scalar draws: the block loop is
dominated by per-draw overhead, and a data-loader worker has to produce thousands of masks
per second.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["BlockwiseMaskGenerator", "RandomMaskGenerator"]

SizeLike = Union[int, Tuple[int, int]]


def _seed(seed):
    if seed is None or isinstance(seed, (int, str, bytes)):
        return seed
    if isinstance(seed, np.integer):
        return int(seed)
    raise ValueError(f"seed must be an int or None, got {type(seed).__name__}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _grid(input_size: SizeLike) -> Tuple[int, int]:
    if _is_int(input_size):
        h = w = int(input_size)
    else:
        if not isinstance(input_size, (tuple, list)) or len(input_size) != 2 or not all(map(_is_int, input_size)):
            raise ValueError(f"input_size must be an int or a (height, width) pair of ints, got {input_size!r}")
        h, w = (int(v) for v in input_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"input_size must be positive, got {(h, w)}")
    return h, w


class _MaskGeneratorBase:
    """Shared interface: `gen()` -> bool ndarray (H, W); `gen.batch(n)` -> torch.bool (n, H*W)."""

    def __init__(self, input_size: SizeLike, num_masking_patches: int, seed: Optional[int]) -> None:
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        if not _is_int(num_masking_patches) or num_masking_patches <= 0:
            raise ValueError(f"num_masking_patches must be a positive int, got {num_masking_patches!r}")
        if num_masking_patches > self.num_patches:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} exceeds the {self.height}x{self.width} grid "
                f"({self.num_patches} patches)"
            )
        self.num_masking_patches = int(num_masking_patches)
        self.rng = random.Random(_seed(seed))

    def seed(self, seed: Optional[int]) -> None:
        """Re-seed (e.g. per data-loader worker)."""
        self.rng.seed(_seed(seed))

    def get_shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def __call__(self) -> np.ndarray:
        raise NotImplementedError

    def batch(self, n: int) -> torch.Tensor:
        """`n` masks as a torch.bool tensor of shape (n, H*W), each with exactly `num_masking_patches` True."""
        if n < 0:
            raise ValueError(f"batch size must be >= 0, got {n}")
        out = np.empty((n, self.num_patches), dtype=bool)
        for i in range(n):
            out[i] = self().reshape(-1)
        return torch.from_numpy(out)


class BlockwiseMaskGenerator(_MaskGeneratorBase):
    """BEiT block-wise masking with an exact masked-patch count.

    Args:
        input_size: patch grid, int or (H, W). 14 for 224px images with 16px patches.
        num_masking_patches: masked patches per image (75 ~ 0.4 * 196 in BEiT).
        min_num_patches: smallest block area drawn (16 in BEiT).
        min_aspect: smallest block aspect ratio; the largest is `max_aspect` or `1 / min_aspect`.
        max_aspect: see `min_aspect`.
        seed: seed of this generator's private RNG (None: from system entropy).
        max_num_patches: keyword only; largest block area (default: `num_masking_patches`, as the reference).
    """

    def __init__(
        self,
        input_size: SizeLike = 14,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        seed: Optional[int] = None,
        *,
        max_num_patches: Optional[int] = None,
    ) -> None:
        super().__init__(input_size, num_masking_patches, seed)
        if not _is_int(min_num_patches) or min_num_patches <= 0:
            raise ValueError(f"min_num_patches must be a positive int, got {min_num_patches!r}")
        if min_num_patches > self.num_masking_patches:
            raise ValueError(
                f"min_num_patches={min_num_patches} is larger than num_masking_patches={self.num_masking_patches}"
            )
        max_num_patches = self.num_masking_patches if max_num_patches is None else max_num_patches
        if not _is_int(max_num_patches) or max_num_patches < min_num_patches:
            raise ValueError(f"max_num_patches={max_num_patches} is smaller than min_num_patches={min_num_patches}")
        if not (math.isfinite(min_aspect) and min_aspect > 0):
            raise ValueError(f"min_aspect must be a positive finite number, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not (math.isfinite(max_aspect) and max_aspect > 0):
            raise ValueError(f"max_aspect must be a positive finite number, got {max_aspect}")
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect={max_aspect} is smaller than min_aspect={min_aspect}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        # How many masks needed the top-up (the reference would have returned fewer patches).
        self.num_topped_up = 0

    def __repr__(self) -> str:
        return (
            f"BlockwiseMaskGenerator(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"aspect=({math.exp(self.log_aspect_ratio[0]):.3f}, {math.exp(self.log_aspect_ratio[1]):.3f}))"
        )

    def _add_block(self, mask: np.ndarray, max_mask_patches: int) -> int:
        """One round of up to ten block attempts; returns how many patches it newly masked."""
        rng = self.rng
        lo, hi = self.log_aspect_ratio
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(lo, hi))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                box = mask[top : top + h, left : left + w]
                new = h * w - int(box.sum())
                if 0 < new <= max_mask_patches:
                    box[...] = True
                    return new
        return 0

    def __call__(self) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, max_mask_patches)
            if delta == 0:
                break
            count += delta
        if count < self.num_masking_patches:
            # The block loop stalled (the reference returns a short mask here): grow the existing blocks
            # by random patches on their border, so the top-up adds no new regions.
            self.num_topped_up += 1
            self._grow(mask, self.num_masking_patches - count)
        return mask

    def _grow(self, mask: np.ndarray, missing: int) -> None:
        for _ in range(missing):
            border = np.zeros_like(mask)
            border[1:] |= mask[:-1]
            border[:-1] |= mask[1:]
            border[:, 1:] |= mask[:, :-1]
            border[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(border & ~mask)
            if candidates.size == 0:  # nothing masked yet (every block attempt failed): any free patch
                candidates = np.flatnonzero(~mask)
            mask.reshape(-1)[candidates[self.rng.randrange(candidates.size)]] = True


class RandomMaskGenerator(_MaskGeneratorBase):
    """Uniformly random masking of exactly `num_masking_patches` patches (the paper's ablation).

    Takes the block generator's arguments too (`min_num_patches`, `min_aspect`, `max_aspect`,
    `max_num_patches`) so the two swap with the same call; they have no effect here."""

    def __init__(
        self,
        input_size: SizeLike = 14,
        num_masking_patches: int = 75,
        min_num_patches: Optional[int] = None,
        min_aspect: Optional[float] = None,
        max_aspect: Optional[float] = None,
        seed: Optional[int] = None,
        *,
        max_num_patches: Optional[int] = None,
    ) -> None:
        super().__init__(input_size, num_masking_patches, seed)
        self._positions = list(range(self.num_patches))

    def __repr__(self) -> str:
        return (
            f"RandomMaskGenerator(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches})"
        )

    def __call__(self) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[self.rng.sample(self._positions, self.num_masking_patches)] = True
        return mask.reshape(self.height, self.width)
