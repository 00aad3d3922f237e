"""Classification data: the builtin split, ImageNet-layout folders, train_fraction subsets, the fine-tuning
transforms, per-sample determinism of ClassificationDataset and the sharded eval sampler."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from beit_fast.data import (
    BUILTIN_CLASSIFICATION_SEED,
    SHAPE_CLASSES,
    BuiltinShapes,
    ClassificationDataset,
    ImageFolderDataset,
    ShardedEvalSampler,
    build_classification_data,
    build_dataset,
    classification_transform,
)


def _write_folder(root, train, val, size=(12, 10)):
    """root/<side>/<class>/<k>.png with {class: count} per side; every image a different flat colour."""
    k = 0
    for side, counts in (("train", train), ("val", val)):
        (root / side).mkdir(parents=True, exist_ok=True)
        for cls, n in counts.items():
            (root / side / cls).mkdir(exist_ok=True)
            for i in range(n):
                k += 1
                Image.fromarray(np.full((size[1], size[0], 3), (k * 37) % 256, np.uint8)).save(
                    root / side / cls / f"{i}.png")
    return root


def test_builtin_label_replays_the_rendered_label():
    ds = BuiltinShapes(120, 24, seed=3)
    assert [ds.label(i) for i in range(120)] == [ds.sample(i)[1] for i in range(120)]
    with pytest.raises(IndexError):
        ds.label(120)


def test_builtin_split_is_fixed_disjoint_and_not_the_pretraining_images():
    d = build_classification_data("builtin", num_images=40, image_size=24)
    assert d.classes == list(SHAPE_CLASSES) and d.num_classes == 8
    assert len(d.train) == 40 and len(d.val) == 256  # val: max(256, num_images // 4)
    assert len(build_classification_data("builtin", num_images=2000, image_size=24).val) == 500
    assert d.train.dataset is d.val.dataset and d.train.dataset.seed == BUILTIN_CLASSIFICATION_SEED
    assert not set(d.train.indices) & set(d.val.indices)
    # Labels read without rendering agree with the rendered ones.
    assert d.train.labels == [d.train[i][1] for i in range(len(d.train))]
    assert d.val.labels[:20] == [d.val[i][1] for i in range(20)]
    # Runs with different seeds score the same val images: the eval samples do not depend on the run's seed.
    ev = classification_transform(32, train=False)
    again = build_classification_data("builtin", num_images=40, image_size=24)
    a, b = ClassificationDataset(d.val, ev, seed=0), ClassificationDataset(again.val, ev, seed=7)
    for i in (0, 100, 255):
        assert torch.equal(a[(0, i)][0], b[(0, i)][0]) and a[(0, i)][1] == b[(0, i)][1]
    # Pretraining's default builtin data (seed 0) is another image stream.
    pre = build_dataset("builtin", num_images=296, size=24, seed=0)
    pre_images = {pre.sample(i)[0].tobytes() for i in range(296)}
    assert not pre_images & {d.val.dataset.sample(i)[0].tobytes() for i in d.val.indices}
    # num_classes k: the first k shape kinds only (an easier task), labels in range; outside 2..8 refused.
    four = build_classification_data("builtin", num_images=40, image_size=24, num_classes=4)
    assert four.classes == list(SHAPE_CLASSES[:4]) and set(four.train.labels) <= {0, 1, 2, 3}
    assert len(set(four.train.labels)) == 4
    for bad in (1, 9):
        with pytest.raises(ValueError, match="2 to 8 classes"):
            build_classification_data("builtin", num_images=40, image_size=24, num_classes=bad)


def test_train_fraction_is_stratified_fixed_nested_and_cheap(monkeypatch):
    full = build_classification_data("builtin", num_images=400, image_size=24)
    counts = np.bincount(full.train.labels, minlength=8)

    def no_rendering(self, index):
        raise AssertionError("labels must not render images")

    monkeypatch.setattr(BuiltinShapes, "sample", no_rendering)
    tenth = build_classification_data("builtin", num_images=400, image_size=24, train_fraction=0.1)
    fifth = build_classification_data("builtin", num_images=400, image_size=24, train_fraction=0.2)
    tiny = build_classification_data("builtin", num_images=400, image_size=24, train_fraction=0.001)
    monkeypatch.undo()
    assert np.array_equal(np.bincount(tenth.train.labels, minlength=8), np.floor(0.1 * counts + 0.5))
    assert np.array_equal(np.bincount(tiny.train.labels, minlength=8), np.ones(8))  # at least one per class
    assert set(tenth.train.indices) <= set(fifth.train.indices) <= set(full.train.indices)
    assert tenth.train.indices == build_classification_data("builtin", num_images=400, image_size=24,
                                                            train_fraction=0.1).train.indices
    assert tenth.train.labels == [full.train.labels[i] for i in tenth.train.indices]  # base indices = positions here
    assert tenth.val.indices == full.val.indices
    assert tenth.train[3][1] == tenth.train.labels[3]
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="train_fraction"):
            build_classification_data("builtin", num_images=40, image_size=24, train_fraction=bad)


def test_same_key_same_sample_in_process_and_in_a_worker():
    d = build_classification_data("builtin", num_images=16, image_size=48)
    tf = classification_transform(32, train=True, re_prob=1.0)  # random erasing (torch draws) on every sample
    ds = ClassificationDataset(d.train, tf, seed=3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    x, label = ds[(2, 5)]
    # The global generators are left as they were.
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[2])
    after = np.random.get_state()
    assert np.array_equal(after[1], states[1][1]) and after[2:] == states[1][2:]
    random.seed(2), np.random.seed(2), torch.manual_seed(2)  # global state must not matter
    y, label_y = ds[(2, 5)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == label_y == d.train.labels[5]
    assert torch.equal(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[(0, 1), (2, 5)]], num_workers=1)
    (batch, labels), = list(loader)
    assert torch.equal(batch[1], x) and labels.tolist() == [d.train.labels[1], label]
    assert not torch.equal(ds[(3, 5)][0], x)  # another epoch, another augmentation
    assert not torch.equal(ClassificationDataset(d.train, tf, seed=4)[(2, 5)][0], x)  # another run seed


def test_folder_layout(tmp_path):
    root = _write_folder(tmp_path / "data", {"cat": 3, "dog": 2, "eel": 2}, {"cat": 1, "dog": 1, "eel": 2})
    (root / "train" / "dog" / "2.png").write_bytes(b"not a png")
    d = build_classification_data(str(root))
    assert d.classes == ["cat", "dog", "eel"] and d.num_classes == 3
    assert len(d.train) == 8 and len(d.val) == 4
    assert d.train.labels == [0, 0, 0, 1, 1, 1, 2, 2] and d.val.labels == [0, 1, 2, 2]
    assert isinstance(d.train.dataset, ImageFolderDataset)
    ev = ClassificationDataset(d.train, classification_transform(16, train=False), return_skipped=True)
    skipped = [ev[(0, i)][2] for i in range(len(d.train))]
    assert skipped == [-1, -1, -1, -1, -1, 5, -1, -1]  # dog/2.png sorts after dog/0.png, dog/1.png
    image, label, _ = ev[(0, 5)]
    assert image.shape == (3, 16, 16) and label == 2  # its replacement: the next readable file, an eel
    half = build_classification_data(str(root), train_fraction=0.5)
    assert np.array_equal(np.bincount(half.train.labels), [2, 2, 1])  # 3 -> round(1.5) = 2 (half up), 3 -> 2, 2 -> 1


@pytest.mark.parametrize(
    "train, val, error, text",
    [
        ({"cat": 1, "dog": 1}, {"cat": 1}, ValueError, "'dog' is in .*train but missing from .*val"),
        ({"cat": 1}, {"cat": 1, "dog": 1}, ValueError, "'dog' is in .*val but missing from .*train"),
        ({"cat": 1, "dog": 1, "eel": 1}, {"cat": 1}, ValueError, r"'dog' .*\(and 1 more\)"),
        ({}, {"cat": 1}, ValueError, "no class folders in .*train"),
        ({"cat": 1, "dog": 0}, {"cat": 1, "dog": 1}, ValueError, "dog has no images"),
    ],
)
def test_folder_class_errors(tmp_path, train, val, error, text):
    root = _write_folder(tmp_path, train, val)
    with pytest.raises(error, match=text):
        build_classification_data(str(root))


def test_folder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_classification_data(str(tmp_path / "nope"))
    root = _write_folder(tmp_path / "a", {"cat": 1}, {})
    (root / "val").rmdir()
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        build_classification_data(str(root))
    # Only loose images: zero classes.
    loose = _write_folder(tmp_path / "b", {}, {"cat": 1})
    Image.new("RGB", (8, 8)).save(loose / "train" / "x.png")
    with pytest.raises(ValueError, match="no class folders"):
        build_classification_data(str(loose))
    # Loose images beside class folders would have no label.
    mixed = _write_folder(tmp_path / "c", {"cat": 1}, {"cat": 1})
    Image.new("RGB", (8, 8)).save(mixed / "val" / "x.png")
    with pytest.raises(ValueError, match=r"1 images in .*val are outside any class folder"):
        build_classification_data(str(mixed))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_samples, batch_size", [(1, 4), (7, 2), (10, 5), (33, 4), (5, 8)])
def test_sharded_eval_sampler_covers_every_index_once(num_samples, batch_size, world_size):
    shards = [list(ShardedEvalSampler(num_samples, batch_size, r, world_size)) for r in range(world_size)]
    keys = [k for shard in shards for batch in shard for k in batch]
    assert sorted(i for _, i in keys) == list(range(num_samples)) and {e for e, _ in keys} == {0}
    batches = [batch for shard in shards for batch in shard]
    assert all(0 < len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1  # at most one short batch overall
    lens = [len(s) for s in shards]
    assert max(lens) - min(lens) <= 1
    for r, shard in enumerate(shards):
        sampler = ShardedEvalSampler(num_samples, batch_size, r, world_size)
        assert len(sampler) == len(shard) and sampler.max_rank_batches == max(lens)


def test_sharded_eval_sampler_errors():
    for args in ((0, 4), (8, 0), (8, 4, 2, 2), (8, 4, -1, 2)):
        with pytest.raises(ValueError):
            ShardedEvalSampler(*args)


def test_transform_shapes_and_eval_resize():
    square = BuiltinShapes(2, 96)[0][0]
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    train, ev = classification_transform(64, train=True), classification_transform(64, train=False)
    for img in (square, wide):
        torch.manual_seed(0)
        x = train(img)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        y = ev(img)
        assert y.shape == (3, 64, 64) and torch.equal(y, ev(img))
        # Eval: short side to floor(64 / 0.875) = 73, bicubic, center crop, then (x - 0.5) / 0.5.
        ref = TF.to_tensor(TF.center_crop(TF.resize(img, 73, TF.InterpolationMode.BICUBIC), 64)) * 2 - 1
        assert torch.allclose(y, ref, atol=1e-6)
    # From 384 px the eval crop takes the whole resized image (crop_pct 1.0), as unilm.
    big = classification_transform(384, train=False)(wide)
    ref = TF.to_tensor(TF.center_crop(TF.resize(wide, 384, TF.InterpolationMode.BICUBIC), 384)) * 2 - 1
    assert big.shape == (3, 384, 384) and torch.allclose(big, ref, atol=1e-6)
    plain = classification_transform(64, train=True, auto_augment=None, re_prob=0.0, color_jitter=0.0)
    z = plain(square)
    assert z.min() >= -1 - 1e-6 and z.max() <= 1 + 1e-6
    for bad in (dict(img_size=0, train=True), dict(img_size=64, train=False, crop_pct=1.5)):
        with pytest.raises(ValueError):
            classification_transform(**bad)


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    # rand-m9-mstd0.5-inc1 reaches magnitude 10 = 0 bits kept: Pillow >= 11 raises there, the recipe's Pillow gave
    # black.
    import numpy as np
    import timm.data.auto_augment as aa
    from PIL import Image

    classification_transform(64, True)
    op = aa.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert np.asarray(op(Image.new("RGB", (8, 8), (200, 100, 50)))).max() == 0
    kept = aa.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=0)(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert np.asarray(kept).max() == 192  # 4 bits kept: 200 -> 192
