"""Built-in data, image folders, the two-view transform, step-addressed sampling, the stand-in tokenizer."""

import contextlib
import itertools
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from beit_fast.data import (
    SHAPE_CLASSES,
    BuiltinShapes,
    DataError,
    ImageFolderDataset,
    MIMDataset,
    StepBatchSampler,
    TwoViewTransform,
    build_dataset,
    sample_seed,
)
from beit_fast.masking import BlockwiseMaskGenerator
from beit_fast.tokenizer import RandomConvTokenizer


def test_builtin_is_deterministic_and_labelled():
    a, b = BuiltinShapes(50, 64, seed=1), BuiltinShapes(50, 64, seed=1)
    c = BuiltinShapes(50, 64, seed=2)
    for i in (0, 7, 49):
        ia, la, sa = a.sample(i)
        ib, lb, sb = b.sample(i)
        assert np.array_equal(ia, ib) and la == lb and np.array_equal(sa, sb)
        assert ia.shape == (64, 64, 3) and ia.dtype == np.uint8 and sa.shape == (64, 64)
        assert 0 <= la < 8
        # The labelled main shape is drawn last, so its class is on the segmentation map.
        assert (sa == la + 1).any()
        assert set(np.unique(sa)) <= set(range(len(SHAPE_CLASSES) + 1))
    assert not np.array_equal(a.sample(3)[0], c.sample(3)[0])
    labels = [a.sample(i)[1] for i in range(50)]
    assert len(set(labels)) >= 5
    img, label = a[0]
    assert isinstance(img, Image.Image) and img.size == (64, 64)
    with pytest.raises(IndexError):
        a.sample(50)
    for bad in (dict(num_images=0), dict(size=8), dict(num_classes=1), dict(num_classes=9)):
        with pytest.raises(ValueError):
            BuiltinShapes(**bad)


def test_image_folder_layouts_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    img = Image.fromarray(np.full((20, 20, 3), 128, np.uint8))
    for cls in ("cat", "dog"):
        (tmp_path / "cls" / cls).mkdir(parents=True)
        img.save(tmp_path / "cls" / cls / "x.png")
    ds = ImageFolderDataset(tmp_path / "cls")
    assert ds.classes == ["cat", "dog"] and [l for _, l in ds.samples] == [0, 1]
    (tmp_path / "flat").mkdir()
    img.save(tmp_path / "flat" / "a.jpg")
    (tmp_path / "flat" / "b.JPEG").write_bytes(b"garbage")
    (tmp_path / "flat" / "notes.txt").write_text("skip me")
    flat = ImageFolderDataset(tmp_path / "flat")
    assert len(flat) == 2 and flat.samples[0][1] == -1
    # The corrupt file is skipped (next readable one returned) and counted.
    im, _ = flat[1]
    assert im.size == (20, 20) and flat.num_skipped == 1
    assert isinstance(build_dataset("builtin", num_images=4, size=32), BuiltinShapes)


def test_two_view_transform():
    img = BuiltinShapes(4, 96)[0][0]
    t = TwoViewTransform(64)
    torch.manual_seed(0)
    patches, tok = t(img)
    assert patches.shape == (3, 64, 64) and tok.shape == (3, 32, 32)
    assert tok.min() >= 0 and tok.max() <= 1
    assert patches.min() >= -1 - 1e-6 and patches.max() <= 1 + 1e-6
    # Both views come from the same box: with no jitter or flip, the downsampled patch view
    # matches the tokenizer view closely.
    t2 = TwoViewTransform(64, color_jitter=0, hflip=0, scale=(0.5, 0.5))
    torch.manual_seed(1)
    p2, k2 = t2(img)
    small = torch.nn.functional.avg_pool2d(p2 * 0.5 + 0.5, 2)
    assert (small - k2).abs().mean() < 0.05


def test_mim_dataset_is_a_function_of_seed_epoch_index():
    base = BuiltinShapes(16, 96)
    mk = lambda: MIMDataset(base, TwoViewTransform(64), BlockwiseMaskGenerator(8, 26, min_num_patches=4), seed=5)
    a, b = mk(), mk()
    torch.manual_seed(123)
    x = a[(2, 3)]
    torch.manual_seed(999)  # global RNG state must not matter
    _ = b[(0, 0)]
    y = b[(2, 3)]
    for u, v in zip(x[:3], y[:3]):
        assert torch.equal(u, v)
    assert x[2].dtype == torch.bool and int(x[2].sum()) == 26
    z = a[(3, 3)]
    assert not torch.equal(x[0], z[0])


def test_step_batch_sampler_resumes_at_any_step():
    full = list(itertools.islice(iter(StepBatchSampler(10, 3, seed=4)), 9))
    assert all(len(b) == 3 for b in full)
    # 3 steps per epoch; every epoch is a permutation without repeats within it.
    for e in range(3):
        idx = [i for b in full[3 * e : 3 * e + 3] for (_, i) in b]
        assert len(set(idx)) == 9 and all(ep == e for b in full[3 * e : 3 * e + 3] for ep, _ in b)
    for start in (1, 3, 5):
        resumed = list(itertools.islice(iter(StepBatchSampler(10, 3, seed=4, start_step=start)), 9 - start))
        assert resumed == full[start:]
    with pytest.raises(ValueError):
        StepBatchSampler(2, 3)


def test_random_tokenizer():
    tok = RandomConvTokenizer(vocab_size=512, grid_size=8, image_size=32, seed=0)
    base = BuiltinShapes(64, 96)
    t = TwoViewTransform(64)
    torch.manual_seed(0)
    views = torch.stack([t(base[i][0])[1] for i in range(64)])
    ids = tok.tokenize(views)
    assert ids.shape == (64, 64) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < 512
    assert torch.equal(ids, RandomConvTokenizer(512, 8, 32, seed=0).tokenize(views))
    hist = torch.bincount(ids.flatten(), minlength=512).double()
    p = hist / hist.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    assert perplexity > 10  # targets are spread over many codes, not one
    assert not any(p.requires_grad for p in tok.parameters())
    with pytest.raises(ValueError):
        tok.tokenize(torch.zeros(2, 3, 16, 16))


def test_unreadable_folder_raises_data_error(tmp_path):
    (tmp_path / "bad").mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        (tmp_path / "bad" / name).write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path / "bad")  # construction lists files, decodes none
    assert len(ds) == 3 and ds.num_skipped == 0
    with pytest.raises(DataError, match="none of the 3 image files"):
        ds.check_readable()
    with pytest.raises(DataError, match="no readable image"):
        ds[0]
    assert isinstance(DataError("x"), RuntimeError)  # callers catching RuntimeError still do
    # One readable file anywhere is enough; the probe stops at it.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "bad" / "d.png")
    ds = ImageFolderDataset(tmp_path / "bad")
    assert ds.check_readable() == 3  # sorted: a.jpg, b.png, c.webp, then d.png (the readable one)
    assert ds[0][0].size == (8, 8)


def test_sample_seed_fits_torch_and_is_unchanged_for_small_seeds():
    for seed in (0, 3, 900_000):
        assert sample_seed(seed, 2, 5) == (seed * 1_000_003 + 2) * 10_000_019 + 5  # resumable runs keep their data
    for seed in (2_000_000, 2**32 - 1, 2**40):
        s = sample_seed(seed, 7, 11)
        assert isinstance(s, int) and 0 <= s < 2**63
        torch.manual_seed(s)  # overflowed ("Overflow when unpacking long long") for seeds above ~1.8e6
    base = BuiltinShapes(4, 96)
    ds = MIMDataset(base, TwoViewTransform(64), BlockwiseMaskGenerator(8, 26, min_num_patches=4), seed=2**32 - 1)
    a, b = ds[(3, 1)], ds[(3, 1)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and int(a[2].sum()) == 26


@contextlib.contextmanager
def _deadline(seconds):
    """Fail instead of hanging: a regression that opened a FIFO would block in open() forever."""

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s: something opened a FIFO?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _special_files(folder):
    """A FIFO, a directory and a broken symlink, each with an image name, in `folder`."""
    os.mkfifo(folder / "a.jpg")  # opening it would block until a writer comes: only the listing may touch it
    (folder / "b.png").mkdir()
    (folder / "c.png").symlink_to(folder / "missing.png")


def test_listing_keeps_regular_files_only(tmp_path):
    with _deadline(10):
        _check_listing(tmp_path)


def _check_listing(tmp_path):
    img = Image.fromarray(np.full((8, 8, 3), 50, np.uint8))
    cls = tmp_path / "cls"
    (cls / "cat" / "nested").mkdir(parents=True)
    (cls / "dog").mkdir()
    img.save(cls / "cat" / "x.png")
    img.save(cls / "cat" / "nested" / "y.png")
    img.save(cls / "dog" / "z.png")
    (cls / "dog" / "link.png").symlink_to(cls / "dog" / "z.png")  # a symlink to a regular file is fine
    for folder in (cls / "cat", cls / "cat" / "nested", cls / "dog"):
        _special_files(folder)
    ds = ImageFolderDataset(cls)
    assert [(os.path.relpath(p, cls), l) for p, l in ds.samples] == [
        ("cat/x.png", 0),
        ("cat/nested/y.png", 0),
        ("dog/link.png", 1),
        ("dog/z.png", 1),
    ]
    flat = tmp_path / "flat"
    flat.mkdir()
    img.save(flat / "x.png")
    os.mkfifo(flat / "a.jpg")
    (flat / "c.png").symlink_to(flat / "missing.png")
    ds = ImageFolderDataset(flat)
    assert ds.classes == [] and [os.path.basename(p) for p, _ in ds.samples] == ["x.png"]
    assert ds[0][0].size == (8, 8)
    # Nothing but special files: no image, rather than a run that hangs on the FIFO.
    only = tmp_path / "only"
    only.mkdir()
    os.mkfifo(only / "a.jpg")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(only)
