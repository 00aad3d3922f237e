"""Built-in data, image folders, the two-view transform, step-addressed sampling, the stand-in tokenizer."""

import contextlib
import itertools
import logging
import os
import signal
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from beit_fast.data import (
    SHAPE_CLASSES,
    BuiltinShapes,
    DataError,
    ImageFolderDataset,
    UnsupportedImageError,
    MIMDataset,
    StepBatchSampler,
    SyntheticMIMDataset,
    TwoViewTransform,
    build_dataset,
    sample_seed,
    to_rgb,
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


def test_builtin_cache_returns_the_rendered_images():
    import pickle

    plain = BuiltinShapes(40, 32, seed=3, cache_bytes=0)
    per_image = 32 * 32 * 4  # image + map bytes
    cached = BuiltinShapes(40, 32, seed=3, cache_bytes=10 * per_image)
    for _ in range(2):  # first render, then the cache (for the first 10 indices)
        for i in range(40):
            ref, got = plain.sample(i), cached.sample(i)
            assert np.array_equal(ref[0], got[0]) and ref[1] == got[1] and np.array_equal(ref[2], got[2])
            assert cached.label(i) == ref[1]
    assert len(cached._cache) == 10 and cached._cached_bytes <= cached.cache_bytes and not plain._cache
    image, _, seg = cached.sample(0)
    image[:] = 0
    seg[:] = 7
    assert np.array_equal(cached.sample(0)[0], plain.sample(0)[0])  # the caller's copy, not the cache's
    assert np.array_equal(cached.sample(0)[2], plain.sample(0)[2])
    clone = pickle.loads(pickle.dumps(cached))  # a spawned DataLoader worker: no cache carried over
    assert not clone._cache and np.array_equal(clone.sample(5)[0], plain.sample(5)[0])


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


GRADIENT16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
EXPECTED8 = np.array([round(v / 257) for v in range(65536)], np.uint8).reshape(256, 256)


def _rgb(im):
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == im.size
    return np.asarray(out)


def _gray(im):
    a = _rgb(im)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    return a[..., 0]


def _png16(path, arr, color_type):
    """A 16-bit PNG written by hand (Pillow writes no 16-bit colour PNG): color_type 2 = RGB, 6 = RGBA."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_to_rgb_scales_16_bit_grayscale(tmp_path):
    assert EXPECTED8[0, 0] == 0 and EXPECTED8.flat[32896] == 128 and EXPECTED8.flat[65535] == 255
    Image.fromarray(GRADIENT16).save(tmp_path / "g.png")
    Image.fromarray(GRADIENT16).save(tmp_path / "g.tif")
    for name in ("g.png", "g.tif"):
        with Image.open(tmp_path / name) as im:
            assert im.mode == "I;16"
            assert np.asarray(im.convert("RGB"))[..., 0].mean() > 250  # what the plain convert did: clipped
            assert np.array_equal(_gray(im), EXPECTED8)
    # The other 16-bit layouts, and mode I (as Pillow opens some 16-bit PNGs and 32-bit TIFFs).
    for mode, dtype in (("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2"), ("I;16", "<u2")):
        im = Image.frombytes(mode, (256, 256), GRADIENT16.astype(dtype).tobytes())
        assert im.mode == mode and np.array_equal(_gray(im), EXPECTED8), mode
    Image.fromarray(GRADIENT16.astype(np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I" and np.array_equal(_gray(im), EXPECTED8)
    for bad in (-1, 65536):
        im = Image.fromarray(np.array([[0, bad]], np.int32))
        with pytest.raises(UnsupportedImageError, match=r"outside \[0, 65535\]"):
            to_rgb(im)


def test_to_rgb_16_bit_colour_png_keeps_the_scale(tmp_path):
    rgb = np.stack([GRADIENT16, 65535 - GRADIENT16, np.full_like(GRADIENT16, 32896)], -1)
    _png16(tmp_path / "c.png", rgb, color_type=2)
    _png16(tmp_path / "ca.png", np.concatenate([rgb, np.full_like(GRADIENT16, 65535)[..., None]], -1), color_type=6)
    high_byte = (rgb >> 8).astype(np.uint8)
    by_257 = np.stack([EXPECTED8, EXPECTED8[::-1, ::-1], np.full_like(EXPECTED8, 128)], -1)
    for name in ("c.png", "ca.png"):
        with Image.open(tmp_path / name) as im:
            out = _rgb(im)
        # Pillow keeps the high byte (v >> 8); either that or round(v / 257) is a faithful scaling, a clip is not.
        assert np.array_equal(out, high_byte) or np.array_equal(out, by_257), name


def test_to_rgb_floats(tmp_path):
    ramp = np.linspace(0, 1, 256 * 64, dtype=np.float32).reshape(64, 256)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "F"
        assert np.array_equal(_gray(im), np.rint(ramp.astype(np.float64) * 255).astype(np.uint8))
    exact = np.array([[0.0, 0.5, 1.0, 128 / 255]], np.float32)
    assert _gray(Image.fromarray(exact)).tolist() == [[0, 128, 255, 128]]
    refused = (
        ([0.0, 3.5], r"values in \[0, 3.5\], outside \[0, 1\]"),
        ([-0.25, 1.0], r"\[-0.25, 1\]"),
        ([0.5, np.nan], "NaN or infinite"),
        ([np.inf, 0.0], "NaN or infinite"),
    )
    for values, reason in refused:
        with pytest.raises(UnsupportedImageError, match=reason):
            to_rgb(Image.fromarray(np.array([values], np.float32)))
    assert isinstance(UnsupportedImageError("x"), ValueError)


def test_to_rgb_other_modes():
    px = np.array([[[10, 200, 30]]], np.uint8)
    rgb = Image.fromarray(px)
    for mode in ("L", "LA", "P", "PA", "RGBA", "CMYK", "1", "YCbCr", "HSV", "RGB"):
        im = rgb.convert(mode)
        assert np.array_equal(_rgb(im), np.asarray(im.convert("RGB"))), mode  # the plain convert, unchanged
    assert _rgb(rgb.convert("RGBA")).tolist() == [[[10, 200, 30]]]
    with pytest.raises(UnsupportedImageError, match="mode La cannot be converted to RGB"):
        to_rgb(Image.new("La", (2, 2)))


def test_unconvertible_file_is_skipped_with_its_reason(tmp_path, caplog):
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / "a.tif")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "b.tif")
    ds = ImageFolderDataset(tmp_path)
    assert ds.check_readable() == 1
    with caplog.at_level(logging.WARNING, logger="beit_fast.data"):
        img, label = ds[0]
    assert np.asarray(img).tolist() == [[[128] * 3] * 8] * 8 and label == -1 and ds.num_skipped == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping unreadable image {tmp_path / 'a.tif'}: float image with values in [3.5, 3.5], outside [0, 1]: "
        "no faithful 8-bit conversion"
    ]


def _mim(base, **kw):
    return MIMDataset(base, TwoViewTransform(64), BlockwiseMaskGenerator(8, 26, min_num_patches=4), seed=3, **kw)


def _skip_messages(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]


def test_a_bad_file_is_counted_and_logged_once(tmp_path, caplog):
    for name, value in (("a.png", 40), ("c.png", 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(tmp_path)
    mim = _mim(ds, return_skipped=True)
    with caplog.at_level(logging.WARNING, logger="beit_fast.data"):
        fifth = [mim[(epoch, i)][4] for epoch in (0, 1) for i in (0, 1, 2)]
        img, label, own_bad = ds.load(1)  # drawn a third time, outside MIMDataset
        assert ds[1][0].getpixel((0, 0)) == (200, 200, 200)
    assert fifth == [-1, 1, -1, -1, 1, -1]  # the bad file's own index, each time it is drawn; -1 for good ones
    assert img.getpixel((0, 0)) == (200, 200, 200) and label == -1 and own_bad  # replaced by c.png
    assert ds.load(0)[2] is False and ds.load(2)[2] is False
    assert ds.num_skipped == 1 and list(ds.bad_files) == [1] and ds.bad_files[1].startswith("UnidentifiedImageError")
    assert _skip_messages(caplog) == [f"skipping unreadable image {tmp_path / 'b.png'}: {ds.bad_files[1]}"]


def test_fallback_walk_does_not_count_a_known_bad_file_again(tmp_path, caplog):
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / "b.tif")
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "c.png")
    ds = ImageFolderDataset(tmp_path)
    mim = _mim(ds, return_skipped=True)
    with caplog.at_level(logging.WARNING, logger="beit_fast.data"):
        # b.tif drawn in two epochs, then passed over by a.jpg's fallback walk (a -> b -> c).
        fifth = [mim[key][4] for key in ((0, 1), (1, 1), (1, 0), (1, 2), (2, 0))]
    assert fifth == [1, 1, 0, -1, 0]
    assert ds.num_skipped == 2 and sorted(ds.bad_files) == [0, 1]  # distinct files, not the 5 failed reads
    assert sorted(_skip_messages(caplog)) == [
        f"skipping unreadable image {tmp_path / 'a.jpg'}: {ds.bad_files[0]}",
        f"skipping unreadable image {tmp_path / 'b.tif'}: float image with values in [3.5, 3.5], outside [0, 1]: "
        "no faithful 8-bit conversion",
    ]
    # What a training loop keeps: the set of reported indices, one per bad file.
    assert {i for i in fifth if i >= 0} == {0, 1}
    # The sample of a bad file is the replacement's image, deterministic in (seed, epoch, index).
    a, b = mim[(1, 0)], mim[(1, 0)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_fifth_item_is_minus_one_without_files():
    mask_gen = BlockwiseMaskGenerator(8, 26, min_num_patches=4)
    synthetic = SyntheticMIMDataset(4, 64, 32, mask_gen, seed=1, return_skipped=True)
    assert [synthetic[(0, i)][4] for i in range(4)] == [-1, -1, -1, -1]
    assert len(SyntheticMIMDataset(4, 64, 32, mask_gen, return_skipped=False)[(0, 0)]) == 4
    builtin = _mim(BuiltinShapes(4, 96), return_skipped=True)
    assert [builtin[(0, i)][4] for i in range(4)] == [-1, -1, -1, -1]
    assert len(_mim(BuiltinShapes(4, 96))[(0, 0)]) == 4
