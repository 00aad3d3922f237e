"""Tests for `beit_fast.masking` (SPEC section 3).

What is checked:

* exact masked-patch count, shapes and dtypes of `gen()` / `gen.batch(n)` on several grids;
* seed reproducibility and `seed()`;
* argument validation (ValueError);
* equivalence with a literal transcription of the unilm reference loop (`_UnilmReference`
  below): exactly, mask by mask, when both are driven by the same seed (ours == reference
  whenever the reference does not stop short, ours is a superset of the reference
  otherwise), and statistically, with independent seeds (mean number of 4-connected
  regions, per-position mask frequency, stall / top-up rate);
* `RandomMaskGenerator` (exact count, interface, uniform per-position frequency);
* the `num_topped_up` counter.

All sampling uses fixed seeds, so the file is deterministic; the statistical tolerances are
nevertheless set several standard errors wide (see the comments at each assertion) so that
they would also hold for almost any other choice of seeds.

Run with `-s` to see the measured statistics (ours vs reference).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from beit_fast.masking import BlockwiseMaskGenerator, RandomMaskGenerator


# --------------------------------------------------------------------------------------
# Literal transcription of unilm `beit/masking_generator.py` (MaskingGenerator).
# Only change: a private `random.Random` instance instead of the global `random` module, so
# the test is deterministic without touching global state (same draws, same order).
# --------------------------------------------------------------------------------------


class _UnilmReference:
    def __init__(
        self,
        input_size,
        num_masking_patches,
        min_num_patches=4,
        max_num_patches=None,
        min_aspect=0.3,
        max_aspect=None,
        seed=None,
    ):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size

        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches

        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.random = random.Random(seed)

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for attempt in range(10):
            target_area = self.random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.random.randint(0, self.height - h)
                left = self.random.randint(0, self.width - w)

                num_masked = mask[top : top + h, left : left + w].sum()
                # Overlap
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=self.get_shape(), dtype=np.int64)  # unilm: np.int (removed from numpy)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)

            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta

        return mask


def _reference(cfg, seed):
    """The reference for one of our `cfg` dicts (our defaults: min_num_patches=16)."""
    cfg = dict(cfg)
    size = cfg.pop("input_size", 14)
    return _UnilmReference(
        tuple(size) if not isinstance(size, int) else size,
        cfg.pop("num_masking_patches", 75),
        min_num_patches=cfg.pop("min_num_patches", 16),
        seed=seed,
        **cfg,
    )


def _count_regions(mask) -> int:
    """Number of 4-connected components of True cells (pure-Python iterative flood fill)."""
    rows = mask.tolist()
    height, width = len(rows), len(rows[0])
    seen = [[False] * width for _ in range(height)]
    regions = 0
    for i in range(height):
        for j in range(width):
            if rows[i][j] and not seen[i][j]:
                regions += 1
                seen[i][j] = True
                stack = [(i, j)]
                while stack:
                    a, b = stack.pop()
                    for c, d in ((a - 1, b), (a + 1, b), (a, b - 1), (a, b + 1)):
                        if 0 <= c < height and 0 <= d < width and rows[c][d] and not seen[c][d]:
                            seen[c][d] = True
                            stack.append((c, d))
    return regions


# --------------------------------------------------------------------------------------
# 1. Exact count, shapes, dtypes
# --------------------------------------------------------------------------------------

CONFIGS = [
    pytest.param(dict(), id="14x14-75-default"),
    pytest.param(dict(input_size=8, num_masking_patches=26, min_num_patches=4), id="8x8-26-min4"),
    pytest.param(dict(input_size=(7, 10), num_masking_patches=28, min_num_patches=4), id="7x10-28-min4"),
    pytest.param(dict(input_size=(10, 7), num_masking_patches=28, min_num_patches=4), id="10x7-28-min4"),
    pytest.param(dict(input_size=8, num_masking_patches=64, min_num_patches=4), id="8x8-whole-grid"),
    pytest.param(dict(input_size=14, num_masking_patches=196), id="14x14-whole-grid"),
    pytest.param(dict(input_size=14, num_masking_patches=1, min_num_patches=1), id="count-1"),
    pytest.param(dict(input_size=14, num_masking_patches=3, min_num_patches=2), id="count-3"),
    pytest.param(dict(input_size=6, num_masking_patches=5, min_num_patches=5), id="6x6-5-min5"),
    pytest.param(dict(input_size=(1, 12), num_masking_patches=5, min_num_patches=1), id="1x12-no-block-fits"),
    pytest.param(dict(input_size=1, num_masking_patches=1, min_num_patches=1), id="1x1"),
]


def _shape(cfg):
    size = cfg.get("input_size", 14)
    return (size, size) if isinstance(size, int) else tuple(size)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_blockwise_exact_count(cfg):
    gen = BlockwiseMaskGenerator(seed=0, **cfg)
    shape = _shape(cfg)
    target = cfg.get("num_masking_patches", 75)
    assert gen.get_shape() == shape
    assert gen.num_masking_patches == target
    previous = None
    for _ in range(300):
        mask = gen()
        assert isinstance(mask, np.ndarray)
        assert mask.dtype == np.bool_
        assert mask.shape == shape
        assert int(mask.sum()) == target
        if previous is not None:  # a fresh array each call (no aliasing of an internal buffer)
            assert int(previous.sum()) == target
        previous = mask


@pytest.mark.parametrize("cfg", CONFIGS)
def test_blockwise_batch(cfg):
    gen = BlockwiseMaskGenerator(seed=1, **cfg)
    h, w = _shape(cfg)
    target = cfg.get("num_masking_patches", 75)
    out = gen.batch(64)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.bool
    assert out.shape == (64, h * w)
    assert torch.equal(out.sum(dim=1), torch.full((64,), target, dtype=torch.long))

    empty = gen.batch(0)
    assert isinstance(empty, torch.Tensor) and empty.dtype == torch.bool
    assert empty.shape == (0, h * w)


def test_batch_rows_are_flattened_masks_in_order():
    a = BlockwiseMaskGenerator(seed=7)
    b = BlockwiseMaskGenerator(seed=7)
    out = a.batch(5)
    for row in out:
        assert np.array_equal(row.numpy(), b().reshape(-1))


def test_batch_negative_raises():
    with pytest.raises(ValueError):
        BlockwiseMaskGenerator(seed=0).batch(-1)
    with pytest.raises(ValueError):
        RandomMaskGenerator(seed=0).batch(-1)


# --------------------------------------------------------------------------------------
# 2. Seed reproducibility
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BlockwiseMaskGenerator, RandomMaskGenerator])
def test_same_seed_same_sequence(cls):
    a, b = cls(seed=123), cls(seed=123)
    for _ in range(50):
        assert np.array_equal(a(), b())
    assert torch.equal(a.batch(20), b.batch(20))


@pytest.mark.parametrize("cls", [BlockwiseMaskGenerator, RandomMaskGenerator])
def test_different_seeds_differ(cls):
    a, b = cls(seed=1), cls(seed=2)
    seq_a = np.stack([a() for _ in range(20)])
    seq_b = np.stack([b() for _ in range(20)])
    assert not np.array_equal(seq_a, seq_b)
    # Not just one mask: nearly all of them differ (identical masks are very unlikely).
    assert sum(not np.array_equal(x, y) for x, y in zip(seq_a, seq_b)) >= 15


@pytest.mark.parametrize("cls", [BlockwiseMaskGenerator, RandomMaskGenerator])
def test_reseed(cls):
    fresh = cls(seed=99)
    expected = [fresh() for _ in range(10)]
    gen = cls(seed=5)
    for _ in range(7):  # advance the state first
        gen()
    gen.seed(99)
    assert all(np.array_equal(gen(), e) for e in expected)
    gen.seed(99)  # again: restarts the same sequence
    assert np.array_equal(gen(), expected[0])
    gen.seed(None)  # entropy seeding is accepted and still gives valid masks
    assert int(gen().sum()) == gen.num_masking_patches


# --------------------------------------------------------------------------------------
# 3. Argument validation
# --------------------------------------------------------------------------------------

BAD_BLOCKWISE = [
    pytest.param(dict(input_size=14, num_masking_patches=197), id="count>grid"),
    pytest.param(dict(input_size=(7, 10), num_masking_patches=71, min_num_patches=4), id="count>grid-7x10"),
    pytest.param(dict(input_size=14, num_masking_patches=10, min_num_patches=11), id="min_num>count"),
    pytest.param(dict(num_masking_patches=0), id="count=0"),
    pytest.param(dict(num_masking_patches=-5), id="count<0"),
    pytest.param(dict(num_masking_patches=75.0), id="count-float"),
    pytest.param(dict(min_num_patches=0), id="min_num=0"),
    pytest.param(dict(min_num_patches=-3), id="min_num<0"),
    pytest.param(dict(max_num_patches=15), id="max_num<min_num"),
    pytest.param(dict(max_num_patches=0), id="max_num=0"),
    pytest.param(dict(input_size=0), id="size=0"),
    pytest.param(dict(input_size=-14), id="size<0"),
    pytest.param(dict(input_size=(0, 14)), id="height=0"),
    pytest.param(dict(input_size=(14, -1)), id="width<0"),
    pytest.param(dict(input_size=(14,)), id="size-1-tuple"),
    pytest.param(dict(input_size=(14, 14, 3)), id="size-3-tuple"),
    pytest.param(dict(input_size=()), id="size-empty-tuple"),
    pytest.param(dict(min_aspect=0.0), id="min_aspect=0"),
    pytest.param(dict(min_aspect=-0.3), id="min_aspect<0"),
    pytest.param(dict(min_aspect=float("nan")), id="min_aspect-nan"),
    pytest.param(dict(min_aspect=0.5, max_aspect=0.4), id="max_aspect<min_aspect"),
    pytest.param(dict(min_aspect=0.3, max_aspect=-1.0), id="max_aspect<0"),
    pytest.param(dict(min_aspect=2.0), id="min_aspect>1-implied-max<min"),
    pytest.param(dict(min_aspect=0.3, max_aspect=0.0), id="max_aspect=0"),
    pytest.param(dict(max_aspect=float("nan")), id="max_aspect-nan"),
    pytest.param(dict(max_aspect=float("inf")), id="max_aspect-inf"),
    pytest.param(dict(input_size="14", num_masking_patches=2, min_num_patches=1), id="size-str"),
    pytest.param(dict(input_size=14.0), id="size-float"),
    pytest.param(dict(input_size=(14.7, 14)), id="size-float-pair"),
    pytest.param(dict(min_num_patches=2.5), id="min_num_patches-float"),
    pytest.param(dict(num_masking_patches=True), id="num_masking_patches-bool"),
]


@pytest.mark.parametrize("kwargs", BAD_BLOCKWISE)
def test_blockwise_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        BlockwiseMaskGenerator(**kwargs)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((14, 197), id="count>grid"),
        pytest.param((14, 0), id="count=0"),
        pytest.param((14, -1), id="count<0"),
        pytest.param((0, 1), id="size=0"),
        pytest.param(((3, -3), 1), id="width<0"),
        pytest.param(((14,), 10), id="size-1-tuple"),
        pytest.param(((2, 2, 2), 1), id="size-3-tuple"),
    ],
)
def test_random_bad_arguments(args):
    with pytest.raises(ValueError):
        RandomMaskGenerator(*args)


def test_valid_edge_arguments_accepted():
    # Boundaries that must *not* raise.
    BlockwiseMaskGenerator(14, 196)  # whole grid
    BlockwiseMaskGenerator(14, 16, min_num_patches=16)  # min == count
    BlockwiseMaskGenerator(14, 75, min_aspect=1.0)  # square blocks only (max = 1/min = min)
    BlockwiseMaskGenerator(14, 75, min_aspect=0.5, max_aspect=0.5)
    BlockwiseMaskGenerator(14, 75, max_num_patches=16)  # max == min
    BlockwiseMaskGenerator((7, 10), 70, min_num_patches=4)
    RandomMaskGenerator(14, 196)
    RandomMaskGenerator((1, 1), 1)


# --------------------------------------------------------------------------------------
# 4a. Exact equivalence with the reference under a shared seed.
#
# Ours draws exactly what the reference draws, in the same order, until the block loop
# stalls; only then does it consume further draws for the top-up. So, re-seeding both with
# the same seed before each mask: reference not short => identical masks and no top-up;
# reference short => ours is a superset of the reference, topped up by exactly the shortfall.
# --------------------------------------------------------------------------------------

COUPLED_CONFIGS = [
    pytest.param(dict(), 400, id="14x14-75-default"),
    pytest.param(dict(input_size=8, num_masking_patches=26, min_num_patches=4), 300, id="8x8-26-min4"),
    pytest.param(dict(input_size=(7, 10), num_masking_patches=28, min_num_patches=4), 300, id="7x10-28-min4"),
    pytest.param(dict(input_size=(10, 7), num_masking_patches=28, min_num_patches=4), 300, id="10x7-28-min4"),
    pytest.param(dict(input_size=14, num_masking_patches=190, min_num_patches=16), 100, id="14x14-190-stalls"),
    pytest.param(dict(input_size=14, num_masking_patches=3, min_num_patches=2), 300, id="count-3"),
    pytest.param(
        dict(input_size=(9, 12), num_masking_patches=40, min_num_patches=6, min_aspect=0.5, max_aspect=3.0),
        300,
        id="9x12-asym-aspect",
    ),
    pytest.param(dict(input_size=14, num_masking_patches=75, max_num_patches=30), 300, id="max_num=30"),
]


@pytest.mark.parametrize("cfg,n", COUPLED_CONFIGS)
def test_matches_reference_mask_by_mask(cfg, n):
    ours = BlockwiseMaskGenerator(seed=0, **cfg)
    ref = _reference(cfg, seed=0)
    target = ours.num_masking_patches
    n_short = 0
    for s in range(n):
        ours.seed(s)
        ref.random.seed(s)
        before = ours.num_topped_up
        m = ours()
        r = ref().astype(bool)
        assert int(m.sum()) == target
        short = int(r.sum()) < target
        n_short += short
        if short:
            assert ours.num_topped_up == before + 1
            assert np.all(m[r]), "the reference's blocks must all be kept"
            assert int((m & ~r).sum()) == target - int(r.sum())
        else:
            assert ours.num_topped_up == before
            assert np.array_equal(m, r), f"seed {s}: differs from the reference"
    assert ours.num_topped_up == n_short


# --------------------------------------------------------------------------------------
# 4b. Statistical comparison with independent seeds.
# --------------------------------------------------------------------------------------

STAT_CONFIGS = {
    # name: (cfg, number of masks per generator)
    "14x14-75-default": (dict(), 4000),
    "8x8-26-min4": (dict(input_size=8, num_masking_patches=26, min_num_patches=4), 3000),
}


def _sample(cfg, n, seed_ours, seed_ref):
    ours = BlockwiseMaskGenerator(seed=seed_ours, **cfg)
    ref = _reference(cfg, seed=seed_ref)
    target = ours.num_masking_patches
    o, topped = [], []
    for _ in range(n):
        before = ours.num_topped_up
        o.append(ours())
        topped.append(ours.num_topped_up > before)
    o = np.stack(o)
    r = np.stack([ref() for _ in range(n)]).astype(bool)
    ref_counts = r.reshape(n, -1).sum(axis=1)
    return dict(
        n=n,
        target=target,
        ours=o,
        ref=r,
        ours_topped=np.array(topped),
        ref_short=ref_counts < target,
        ref_counts=ref_counts,
        ours_regions=np.array([_count_regions(m) for m in o]),
        ref_regions=np.array([_count_regions(m) for m in r]),
    )


@pytest.fixture(scope="module", params=list(STAT_CONFIGS))
def stats(request):
    cfg, n = STAT_CONFIGS[request.param]
    s = _sample(cfg, n, seed_ours=20240601, seed_ref=777)
    s["name"] = request.param
    return s


def _se_mean_diff(x, y):
    return math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))


def test_region_count_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    structure = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    gen = BlockwiseMaskGenerator(seed=3)
    rng = np.random.default_rng(0)
    masks = [gen() for _ in range(100)] + [rng.random((9, 13)) < p for p in (0.2, 0.5, 0.8) for _ in range(30)]
    for m in masks:
        assert _count_regions(m) == ndimage.label(m, structure=structure)[1]
    assert _count_regions(np.zeros((3, 4), dtype=bool)) == 0
    assert _count_regions(np.eye(4, dtype=bool)) == 4  # diagonal cells are not 4-connected


def test_stats_exact_counts_and_stall_rate(stats):
    n, target = stats["n"], stats["target"]
    # (c) ours never stops short ...
    assert np.all(stats["ours"].reshape(n, -1).sum(axis=1) == target)
    assert np.all(stats["ref_counts"] <= target)
    # ... and tops up exactly as often as the reference stops short (the same event, same
    # probability p). Standard error of the difference of two independent proportions:
    # sqrt(2 p (1-p) / n) (~0.0105 for p~0.33, n=4000); tolerance 5 SE (+ 1/n against p=0).
    p_ref = stats["ref_short"].mean()
    p_ours = stats["ours_topped"].mean()
    p = (p_ref + p_ours) / 2
    se = math.sqrt(2 * p * (1 - p) / n)
    print(
        f"\n[{stats['name']}] reference stops short in {p_ref:.2%} of masks "
        f"(mean masked {stats['ref_counts'].mean():.3f} of {target}, min {stats['ref_counts'].min()}); "
        f"ours topped up {p_ours:.2%}, never short"
    )
    assert abs(p_ref - p_ours) <= 5 * se + 1.0 / n


def test_stats_mean_regions(stats):
    o, r = stats["ours_regions"], stats["ref_regions"]
    ot, rs = stats["ours_topped"], stats["ref_short"]
    # Conditional on the block loop not stalling, ours *is* the reference algorithm, so the
    # mean region count must agree. SE of a difference of two independent means =
    # sqrt(var_o/n_o + var_r/n_r) (~0.017 for sd~0.6, n~2700); tolerance 5 SE.
    o_ok, r_ok = o[~ot], r[~rs]
    se_ok = _se_mean_diff(o_ok, r_ok)
    diff_ok = o_ok.mean() - r_ok.mean()
    # Over all masks ours adds the top-up, grown from the border of the masked blocks: it never adds
    # a region (it can join two), so the unconditional mean must agree with the reference too.
    se_all = _se_mean_diff(o, r)
    diff_all = o.mean() - r.mean()
    shortfall = stats["target"] - stats["ref_counts"].mean()
    print(
        f"\n[{stats['name']}] mean 4-connected regions: ours {o.mean():.3f} (sd {o.std():.3f}) vs "
        f"reference {r.mean():.3f} (sd {r.std():.3f}); diff {diff_all:+.3f} (SE {se_all:.3f}); "
        f"non-stalled masks only: ours {o_ok.mean():.3f} vs reference {r_ok.mean():.3f}, "
        f"diff {diff_ok:+.3f} (SE {se_ok:.3f}); reference shortfall {shortfall:.3f} patches/mask"
    )
    assert abs(diff_ok) <= 5 * se_ok
    assert abs(diff_all) <= 5 * se_all
    assert -3 * shortfall - 5 * se_all <= diff_all <= 5 * se_all
    # Sanity: blockwise masks are made of few regions (uniform masks of 75/196 have ~20).
    assert 1.0 <= r.mean() <= 3.0


def _freq_stats(a, b):
    """Per-position frequencies of two samples of masks, their difference and its SE."""
    fa, fb = a.mean(axis=0), b.mean(axis=0)
    # SE per position of the difference of two binomial proportions. p floored at 1/n so
    # that positions with (almost) zero frequency do not get a zero SE.
    pa = np.clip(fa, 1.0 / len(a), 1 - 1.0 / len(a))
    pb = np.clip(fb, 1.0 / len(b), 1 - 1.0 / len(b))
    se = np.sqrt(pa * (1 - pa) / len(a) + pb * (1 - pb) / len(b))
    return fa, fb, fa - fb, se


def test_stats_per_position_frequency(stats):
    o, r = stats["ours"], stats["ref"]
    fo, fr, d, se = _freq_stats(o, r)
    max_abs, mean_abs = float(np.abs(d).max()), float(np.abs(d).mean())
    z = np.abs(d) / se
    _, _, d_ok, se_ok = _freq_stats(o[~stats["ours_topped"]], r[~stats["ref_short"]])
    z_ok = np.abs(d_ok) / se_ok
    print(
        f"\n[{stats['name']}] per-position mask frequency ({len(o)} masks each): "
        f"reference range [{fr.min():.3f}, {fr.max():.3f}], mean {fr.mean():.4f}; ours mean {fo.mean():.4f}; "
        f"|diff| max {max_abs:.4f}, mean {mean_abs:.4f} (mean SE {se.mean():.4f}), max z {z.max():.2f}; "
        f"non-stalled only: |diff| max {np.abs(d_ok).max():.4f}, mean {np.abs(d_ok).mean():.4f}, "
        f"max z {z_ok.max():.2f}"
    )
    # Tolerances. Per position the difference of frequencies is ~normal with SE `se` (<= 0.0112
    # for n=4000, p~0.5). With H*W (<=196) positions the largest |z| of pure noise is ~3;
    # 5.5 leaves a wide margin (P(|z|>5.5) ~ 4e-8 per position). The top-up adds on average
    # (shortfall / free positions) ~0.004 to a position: well under one SE.
    assert z.max() < 5.5
    assert z_ok.max() < 5.5
    assert max_abs < 5.5 * se.max()
    # The mean of |diff| over positions is ~ sqrt(2/pi) * mean(se) ~ 0.8 mean(se) for pure
    # noise (plus the small top-up shift); 2 * mean(se) is 2.5x that expectation. A
    # systematic error such as an off-by-one in the block placement moves whole rows/columns
    # by several SE and fails this check.
    assert mean_abs < 2.0 * se.mean()
    # The blockwise distribution is strongly centre-biased; it must not look uniform.
    if stats["name"] == "14x14-75-default":
        assert fr.max() - fr.min() > 0.3


def test_statistical_checks_catch_a_placement_bug():
    """The frequency tolerances are tight enough to see a plausible implementation error:
    blocks never touching the last row/column (randint(0, H - h - 1))."""

    class OffByOne(random.Random):
        def randint(self, a, b):
            return super().randint(a, max(a, b - 1))

    n = 2000
    ref = _UnilmReference(14, 75, min_num_patches=16, seed=1)
    bad = _UnilmReference(14, 75, min_num_patches=16)
    bad.random = OffByOne(2)
    r = np.stack([ref() for _ in range(n)]).astype(bool)
    b = np.stack([bad() for _ in range(n)]).astype(bool)
    _, _, d, se = _freq_stats(b, r)
    z = np.abs(d) / se
    assert z.max() >= 5.5 or np.abs(d).mean() >= 2.0 * se.mean()


# --------------------------------------------------------------------------------------
# 5. RandomMaskGenerator
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,count",
    [(14, 75), (8, 26), ((7, 10), 28), ((10, 7), 70), (14, 196), (14, 1), (1, 1)],
)
def test_random_exact_count_and_interface(size, count):
    gen = RandomMaskGenerator(size, count, seed=0)
    shape = (size, size) if isinstance(size, int) else size
    assert gen.get_shape() == shape
    for _ in range(200):
        m = gen()
        assert isinstance(m, np.ndarray) and m.dtype == np.bool_ and m.shape == shape
        assert int(m.sum()) == count
    out = gen.batch(32)
    assert out.dtype == torch.bool and out.shape == (32, shape[0] * shape[1])
    assert torch.all(out.sum(dim=1) == count)
    assert gen.batch(0).shape == (0, shape[0] * shape[1])


def test_random_default_arguments():
    gen = RandomMaskGenerator(seed=0)
    assert gen.get_shape() == (14, 14) and gen.num_masking_patches == 75


def test_random_per_position_frequency_uniform():
    n = 4000
    gen = RandomMaskGenerator(14, 75, seed=11)
    masks = gen.batch(n).numpy()
    f = masks.mean(axis=0)
    p = 75 / 196
    # Per position: binomial(n, p) / n, SE = sqrt(p(1-p)/n) ~ 0.0077. Max |dev| over 196
    # positions of pure noise ~ 3 SE; tolerance 5.5 SE. The mean is exact (exact counts).
    se = math.sqrt(p * (1 - p) / n)
    dev = np.abs(f - p)
    print(f"\n[random] per-position frequency: max |f - p| {dev.max():.4f}, mean {dev.mean():.4f}, SE {se:.4f}")
    assert abs(f.mean() - p) < 1e-12
    assert dev.max() < 5.5 * se
    assert dev.mean() < 2.0 * se  # expectation ~0.8 SE
    # Random masks are fragmented: far more regions than blockwise ones.
    regions = np.mean([_count_regions(m.reshape(14, 14)) for m in masks[:300]])
    assert regions > 10


# --------------------------------------------------------------------------------------
# 6. num_topped_up
# --------------------------------------------------------------------------------------


def test_num_topped_up_in_a_stalling_configuration():
    gen = BlockwiseMaskGenerator(14, 190, min_num_patches=16, seed=4)
    assert isinstance(gen.num_topped_up, int) and gen.num_topped_up == 0
    n = 150
    for _ in range(n):
        before = gen.num_topped_up
        m = gen()
        assert int(m.sum()) == 190
        assert gen.num_topped_up in (before, before + 1)  # at most one per mask
    assert isinstance(gen.num_topped_up, int)
    # This configuration stalls most of the time (the reference is short in ~90% of masks).
    assert gen.num_topped_up > n // 2
    # batch() counts too.
    before = gen.num_topped_up
    out = gen.batch(20)
    assert torch.all(out.sum(dim=1) == 190)
    assert before < gen.num_topped_up <= before + 20


def test_num_topped_up_not_reset_by_seed():
    # (That it increments exactly when the reference would stop short is checked mask by mask
    # in test_matches_reference_mask_by_mask.)
    gen = BlockwiseMaskGenerator(14, 190, min_num_patches=16, seed=0)
    for _ in range(10):
        gen()
    k = gen.num_topped_up
    assert k > 0
    gen.seed(0)
    assert gen.num_topped_up == k
    fresh = BlockwiseMaskGenerator(14, 190, min_num_patches=16, seed=0)
    for _ in range(10):
        fresh()
    assert fresh.num_topped_up == k  # deterministic given the seed


def test_positional_seed_and_keyword_only_max_num_patches():
    # The signature: (input_size, num_masking_patches, min_num_patches, min_aspect, max_aspect, seed).
    a = BlockwiseMaskGenerator(14, 75, 16, 0.3, None, 42)
    b = BlockwiseMaskGenerator(input_size=14, num_masking_patches=75, seed=42)
    assert all(np.array_equal(a(), b()) for _ in range(20))
    with pytest.raises(TypeError):
        BlockwiseMaskGenerator(14, 75, 16, 0.3, None, 42, 30)  # max_num_patches is keyword-only
    c = BlockwiseMaskGenerator(14, 75, seed=np.int64(42))
    d = BlockwiseMaskGenerator(14, 75, seed=42)
    assert np.array_equal(c(), d())
    with pytest.raises(ValueError, match="seed"):
        BlockwiseMaskGenerator(14, 75, seed=1.5)


def test_random_generator_takes_the_block_arguments():
    kw = dict(input_size=14, num_masking_patches=75, min_num_patches=16, min_aspect=0.3, max_aspect=None, seed=3)
    r = RandomMaskGenerator(**kw)
    assert r().sum() == 75 and BlockwiseMaskGenerator(**kw)().sum() == 75
    assert np.array_equal(RandomMaskGenerator(14, 75, 16, 0.3, None, 3)(), RandomMaskGenerator(14, 75, seed=3)())
