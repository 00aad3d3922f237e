"""WebDataset tar shards: `make_shards` writes them from an image folder; `ShardStream` streams MIM samples from them,
deterministically, split over ranks and data-loader workers, resumable.

Format (WebDataset's): each sample is consecutive tar members sharing a key, `KEY.jpg` (or .png, .webp, ... the
image file's own bytes) and `KEY.cls` (the class index as text; absent for unlabelled images). Read with the
`webdataset` package's tar iterators (`pip install webdataset`); `--data` takes a shard file, a brace pattern
(`/data/in22k/shard-{000000..013999}.tar`) or a directory of `.tar` files.

The stream, per epoch e: the shards in an order drawn from (seed, e); rank r of R takes every R-th, worker w of W of
that rank every W-th (so each sample is read once per epoch over all ranks and workers, when there are at least
R x W shards); each worker reads its shards in that order through a shuffle buffer seeded by (seed, e, r, w), and
every sample's random views and mask come from (seed, e, the sample's shard and position). Each worker runs its own
epochs back to back, endlessly (workers whose shards hold different numbers of samples drift apart by epoch).

Resume: the data loader takes the workers' batches in turn, so micro-batch m is worker m mod W's (m div W)-th; a run
resumed at step s fast-forwards each worker past the raw samples its micro-batches before s * grad_accum used (read,
not decoded). Exact - the batches an uninterrupted run would have drawn - when the seed, shards, world size,
num_workers, micro-batch size and shuffle buffer are unchanged; with another world size or num_workers the stream
restarts at the same number of samples per worker, which is approximate (samples of the interrupted epoch may be
seen twice or missed), and the run logs so.

A sample that does not decode (a corrupt member, an image Pillow cannot read or convert) is replaced by the last good
sample of the same worker (a grey image when there is none yet: one raw sample -> one output, which keeps resume
exact) and reported once, like an unreadable file: its id (shard index * 2**24 + position) rides on the `skipped`
field of its stand-in or a later sample.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["shard_list", "is_shard_spec", "make_shards", "ShardStream", "count_samples", "require_webdataset",
           "IMAGE_EXTS"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
INDEX = "shards.json"  # written by make_shards beside the shards: sample counts per shard
_ID_BITS = 24  # a sample's id: shard index << 24 | position in the shard


def is_shard_spec(data: str) -> bool:
    """`--data` names tar shards: a .tar file, a brace pattern of them, or a directory holding .tar files only."""
    if ".tar" in data and ("{" in data or data.endswith(".tar")):
        return True
    p = Path(data)
    if p.is_dir():
        entries = [e for e in p.iterdir() if not e.name.startswith(".") and e.name != INDEX]
        return bool(entries) and all(e.is_file() and e.suffix == ".tar" for e in entries)
    return False


def require_webdataset() -> None:
    """One line, not a worker's traceback, when the package that reads the shards is missing."""
    try:
        import braceexpand  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--data names tar shards, which need the webdataset package ({exc}): "
                         "pip install webdataset (or -e '.[shards]')") from None


def shard_list(spec: str) -> List[str]:
    """The shard files of `spec` (sorted for a directory, in pattern order for a brace pattern); every one must
    exist."""
    require_webdataset()
    p = Path(spec)
    if p.is_dir():
        found = sorted(str(f) for f in p.glob("*.tar"))
    elif "{" in spec:
        from braceexpand import braceexpand

        found = list(braceexpand(spec))
    else:
        found = [spec]
    if not found:
        raise FileNotFoundError(f"no .tar shards in {spec}")
    missing = [f for f in found if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(found)} shards of {spec} do not exist (first: {missing[0]})")
    return found


def count_samples(shards: List[str]) -> Optional[int]:
    """The number of samples, from make_shards' index beside the shards (None when there is none)."""
    index = Path(shards[0]).parent / INDEX
    if not index.is_file():
        return None
    counts = json.loads(index.read_text()).get("counts", {})
    try:
        return sum(int(counts[Path(s).name]) for s in shards)
    except KeyError:
        return None


def _raw_samples(path: str) -> Iterator[Dict[str, Any]]:
    """The samples of one shard as webdataset groups them ({"__key__", "jpg": bytes, "cls": bytes, ...})."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        yield from group_by_keys(dict(d, __url__=path) for d in tar_file_iterator(f))


def make_shards(src: str, pattern: str, max_count: int = 1000, max_bytes: int = 1 << 30) -> Tuple[int, int]:
    """Write the images of the folder `src` (class subfolders or flat, as `--data` reads it) into tar shards named by
    `pattern` % i (e.g. "out/shard-%06d.tar"), at most `max_count` samples or `max_bytes` per shard, plus
    shards.json (the counts). Each shard is written to a temporary name and renamed when complete. Returns
    (shards, samples)."""
    from beit_fast.data import ImageFolderDataset

    if "%" not in pattern:
        raise ValueError(f"--out {pattern!r} needs a %d-style field for the shard number, e.g. shards/in1k-%06d.tar")
    if max_count <= 0 or max_bytes <= 0:
        raise ValueError("max_count and max_bytes must be positive")
    folder = ImageFolderDataset(src)
    out_dir = Path(pattern % 0).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: Dict[str, int] = {}
    shard, tar, tmp, size, n = -1, None, None, 0, 0

    def close() -> None:
        if tar is not None:
            tar.close()
            os.replace(tmp, pattern % shard)
            counts[Path(pattern % shard).name] = n

    for i, (path, label) in enumerate(folder.samples):
        data = Path(path).read_bytes()
        if tar is None or n >= max_count or size + len(data) > max_bytes:
            close()
            shard, n, size = shard + 1, 0, 0
            tmp = Path(pattern % shard).with_name(f".{Path(pattern % shard).name}.tmp")
            tar = tarfile.open(tmp, "w")
        key = f"{i:09d}"
        ext = Path(path).suffix.lower().lstrip(".") or "jpg"
        members = [(f"{key}.{ext}", data)] + ([(f"{key}.cls", str(label).encode())] if label >= 0 else [])
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), 0, 0o444
            tar.addfile(info, io.BytesIO(blob))
        size += len(data) + 1024
        n += 1
    close()
    (out_dir / INDEX).write_text(json.dumps({"source": str(src), "counts": counts}, indent=1) + "\n")
    return shard + 1, len(folder.samples)


class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of MIM samples from tar shards (see the module docstring), each as `MIMDataset` makes them:
    (patch view, tokenizer view, mask, label, skipped[, aug]) - `make(sample_seed, opened image, label, skipped)`
    is that per-sample function (`MIMDataset.make`)."""

    def __init__(self, shards: List[str], make: Callable[[int, Image.Image, int, int], tuple], seed: int,
                 batch_size: int, rank: int = 0, world: int = 1, start_micro_batch: int = 0,
                 shuffle_buffer: int = 1000) -> None:
        if len(shards) < 1:
            raise ValueError("no shards")
        self.shards, self.make, self.seed = list(shards), make, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.start_micro_batch, self.shuffle_buffer = start_micro_batch, max(1, shuffle_buffer)

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> List[int]:
        """Indices of the shards this (rank, worker) reads in `epoch`, in reading order."""
        order = list(range(len(self.shards)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank::self.world][worker::num_workers]

    def samples(self, worker: int, num_workers: int) -> Iterator[Tuple[int, int, Dict[str, Any]]]:
        """(epoch, sample id, raw sample) of this worker, shuffled, endlessly."""
        epoch = 0
        while True:
            mine = self.worker_shards(epoch, worker, num_workers)
            if not mine:
                raise ValueError(f"{len(self.shards)} shards cannot feed {self.world} rank(s) x {num_workers} "
                                 "data-loader worker(s): write more, smaller shards (beit-fast make-shards "
                                 "--max-count) or lower --num-workers")
            rng = random.Random(((self.seed * 1_000_003 + epoch) * 1_009 + self.rank) * 1_013 + worker)
            buf: List[Tuple[int, int, Dict[str, Any]]] = []
            read = 0
            for s in mine:
                for pos, raw in enumerate(_raw_samples(self.shards[s])):
                    buf.append((epoch, (s << _ID_BITS) | pos, raw))
                    read += 1
                    if len(buf) >= self.shuffle_buffer:
                        yield buf.pop(rng.randrange(len(buf)))
            if not read:
                raise ValueError(f"the shards of rank {self.rank}, worker {worker} hold no samples: "
                                 f"{[self.shards[s] for s in mine][:3]}")
            while buf:
                yield buf.pop(rng.randrange(len(buf)))
            epoch += 1

    def skip_count(self, worker: int, num_workers: int) -> int:
        """Raw samples this worker's micro-batches before `start_micro_batch` consumed."""
        before = max(0, -(-(self.start_micro_batch - worker) // num_workers))
        return before * self.batch_size

    def __iter__(self) -> Iterator[tuple]:
        from beit_fast.data import sample_seed

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.samples(worker, num_workers)
        last_good: Optional[Tuple[int, int, Dict[str, Any]]] = None
        for _ in range(self.skip_count(worker, num_workers)):
            last_good = next(stream)
        bad: deque = deque()
        for epoch, sid, raw in stream:
            try:
                item = self._make(epoch, sid, raw, bad)
                last_good = (epoch, sid, raw)
            except Exception as exc:  # a member that does not decode: replaced, reported once
                log.warning("skipping unreadable sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"),
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                bad.append(sid)
                item = None
                if last_good is not None:
                    try:
                        item = self._make(*last_good, bad)
                    except Exception:  # the sample before a resume point was bad too
                        item = None
                if item is None:  # no good sample yet: a grey image stands in, so one raw sample is one output
                    with Image.new("RGB", (64, 64), (127, 127, 127)) as grey:
                        item = self.make(sample_seed(self.seed, epoch, sid), grey, -1, bad.popleft())
            yield item

    def _make(self, epoch: int, sid: int, raw: Dict[str, Any], bad: deque) -> tuple:
        from beit_fast.data import sample_seed

        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise ValueError(f"no image member ({', '.join(IMAGE_EXTS)}) in sample {raw.get('__key__')}")
        label = int(raw["cls"]) if "cls" in raw else -1
        skipped = bad[0] if bad else -1
        with Image.open(io.BytesIO(raw[ext])) as im:
            out = self.make(sample_seed(self.seed, epoch, sid), im, label, skipped)
        if bad:
            bad.popleft()
        return out
