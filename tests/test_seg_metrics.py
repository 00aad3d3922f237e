"""Segmentation evaluation (train/evaluate.py: evaluate_segmentation and friends): mmseg's IoU / Acc / mIoU / mAcc /
aAcc against a hand-computed confusion matrix and a transcription of mmseg's per-image histograms, the ignore index,
logits upsampled to the label size, bad labels, the one reduction over ranks, padding batches, the report and the
overlay plot."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from beit_fast.train.evaluate import SegEvalResult, evaluate_segmentation, format_seg_report, plot_segmentation

CPU = torch.device("cpu")
IGNORE = 255

# 5 classes, one image 3x4; class 3 is predicted but never labelled, class 4 is neither labelled nor predicted.
# The two ignored pixels are predicted as 3: they must not count.
LABEL = torch.tensor([[0, 0, 1, IGNORE],
                      [0, 1, 1, IGNORE],
                      [2, 2, 0, 0]], dtype=torch.uint8)
PRED = torch.tensor([[0, 1, 1, 3],
                     [0, 1, 3, 3],
                     [2, 0, 0, 3]])
# (true, predicted) over the 10 labelled pixels, counted by hand
HAND_CONFUSION = torch.tensor([[3, 1, 0, 1, 0],
                               [0, 2, 0, 1, 0],
                               [1, 0, 1, 0, 0],
                               [0, 0, 0, 0, 0],
                               [0, 0, 0, 0, 0]])


def _one_hot_forward(preds):
    """A forward whose logits argmax to `preds[i]` for the image holding index i (images are (B, 3, 1, 1))."""
    def forward(x):
        p = preds[x[:, 0, 0, 0].long()]
        return F.one_hot(p, 5).permute(0, 3, 1, 2).float() * 4 - 2
    return forward


def _index_images(n):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 1, 1)


def _mmseg_areas(preds, labels, num_classes, ignore_index):
    """mmseg 0.x `intersect_and_union` per image (masked histograms), summed as `total_intersect_and_union`."""
    total = torch.zeros(4, num_classes, dtype=torch.float64)
    for pred, label in zip(preds, labels):
        mask = label != ignore_index
        pred, label = pred[mask].float(), label[mask].float()
        intersect = pred[pred == label]
        hist = [torch.histc(t, bins=num_classes, min=0, max=num_classes - 1) for t in (intersect, pred, label)]
        total += torch.stack([hist[0], hist[1] + hist[2] - hist[0], hist[1], hist[2]]).double()
    return total  # intersect, union, pred, label


def test_metrics_match_a_hand_computed_confusion_matrix():
    result = evaluate_segmentation(_one_hot_forward(PRED[None]), [(_index_images(1), LABEL[None])], num_classes=5,
                                   device=CPU)
    assert result.confusion.dtype == torch.int64 and result.confusion.device.type == "cpu"
    assert torch.equal(result.confusion, HAND_CONFUSION)
    assert result.pixels == 10 and result.images == 1
    assert result.area_intersect.tolist() == [3, 2, 1, 0, 0]
    assert result.area_label.tolist() == [5, 3, 2, 0, 0]
    assert result.area_pred.tolist() == [4, 3, 1, 2, 0]
    assert result.area_union.tolist() == [6, 4, 2, 2, 0]
    iou, acc = result.iou.tolist(), result.acc.tolist()
    assert iou[:4] == [0.5, 0.5, 0.5, 0.0] and math.isnan(iou[4])  # class 3: predicted, never labelled -> 0
    assert acc[:3] == pytest.approx([3 / 5, 2 / 3, 1 / 2]) and math.isnan(acc[3]) and math.isnan(acc[4])
    # class 4 (absent from both) is left out of the mean, class 3 (IoU 0) counts: 1.5 / 4, not 1.5 / 5 or 1.5 / 3
    assert result.miou == pytest.approx(1.5 / 4, abs=1e-15)
    assert result.macc == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 3, abs=1e-15)
    assert result.aacc == pytest.approx(6 / 10, abs=1e-15)
    # the same numbers as mmseg's masked histograms
    intersect, union, pred, label = _mmseg_areas(PRED[None], LABEL[None].long(), 5, IGNORE)
    assert torch.equal(result.area_union, union) and torch.equal(result.area_pred, pred)
    summary = result.to_dict()
    json.dumps(summary)
    assert summary["iou"][3] == 0.0 and summary["iou"][4] is None and summary["acc"][3] is None
    assert summary["miou"] == result.miou and summary["pixels"] == 10


def test_low_resolution_logits_are_upsampled_to_the_label_size_over_uneven_batches():
    g = torch.Generator().manual_seed(0)
    C, H, W, n = 6, 13, 17, 7
    logits = torch.randn(n, C, 4, 5, generator=g)  # an awkward 13/4 x 17/5 scale
    labels = torch.randint(0, C, (n, H, W), generator=g)
    labels[torch.rand(n, H, W, generator=g) < 0.2] = IGNORE
    expected = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False).argmax(dim=1)
    assert not torch.equal(expected, F.interpolate(logits, size=(H, W), mode="nearest").argmax(dim=1))
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8)
    batches = [(images[:3], labels[:3]), (images[3:4], labels[3:4]), (images[4:], labels[4:])]
    result = evaluate_segmentation(lambda x: logits[x[:, 0, 0, 0].long()], batches, num_classes=C, device=CPU,
                                   keep=5)
    mask = labels != IGNORE
    reference = torch.zeros(C, C, dtype=torch.int64)
    for t, p in zip(labels[mask].tolist(), expected[mask].tolist()):
        reference[t, p] += 1
    assert torch.equal(result.confusion, reference)
    assert result.pixels == int(mask.sum()) and result.images == n
    intersect, union, _, area = _mmseg_areas(expected, labels, C, IGNORE)
    assert torch.allclose(result.iou, intersect / union) and torch.allclose(result.acc, intersect / area)
    # the first 5 samples across batch boundaries: (image as fed, label, full-resolution prediction)
    assert len(result.samples) == 5
    for i, (image, label, pred) in enumerate(result.samples):
        assert torch.equal(image, images[i]) and torch.equal(label, labels[i]) and torch.equal(pred, expected[i])


def test_reduce_sum_is_called_once_with_float64_and_sums_ranks():
    calls = []

    def two_identical_ranks(t):
        calls.append(t)
        return t * 2

    batches = [(_index_images(1), LABEL[None]), (_index_images(0), torch.zeros(0, dtype=torch.long))]
    result = evaluate_segmentation(_one_hot_forward(PRED[None]), batches, num_classes=5, device=CPU,
                                   reduce_sum=two_identical_ranks)
    assert len(calls) == 1 and calls[0].dtype == torch.float64 and calls[0].dim() == 1
    assert torch.equal(result.confusion, 2 * HAND_CONFUSION)
    assert result.images == 2 and result.pixels == 20
    assert result.miou == pytest.approx(1.5 / 4) and result.aacc == pytest.approx(0.6)


def test_padding_batches_are_forwarded_but_not_scored():
    seen = []
    forward = _one_hot_forward(PRED[None])

    def counting(x):
        seen.append(x.shape[0])
        return forward(x)

    empty = torch.zeros(0, dtype=torch.long)
    batches = [(_index_images(1), empty), (_index_images(1), LABEL[None]), (_index_images(1), empty)]
    result = evaluate_segmentation(counting, batches, num_classes=5, device=CPU, keep=3)
    assert seen == [1, 1, 1]
    assert torch.equal(result.confusion, HAND_CONFUSION) and result.images == 1 and len(result.samples) == 1
    with pytest.raises(ValueError, match="no image"):
        evaluate_segmentation(counting, [(_index_images(1), empty)], num_classes=5, device=CPU)


@pytest.mark.parametrize("bad", [5, 254, -1])
def test_out_of_range_label_raises_after_the_reduction(bad):
    calls = []
    label = LABEL[None].long().clone()
    label[0, 2, 1] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is out of range \[0, 5\).*1 such pixel"):
        evaluate_segmentation(_one_hot_forward(PRED[None]), [(_index_images(1), label)], num_classes=5, device=CPU,
                              reduce_sum=lambda t: calls.append(t) or t)
    assert len(calls) == 1  # every rank reaches the all-reduce before raising


def test_a_negative_ignore_index_is_not_a_bad_label():
    label = LABEL[None].long().clone()
    label[label == IGNORE] = -1
    result = evaluate_segmentation(_one_hot_forward(PRED[None]), [(_index_images(1), label)], num_classes=5,
                                   ignore_index=-1, device=CPU)
    assert torch.equal(result.confusion, HAND_CONFUSION)


def test_bad_input():
    forward = _one_hot_forward(PRED[None])
    batch = [(_index_images(1), LABEL[None])]
    with pytest.raises(ValueError, match="bf16=True needs a CUDA device"):
        evaluate_segmentation(forward, batch, num_classes=5, device=CPU, bf16=True)
    with pytest.raises(ValueError, match=r"logits \(B, C, h, w\) = \(1, 4, h, w\), got \(1, 5, 3, 4\)"):
        evaluate_segmentation(forward, batch, num_classes=4, ignore_index=255, device=CPU)
    with pytest.raises(ValueError, match="integer class indices"):
        evaluate_segmentation(forward, [(_index_images(1), LABEL[None].float())], num_classes=5, device=CPU)
    with pytest.raises(ValueError, match=r"\(B, H, W\) class maps"):
        evaluate_segmentation(forward, [(_index_images(1), LABEL)], num_classes=5, device=CPU)
    with pytest.raises(ValueError, match="no labelled pixel"):
        evaluate_segmentation(forward, [(_index_images(1), torch.full((1, 3, 4), IGNORE))], num_classes=5,
                              device=CPU)


def test_format_seg_report_shows_the_numbers():
    result = SegEvalResult(confusion=HAND_CONFUSION.clone(), images=1)
    text = format_seg_report(result, classes=["sky", "road", "car", "tree", "boat"])
    lines = text.splitlines()
    assert lines[0].split() == ["class", "IoU", "Acc"]
    assert lines[1].split() == ["sky", "50.00", "60.00"]
    assert lines[2].split() == ["road", "50.00", "66.67"]
    assert lines[4].split() == ["tree", "0.00", "nan"]
    assert lines[5].split() == ["boat", "nan", "nan"]
    i = lines.index(next(line for line in lines if line.split() == ["aAcc", "mIoU", "mAcc"]))
    assert lines[i + 1].split() == ["60.00", "37.50", "58.89"]
    assert "10 labelled pixels" in text
    with pytest.raises(ValueError, match="4 class names for a 5-class result"):
        format_seg_report(result, classes=["a", "b", "c", "d"])


def test_plot_segmentation_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 6, 8, generator=g)  # half the label's size: resized for display
    samples = [(image, LABEL.repeat(4, 2), PRED.repeat(4, 2)), (image, LABEL.repeat(4, 2), PRED.repeat(4, 2))]
    path = plot_segmentation(samples, tmp_path / "sub" / "seg.png", num_classes=5, title="val",
                             classes=["sky", "road", "car", "tree", "boat"])
    assert path == tmp_path / "sub" / "seg.png"
    assert [p.name for p in path.parent.iterdir()] == ["seg.png"]  # no temporary left behind
    one = plot_segmentation(samples[:1], tmp_path / "one.png", num_classes=5)
    with Image.open(path) as two_rows, Image.open(one) as one_row:
        assert two_rows.format == "PNG" and two_rows.width == one_row.width and two_rows.height > one_row.height
    with pytest.raises(ValueError, match="no sample"):
        plot_segmentation([], tmp_path / "x.png", num_classes=5)


@pytest.mark.gpu
def test_cuda_no_sync_per_batch_and_bf16():
    import warnings

    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    n, C = 12, 9
    images = torch.randn(n, 3, 32, 48, generator=g)
    labels = torch.randint(0, C, (n, 32, 48), generator=g, dtype=torch.uint8)
    labels[:, :2] = IGNORE
    model = torch.nn.Conv2d(3, C, kernel_size=4, stride=4)  # logits at 1/4 of the label size, upsampled

    def run(sizes, device, bf16=False):
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        batches = [(images[a:b], labels[a:b]) for a, b in zip(bounds, bounds[1:])]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                result = evaluate_segmentation(model, batches, num_classes=C, device=device, bf16=bf16)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        return result, sum("synchroniz" in str(w.message) for w in caught)

    cpu, _ = run([5, 7], CPU)
    model = model.to(cuda)
    few, n_few = run([5, 7], cuda)
    many, n_many = run([2] * 6, cuda)
    assert n_many == n_few  # the syncs are the final read's, not one per batch
    assert torch.equal(few.confusion, many.confusion)
    # CPU and CUDA interpolation may round differently: a near-tie pixel may flip, no more
    assert few.pixels == cpu.pixels and (few.confusion - cpu.confusion).abs().sum() <= cpu.pixels // 500
    low, _ = run([5, 7], cuda, bf16=True)
    assert low.pixels == cpu.pixels and abs(low.miou - cpu.miou) < 0.05

    bad = labels.clone()
    bad[3, 10, 10] = C
    with pytest.raises(ValueError, match=f"label {C} is out of range"):  # labels already on the device
        evaluate_segmentation(model, [(images.to(cuda), bad.to(cuda))], num_classes=C, device=cuda)
