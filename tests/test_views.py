"""The fast two-view path (`--data-backend cpu`, beit_fast.views) against today's `pil` path (issue 16), and the
data-wait report of the training loops."""

from __future__ import annotations

import io
import logging
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from beit_fast.data import ImageFolderDataset, MIMDataset, TwoViewTransform, to_rgb
from beit_fast.masking import BlockwiseMaskGenerator
from beit_fast.views import (
    FastTwoViewTransform,
    augment_views,
    collate_crops,
    draft_factor,
    resize_crops,
    resized_crop_params,
)
from beit_fast.train.metrics import DataWait, StepReporter, suggested_workers

IMG, TOK = 64, 32  # small views: the same code as 224 / 112, faster


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour field with a few sharp discs (what the views must carry through decoding and resizing)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([120 + 60 * np.sin(xx / g.uniform(20, 60) + g.uniform(0, 6)) * np.cos(yy / g.uniform(20, 60))
                    for _ in range(3)], -1)
    for _ in range(4):
        cy, cx, r = g.uniform(0, height), g.uniform(0, width), g.uniform(0.05, 0.2) * min(width, height)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = g.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_draws_are_the_pil_paths():
    """Same seed -> the same jitter factors and order, flip and crop box as TwoViewTransform draws: the fast path
    changes no distribution (and its crop draw is torchvision's, draw for draw)."""
    fast = FastTwoViewTransform(IMG, TOK)
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    lr = torch.log(torch.tensor([3 / 4, 4 / 3]))
    for size in ((500, 375), (97, 33), (40, 300)):
        im = Image.new("RGB", size)
        for seed in range(150):
            torch.manual_seed(seed)
            fn_idx, b, c, s, _ = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, None)
            flip = bool(torch.rand(()) < 0.5)
            box = T.RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3])
            after = torch.rand(())
            torch.manual_seed(seed)
            got = fast.draw(im)
            assert got == ([b, c, s] + [float(i) for i in fn_idx.tolist() if i < 3], flip, box)
            assert torch.equal(torch.rand(()), after)  # nothing more drawn
            torch.manual_seed(seed)
            ours = resized_crop_params(*size, (0.08, 1.0), (3 / 4, 4 / 3), lr, torch.empty(1))
            torch.manual_seed(seed)
            assert ours == T.RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3])


def test_draft_never_decodes_a_crop_smaller_than_the_view():
    for _ in range(2000):
        w, h, out = random.randint(1, 3000), random.randint(1, 3000), random.choice((224, 112, 64))
        k = draft_factor(w, h, out)
        assert k in (1, 2, 4, 8) and (k == 1 or (w / k >= out and h / k >= out))
        assert k == 8 or w / (2 * k) < out or h / (2 * k) < out  # the largest such scale
    fast = FastTwoViewTransform(IMG, TOK)
    blob = jpeg(photo(1024, 768, 0))
    for crop_w, crop_h in ((1000, 700), (300, 520), (140, 140), (60, 60), (1024, 768)):
        rgb, k = fast.decode(Image.open(io.BytesIO(blob)), crop_w, crop_h)
        assert rgb.size == (-(-1024 // k), -(-768 // k)) and k == draft_factor(crop_w, crop_h, IMG)
        assert crop_w / k >= IMG and crop_h / k >= IMG or k == 1


@pytest.mark.parametrize("device_augment", [True, False])
def test_views_close_to_the_pil_path(device_augment):
    """Same seeds: the same box, flip and jitter; the pixels differ only by resampling, draft decoding and jitter
    after the resize - within the bounds README documents (mean < 3 levels here, where the images are smooth)."""
    pil, fast = TwoViewTransform(IMG, TOK), FastTwoViewTransform(IMG, TOK, device_augment=device_augment)
    errors = []
    for seed in range(12):
        blob = jpeg(photo(400, 300, seed))
        torch.manual_seed(seed)
        p0, t0 = pil(to_rgb(Image.open(io.BytesIO(blob))))
        torch.manual_seed(seed)
        out = fast(Image.open(io.BytesIO(blob)))
        p1, t1 = augment_views(*(x[None] for x in out)) if device_augment else (o[None] for o in out)
        assert p1.shape[1:] == p0.shape and t1.shape[1:] == t0.shape and p1.dtype == t1.dtype == torch.float32
        assert t1.min() >= 0 and t1.max() <= 1
        errors.append((float((p1[0] - p0).abs().mean() * 127.5), float((t1[0] - t0).abs().mean() * 255)))
    mean_patch, mean_tok = np.mean(errors, 0)
    assert mean_patch < 3 and mean_tok < 3, errors


def test_flip_and_box_exact_without_jitter():
    """No jitter, no draft: flipping then cropping (the pil path) == cropping the mirrored box then flipping."""
    pil = TwoViewTransform(IMG, TOK, color_jitter=0, hflip=1.0)
    fast = FastTwoViewTransform(IMG, TOK, color_jitter=0, hflip=1.0, draft=False)
    img = photo(300, 200, 3)
    torch.manual_seed(0)
    p0, _ = pil(img)
    torch.manual_seed(0)
    p1, _ = augment_views(*(x[None] for x in fast(img)))
    assert float((p1[0] - p0).abs().max() * 127.5) <= 8  # resampling rounding only (Pillow vs torch bicubic)
    assert float((p1[0] - p0).abs().mean() * 127.5) < 0.5


def test_two_views_share_one_box():
    """The tokenizer view is the patch view's box at half the size: downsampling the patch view gives it back."""
    fast = FastTwoViewTransform(IMG, TOK, color_jitter=0.4)
    for seed in range(6):
        torch.manual_seed(seed)
        p, t = augment_views(*(x[None] for x in fast(photo(320, 240, seed))), mean=(0, 0, 0), std=(1, 1, 1))
        down = torch.nn.functional.interpolate(p, size=(TOK, TOK), mode="bilinear", antialias=True)
        assert float((down - t).abs().mean()) < 0.02


def test_view_statistics_match_the_pil_path():
    """Over many samples the views' per-channel mean and spread agree with the pil path's (same draws, so this
    checks the jitter's implementation end to end, not only its factors)."""
    pil, fast = TwoViewTransform(IMG, TOK), FastTwoViewTransform(IMG, TOK)
    imgs = [photo(256, 192, s) for s in range(4)]
    a, b = [], []
    for seed in range(48):
        img = imgs[seed % 4]
        torch.manual_seed(seed)
        a.append(pil(img)[0])
        torch.manual_seed(seed)
        b.append(augment_views(*(x[None] for x in fast(img)))[0][0])
    a, b = torch.stack(a), torch.stack(b)
    assert torch.allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.02)
    assert torch.allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), rtol=0.03)


def test_gpu_backend_views_match_the_cpu_backend():
    """--data-backend gpu: the workers send the crops (one flat buffer), the device resizes them - the cpu backend's
    views to within the rounding of float vs uint8 (fixed-point) resampling: two levels at most."""
    cpu, gpu = FastTwoViewTransform(IMG, TOK), FastTwoViewTransform(IMG, TOK, resize_on_device=True)
    samples, expected = [], []
    for seed in range(5):
        img = photo(300 + 20 * seed, 200, seed)
        torch.manual_seed(seed)
        expected.append(cpu(img))
        torch.manual_seed(seed)
        crop, aug = gpu(img)
        assert crop.dtype == torch.uint8 and crop.shape[2] == 3
        samples.append((crop, aug, torch.zeros(4, dtype=torch.bool), 0, -1))
    flat, sizes, mask, label, skipped, aug = collate_crops(samples)
    assert flat.dim() == 1 and sizes.shape == (5, 2) and mask.shape == (5, 4) and aug.shape == (5, 8)
    p, t = resize_crops(flat, sizes, IMG, TOK)
    want_p, want_t, want_aug = (torch.stack(x) for x in zip(*expected))
    assert torch.equal(aug, want_aug)
    for got, want in ((p, want_p), (t, want_t)):
        diff = (got.int() - want.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.3


def test_augment_views_checks_its_inputs():
    p, t = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        augment_views(p.float(), t, torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        augment_views(p, t, torch.zeros(2, 7))


def test_mim_dataset_fast_path_from_files(tmp_path):
    """Files: decoded inside the transform (drafted), a corrupt one replaced and reported, deterministic."""
    for i in range(3):
        photo(300, 220, i).save(tmp_path / f"{i}.jpg", quality=90)
    (tmp_path / "1.jpg").write_bytes(b"not a jpeg")
    gen = BlockwiseMaskGenerator((IMG // 16, IMG // 16), num_masking_patches=4, min_num_patches=2)
    ds = MIMDataset(ImageFolderDataset(tmp_path), FastTwoViewTransform(IMG, TOK), gen, seed=1, return_skipped=True)
    p, t, mask, label, skipped, aug = ds[(0, 1)]
    assert p.dtype == torch.uint8 and p.shape == (3, IMG, IMG) and t.shape == (3, TOK, TOK) and aug.shape == (8,)
    assert skipped == 1 and mask.sum() == 4
    again = ds[(0, 1)]
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(again, (p, t, mask, label,
                                                                                             skipped, aug)))
    worker = MIMDataset(ImageFolderDataset(tmp_path), FastTwoViewTransform(IMG, TOK, device_augment=False), gen,
                        seed=1, return_skipped=True)
    p2, t2, *_ = worker[(0, 1)]
    assert p2.dtype == torch.float32 and len(worker[(0, 0)]) == 5


# -- data wait --------------------------------------------------------------------------------------------------------
def test_data_wait_counts_the_waits_and_warns(tmp_path, caplog, monkeypatch):
    def slow():
        while True:
            time.sleep(0.02)
            yield 1

    wait = DataWait(slow())
    next(wait)
    assert 0.015 < wait.take() < 1 and wait.take() == 0.0
    monkeypatch.setattr("beit_fast.train.metrics.os.cpu_count", lambda: 64)
    assert suggested_workers(2, 0.5) == 4 and suggested_workers(0, 0.9) == 10 and suggested_workers(8, 0.01) == 9
    reporter = StepReporter(tmp_path, [("loss", "loss")], [], start_step=0, max_steps=4, log_every=2, batch_size=8,
                            world=1, device=torch.device("cpu"), flops_per_image=None, tensorboard=False, tag="t",
                            enabled=True, num_workers=1)
    it = reporter.timed(slow())
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3, 4):
            next(it)
            reporter.report(step, [0.0], 1e-3, 1.0, {})
    reporter.close()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("data_wait")
    assert all(float(r.split(",")[col]) > 0.5 for r in rows[1:])  # the steps did nothing but wait
    warnings = [r for r in caplog.records if "input pipeline is the bottleneck" in r.getMessage()]
    assert len(warnings) == 1 and "--num-workers" in warnings[0].getMessage()


@pytest.mark.parametrize("backend", ["gpu", "pil"], ids=["device-resize", "pil-path"])  # no "gpu" id: the marker
def test_pretrain_data_backends(tmp_path, backend):
    """Every --data-backend trains from an image folder (the gpu backend's device is the CPU here: a warning)."""
    from helpers import metrics_rows, pretrain_config

    from beit_fast.train.pretrain import pretrain

    for i in range(8):
        photo(120, 90, i).save(tmp_path / f"{i}.jpg", quality=90)
    out = tmp_path / "run"
    pretrain(pretrain_config(out, {"depth": 1}, data=str(tmp_path), data_backend=backend, batch_size=4, max_steps=2,
                             num_images=8))
    rows = metrics_rows(out)
    assert len(rows) == 2 and all(float(r["loss"]) > 0 for r in rows)
