"""Recipes by network scale (train/recipes.py), the "did not learn" verdicts of the summaries (train/metrics.py
`no_learning`, the evaluations' majority levels), the builtin rhombus, and the pretraining view switches."""

import math

import numpy as np
import pytest
import torch

from beit_fast import BeitConfig
from beit_fast.data import SHAPE_CLASSES, BuiltinShapes
from beit_fast.train.evaluate import EvalResult, SegEvalResult
from beit_fast.train.finetune import FinetuneConfig
from beit_fast.train.metrics import MIOU_MARGIN, accuracy_margin, no_learning
from beit_fast.train.pretrain import PretrainConfig
from beit_fast.train.recipes import RECIPES, apply_recipe, recipe_for
from beit_fast.train.segment import SegmentConfig


# -- recipes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, expected", [("tiny", "small"), ("small", "paper"), ("base", "paper"),
                                              ("large", "paper")])
def test_auto_recipe_follows_the_network_size(preset, expected):
    assert recipe_for("auto", BeitConfig.from_preset(preset)) == expected
    assert recipe_for("paper", BeitConfig.from_preset("tiny")) == "paper"
    with pytest.raises(ValueError, match="recipe"):
        recipe_for("mine", BeitConfig.from_preset("tiny"))


def test_finetune_recipe_fills_only_unset_keys():
    cfg = FinetuneConfig.from_args(["--preset", "tiny", "--layer-decay", "0.8", "--drop-path-rate", "0.05"])
    assert cfg.lr is None and cfg.layer_decay == 0.8  # nothing resolved before the network is known
    mcfg = cfg.resolve()
    small = RECIPES["finetune"]["small"]
    assert cfg.recipe == "small"
    assert (cfg.lr, cfg.lr_batch, cfg.color_jitter, cfg.mixup, cfg.auto_augment) == \
        (small["lr"], small["lr_batch"], 0.0, 0.0, "none")
    assert cfg.layer_decay == 0.8  # the user's value stays
    assert mcfg.drop_path_rate == 0.05 and mcfg.use_rel_pos_bias and not mcfg.use_shared_rel_pos_bias
    assert mcfg.extra["eval_crop_pct"] == 1.0


def test_paper_recipe_is_unilms_base_recipe():
    cfg = FinetuneConfig.from_args(["--preset", "base"])
    mcfg = cfg.resolve()
    assert cfg.recipe == "paper"
    assert (cfg.lr, cfg.lr_batch, cfg.layer_decay, cfg.label_smoothing, cfg.mixup, cfg.cutmix, cfg.reprob,
            cfg.crop_scale, cfg.color_jitter, cfg.auto_augment, cfg.eval_crop_pct) == \
        (4e-3, 1024, 0.65, 0.1, 0.8, 1.0, 0.25, 0.08, 0.4, "rand-m9-mstd0.5-inc1", None)
    assert mcfg.drop_path_rate == 0.1
    probe = FinetuneConfig.from_args(["--preset", "tiny", "--linear-probe", "--recipe", "paper"])
    probe.resolve()
    assert probe.crop_scale == 0.08 and probe.lr == 4e-3


def test_linear_probe_and_segmentation_recipes():
    probe = FinetuneConfig.from_args(["--preset", "tiny", "--linear-probe"])
    mcfg = probe.resolve()
    assert probe.crop_scale == 1.0 and probe.eval_crop_pct == 1.0 and mcfg.drop_path_rate == 0.0
    seg = SegmentConfig.from_args(["--preset", "tiny"])
    mcfg = seg.resolve()
    assert (seg.lr, seg.lr_batch, seg.layer_decay, seg.ratio_range, seg.photometric) == \
        (2e-3, 8, 1.0, [1.0, 1.0], False)
    assert mcfg.drop_path_rate == 0.0
    seg = SegmentConfig.from_args(["--preset", "base", "--photometric", "false"])
    seg.resolve()
    assert (seg.lr, seg.layer_decay, seg.ratio_range, seg.photometric) == (7e-4, 0.65, [0.5, 2.0], False)


def test_recipe_values_are_checked_after_resolution():
    with pytest.raises(ValueError, match="recipe"):
        FinetuneConfig.from_args(["--recipe", "fast"])
    with pytest.raises(ValueError, match="eval_crop_pct"):
        FinetuneConfig.from_args(["--eval-crop-pct", "1.5"])
    cfg = FinetuneConfig.from_args(["--preset", "tiny"])
    apply_recipe(cfg, "finetune", BeitConfig.from_preset("tiny"))
    cfg.validate()  # the resolved values are valid


# -- "did not learn" --------------------------------------------------------------------------------------------------
def test_no_learning_verdict_and_the_binomial_margin():
    margin = accuracy_margin(0.125, 512)
    assert margin == pytest.approx(3 * math.sqrt(0.125 * 0.875 / 512))
    assert no_learning("val top-1", 0.14, 0.125, margin, "chance") == \
        "val top-1 0.1400 is at chance 0.1250: the model did not learn"
    assert no_learning("val top-1", 0.25, 0.125, margin, "chance") is None
    assert no_learning("val top-1", None, 0.125, margin, "chance") is None
    assert no_learning("val mIoU", 0.095, 0.089, MIOU_MARGIN, "all-background") is not None


def test_majority_levels_of_the_evaluations():
    conf = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 2]])  # 6 / 4 / 2 images per true class
    res = EvalResult(top1=0.75, top5=1.0, loss=0.5, count=12, confusion=conf)
    assert res.majority_top1 == pytest.approx(6 / 12)
    seg = SegEvalResult(confusion=torch.tensor([[70, 10, 0], [5, 10, 0], [0, 0, 0]]))
    # background everywhere: IoU 80 / 95 for class 0, 0 for class 1; class 2 is never labelled -> left out
    assert seg.majority_miou == pytest.approx(80 / 95 / 2)
    constant = SegEvalResult(confusion=torch.tensor([[80, 0, 0], [15, 0, 0], [0, 0, 0]]))
    assert constant.miou == pytest.approx(seg.majority_miou)


# -- data -------------------------------------------------------------------------------------------------------------
def test_rhombus_is_no_rotated_square():
    """At every rotation the rhombus's second moments keep their ratio 0.55^2 (a square's is 1): the two classes
    differ in outline, not only in size."""
    ds = BuiltinShapes(1, 128)
    rhombus, square = SHAPE_CLASSES.index("rhombus"), SHAPE_CLASSES.index("square")

    def aspect(kind, angle):
        m = ds._shape_mask(kind, 0.5, 0.5, 0.3, angle)
        ys, xs = np.nonzero(m)
        ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
        return ev[0] / ev[1]

    for angle in np.linspace(0, math.pi, 13):
        assert aspect(rhombus, angle) == pytest.approx(0.55 ** 2, rel=0.1)
        assert aspect(square, angle) == pytest.approx(1.0, rel=0.05)


def test_pretraining_view_switches():
    cfg = PretrainConfig.from_args(["--crop-scale", "0.4", "--color-jitter", "0"])
    assert (cfg.crop_scale, cfg.color_jitter) == (0.4, 0.0)
    for bad in (["--crop-scale", "0"], ["--crop-scale", "1.5"], ["--color-jitter", "-1"]):
        with pytest.raises(ValueError):
            PretrainConfig.from_args(bad)
