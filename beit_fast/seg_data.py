"""Semantic segmentation data: the sources (builtin shapes, ADE20K, a generic folder) and mmseg's pipelines.

- `build_segmentation_data` -> `SegmentationData` (train and val `SegmentationSource`s, class names, ignore index):
  - "builtin": `BuiltinShapes` images with their per-pixel maps (0 = background, c + 1 = a shape of class c), a fixed
    train/val split (dataset seed `BUILTIN_SEGMENTATION_SEED` + seed), 9 classes, nothing ignored;
  - ADE20K (`DIR/images/{training,validation}`, `DIR/annotations/{training,validation}`, as ADEChallengeData2016
    unpacks): 150 classes, `reduce_zero_label` (0 = "other" -> ignored, k -> k - 1), as mmseg's ADE20KDataset;
  - generic (`DIR/images/{train,val}`, `DIR/labels/{train,val}` of PNG class-id maps, optional `DIR/classes.txt`).
  Images pair with labels by their path without extension. Every pair is checked up front (sizes from the files'
  headers, label values from the decoded PNGs, in a thread pool) so that bad data fails before a run writes
  anything, with one line naming the file (`SegmentationDataError`, a ValueError); sources check again, cheaply,
  at load time.
- `SegTrainTransform`: mmseg 0.x's ADE20K training pipeline as unilm BEiT ran it: Resize (img_scale (2048, 512) for
  crop 512, ratio 0.5-2, keep ratio), RandomCrop (cat_max_ratio 0.75), RandomFlip 0.5, PhotoMetricDistortion,
  Normalize (ImageNet mean / std in 0-255 RGB), Pad to crop x crop (image 0, label the ignore index).
  `SegEvalTransform`: the test pipeline: Resize to img_scale keeping the ratio, Normalize; the label keeps its size.
- `SegmentationDataset`: (epoch, index) -> (image, label) deterministic in (seed, epoch, index), fed by
  `StepBatchSampler` / `MicroBatchSampler` (training) and `ShardedEvalSampler` (evaluation) as classification;
  `seg_collate` stacks, padding eval items of different sizes.

Fidelity to mmseg / mmcv, which decode and transform with OpenCV (not a dependency here; written out in numpy):
the bilinear resize is OpenCV's INTER_LINEAR in its own fixed-point arithmetic and the nearest resize its
INTER_NEAREST index rule (both bit-exact with cv2.resize 4.14 on the shapes tried); the HSV steps use OpenCV's 8-bit
conversions (RGB -> HSV bit-exact over all 2^24 colours; HSV -> RGB bit-exact with its vectorised loop, which on
x86-64 fuses a multiply-subtract and truncates; OpenCV's scalar loop, taken for the last width mod 4 x SIMD-width
pixels of a row, rounds instead: a grey level or a few on crops narrower than that multiple). Random draws come from
numpy's global generator in mmseg's order, so with equal seeds an mmseg-style cv2 pipeline gave identical labels and
identical images up to those tail pixels. Images are RGB throughout: mmseg's BGR image with `to_rgb=True`
normalisation gives the same tensor, and the photometric steps are symmetric in the channel order. Decoding is PIL's
(libjpeg-turbo, as OpenCV's) and applies no EXIF rotation, to image and label alike, so the two stay aligned.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from beit_fast.data import SHAPE_CLASSES, BuiltinShapes, _list_images, _reason, _seeded_globals, sample_seed, to_rgb

__all__ = [
    "SegmentationDataError",
    "SegmentationSource",
    "SegmentationData",
    "build_segmentation_data",
    "SegTrainTransform",
    "SegEvalTransform",
    "SegmentationDataset",
    "seg_collate",
    "default_scales",
    "ADE20K_CLASSES",
    "BUILTIN_SEGMENTATION_SEED",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
]

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)  # mmseg's img_norm_cfg (RGB, 0-255), used by unilm's BEiT configs
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

BUILTIN_SEGMENTATION_SEED = 30_011
"""Dataset seed of the builtin segmentation data (plus `build_segmentation_data`'s `seed`): fixed, so runs with
different seeds are scored on the same val images; unlike the classification seed (10_007) and pretraining's default
(0), so segmentation's val images are images neither of those saw."""

# mmseg's ADE20KDataset.CLASSES in order (class id k is raw annotation value k + 1); 'bed ' lost its trailing space.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150


class SegmentationDataError(ValueError):
    """Segmentation data that cannot be used as given; the message is one line naming the file (or folder)."""


# -- sources ---------------------------------------------------------------------------------------------------------
def _read_label(path: str) -> np.ndarray:
    """The (H, W) integer class-id map of a label PNG (palette PNGs give their indices, as mmseg reads them)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im)  # a writable copy (asarray's is read-only): callers may transform in place
    except Exception as exc:  # PIL raises several types for unreadable files
        raise SegmentationDataError(f"cannot read label {path}: {_reason(exc)}") from None
    if arr.ndim != 2:
        raise SegmentationDataError(f"label {path} has mode {mode}: expected one channel of class ids (mode L or P)")
    if arr.dtype == bool:  # mode 1
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise SegmentationDataError(f"label {path} has mode {mode}: expected integer class ids")
    return arr


def _map_values(values: np.ndarray, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """Raw label values -> class ids. reduce_zero_label as mmseg: 0 -> ignore, the ignore value stays, k -> k - 1."""
    if not reduce_zero_label:
        return values
    out = values.astype(np.int64) - 1
    out[(values == 0) | (values == ignore_index)] = ignore_index
    return out


def _map_label(raw: np.ndarray, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """A raw label map in class ids; uint8 stays uint8 when the ignore index fits (it is what the loaders carry)."""
    if not reduce_zero_label:
        return raw
    if raw.dtype == np.uint8 and ignore_index <= 255:
        # A 256-entry table: one gather instead of three passes over the map.
        return _map_values(np.arange(256), True, ignore_index).astype(np.uint8)[raw]
    return _map_values(raw, True, ignore_index)


def _bad_value(values: np.ndarray, num_classes: int, ignore_index: int) -> Optional[int]:
    """The index in `values` of the first value that is neither a class id nor the ignore index, else None."""
    bad = np.flatnonzero(((values < 0) | (values >= num_classes)) & (values != ignore_index))
    return int(bad[0]) if len(bad) else None


def _check_pair(image_path: str, label_path: str, num_classes: int, ignore_index: int,
                reduce_zero_label: bool) -> None:
    """Raise `SegmentationDataError` unless the image header reads, the label decodes to the image's size and holds
    only class ids or the ignore index (after reduce_zero_label). The image itself is not decoded."""
    try:
        with Image.open(image_path) as im:
            size = im.size
    except Exception as exc:
        raise SegmentationDataError(f"cannot read image {image_path}: {_reason(exc)}") from None
    raw = _read_label(label_path)
    if raw.shape != (size[1], size[0]):
        raise SegmentationDataError(
            f"image {image_path} is {size[0]}x{size[1]} but its label {label_path} is {raw.shape[1]}x{raw.shape[0]}"
        )
    if _all_valid_by_range(raw, num_classes, reduce_zero_label):
        return
    if raw.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    else:
        values = np.unique(raw)
    mapped = _map_values(values, reduce_zero_label, ignore_index)
    i = _bad_value(mapped, num_classes, ignore_index)
    if i is not None:
        raise SegmentationDataError(_bad_value_message(label_path, int(values[i]), int(mapped[i]), num_classes,
                                                       ignore_index, reduce_zero_label))


def _all_valid_by_range(raw: np.ndarray, num_classes: int, reduce_zero_label: bool) -> bool:
    """True when the raw values' range alone proves them valid (0..C-1, or 0..C with reduce_zero_label): a max is
    ~20x cheaper than listing the values, and clean data never needs more."""
    if raw.size == 0:
        return True
    if raw.dtype.kind == "i" and raw.min() < 0:
        return False
    return int(raw.max()) <= num_classes - (0 if reduce_zero_label else 1)


def _bad_value_message(label_path: str, raw: int, mapped: int, num_classes: int, ignore_index: int,
                       reduce_zero_label: bool) -> str:
    after = f" ({mapped} after reduce_zero_label)" if reduce_zero_label else ""
    return (f"label {label_path} has value {raw}{after}: class ids are 0..{num_classes - 1}, "
            f"{ignore_index} is ignored")


class SegmentationSource(torch.utils.data.Dataset):
    """One side (train or val) of a segmentation data set.

    `src[i]` -> (image uint8 (H, W, 3) RGB, label (H, W) integer class ids with `ignore_index` where unlabelled,
    reduce_zero_label already applied; uint8 for 8-bit label files, else int64). `names[i]` is the image's path
    relative to its folder (or "builtin:<i>"). Loading checks the pair again (the decoded image's size, the label's
    values) and raises `SegmentationDataError` naming the file: a file that decoded its header but not its pixels
    (truncated) fails here, not at `build_segmentation_data`.

    Build with `from_pairs` (files) or `from_builtin`."""

    def __init__(self, names: Sequence[str], *, num_classes: int, ignore_index: int, reduce_zero_label: bool,
                 pairs: Optional[Sequence[Tuple[str, str]]] = None, builtin: Optional[BuiltinShapes] = None,
                 indices: Optional[Sequence[int]] = None) -> None:
        if (pairs is None) == (builtin is None):
            raise ValueError("a SegmentationSource has either file pairs or a builtin base")
        self.names = list(names)
        self.pairs = list(pairs) if pairs is not None else None
        self.builtin, self.indices = builtin, list(indices) if indices is not None else None
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label

    @classmethod
    def from_pairs(cls, pairs: Sequence[Tuple[str, str]], names: Sequence[str], *, num_classes: int,
                   ignore_index: int = 255, reduce_zero_label: bool = False) -> "SegmentationSource":
        """(image path, label path) pairs; `names[i]` names pair i in messages and outputs."""
        return cls(names, pairs=pairs, num_classes=num_classes, ignore_index=ignore_index,
                   reduce_zero_label=reduce_zero_label)

    @classmethod
    def from_builtin(cls, base: BuiltinShapes, indices: Sequence[int], ignore_index: int = 255
                     ) -> "SegmentationSource":
        """`base.sample(indices[i])`'s image and map: 0 = background, c + 1 = shape class c; no pixel is ignored
        (`ignore_index` only pads crops larger than the image)."""
        return cls([f"builtin:{i}" for i in indices], builtin=base, indices=indices, num_classes=base.num_classes + 1,
                   ignore_index=ignore_index, reduce_zero_label=False)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.builtin is not None:
            image, _, seg = self.builtin.sample(self.indices[index])
            return image, seg
        image_path, label_path = self.pairs[index]
        try:
            with Image.open(image_path) as im:
                image = np.array(to_rgb(im))
        except Exception as exc:
            raise SegmentationDataError(f"cannot read image {image_path}: {_reason(exc)}") from None
        raw = _read_label(label_path)
        if raw.shape != image.shape[:2]:
            raise SegmentationDataError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} is "
                f"{raw.shape[1]}x{raw.shape[0]}"
            )
        label = _map_label(raw, self.reduce_zero_label, self.ignore_index)
        if not _all_valid_by_range(raw, self.num_classes, self.reduce_zero_label):
            flat = label.ravel()
            i = _bad_value(flat, self.num_classes, self.ignore_index)
            if i is not None:
                raise SegmentationDataError(_bad_value_message(label_path, int(raw.ravel()[i]), int(flat[i]),
                                                               self.num_classes, self.ignore_index,
                                                               self.reduce_zero_label))
        return image, label


@dataclass
class SegmentationData:
    """The two sides of a segmentation data set and what their labels mean."""

    train: SegmentationSource
    val: SegmentationSource
    classes: List[str]  # class names; index = class id
    ignore_index: int  # label value of unlabelled pixels (not a class; losses and metrics skip it)
    reduce_zero_label: bool  # raw value 0 was mapped to ignore_index and k to k - 1
    layout: str  # "builtin" | "ade20k" | "generic"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_segmentation_data(data: str, *, num_images: int = 1024, image_size: int = 64,
                            num_classes: Optional[int] = None, ignore_index: int = 255,
                            reduce_zero_label: Optional[bool] = None, seed: int = 0, check: bool = True
                            ) -> SegmentationData:
    """Train and val sources from "builtin", an ADE20K folder or a generic folder.

    - "builtin": one `BuiltinShapes` stream (`image_size` px, dataset seed `BUILTIN_SEGMENTATION_SEED` + `seed`): train
      is its first `num_images` images, val the next max(64, num_images // 4). Classes "background" and the 8 shapes
      (`num_classes` k + 1 < 9: background and the first k shape kinds, an easier task for tests and small budgets).
    - ADE20K (`data/images/training` and `data/annotations/training` exist): `images/{training,validation}/<name>.jpg`
      with `annotations/{training,validation}/<name>.png`; the 150 ADE20K classes, reduce_zero_label by default
      (raw 0 -> ignore_index, k -> k - 1). With reduce_zero_label=False raw values are the ids and 0 is a class,
      "other" (151 classes).
    - generic: `data/images/{train,val}/<name>.<ext>` with `data/labels/{train,val}/<name>.png` of class ids; the
      class count is `num_classes` or the line count of `data/classes.txt` (one name per line; names are "0".."C-1"
      without it). reduce_zero_label only if asked (then `num_classes` counts the classes after it).
    Images pair with labels by path without extension, subfolders included. `num_images`, `image_size` only apply to
    builtin; `seed` is the DATA's seed (builtin images): keep it fixed over runs that are to be compared.

    With `check` every folder pair is verified before returning (image header, decoded label), in a thread pool.

    Raises:
        SegmentationDataError: an image without a label or a label without an image, an image and label of different
            sizes, a label value that is neither a class id (after reduce_zero_label) nor `ignore_index`, an empty
            split, an unreadable file, a missing class count, a classes.txt that disagrees with `num_classes`, a
            folder in neither layout; each one line naming the file or folder.
        FileNotFoundError: `data`, or one of its split folders, does not exist.
    """
    if ignore_index < 0:
        raise SegmentationDataError(f"ignore_index must be >= 0, got {ignore_index}")
    if data == "builtin":
        return _builtin_data(num_images, image_size, num_classes, ignore_index, reduce_zero_label, seed)
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"data directory does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data path is not a directory: {root}")
    if (root / "images" / "training").is_dir() and (root / "annotations" / "training").is_dir():
        layout, sides, label_dir = "ade20k", ("training", "validation"), "annotations"
        reduce = True if reduce_zero_label is None else reduce_zero_label
        classes = list(ADE20K_CLASSES) if reduce else ["other", *ADE20K_CLASSES]
        if num_classes is not None and num_classes != len(classes):
            raise SegmentationDataError(
                f"{root} is an ADE20K folder: {len(classes)} classes (reduce_zero_label={reduce}), not {num_classes}"
            )
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        layout, sides, label_dir = "generic", ("train", "val"), "labels"
        reduce = bool(reduce_zero_label)
        classes = _generic_classes(root, num_classes)
    else:
        raise SegmentationDataError(
            f"{root} is not a segmentation folder: expected images/{{training,validation}} with "
            f"annotations/{{training,validation}} (ADE20K) or images/{{train,val}} with labels/{{train,val}}"
        )
    if ignore_index < len(classes):
        raise SegmentationDataError(f"ignore_index {ignore_index} is a class id (there are {len(classes)} classes)")
    train, val = (_folder_source(root / "images" / side, root / label_dir / side, len(classes), ignore_index, reduce)
                  for side in sides)
    if check:
        for source in (train, val):
            _verify_pairs(source)
    return SegmentationData(train=train, val=val, classes=classes, ignore_index=ignore_index,
                            reduce_zero_label=reduce, layout=layout)


def _builtin_data(num_images: int, image_size: int, num_classes: Optional[int], ignore_index: int,
                  reduce_zero_label: Optional[bool], seed: int) -> SegmentationData:
    if num_images <= 0:
        raise SegmentationDataError(f"num_images must be positive, got {num_images}")
    if seed < 0:
        raise SegmentationDataError(f"seed must be >= 0, got {seed}")
    if reduce_zero_label:
        raise SegmentationDataError("reduce_zero_label does not apply to the builtin data (0 is its background class)")
    num_val = max(64, num_images // 4)
    kinds = len(SHAPE_CLASSES) if num_classes is None else num_classes - 1  # background + the first k shape kinds
    if not 2 <= kinds <= len(SHAPE_CLASSES):
        raise SegmentationDataError(f"the builtin data has 3 to {len(SHAPE_CLASSES) + 1} classes (background + 2 to "
                                    f"{len(SHAPE_CLASSES)} shape kinds), not {num_classes}")
    base = BuiltinShapes(num_images + num_val, image_size, seed=BUILTIN_SEGMENTATION_SEED + seed, num_classes=kinds)
    classes = ["background", *base.classes]
    if ignore_index < len(classes):
        raise SegmentationDataError(f"ignore_index {ignore_index} is a class id (there are {len(classes)} classes)")
    return SegmentationData(train=SegmentationSource.from_builtin(base, range(num_images), ignore_index),
                            val=SegmentationSource.from_builtin(base, range(num_images, num_images + num_val),
                                                                ignore_index),
                            classes=classes, ignore_index=ignore_index, reduce_zero_label=False, layout="builtin")


def _generic_classes(root: Path, num_classes: Optional[int]) -> List[str]:
    """Class names from root/classes.txt (checked against num_classes) or "0".."C-1"."""
    path = root / "classes.txt"
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SegmentationDataError(f"cannot read {path}: {_reason(exc)}") from None
        while lines and not lines[-1].strip():
            lines.pop()
        names = [line.strip() for line in lines]
        if not names:
            raise SegmentationDataError(f"{path} is empty: expected one class name per line")
        if "" in names:
            raise SegmentationDataError(f"{path} line {names.index('') + 1} is blank: expected one class name per line")
        if num_classes is not None and num_classes != len(names):
            raise SegmentationDataError(f"{path} names {len(names)} classes but num_classes is {num_classes}")
        return names
    if num_classes is None:
        raise SegmentationDataError(f"{root} has no classes.txt: pass the class count with --num-classes")
    if num_classes < 1:
        raise SegmentationDataError(f"num_classes must be positive, got {num_classes}")
    return [str(c) for c in range(num_classes)]


def _folder_source(image_dir: Path, label_dir: Path, num_classes: int, ignore_index: int, reduce_zero_label: bool
                   ) -> SegmentationSource:
    """The pairs of image_dir/<name>.<image ext> and label_dir/<name>.png, every file of both accounted for."""
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"segmentation folder does not exist: {d}")
    images = _by_stem(_list_images(str(image_dir), recursive=True), image_dir)
    labels = _by_stem([p for p in _list_images(str(label_dir), recursive=True) if p.lower().endswith(".png")],
                      label_dir)
    if not images:
        raise SegmentationDataError(f"no images in {image_dir}")
    for stem, path in images.items():
        if stem not in labels:
            raise SegmentationDataError(f"image {path} has no label {label_dir / stem}.png")
    for stem, path in labels.items():
        if stem not in images:
            raise SegmentationDataError(f"label {path} has no image in {image_dir}")
    stems = sorted(images)
    return SegmentationSource.from_pairs(
        [(images[s], labels[s]) for s in stems], [os.path.relpath(images[s], image_dir) for s in stems],
        num_classes=num_classes, ignore_index=ignore_index, reduce_zero_label=reduce_zero_label)


def _by_stem(paths: Sequence[str], top: Path) -> dict:
    """{path relative to top without extension: path}; two files with one stem (a.jpg, a.png) are an error."""
    out: dict = {}
    for path in paths:
        stem = os.path.splitext(os.path.relpath(path, top))[0]
        if stem in out:
            raise SegmentationDataError(f"{out[stem]} and {path} have the same name: which one pairs is ambiguous")
        out[stem] = path
    return out


def _verify_pairs(source: SegmentationSource) -> None:
    """`_check_pair` on every pair of a file source, in threads (PIL releases the GIL while reading and decoding);
    the error of the first bad pair in file order is raised and the rest of the work cancelled."""
    pairs = source.pairs or []
    threads = min(32, 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    args = (source.num_classes, source.ignore_index, source.reduce_zero_label)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(_check_pair, image, label, *args) for image, label in pairs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# -- geometry (mmcv's imrescale / imresize, OpenCV semantics) --------------------------------------------------------
def default_scales(crop_size: int) -> Tuple[int, int]:
    """mmseg's img_scale (2048, 512) for crop 512, scaled to another crop: (4 * crop, crop)."""
    if crop_size <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    return 4 * crop_size, crop_size


def _rescale_size(w: int, h: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """(new_w, new_h) of mmcv.rescale_size: the largest keep-ratio size with long edge <= max(scale) and short edge
    <= min(scale), each side rounded as int(x + 0.5)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: linear weights in 1/2048 steps


def _linear_taps(src: int, dst: int, start: int, count: int, clamp: bool) -> Tuple[np.ndarray, ...]:
    """Source indices (i0, i1) and fixed-point weights (w0, w1) of output pixels start..start + count - 1 of an
    OpenCV INTER_LINEAR resize of a src-long axis to dst, as cv::resize computes them: the position
    (x + 0.5) * (1 / (dst / src)) - 0.5 rounded to float32, weights round(2048 (1 - f)) and round(2048 f). OpenCV
    clamps the position itself at the edges horizontally (`clamp`) but only the row indices vertically, so the two
    axes differ in their edge pixels' rounding."""
    pos = ((np.arange(start, start + count) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    f = pos - i0.astype(np.float32)
    if clamp:
        edge = (i0 < 0) | (i0 >= src - 1)
        f[edge] = 0
        i0 = np.clip(i0, 0, src - 1)
    one = np.float32(1 << _COEF_BITS)
    w1 = np.rint(f * one).astype(np.int32)
    w0 = np.rint((np.float32(1) - f) * one).astype(np.int32)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def _resize_bilinear(image: np.ndarray, h: int, w: int, box: Optional[Tuple[int, int, int, int]] = None
                     ) -> np.ndarray:
    """Window `box` = (y, x, box_h, box_w) (default: all) of uint8 (H, W, 3) resized to (h, w) by OpenCV's
    INTER_LINEAR (half-pixel centres, no antialiasing; mmcv.imresize's default), in OpenCV's fixed-point arithmetic:
    bit-exact with cv2.resize (4.14, checked on assorted up- and down-scales). Only the window is computed, so a
    crop of a large rescale costs the crop, not the rescale."""
    y, x, bh, bw = box if box is not None else (0, 0, h, w)
    if image.shape[:2] == (h, w):
        return image[y : y + bh, x : x + bw]
    r0, r1, b0, b1 = _linear_taps(image.shape[0], h, y, bh, clamp=False)
    c0, c1, a0, a1 = _linear_taps(image.shape[1], w, x, bw, clamp=True)
    # Horizontal pass over the source rows and columns the window reads (OpenCV's HResizeLinear), then vertical
    # (VResizeLinear's uchar rounding: each product shifted down separately, then + 2 >> 2).
    rlo, clo = int(r0.min()), int(c0.min())
    src = image[rlo : int(r1.max()) + 1, clo : int(c1.max()) + 1].astype(np.int32)
    rows = src[:, c0 - clo]
    rows *= a0[:, None]
    right = src[:, c1 - clo]
    right *= a1[:, None]
    rows += right
    rows >>= 4
    out, bottom = rows[r0 - rlo], rows[r1 - rlo]  # gathers: copies, so the in-place steps below are safe
    out *= b0[:, None, None]
    out >>= 16
    bottom *= b1[:, None, None]
    bottom >>= 16
    out += bottom
    out += 2
    out >>= 2
    return out.astype(np.uint8)


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each output pixel of an OpenCV INTER_NEAREST resize: floor(x * (1 / (dst / src))), clamped
    (computed as OpenCV does, so an exact-boundary product rounds the same way)."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)


# -- photometric distortion (mmseg's PhotoMetricDistortion, OpenCV's 8-bit HSV) --------------------------------------
_HSV_SHIFT = 12
# OpenCV's RGB2HSV_b tables: saturate_cast<int> rounds half to even, as np.rint.
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / np.arange(1, 256))]).astype(np.int32)
_HDIV180 = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * np.arange(1, 256)))]).astype(np.int32)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Planar uint8 RGB (3, H, W) -> planar uint8 HSV as cv2.cvtColor(COLOR_RGB2HSV): H in [0, 180] (2-degree
    units), S and V in 0..255, with OpenCV's fixed-point tables (bit-exact over all 2^24 colours)."""
    r, g, b = (c.astype(np.int32) for c in rgb)
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    # Red max first, then green, then blue: OpenCV's priority when two channels tie.
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + half) >> _HSV_SHIFT
    h += np.where(h < 0, 180, 0).astype(np.int32)
    return np.stack([h, s, v]).astype(np.uint8)


# OpenCV's HSV2RGB picks each of b, g, r from (v, p, q, t) = v * (1 - s * w) with w = 0, 1, f, 1 - f (f: the
# position within the 60-degree sector), by sector. As w = A + B * f with B in {-1, 0, 1} every w is exact, so
# v * (1 - s * w) gives OpenCV's floats bit for bit without a per-pixel selection. Rows: sector; columns: r, g, b.
_W_INDEX = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])[:, ::-1]  # (b, g, r) -> rgb
_W_A = np.array([0, 1, 0, 1], np.float32)[_W_INDEX].T.copy()  # (3, 6)
_W_B = np.array([0, 0, 1, -1], np.float32)[_W_INDEX].T.copy()


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Planar uint8 HSV (3, H, W), H in [0, 180] -> planar uint8 RGB as cv2.cvtColor(COLOR_HSV2RGB) in OpenCV >= 4.1
    (float32 math; its vectorised loop, every pixel but a row's last few, truncates to uint8: so do we)."""
    h = hsv[0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = (hsv[1].astype(np.float32) * np.float32(1.0 / 255.0)).astype(np.float64)
    v = hsv[2].astype(np.float32) * np.float32(1.0 / 255.0)
    sector = h.astype(np.int32)
    h -= sector
    sector %= 6  # H = 180 is sector 6, i.e. 0
    out = np.empty(hsv.shape, np.uint8)
    for c in range(3):
        w = _W_A[c][sector] + _W_B[c][sector] * h
        x = v * (1.0 - s * w).astype(np.float32) * np.float32(255.0)
        np.clip(x, 0, 255, out=x)
        out[c] = x  # truncates, as OpenCV's v_trunc
    return out


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's convert: float32 affine, clipped, then TRUNCATED to uint8 (astype), not rounded.
    return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def _photometric_distortion(image: np.ndarray, brightness_delta: float = 32, contrast_range=(0.5, 1.5),
                            saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 (H, W, 3), with its draws from numpy's global generator in its order:
    brightness, mode, [contrast if mode == 1], saturation, hue, [contrast if mode == 0]; each step taken with
    probability 1/2 (randint(2))."""
    rand = np.random
    image = np.ascontiguousarray(image.transpose(2, 0, 1))  # planar: each step below works on whole channels
    if rand.randint(2):
        image = _convert(image, beta=rand.uniform(-brightness_delta, brightness_delta))
    mode = rand.randint(2)

    def contrast(img: np.ndarray) -> np.ndarray:
        if rand.randint(2):
            return _convert(img, alpha=rand.uniform(*contrast_range))
        return img

    if mode == 1:
        image = contrast(image)
    if rand.randint(2):
        hsv = _rgb_to_hsv(image)
        hsv[1] = _convert(hsv[1], alpha=rand.uniform(*saturation_range))
        image = _hsv_to_rgb(hsv)
    if rand.randint(2):
        hsv = _rgb_to_hsv(image)
        hsv[0] = (hsv[0].astype(np.int32) + rand.randint(-hue_delta, hue_delta)) % 180
        image = _hsv_to_rgb(hsv)
    if mode == 0:
        image = contrast(image)
    return image.transpose(1, 2, 0)


# -- the pipelines ---------------------------------------------------------------------------------------------------
def _normalize(image: np.ndarray, mean: torch.Tensor, std_inv: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W), (x - mean) / std in 0-255 units (mmcv multiplies by 1 / std too)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (x - mean).mul_(std_inv).contiguous()


def _check_pair_shapes(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label {tuple(label.shape)} and image {tuple(image.shape[:2])} differ in size")


class SegTrainTransform:
    """(image uint8 (H, W, 3) RGB, label (H, W)) -> (image float32 (3, crop, crop), label int64 (crop, crop)).

    mmseg's training pipeline: Resize to `scale` x r, r ~ U(ratio_range), keeping the ratio (image bilinear, label
    nearest); RandomCrop of crop x crop (or the whole side if smaller), re-drawn up to 10 times while one class holds
    >= `cat_max_ratio` of the crop's labelled pixels or only one class is present (as mmseg: the last draw is then
    kept unchecked); horizontal flip with `flip_prob`; PhotoMetricDistortion; normalise; pad bottom / right to
    crop x crop (image 0 after normalisation, label `ignore_index`). Randomness from numpy's global generator:
    `SegmentationDataset` seeds it per sample.

    Args:
        crop_size: side of the square crop.
        scale: mmseg's img_scale (long, short) before the ratio; `default_scales(crop_size)` is (4 crop, crop).
        ratio_range: (min, max) ratio; None resizes to `scale` itself.
        cat_max_ratio: 1 disables the re-draws.
        flip_prob: probability of the horizontal flip.
        photometric: apply PhotoMetricDistortion (brightness 32, contrast / saturation 0.5-1.5, hue 18).
        mean, std: per-channel RGB statistics in 0-255.
        ignore_index: label of padding, and the value cat_max_ratio does not count.
    """

    def __init__(self, crop_size: int, scale: Tuple[int, int] = (2048, 512),
                 ratio_range: Optional[Tuple[float, float]] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, mean: Sequence[float] = IMAGENET_MEAN_255,
                 std: Sequence[float] = IMAGENET_STD_255, ignore_index: int = 255) -> None:
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"scale must be two positive sides, got {tuple(scale)}")
        if ratio_range is not None and not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < min <= max, got {tuple(ratio_range)}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.crop_size, self.scale, self.ratio_range = crop_size, tuple(scale), ratio_range
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.ignore_index = ignore_index
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std_inv = 1.0 / torch.tensor(std, dtype=torch.float64).view(3, 1, 1).float()

    def _crop_box(self, label: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> Tuple[int, int]:
        """Top-left (y, x) of the crop in the resized label `label[rows][:, cols]`, drawn as mmseg's RandomCrop.

        Only the candidate crops are gathered from the source label, never the whole resized one."""
        c = self.crop_size

        def draw() -> Tuple[int, int]:
            return (np.random.randint(0, max(len(rows) - c, 0) + 1), np.random.randint(0, max(len(cols) - c, 0) + 1))

        y, x = draw()
        if self.cat_max_ratio < 1:
            for _ in range(10):
                crop = label[rows[y : y + c, None], cols[None, x : x + c]].ravel()
                counts = np.bincount(crop[crop != self.ignore_index].astype(np.int64))
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x = draw()  # as mmseg: the 10th re-draw is kept without a check
        return y, x

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_pair_shapes(image, label)
        h, w = label.shape
        scale = self.scale
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = np.random.random_sample() * (hi - lo) + lo
            scale = int(scale[0] * ratio), int(scale[1] * ratio)
        new_w, new_h = _rescale_size(w, h, scale)
        # Resize then crop, as mmseg, computed crop-first: the label's nearest-neighbour rows / columns are index
        # arrays and the image is interpolated only inside the crop (the same pixels as resizing it all).
        rows, cols = _nearest_index(h, new_h), _nearest_index(w, new_w)
        y, x = self._crop_box(label, rows, cols)
        c = self.crop_size
        rows, cols = rows[y : y + c], cols[x : x + c]
        image = _resize_bilinear(image, new_h, new_w, (y, x, len(rows), len(cols)))
        label = label[rows[:, None], cols[None, :]]
        if np.random.rand() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = _photometric_distortion(image)
        out = torch.zeros(3, c, c)
        out[:, : image.shape[0], : image.shape[1]] = _normalize(image, self.mean, self.std_inv)
        target = torch.full((c, c), self.ignore_index, dtype=torch.int64)
        target[: label.shape[0], : label.shape[1]] = torch.from_numpy(label.astype(np.int64))
        return out, target


class SegEvalTransform:
    """(image uint8 (H, W, 3) RGB, label (H, W)) -> (image float32 (3, h', w'), label int64 (H, W)).

    mmseg's test pipeline: the image resized (bilinear) to the largest keep-ratio size within `scale` (long, short),
    normalised; the label is NOT resized: metrics are computed at the label's size, the model's logits upsampled to
    it (per image: crop the logits to (h', w') first when the batch was padded)."""

    def __init__(self, scale: Tuple[int, int] = (2048, 512), mean: Sequence[float] = IMAGENET_MEAN_255,
                 std: Sequence[float] = IMAGENET_STD_255) -> None:
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"scale must be two positive sides, got {tuple(scale)}")
        self.scale = tuple(scale)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std_inv = 1.0 / torch.tensor(std, dtype=torch.float64).view(3, 1, 1).float()

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_pair_shapes(image, label)
        new_w, new_h = _rescale_size(image.shape[1], image.shape[0], self.scale)
        image = _resize_bilinear(image, new_h, new_w)
        return _normalize(image, self.mean, self.std_inv), torch.from_numpy(label.astype(np.int64))


class SegmentationDataset(torch.utils.data.Dataset):
    """(epoch, index) -> (image tensor, label tensor) of `transform(*source[index])`; deterministic in
    (seed, epoch, index): torch's, python's and numpy's global generators are seeded per sample from
    `sample_seed(seed, epoch, index)` and restored after (as `ClassificationDataset`), so a resumed run and any number
    of workers see the same samples. Keys come from `StepBatchSampler` / `MicroBatchSampler` (training) or
    `ShardedEvalSampler` (evaluation, epoch 0)."""

    def __init__(self, source: SegmentationSource, transform: Callable[[np.ndarray, np.ndarray], Any],
                 seed: int = 0) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image, label = self.source[index]
        with _seeded_globals(sample_seed(self.seed, epoch, index)):
            return self.transform(image, label)


def seg_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]], ignore_index: int = 255,
                return_sizes: bool = False):
    """Stack (image (3, h, w), label (H, W)) items into (images (B, 3, h_max, w_max), labels (B, H_max, W_max)).

    Items of one size (training crops) are stacked as they are. Eval items of different sizes are padded at the
    bottom / right: images with 0 (the mean after normalisation), labels with `ignore_index`, so a loss or confusion
    matrix over the padded labels counts only real pixels. The padding does not tell where each image ends, though:
    to score a padded batch correctly each item's logits must be cropped to its own image size and then resized to
    its own label size (mmseg evaluates one image at a time). `return_sizes=True` adds an int64 (B, 4) tensor of
    (h, w, H, W) per item for that; or evaluate with batch size 1.
    """
    images = [item[0] for item in batch]
    labels = [item[1] for item in batch]
    sizes = torch.tensor([[*im.shape[-2:], *lab.shape[-2:]] for im, lab in zip(images, labels)], dtype=torch.int64)
    if len({tuple(im.shape) for im in images}) == 1 and len({tuple(lab.shape) for lab in labels}) == 1:
        out = torch.stack(images), torch.stack(labels)
    else:
        h, w = (int(v) for v in sizes[:, :2].max(0).values)
        lh, lw = (int(v) for v in sizes[:, 2:].max(0).values)
        out_images = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        out_labels = labels[0].new_full((len(labels), lh, lw), ignore_index)
        for i, (im, lab) in enumerate(zip(images, labels)):
            out_images[i, :, : im.shape[-2], : im.shape[-1]] = im
            out_labels[i, : lab.shape[-2], : lab.shape[-1]] = lab
        out = out_images, out_labels
    return (*out, sizes) if return_sizes else out

