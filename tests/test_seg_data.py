"""Segmentation data: the three layouts and their up-front checks, ADE20K's reduce_zero_label, the builtin split,
mmseg's train / eval pipelines (geometry in OpenCV's arithmetic, cat_max_ratio, padding, HSV), per-sample determinism
and seg_collate."""

import numpy as np
import pytest
import torch
from PIL import Image

from beit_fast.data import BuiltinShapes
from beit_fast.seg_data import (
    ADE20K_CLASSES,
    BUILTIN_SEGMENTATION_SEED,
    SegEvalTransform,
    SegmentationDataError,
    SegmentationDataset,
    SegTrainTransform,
    _hsv_to_rgb,
    _nearest_index,
    _rescale_size,
    _resize_bilinear,
    _rgb_to_hsv,
    build_segmentation_data,
    default_scales,
    seg_collate,
)


def _pair(root, image_dir, label_dir, name, label, image_size=None, ext=".png"):
    """root/image_dir/<name><ext> (an RGB image, `image_size` (w, h) or the label's) and root/label_dir/<name>.png."""
    h, w = label.shape
    iw, ih = image_size or (w, h)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / label_dir).mkdir(parents=True, exist_ok=True)
    rgb = (np.arange(ih * iw * 3).reshape(ih, iw, 3) * 7 % 256).astype(np.uint8)
    Image.fromarray(rgb).save(root / image_dir / f"{name}{ext}")
    Image.fromarray(label.astype(np.uint8), mode="L").save(root / label_dir / f"{name}.png")


def _generic(root, num_train=2, num_val=1, value=1, classes=None):
    for side, n in (("train", num_train), ("val", num_val)):
        for i in range(n):
            _pair(root, f"images/{side}", f"labels/{side}", f"im{i}", np.full((6, 8), value, np.uint8))
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# -- layouts and checks ----------------------------------------------------------------------------------------------
def test_generic_folder_pairs_by_name_and_reads_class_ids(tmp_path):
    _generic(tmp_path, num_train=3)
    label = np.array([[0, 1, 2, 255]] * 3, np.uint8)
    _pair(tmp_path, "images/train/sub", "labels/train/sub", "deep", label, ext=".jpg")
    d = build_segmentation_data(str(tmp_path), num_classes=3)
    assert d.layout == "generic" and d.classes == ["0", "1", "2"] and d.num_classes == 3 and not d.reduce_zero_label
    assert len(d.train) == 4 and len(d.val) == 1 and d.ignore_index == 255
    i = d.train.names.index("sub/deep.jpg")
    image, got = d.train[i]
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(got, label)  # 255 is the ignore index, not an error


def test_pairing_errors_name_the_file(tmp_path):
    _generic(tmp_path)
    (tmp_path / "images/train/lonely.png").write_bytes((tmp_path / "images/train/im0.png").read_bytes())
    with pytest.raises(SegmentationDataError, match=r"image .*lonely\.png has no label .*lonely\.png"):
        build_segmentation_data(str(tmp_path), num_classes=2)
    (tmp_path / "images/train/lonely.png").unlink()
    (tmp_path / "labels/val/orphan.png").write_bytes((tmp_path / "labels/val/im0.png").read_bytes())
    with pytest.raises(SegmentationDataError, match=r"label .*orphan\.png has no image"):
        build_segmentation_data(str(tmp_path), num_classes=2)


def test_size_mismatch_value_out_of_range_and_unreadable_files(tmp_path):
    _generic(tmp_path)
    _pair(tmp_path, "images/val", "labels/val", "wide", np.zeros((6, 8), np.uint8), image_size=(9, 6))
    with pytest.raises(SegmentationDataError, match=r"wide\.png is 9x6 but its label .*wide\.png is 8x6"):
        build_segmentation_data(str(tmp_path), num_classes=2)
    _pair(tmp_path, "images/val", "labels/val", "wide", np.full((6, 8), 7, np.uint8))
    with pytest.raises(SegmentationDataError, match=r"label .*wide\.png has value 7: class ids are 0\.\.1"):
        build_segmentation_data(str(tmp_path), num_classes=2)
    (tmp_path / "labels/val/wide.png").write_bytes(b"not a png")
    with pytest.raises(SegmentationDataError, match=r"cannot read label .*wide\.png"):
        build_segmentation_data(str(tmp_path), num_classes=2)
    # An RGB label is refused (class ids are one channel), naming the file.
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "labels/val/wide.png")
    with pytest.raises(SegmentationDataError, match=r"label .*wide\.png has mode RGB"):
        build_segmentation_data(str(tmp_path), num_classes=2)


def test_load_time_checks_catch_what_the_headers_cannot(tmp_path):
    _generic(tmp_path)
    # A bad value with check=False, and an image whose header reads but whose pixels are cut off.
    _pair(tmp_path, "images/val", "labels/val", "im0", np.full((6, 8), 9, np.uint8))
    d = build_segmentation_data(str(tmp_path), num_classes=2, check=False)
    with pytest.raises(SegmentationDataError, match=r"label .*im0\.png has value 9"):
        d.val[0]
    path = tmp_path / "images/train/im1.png"
    path.write_bytes(path.read_bytes()[:-40])
    d = build_segmentation_data(str(tmp_path), num_classes=2, check=False)
    with pytest.raises(SegmentationDataError, match=r"cannot read image .*im1\.png"):
        d.train[1]


def test_empty_split_missing_folder_and_class_count(tmp_path):
    _generic(tmp_path, num_val=0)
    (tmp_path / "images/val").mkdir(parents=True)
    (tmp_path / "labels/val").mkdir(parents=True)
    with pytest.raises(SegmentationDataError, match=r"no images in .*images/val"):
        build_segmentation_data(str(tmp_path), num_classes=2)
    with pytest.raises(FileNotFoundError):
        build_segmentation_data(str(tmp_path / "nope"), num_classes=2)
    other = _generic(tmp_path / "b")
    with pytest.raises(SegmentationDataError, match="--num-classes"):
        build_segmentation_data(str(other))
    with pytest.raises(SegmentationDataError, match="ignore_index 1 is a class id"):
        build_segmentation_data(str(other), num_classes=2, ignore_index=1)
    (tmp_path / "c").mkdir()
    with pytest.raises(SegmentationDataError, match="not a segmentation folder"):
        build_segmentation_data(str(tmp_path / "c"))


def test_classes_txt_names_and_counts_the_classes(tmp_path):
    _generic(tmp_path, classes=["sky", "road", "car"])
    d = build_segmentation_data(str(tmp_path))
    assert d.classes == ["sky", "road", "car"] and d.num_classes == 3
    assert build_segmentation_data(str(tmp_path), num_classes=3).classes == ["sky", "road", "car"]
    with pytest.raises(SegmentationDataError, match=r"classes\.txt names 3 classes but num_classes is 4"):
        build_segmentation_data(str(tmp_path), num_classes=4)


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    raw = np.array([[0, 1, 150, 255], [2, 3, 4, 5]], np.uint8)
    for side in ("training", "validation"):
        _pair(tmp_path, f"images/{side}", f"annotations/{side}", "ADE_0001", raw, ext=".jpg")
    d = build_segmentation_data(str(tmp_path))
    assert d.layout == "ade20k" and d.reduce_zero_label and d.num_classes == 150 and d.ignore_index == 255
    assert d.classes == list(ADE20K_CLASSES) and d.classes[0] == "wall" and d.classes[149] == "flag"
    image, label = d.train[0]
    assert d.train.names == ["ADE_0001.jpg"] and image.shape == (2, 4, 3)
    np.testing.assert_array_equal(label, [[255, 0, 149, 255], [1, 2, 3, 4]])  # 0 -> ignore, k -> k - 1
    # Without the reduction 0 is a class of its own, "other".
    plain = build_segmentation_data(str(tmp_path), reduce_zero_label=False)
    assert plain.num_classes == 151 and plain.classes[0] == "other"
    np.testing.assert_array_equal(plain.val[0][1], raw)
    _pair(tmp_path, "images/validation", "annotations/validation", "ADE_0002", np.full((2, 4), 151, np.uint8))
    with pytest.raises(SegmentationDataError, match=r"ADE_0002\.png has value 151 \(150 after reduce_zero_label\)"):
        build_segmentation_data(str(tmp_path))


def test_builtin_classes_split_and_maps():
    d = build_segmentation_data("builtin", num_images=8, image_size=32)
    assert d.layout == "builtin" and d.num_classes == 9 and d.classes[0] == "background"
    assert len(d.train) == 8 and len(d.val) == 64  # val: max(64, num_images // 4)
    assert len(build_segmentation_data("builtin", num_images=400, image_size=32).val) == 100
    base = BuiltinShapes(8 + 64, 32, seed=BUILTIN_SEGMENTATION_SEED)
    for source, offset in ((d.train, 0), (d.val, 8)):
        for i in (0, 3):
            image, label = source[i]
            ref_image, cls, ref_seg = base.sample(offset + i)
            np.testing.assert_array_equal(image, ref_image)
            np.testing.assert_array_equal(label, ref_seg)
            # 0 is the background, c + 1 the shapes of class c; the labelled main shape is drawn on top.
            assert (label == 0).any() and (label == cls + 1).any() and label.max() < 9
            assert d.classes[cls + 1] == base.classes[cls]
    assert d.train.names[0] == "builtin:0" and d.val.names[0] == "builtin:8"


# -- transforms ------------------------------------------------------------------------------------------------------
def test_rescale_size_is_mmcvs_keep_ratio_rule():
    assert _rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert _rescale_size(500, 375, (2048, 512)) == (683, 512)  # short side to 512
    assert _rescale_size(2000, 400, (2048, 512)) == (2048, 410)  # long side bound: 400 * 1.024 = 409.6 -> 410
    assert default_scales(512) == (2048, 512) and default_scales(64) == (256, 64)


def test_opencv_resize_arithmetic():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    same = _resize_bilinear(img, 20, 30)
    assert np.shares_memory(same, img) and np.array_equal(same, img)  # nothing to resize: no copy
    # Exact 2x downscale: OpenCV's linear weights are 1/2, 1/2 and its rounding gives (a + b + c + d + 2) >> 2.
    quad = img.astype(np.int64).reshape(10, 2, 15, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(_resize_bilinear(img, 10, 15), (quad + 2) >> 2)
    # A window is the same pixels as the whole resize cropped.
    full = _resize_bilinear(img, 47, 61)
    np.testing.assert_array_equal(_resize_bilinear(img, 47, 61, (5, 9, 30, 40)), full[5:35, 9:49])
    # Upscaling keeps flat regions flat and stays within the source's range.
    assert (_resize_bilinear(np.full((5, 5, 3), 77, np.uint8), 13, 11) == 77).all()
    # Nearest: source pixel floor(x * src / dst), clamped.
    np.testing.assert_array_equal(_nearest_index(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(_nearest_index(9, 3), [0, 3, 6])


def test_opencv_hsv_round_trip():
    pure = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90], [255, 255, 0]]], np.uint8)
    hsv = _rgb_to_hsv(pure.transpose(2, 0, 1)).transpose(1, 2, 0)
    np.testing.assert_array_equal(hsv[0], [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 90], [30, 255, 255]])
    np.testing.assert_array_equal(_hsv_to_rgb(hsv.transpose(2, 0, 1)).transpose(1, 2, 0), pure)
    rgb = np.random.default_rng(1).integers(0, 256, (3, 40, 40), dtype=np.uint8)
    back = _hsv_to_rgb(_rgb_to_hsv(rgb)).astype(int)
    assert np.abs(back - rgb).max() <= 8  # hue is kept in 2-degree steps: a round trip loses a little


def test_matches_opencv_where_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for h, w in ((80, 111), (19, 26), (37, 29)):
        ref = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(_resize_bilinear(img, h, w), ref)
    planar = rng.integers(0, 256, (3, 16, 64), dtype=np.uint8)  # 64 wide: no scalar tail in OpenCV's loop
    hsv = _rgb_to_hsv(planar)
    np.testing.assert_array_equal(hsv.transpose(1, 2, 0), cv2.cvtColor(planar.transpose(1, 2, 0), cv2.COLOR_RGB2HSV))
    np.testing.assert_array_equal(_hsv_to_rgb(hsv).transpose(1, 2, 0),
                                  cv2.cvtColor(hsv.transpose(1, 2, 0), cv2.COLOR_HSV2RGB))


def test_train_transform_shapes_padding_and_labels():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (24, 40)).astype(np.uint8)
    label[:3] = 255
    t = SegTrainTransform(32, scale=default_scales(32), cat_max_ratio=1.0)
    for seed in range(5):
        np.random.seed(seed)
        x, y = t(image, label)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest: no invented classes
    # No resize (scale = the image's own), a crop larger than the image: the rest is padding.
    image, label = image[:, :30], label[:, :30]
    t = SegTrainTransform(32, scale=(30, 24), ratio_range=None, cat_max_ratio=1.0, flip_prob=0.0, photometric=False)
    x, y = t(image, label)
    assert (y[24:] == 255).all() and (y[:, 30:] == 255).all() and (x[:, 24:] == 0).all() and (x[:, :, 30:] == 0).all()
    np.testing.assert_array_equal(y[:24, :30].numpy(), label)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    ref = (torch.from_numpy(image).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(x[:, :24, :30], ref, atol=1e-5, rtol=0)
    # Flip 1.0 mirrors image and label together.
    t.flip_prob = 1.0
    xf, yf = t(image, label)
    torch.testing.assert_close(xf[:, :24, :30], ref.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(yf[:24, :30], torch.from_numpy(label).long().flip(-1))


def test_cat_max_ratio_redraws_crops_one_class_dominates():
    # 64 x 64 of class 1 with a 16 x 64 band of class 2 at the top: a 16 x 16 crop is mixed (both classes, the larger
    # under 75%) only when it starts in rows 5..11 - 7 of 49 offsets. mmseg re-draws up to 10 times.
    label = np.ones((64, 64), np.uint8)
    label[:16] = 2
    image = np.zeros((64, 64, 3), np.uint8)

    def mixed_share(cat_max_ratio):
        t = SegTrainTransform(16, scale=(64, 64), ratio_range=None, cat_max_ratio=cat_max_ratio, flip_prob=0.0,
                              photometric=False)
        mixed = 0
        for seed in range(200):
            np.random.seed(seed)
            _, y = t(image, label)
            counts = torch.bincount(y.flatten())[1:3]
            mixed += int((counts > 0).all() and counts.max() / counts.sum() < 0.75)
        return mixed / 200

    once, redrawn = mixed_share(1.0), mixed_share(0.75)
    # One draw: 1/7 chance; eleven draws: 1 - (6/7)^11 = 82%.
    assert 0.05 < once < 0.25 and 0.7 < redrawn < 0.95, (once, redrawn)


def test_eval_transform_resizes_the_image_only():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (40, 60)).astype(np.uint8)
    x, y = SegEvalTransform(scale=(120, 30))(image, label)  # factor min(120 / 60, 30 / 40) = 0.75
    assert x.shape == (3, 30, 45) and x.dtype == torch.float32
    assert y.shape == (40, 60) and y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(label).long())


def test_dataset_is_deterministic_per_sample_and_varies_over_epochs():
    d = build_segmentation_data("builtin", num_images=4, image_size=32)
    ds = SegmentationDataset(d.train, SegTrainTransform(32, scale=default_scales(32)), seed=5)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a, b = ds[(0, 2)], ds[(0, 2)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (np.random.get_state()[1] == state).all()  # the global generator is restored
    others = [ds[(epoch, 2)] for epoch in (1, 2, 3)] + [SegmentationDataset(d.train, ds.transform, seed=6)[(0, 2)]]
    assert all(not torch.equal(a[0], o[0]) for o in others)


def test_seg_collate_stacks_or_pads_with_the_ignore_index():
    same = [(torch.ones(3, 4, 4), torch.zeros(4, 4, dtype=torch.long)) for _ in range(2)]
    images, labels = seg_collate(same)
    assert images.shape == (2, 3, 4, 4) and labels.shape == (2, 4, 4)
    mixed = [(torch.ones(3, 4, 6), torch.full((8, 12), 2)), (torch.ones(3, 5, 3), torch.full((10, 6), 1))]
    images, labels, sizes = seg_collate(mixed, return_sizes=True)
    assert images.shape == (2, 3, 5, 6) and labels.shape == (2, 10, 12)
    assert (images[0, :, 4:] == 0).all() and (images[1, :, :, 3:] == 0).all() and (images[1, :, :5, :3] == 1).all()
    assert (labels[0, 8:] == 255).all() and (labels[1, :, 6:] == 255).all() and (labels[1, :10, :6] == 1).all()
    assert sizes.tolist() == [[4, 6, 8, 12], [5, 3, 10, 6]]
    assert (seg_collate(mixed, ignore_index=-1)[1][0, 8:] == -1).all()


def test_builtin_ignore_index_pads_crops():
    d = build_segmentation_data("builtin", num_images=4, image_size=16, ignore_index=99)
    assert d.ignore_index == 99 and d.train.ignore_index == 99
    t = SegTrainTransform(24, scale=(16, 16), ratio_range=None, ignore_index=d.ignore_index)
    np.random.seed(0)
    _, y = t(*d.train[0])
    assert (y[16:] == 99).all() and (y[:16, :16] < 9).all()
    with pytest.raises(SegmentationDataError, match="ignore_index 3 is a class id"):
        build_segmentation_data("builtin", num_images=4, image_size=16, ignore_index=3)


def test_loaders_with_the_shared_samplers(tmp_path):
    from beit_fast.data import ShardedEvalSampler, StepBatchSampler

    for side in ("train", "val"):
        for i, (h, w) in enumerate([(12, 20), (20, 12), (16, 16)]):
            _pair(tmp_path, f"images/{side}", f"labels/{side}", f"im{i}", np.full((h, w), i % 2, np.uint8))
    d = build_segmentation_data(str(tmp_path), num_classes=2)
    train = SegmentationDataset(d.train, SegTrainTransform(16, scale=default_scales(16)), seed=0)
    loader = torch.utils.data.DataLoader(train, batch_sampler=StepBatchSampler(len(train), 2, seed=0),
                                         collate_fn=seg_collate)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 16, 16) and labels.shape == (2, 16, 16)
    val = SegmentationDataset(d.val, SegEvalTransform(scale=default_scales(16)))
    loader = torch.utils.data.DataLoader(val, batch_sampler=ShardedEvalSampler(len(val), 3),
                                         collate_fn=lambda b: seg_collate(b, d.ignore_index, return_sizes=True))
    images, labels, sizes = next(iter(loader))
    # Short side to 16: (12, 20) -> (16, 27), (20, 12) -> (27, 16); labels keep their own sizes.
    assert sizes.tolist() == [[16, 27, 12, 20], [27, 16, 20, 12], [16, 16, 16, 16]]
    assert images.shape == (3, 3, 27, 27) and labels.shape == (3, 20, 20)
