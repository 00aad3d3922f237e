"""Visual tokenizers: images -> a grid of discrete token ids, the targets of BEiT pretraining.

`VisualTokenizer` is the interface every tokenizer implements. The DALL-E dVAE and a
trainable dVAE arrive with the tokenizer issue; until then `RandomConvTokenizer` - a fixed,
randomly initialised patchify conv + nearest random code (cosine) - gives targets that depend on
local image content, so masked prediction is learnable (it is NOT a semantic tokenizer:
runs with it say so in their logs).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VisualTokenizer", "RandomConvTokenizer", "map_pixels"]

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's logit-Laplace pixel map: [0, 1] -> [eps, 1 - eps]."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class VisualTokenizer(nn.Module):
    """images float (B, 3, S, S) in [0, 1] -> LongTensor (B, grid * grid) of ids in [0, vocab_size)."""

    vocab_size: int
    grid_size: int
    image_size: int
    description: str = "visual tokenizer"

    def check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"tokenizer expects (B, {want}) images, got {tuple(images.shape)}")

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RandomConvTokenizer(VisualTokenizer):
    """Fixed random tokenizer: linear conv(k=s=image_size/grid) of centred pixels -> L2-normalise ->
    argmax of the cosine against `vocab_size` random code vectors. (No nonlinearity before the
    argmax: features of a ReLU/GELU net sit in one cone and a handful of codes would win.)

    The weights are a deterministic function of `seed`, so every process and every resumed run
    produces the same targets; it is never trained (no parameter requires grad)."""

    def __init__(self, vocab_size: int, grid_size: int, image_size: int, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        if image_size % grid_size:
            raise ValueError(f"image_size {image_size} must be a multiple of grid_size {grid_size}")
        self.vocab_size, self.grid_size, self.image_size = vocab_size, grid_size, image_size
        self.description = f"fixed random conv tokenizer (vocab {vocab_size}, seed {seed}; not a trained dVAE)"
        stride = image_size // grid_size
        self.embed = nn.Conv2d(3, width, kernel_size=stride, stride=stride, bias=False)
        self.head = nn.Conv2d(width, vocab_size, kernel_size=1, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
                p.requires_grad_(False)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        h = F.normalize(self.embed(map_pixels(images.float()) - 0.5), dim=1)
        return self.head(h).argmax(1).flatten(1)
