"""Data: the built-in procedural dataset, image folders, the two-view MIM transform, classification data and sampling.

- `BuiltinShapes`: images of shapes on textured backgrounds, generated deterministically
  from (seed, index), with a class label (the main shape) and a per-pixel segmentation
  label. Nothing to download; the demo, tests and fine-tuning examples use it.
- `ImageFolderDataset`: `root/class_x/**/*.jpg` (ImageFolder style) or a flat folder of images; only
  regular files (or symlinks to them) are listed. `to_rgb` turns every decoded image into 8-bit RGB, scaling
  16-bit and float images rather than clipping them; an image it cannot convert faithfully, or a file that does
  not decode, is replaced by the next readable file, logged once and counted once per process (`bad_files`,
  `num_skipped`).
- `TwoViewTransform`: SPEC section 5 - one random-resized-crop box cut to two views: the
  patch view (img_size, bicubic, normalised) and the tokenizer view (img_size // 2, lanczos,
  pixels in [0, 1]); color jitter and horizontal flip before the crop.
- `SyntheticMIMDataset`: random views with real masks and no decoding (benchmarking the step).
- `MIMDataset` + `StepBatchSampler` (+ `MicroBatchSampler`, one rank's micro-batches): every
  sample is a pure function of (seed, epoch, index) - transform randomness and the mask - so a
  run resumed at step k sees exactly the batches an uninterrupted run would. With `return_skipped` a
  sample's fifth item is its index if its own file was unusable, else -1.
- Classification fine-tuning: `build_classification_data` -> `ClassificationData` (train and val `LabelledSubset`s,
  class names) from "builtin" (a fixed train/val split of `BuiltinShapes`, independent of the run's seed) or an
  ImageNet-layout folder (`train/<class>/`, `val/<class>/`, the same classes), optionally a stratified labelled share
  of train (`train_fraction`); `classification_transform` (unilm's fine-tuning transforms built by timm:
  RandAugment, random erasing; resize + center crop for eval); `ClassificationDataset`, (epoch, index) -> (image,
  label) deterministic in (seed, epoch, index) like `MIMDataset`, fed by `StepBatchSampler` for training and
  `ShardedEvalSampler` (each val image once over all ranks, no padding) for evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from beit_fast.config import first_line

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "UnsupportedImageError",
    "to_rgb",
    "BuiltinShapes",
    "ImageFolderDataset",
    "TwoViewTransform",
    "MIMDataset",
    "StepBatchSampler",
    "MicroBatchSampler",
    "SyntheticMIMDataset",
    "build_dataset",
    "SHAPE_CLASSES",
    "BUILTIN_CLASSIFICATION_SEED",
    "LabelledSubset",
    "ClassificationData",
    "build_classification_data",
    "classification_transform",
    "ClassificationDataset",
    "ShardedEvalSampler",
]

# Every kind differs from every other in outline (or fill) at EVERY rotation: the rhombus's diagonals are r and 0.55 r,
# so it is never a rotated square (a square "diamond" differed from "square" only in size, over overlapping ranges).
SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes_disc", "rhombus", "checker_square")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """The data cannot feed a run (e.g. no image of a folder decodes); the CLI reports it as one line."""


# -- built-in procedural data ----------------------------------------------------------------------------------------
MAX_BUILTIN_IMAGES = 10**8  # the most builtin images a dataset may have (the index arrays stay small)


class BuiltinShapes(torch.utils.data.Dataset):
    """Procedural shapes dataset. `ds[i]` -> (PIL RGB image, class label); `ds.sample(i)` also gives
    the (size, size) uint8 segmentation map (0 = background, c + 1 = pixels of a class-c shape).

    Args:
        num_images: dataset length.
        size: image side in pixels.
        seed: dataset seed; image i is the same for the same (seed, i) on every machine.
        num_classes: how many of SHAPE_CLASSES to use (2..8).
        cache_bytes: rendered images (and maps) are kept up to this many bytes, so every epoch after the first
            reads them instead of rendering again (rendering was ~30% of a tiny fine-tuning step); 0 turns it off.
            Each DataLoader worker keeps its own; a pickled dataset leaves it behind.
    """

    def __init__(self, num_images: int = 2048, size: int = 96, seed: int = 0, num_classes: int = 8,
                 cache_bytes: int = 256 << 20) -> None:
        if not 0 < num_images <= MAX_BUILTIN_IMAGES:
            raise ValueError(f"num_images must be in [1, {MAX_BUILTIN_IMAGES:.0e}] (procedural images: more is never "
                             f"needed), got {num_images}")
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        if not 2 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPE_CLASSES)}], got {num_classes}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.num_images, self.size, self.seed, self.num_classes = num_images, size, seed, num_classes
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self._yy, self._xx = yy, xx
        self.classes = list(SHAPE_CLASSES[:num_classes])
        self.cache_bytes = int(cache_bytes)
        self._cache: Dict[int, Tuple[np.ndarray, int, np.ndarray]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_cached_bytes"] = {}, 0
        return state

    def _shape_mask(self, kind: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
        y, x = self._yy - cy, self._xx - cx
        ca, sa = math.cos(angle), math.sin(angle)
        u, v = ca * x + sa * y, -sa * x + ca * y
        name = SHAPE_CLASSES[kind]
        if name in ("disc", "stripes_disc"):
            return u * u + v * v <= r * r
        if name in ("square", "checker_square"):
            return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
        if name == "triangle":
            return (v >= -r * 0.6) & (v <= r * 0.9 - 1.7 * np.abs(u)) & (np.abs(u) <= r)
        if name == "ring":
            d = u * u + v * v
            return (d <= r * r) & (d >= (0.55 * r) ** 2)
        if name == "cross":
            return ((np.abs(u) <= r * 0.3) & (np.abs(v) <= r)) | ((np.abs(v) <= r * 0.3) & (np.abs(u) <= r))
        if name == "rhombus":
            return np.abs(u) / r + np.abs(v) / (0.55 * r) <= 1
        raise AssertionError(name)

    def sample(self, index: int) -> Tuple[np.ndarray, int, np.ndarray]:
        """(image uint8 (size, size, 3), label, segmentation uint8 (size, size)); the caller's own copies."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        hit = self._cache.get(index)
        if hit is None:
            hit = self._render(index)
            size = hit[0].nbytes + hit[2].nbytes
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[index] = hit
                self._cached_bytes += size
        return hit[0].copy(), hit[1], hit[2].copy()

    def _render(self, index: int) -> Tuple[np.ndarray, int, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        s = self.size
        # Background: a colour gradient plus one of three textures.
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        t = (self._xx * rng.uniform(-1, 1) + self._yy * rng.uniform(-1, 1))[..., None]
        img = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6)
        texture = rng.integers(3)
        if texture == 1:
            freq = rng.uniform(4, 12)
            img = img + 0.15 * np.sin(2 * math.pi * freq * (self._xx + self._yy))[..., None]
        elif texture == 2:
            img = img + rng.normal(0, 0.08, (s, s, 1))
        seg = np.zeros((s, s), dtype=np.uint8)
        label = int(rng.integers(self.num_classes))
        # Distractors first (smaller, any class), then the labelled main shape on top.
        n_distract = int(rng.integers(0, 3))
        shapes = [(int(rng.integers(self.num_classes)), rng.uniform(0.08, 0.16)) for _ in range(n_distract)]
        shapes.append((label, rng.uniform(0.2, 0.32)))
        for kind, r in shapes:
            cy, cx = rng.uniform(r, 1 - r, 2)
            m = self._shape_mask(kind, cy, cx, r, rng.uniform(0, math.pi))
            color = rng.uniform(0, 1, 3)
            fill = np.broadcast_to(color, (s, s, 3)).copy()
            name = SHAPE_CLASSES[kind]
            if name == "stripes_disc":
                fill *= (0.6 + 0.4 * (np.sin(40 * self._xx) > 0))[..., None]
            elif name == "checker_square":
                fill *= (0.6 + 0.4 * ((np.floor(self._xx * 12) + np.floor(self._yy * 12)) % 2))[..., None]
            img = np.where(m[..., None], fill, img)
            seg[m] = kind + 1
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        return img, label, seg

    def label(self, index: int) -> int:
        """The class label of image `index` without rendering it (`sample(index)[1]`, ~20x cheaper).

        Replays `sample`'s draws up to the label: the two must change together (tests check they agree)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if index in self._cache:
            return self._cache[index][1]
        rng = np.random.default_rng([self.seed, index])
        rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng.uniform(-1, 1), rng.uniform(-1, 1)
        texture = rng.integers(3)
        if texture == 1:
            rng.uniform(4, 12)
        elif texture == 2:
            # The ziggurat's draws per normal vary, so the noise is drawn, not skipped.
            rng.normal(0, 0.08, (self.size, self.size, 1))
        return int(rng.integers(self.num_classes))

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        img, label, _ = self.sample(index)
        return Image.fromarray(img), label


# -- image folders ---------------------------------------------------------------------------------------------------
class UnsupportedImageError(ValueError):
    """An image that decodes but has no faithful 8-bit RGB form; the message says why."""


_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """The 8-bit RGB form of a decoded image, or `UnsupportedImageError` with the reason there is none.

    Pillow's convert("RGB") clips wide modes to 0..255 (a 16-bit gradient came out 99.6% white), so those are
    scaled here: 16-bit grayscale (I;16*, and mode I, which some 16-bit files open as) by round(v / 257), so
    0..65535 maps onto 0..255; float (F) by round(255 v) when every value is finite and in [0, 1]. Mode I outside
    [0, 65535] and float outside [0, 1] have no known range to scale from and are refused. Every other mode goes
    through convert("RGB") (Pillow opens 16-bit RGB(A) PNGs as RGB(A) already, keeping the high byte)."""
    mode = im.mode
    if mode in _UINT16_MODES or mode == "I":
        v = np.asarray(im)
        if mode == "I" and v.size and (int(v.min()) < 0 or int(v.max()) > 65535):
            raise UnsupportedImageError(
                f"32-bit integer image with values in [{int(v.min())}, {int(v.max())}], outside [0, 65535]: "
                "no faithful 8-bit conversion"
            )
        # round(v / 257) in integers: 257 is odd, so v / 257 is never a tie and floor(v / 257 + 1/2) is exact.
        gray = ((v.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        v = np.asarray(im, dtype=np.float64)
        if not np.isfinite(v).all():
            raise UnsupportedImageError("float image with NaN or infinite values: no faithful 8-bit conversion")
        if v.size and (v.min() < 0 or v.max() > 1):
            raise UnsupportedImageError(
                f"float image with values in [{v.min():.6g}, {v.max():.6g}], outside [0, 1]: "
                "no faithful 8-bit conversion"
            )
        return Image.fromarray(np.rint(v * 255).astype(np.uint8)).convert("RGB")
    im.load()  # decoding errors (truncated, corrupt) surface here as themselves, not as a conversion failure
    try:
        return im.convert("RGB")
    except ValueError as exc:  # e.g. "conversion from La to L not supported"
        raise UnsupportedImageError(f"mode {mode} cannot be converted to RGB: {exc}") from exc


class ImageFolderDataset(torch.utils.data.Dataset):
    """`root/<class>/<image>` (labels from sorted class folders) or a flat `root/<image>` (label -1).

    A file that cannot be used (it does not decode, or `to_rgb` refuses it) is replaced by the next readable one
    (index + 1, + 2, ... wrapping around). Each process (each data-loader worker has its own copy) keeps the files it
    found bad in `bad_files` ({index: reason}), logs "skipping unreadable image PATH: REASON" once per file and
    counts them in `num_skipped` (distinct files, not attempts). A bad file is tried again whenever it is drawn (a
    read that failed for a passing reason may succeed later) but never logged or counted twice.

    `load(index)` also says whether index's own file was replaced: `MIMDataset` reports that per sample, so a
    training loop can count each bad file once over all workers and ranks. Construction only lists the files;
    `check_readable()` decodes up front until one image reads (a run calls it so that a folder of nothing but
    corrupt files fails before training, with `DataError`)."""

    def __init__(self, root: Union[str, Path]) -> None:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"data directory does not exist: {root}")
        if not root.is_dir():
            raise NotADirectoryError(f"data path is not a directory: {root}")
        subdirs = sorted(d for d in root.iterdir() if d.is_dir())
        samples: List[Tuple[str, int]] = []
        self.classes = [d.name for d in subdirs]
        for label, d in enumerate(subdirs):
            samples += [(path, label) for path in _list_images(str(d), recursive=True)]
        samples += [(path, -1) for path in _list_images(str(root), recursive=False)]
        if not samples:
            raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
        self.root, self.samples = root, samples
        self.bad_files: Dict[int, str] = {}

    @property
    def num_skipped(self) -> int:
        """How many distinct files this process found unusable."""
        return len(self.bad_files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        img, label, _ = self.load(index)
        return img, label

    def load(self, index: int, prepare: Callable[[Image.Image], Any] = to_rgb) -> Tuple[Any, int, bool]:
        """(RGB image, label, own_bad): the image of file `index`, or if that file cannot be used the next one
        that can (own_bad is then True). Raises `DataError` when no file of the folder can be used.

        `prepare(opened image) -> result` replaces `to_rgb` (the fast path decodes, drafted, inside it); whatever it
        raises makes the file unusable, as a decoding error does."""
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            path, label = self.samples[i]
            try:
                with Image.open(path) as im:
                    return prepare(im), label, attempt > 0
            except Exception as exc:  # PIL raises several types for truncated / corrupt files
                if i not in self.bad_files:
                    self.bad_files[i] = _reason(exc)
                    log.warning("skipping unreadable image %s: %s", path, self.bad_files[i])
        raise DataError(f"no readable image under {self.root} ({n} files, none decodes)")

    def check_readable(self) -> int:
        """Decode files in order until one reads; returns its index. Raises `DataError` if none does.

        Cheap on a healthy folder (the first file reads); a folder of corrupt files fails here, before
        any work starts, instead of in a data-loader worker mid-run. A probe only: it neither logs nor
        counts the files it passes over (`load` does when a run draws them)."""
        first_error = ""
        for index, (path, _) in enumerate(self.samples):
            try:
                with Image.open(path) as im:
                    to_rgb(im)
                return index
            except Exception as exc:  # as in load: PIL raises several types
                first_error = first_error or f"{path}: {_reason(exc)}"
        raise DataError(
            f"none of the {len(self.samples)} image files under {self.root} can be decoded (first: {first_error})"
        )


def _reason(exc: BaseException) -> str:
    """One line on why a file cannot be used: to_rgb's refusals say it themselves, decoders by type and message."""
    return first_line(str(exc) if isinstance(exc, UnsupportedImageError) else f"{type(exc).__name__}: {exc}")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _is_regular_file(entry: os.DirEntry) -> bool:
    # DirEntry.is_file() is S_ISREG of the entry, or of its target for a symlink (a broken one is False), and reads
    # the type from the directory listing where the filesystem has it: no stat per file on a large folder. A FIFO,
    # socket, device or directory with an image name is refused without being opened (opening a FIFO blocks).
    try:
        return entry.is_file()
    except OSError:  # e.g. a symlink whose target we may not stat
        return False


def _list_images(top: str, recursive: bool) -> List[str]:
    """Paths of the regular image files in `top` (and its subfolders if `recursive`), in a stable order.

    The order is the one `sorted(os.walk(top))` gave (folders by path, files by name in each) so that an index
    names the same file as before: a resumed run keeps its data. Symlinked subfolders are not followed (as
    os.walk), which also keeps a link cycle from looping."""
    folders: List[Tuple[str, List[str]]] = []
    pending = [top]
    while pending:
        folder = pending.pop()
        names: List[str] = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if recursive and entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif _is_image(entry.name) and _is_regular_file(entry):
                        names.append(entry.name)
        except OSError as exc:  # an unreadable folder loses its files, as with os.walk, but now says so
            log.warning("cannot list %s: %s", folder, exc)
            continue
        folders.append((folder, sorted(names)))
    return [os.path.join(folder, name) for folder, names in sorted(folders) for name in names]


def build_dataset(data: str, num_images: int = 2048, size: int = 96, seed: int = 0) -> torch.utils.data.Dataset:
    """"builtin" -> BuiltinShapes; anything else is an image-folder path."""
    if data == "builtin":
        return BuiltinShapes(num_images=num_images, size=size, seed=seed)
    return ImageFolderDataset(data)


# -- the two-view transform ------------------------------------------------------------------------------------------
class TwoViewTransform:
    """PIL image -> (patch view (3, S, S) normalised, tokenizer view (3, S/2, S/2) in [0, 1])."""

    def __init__(
        self,
        img_size: int = 224,
        tokenizer_size: Optional[int] = None,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        hflip: float = 0.5,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        from torchvision import transforms as T

        self.img_size = img_size
        self.tokenizer_size = tokenizer_size or img_size // 2
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        if self.jitter is not None:
            img = self.jitter(img)
        if torch.rand(()) < self.hflip:
            img = TF.hflip(img)
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        box = (j, i, j + w, i + h)
        patches = img.resize((self.img_size, self.img_size), Image.BICUBIC, box=box)
        tok = img.resize((self.tokenizer_size, self.tokenizer_size), Image.LANCZOS, box=box)
        patches = (TF.to_tensor(patches) - self.mean) / self.std
        return patches, TF.to_tensor(tok)


# -- MIM samples and step-addressed sampling -------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample (epoch, index), folded into [0, 2**63): torch.manual_seed takes at most a
    signed 64-bit value (run seeds above ~1.8e6 overflowed it). Below that the value is unchanged."""
    return int((seed * 1_000_003 + epoch) * 10_000_019 + index) % (1 << 63)


def _draw_mask(mask_generator, seed: int) -> torch.Tensor:
    """The (N,) bool mask of the sample with this seed."""
    mask_generator.seed(seed)
    return torch.from_numpy(mask_generator().reshape(-1).copy())


def _seeded(seed: int, fn: Callable, x: Any) -> Any:
    """fn(x) with torch's and Python's generators seeded by `seed`, the caller's generator states untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        return fn(x)


class MIMDataset(torch.utils.data.Dataset):
    """(epoch, index) -> (patch view, tokenizer view, bool mask (N,), label); deterministic in (seed, epoch, index).
    With the fast path's transform (`beit_fast.views.FastTwoViewTransform`) with `device_augment` the views are uint8
    and a last item, the (8,) augmentation parameters, follows: `beit_fast.views.augment_views` makes the float views
    on the device.

    With `return_skipped=True` a fifth item, an int, reports this sample's own file: `index` if the base dataset
    could not use it (an `ImageFolderDataset` replaced it by the next readable file), else -1; -1 always for a base
    dataset without unusable files (e.g. `BuiltinShapes`). Within an epoch each index is drawn at most once over all
    workers and ranks, so a training loop that keeps the set of reported indices counts each bad file once; a bad
    file the fallback walk passes over is reported by its own sample, not by this one."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable, mask_generator, seed: int = 0,
                 return_skipped: bool = False) -> None:
        self.base, self.transform, self.mask_generator, self.seed = base, transform, mask_generator, seed
        self.return_skipped = return_skipped

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        fast = getattr(self.transform, "takes_file", False)  # the fast path decodes inside its transform
        if isinstance(self.base, ImageFolderDataset):
            if fast:  # every attempt (a bad file is replaced by the next) starts from the sample's seed
                views, label, own_bad = self.base.load(index, functools.partial(_seeded, s, self.transform))
            else:
                img, label, own_bad = self.base.load(index)
        else:
            (img, label), own_bad = self.base[index], False
        if not (fast and isinstance(self.base, ImageFolderDataset)):
            views = _seeded(s, self.transform, img)
        return self._pack(views, _draw_mask(self.mask_generator, s), label, index if own_bad else -1)

    def make(self, seed: int, im: Image.Image, label: int, skipped: int = -1) -> tuple:
        """One sample from an opened image (a shard member: `beit_fast.shards.ShardStream`) with its sample seed."""
        views = _seeded(seed, self.transform, im if getattr(self.transform, "takes_file", False) else to_rgb(im))
        return self._pack(views, _draw_mask(self.mask_generator, seed), label, skipped)

    def _pack(self, views: tuple, mask: torch.Tensor, label: int, skipped: int) -> tuple:
        extra = (skipped,) if self.return_skipped else ()
        if getattr(self.transform, "resize_on_device", False):
            # (crop u8, aug, mask, label[, skipped]): beit_fast.views.collate_crops batches them
            return (views[0], views[1], mask, label) + extra
        if getattr(self.transform, "device_augment", False):
            # (patch u8, tokenizer u8, mask, label[, skipped], aug): beit_fast.views.augment_views finishes them
            return (views[0], views[1], mask, label) + extra + (views[2],)
        return (views[0], views[1], mask, label) + extra


class SyntheticMIMDataset(torch.utils.data.Dataset):
    """Random views with real masks, no decoding or resizing: for measuring the step without the input pipeline.

    (epoch, index) -> (patch view (3, S, S) ~ N(0, 1), tokenizer view (3, S/2, S/2) in [0, 1], mask (N,), -1[, -1]),
    deterministic in (seed, epoch, index) like `MIMDataset`; the optional fifth item is `MIMDataset`'s "own file was
    bad" index, always -1 here (there are no files)."""

    def __init__(self, num_samples: int, img_size: int, tokenizer_size: int, mask_generator, seed: int = 0,
                 return_skipped: bool = False) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.img_size, self.tokenizer_size = num_samples, img_size, tokenizer_size
        self.mask_generator, self.seed, self.return_skipped = mask_generator, seed, return_skipped

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        g = torch.Generator().manual_seed(s)
        patches = torch.randn(3, self.img_size, self.img_size, generator=g)
        tok_view = torch.rand(3, self.tokenizer_size, self.tokenizer_size, generator=g)
        mask = _draw_mask(self.mask_generator, s)
        return (patches, tok_view, mask, -1, -1) if self.return_skipped else (patches, tok_view, mask, -1)


class StepBatchSampler(torch.utils.data.Sampler):
    """An endless stream of batches of (epoch, index) keys, starting at `start_step`.

    Epoch e visits a permutation drawn from (seed, e); the last incomplete batch of an epoch is
    dropped, so step k always maps to the same keys - resuming needs only the step count."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, start_step: int = 0) -> None:
        if batch_size > num_samples:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_samples} samples)")
        self.num_samples, self.batch_size, self.seed, self.start_step = num_samples, batch_size, seed, start_step
        self.steps_per_epoch = num_samples // batch_size

    def __len__(self) -> int:  # endless; DataLoader only uses len for progress, which we do not
        return 2**62

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            perm = torch.randperm(self.num_samples, generator=g).tolist()
            for b in range(offset, self.steps_per_epoch):
                yield [(epoch, i) for i in perm[b * self.batch_size : (b + 1) * self.batch_size]]
            epoch, offset = epoch + 1, 0


class MicroBatchSampler(torch.utils.data.Sampler):
    """One rank's share of a `StepBatchSampler`'s global batches, cut into micro-batches.

    Global step k's batch of B keys is split into `grad_accum` micro-batches of `world_size` slices each: rank r's
    micro-batch m is keys[(m * world_size + r) * b : ... + b] with b = B / (grad_accum * world_size). Over all ranks and
    micro-batches a step sees exactly the keys a single process with the same global batch sees."""

    def __init__(self, steps: StepBatchSampler, rank: int = 0, world_size: int = 1, grad_accum: int = 1) -> None:
        parts = world_size * grad_accum
        if steps.batch_size % parts:
            raise ValueError(
                f"batch_size {steps.batch_size} is not divisible by world_size x grad_accum_steps = "
                f"{world_size} x {grad_accum}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.steps, self.rank, self.world_size, self.grad_accum = steps, rank, world_size, grad_accum
        self.micro_batch = steps.batch_size // parts

    def __len__(self) -> int:
        return 2**62

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        b = self.micro_batch
        for keys in self.steps:
            for m in range(self.grad_accum):
                start = (m * self.world_size + self.rank) * b
                yield keys[start : start + b]


# -- classification fine-tuning --------------------------------------------------------------------------------------
BUILTIN_CLASSIFICATION_SEED = 10_007
"""Dataset seed of the builtin classification data (plus `build_classification_data`'s `seed`, 0 by default). Fixed,
not the run's seed, so runs with different seeds are scored on the same val images; not 0, the seed pretraining's
builtin data has by default, so fine-tuning's val images are not images the demo pretrained on."""

_SUBSET_SEED = 20_011  # seed of train_fraction's per-class draws: fixed, so a label budget is the same images per run


class LabelledSubset(torch.utils.data.Subset):
    """`base[indices[i]]` -> (PIL RGB image, label), with every label readable without decoding or rendering.

    `labels[i]` is item i's label: from `ImageFolderDataset.samples`, from `BuiltinShapes.label` (its label draw
    replayed, no rendering), or for another base by reading the item once; computed on first use, then kept.
    `load(i)` is (image, label, own_bad) as `ImageFolderDataset.load`; own_bad is always False for other bases."""

    def __init__(self, base: torch.utils.data.Dataset, indices: Sequence[int],
                 labels: Optional[Sequence[int]] = None) -> None:
        super().__init__(base, list(indices))
        if labels is not None:
            if len(labels) != len(self.indices):
                raise ValueError(f"{len(labels)} labels for {len(self.indices)} indices")
            self.__dict__["labels"] = list(labels)  # pre-fills the cached property

    @functools.cached_property
    def labels(self) -> List[int]:
        base = self.dataset
        if isinstance(base, ImageFolderDataset):
            return [base.samples[i][1] for i in self.indices]
        if isinstance(base, BuiltinShapes):
            return [base.label(i) for i in self.indices]
        return [int(base[i][1]) for i in self.indices]

    def load(self, index: int) -> Tuple[Image.Image, int, bool]:
        i = self.indices[index]
        if isinstance(self.dataset, ImageFolderDataset):
            return self.dataset.load(i)
        img, label = self.dataset[i]
        return img, label, False


@dataclass
class ClassificationData:
    """The two sides of a classification data set; items are (PIL RGB image, label in [0, num_classes))."""

    train: LabelledSubset
    val: LabelledSubset
    classes: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_classification_data(data: str, *, num_images: int = 4096, image_size: int = 96, train_fraction: float = 1.0,
                              seed: int = 0, num_classes: Optional[int] = None) -> ClassificationData:
    """Labelled train and val sets from "builtin" or an ImageNet-layout folder.

    - "builtin": one `BuiltinShapes` stream (8 classes, `image_size` px, dataset seed `BUILTIN_CLASSIFICATION_SEED` +
      `seed`); train is its first `num_images` images, val the next max(256, num_images // 4): a quarter as many,
      but at least 256 so that val top-1 moves in steps of <= 0.4% even on a small demo. `num_classes` k in 2..8:
      only the first k shape kinds (an easier task for small budgets); None: all 8.
    - a folder: `data/train/<class>/**/<image>` and `data/val/<class>/**/<image>`, the same class folders on both sides
      (labels are the sorted folder names); `num_images` and `image_size` do not apply.

    `train_fraction` in (0, 1] keeps that share of each class of train (round(fraction x count), at least one image
    of every class train has), drawn with a fixed seed: the same images in every run, and the images kept at a
    fraction are kept at every larger one. `seed` is the DATA's seed (builtin images, the subset): keep it fixed over
    runs that are to be compared - do not pass the run's seed.

    Raises:
        ValueError: train_fraction outside (0, 1], no class folders, class folders that differ between train/ and
            val/ (the message names one), an empty class folder, images outside the class folders.
        FileNotFoundError: the folder, or its train/ or val/, does not exist.
    """
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if data == "builtin":
        if not 0 < num_images <= MAX_BUILTIN_IMAGES * 4 // 5:
            raise ValueError(f"num_images must be in [1, {MAX_BUILTIN_IMAGES * 4 // 5:.0e}] (with its val quarter "
                             f"{MAX_BUILTIN_IMAGES:.0e} builtin images), got {num_images}")
        kinds = len(SHAPE_CLASSES) if num_classes is None else num_classes
        if not 2 <= kinds <= len(SHAPE_CLASSES):
            raise ValueError(f"the builtin data has 2 to {len(SHAPE_CLASSES)} classes, not {num_classes}")
        num_val = max(256, num_images // 4)
        base = BuiltinShapes(num_images + num_val, image_size, seed=BUILTIN_CLASSIFICATION_SEED + seed,
                             num_classes=kinds)
        train = LabelledSubset(base, range(num_images))
        val = LabelledSubset(base, range(num_images, num_images + num_val))
        classes = list(base.classes)
    else:
        train_ds, val_ds = _classification_folders(Path(data))
        train, val = LabelledSubset(train_ds, range(len(train_ds))), LabelledSubset(val_ds, range(len(val_ds)))
        classes = list(train_ds.classes)
    if train_fraction < 1:
        train = _stratified_subset(train, train_fraction, seed)
    return ClassificationData(train=train, val=val, classes=classes)


def _class_folders(side: Path) -> List[str]:
    return sorted(d.name for d in side.iterdir() if d.is_dir())  # as ImageFolderDataset lists its classes


def _classification_folders(root: Path) -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    """ImageFolderDatasets of root/train and root/val, checked to be a classification data set."""
    if not root.exists():
        raise FileNotFoundError(f"data directory does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data path is not a directory: {root}")
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    for side in ("train", "val"):
        if not (root / side).is_dir():
            raise FileNotFoundError(f"no {side}/ folder in {root}: {layout}")
    classes = {side: _class_folders(root / side) for side in ("train", "val")}
    for side in ("train", "val"):
        if not classes[side]:
            raise ValueError(f"no class folders in {root / side}: {layout}")
    # Labels are positions in the sorted class list: one folder more or less on a side shifts every later label.
    for side, other in (("train", "val"), ("val", "train")):
        missing = [c for c in classes[side] if c not in set(classes[other])]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"class folder {missing[0]!r} is in {root / side} but missing from {root / other}{more}")
    sides = ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val")
    for ds in sides:
        loose = [path for path, label in ds.samples if label < 0]
        if loose:
            raise ValueError(f"{len(loose)} images in {ds.root} are outside any class folder (e.g. {loose[0]})")
        counts = np.bincount([label for _, label in ds.samples], minlength=len(ds.classes))
        if (counts == 0).any():
            raise ValueError(f"class folder {ds.root / ds.classes[int(np.argmin(counts))]} has no images")
    return sides


def _stratified_subset(train: LabelledSubset, fraction: float, seed: int) -> LabelledSubset:
    """round(fraction x n_c) images (at least 1) of each class c with n_c > 0, the first of a fixed per-class
    permutation (so a larger fraction keeps every image a smaller one has); positions in increasing order."""
    labels = np.asarray(train.labels)
    rng = np.random.default_rng([_SUBSET_SEED, seed])
    keep: List[int] = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        if len(members):
            keep += rng.permutation(members)[: max(1, math.floor(fraction * len(members) + 0.5))].tolist()
    keep.sort()
    return LabelledSubset(train.dataset, [train.indices[k] for k in keep], labels=labels[keep].tolist())


def classification_transform(img_size: int, train: bool, *, auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                             re_prob: float = 0.25, color_jitter: float = 0.4,
                             mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                             crop_pct: Optional[float] = None, scale: Tuple[float, float] = (0.08, 1.0)
                             ) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, img_size, img_size) normalised tensor: unilm BEiT fine-tuning's transforms, built by timm.

    Train (`timm.data.create_transform`, as unilm's `build_transform`): RandomResizedCrop (area fraction `scale`,
    0.08-1 as unilm; bicubic),
    horizontal flip, RandAugment `auto_augment` (timm then skips color jitter, as in unilm; `color_jitter` acts only
    with `auto_augment=None`), normalisation, random erasing with probability `re_prob` (per-pixel normal fill, one
    box). Eval: resize the short side to img_size / crop_pct (bicubic), center crop; crop_pct defaults to 0.875 below
    384 px and 1.0 from 384 px, as unilm. Mean/std default to 0.5 (unilm's default, the Inception constants), as our
    pretraining. Train randomness comes from python `random`, numpy's and torch's global generators:
    `ClassificationDataset` seeds them per sample.
    """
    from timm.data import create_transform  # timm's import is slow: only where a transform is built

    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if train:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        _posterize_to_zero_bits_as_unilm()
        return create_transform(img_size, is_training=True, scale=tuple(scale), color_jitter=color_jitter,
                                auto_augment=auto_augment or None, interpolation="bicubic", re_prob=re_prob,
                                re_mode="pixel", re_count=1, mean=tuple(mean), std=tuple(std))
    if crop_pct is None:
        crop_pct = 0.875 if img_size < 384 else 1.0
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return create_transform(img_size, is_training=False, interpolation="bicubic", mean=tuple(mean), std=tuple(std),
                            crop_pct=crop_pct)


def _posterize_zero_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's `posterize`, with 0 bits kept giving a black image as it did under the Pillow unilm ran on."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_to_zero_bits_as_unilm() -> None:
    """RandAugment's increasing posterize (`inc1`) keeps 4 - int(4 m / 10) bits: 0 at magnitude 10, which
    `rand-m9-mstd0.5` reaches (the magnitude is drawn around 9 and clipped at 10). Pillow >= 11 refuses
    `ImageOps.posterize(img, 0)` ("bits must be between or equal to 1 and 8"), so the first such image would end a
    run; older Pillow, which timm's and unilm's recipe ran on, returned black. timm's op table is pointed at a
    function that does the same (the ops read the table when a transform is built)."""
    import timm.data.auto_augment as aa

    for name, fn in list(aa.NAME_TO_OP.items()):
        if getattr(fn, "__name__", "") == "posterize" and fn is not _posterize_zero_bits:
            aa.NAME_TO_OP[name] = _posterize_zero_bits


@contextlib.contextmanager
def _seeded_globals(seed: int) -> Iterator[None]:
    """Seed torch's CPU, python's and numpy's global generators with `seed` inside; restore all three after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # numpy's legacy seed takes 32-bit words; keep all 63 bits
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class ClassificationDataset(torch.utils.data.Dataset):
    """(epoch, index) -> (image (3, S, S) float32, label[, skipped]); deterministic in (seed, epoch, index).

    The transform's randomness (timm's draws from python `random`, numpy's and torch's global generators) is seeded
    per sample from `sample_seed(seed, epoch, index)` and the global states are restored afterwards, so a resumed
    run and any number of workers see the same samples. Keys come from `StepBatchSampler` / `MicroBatchSampler` for
    training and `ShardedEvalSampler` (epoch 0) for evaluation. With `return_skipped` a third item reports this
    sample's own file as `MIMDataset` does: `index` if it could not be used (the next readable file replaced it),
    else -1 (always -1 without files, e.g. the builtin data)."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable, seed: int = 0,
                 return_skipped: bool = False) -> None:
        self.base, self.transform, self.seed, self.return_skipped = base, transform, seed, return_skipped

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        if isinstance(self.base, (ImageFolderDataset, LabelledSubset)):
            img, label, own_bad = self.base.load(index)
        else:
            (img, label), own_bad = self.base[index], False
        with _seeded_globals(sample_seed(self.seed, epoch, index)):
            image = self.transform(img)
        if self.return_skipped:
            return image, label, index if own_bad else -1
        return image, label


class ShardedEvalSampler(torch.utils.data.Sampler):
    """This rank's batches of (0, index) keys over a whole eval set: every index exactly once over all ranks.

    The set is cut into ceil(num_samples / batch_size) consecutive batches (the last may be short) dealt round-robin:
    rank r gets batches r, r + world_size, ... No padding and no duplicates, so sums reduced over ranks are exact; a
    rank may have one batch fewer than others. `max_rank_batches` is the most any rank has: a loop whose forward is
    collective (ZeRO-3 gathers parameters in it) must run that many forwards on every rank."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.num_batches = -(-num_samples // batch_size)
        self.max_rank_batches = -(-self.num_batches // world_size)

    def __len__(self) -> int:
        return len(range(self.rank, self.num_batches, self.world_size))

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for b in range(self.rank, self.num_batches, self.world_size):
            yield [(0, i) for i in range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples))]
