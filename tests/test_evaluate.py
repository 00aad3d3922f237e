"""The shared evaluation loop (train/evaluate.py): scores against a direct torch computation, uneven batches, several
heads, the reduction over ranks, bad labels, per-class accuracy, the report and the confusion-matrix plot."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from beit_fast.train.evaluate import EvalResult, evaluate, format_report, plot_confusion

CPU = torch.device("cpu")


def _data(n=37, num_classes=7, heads=1, seed=0, empty_class=None):
    """Images are their own index (a (n, 1) tensor), so the forward looks up precomputed logits."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    if empty_class is not None:
        labels[labels == empty_class] = (empty_class + 1) % num_classes
    logits = torch.randn(heads, n, num_classes, generator=g) * 2
    logits[:, torch.arange(n), labels] += 1.5  # better than chance, not perfect
    return torch.arange(n).float()[:, None], labels, logits


def _batches(images, labels, sizes):
    assert sum(sizes) == len(labels)
    out, i = [], 0
    for s in sizes:
        out.append((images[i:i + s], labels[i:i + s]))
        i += s
    return out


def _reference(logits, labels, num_classes):
    k = min(5, num_classes)
    top = logits.topk(k, dim=1).indices
    pred = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        confusion[t, p] += 1
    return {"top1": (pred == labels).double().mean().item(),
            "top5": (top == labels[:, None]).any(dim=1).double().mean().item(),
            "loss": F.cross_entropy(logits.double(), labels).item(), "confusion": confusion}


def _check(result, ref, n):
    assert isinstance(result, EvalResult)
    assert result.count == n
    assert result.top1 == pytest.approx(ref["top1"], abs=1e-12)
    assert result.top5 == pytest.approx(ref["top5"], abs=1e-12)
    assert result.loss == pytest.approx(ref["loss"], rel=1e-6)
    assert result.confusion.dtype == torch.int64 and result.confusion.device.type == "cpu"
    assert torch.equal(result.confusion, ref["confusion"])


@pytest.mark.parametrize("num_classes", [7, 3])  # 3 < 5: top-k with k = C, so top-5 is 1
def test_matches_torch_over_uneven_batches(num_classes):
    images, labels, logits = _data(num_classes=num_classes)
    table = logits[0].to(torch.bfloat16)  # a low-precision forward: the loss is still computed in fp32
    assert all(len(set(row)) == num_classes for row in table.tolist())  # no ties: the top-1 class is unambiguous

    def forward(x):
        return table[x[:, 0].long()]

    result = evaluate(forward, _batches(images, labels, [16, 1, 13, 7]), num_classes=num_classes, device=CPU)
    _check(result, _reference(table.float(), labels, num_classes), len(labels))
    if num_classes < 5:
        assert result.top5 == 1.0
    else:
        assert result.top1 < result.top5 < 1.0  # the data exercises both scores, not a trivial 0 or 1


def test_list_of_heads_gives_one_result_per_head():
    images, labels, logits = _data(heads=3)

    def forward(x):
        return [logits[h][x[:, 0].long()] for h in range(3)]

    results = evaluate(forward, _batches(images, labels, [10, 20, 7]), num_classes=7, device=CPU)
    assert isinstance(results, list) and len(results) == 3
    for h, r in enumerate(results):
        _check(r, _reference(logits[h], labels, 7), len(labels))
    assert len({r.top1 for r in results}) > 1  # the heads really differ: no head's numbers were reused

    one = evaluate(lambda x: [logits[0][x[:, 0].long()]], _batches(images, labels, [37]), num_classes=7, device=CPU)
    assert isinstance(one, list) and len(one) == 1  # a list of one head stays a list


def test_reduce_sum_over_two_ranks_equals_one_process():
    images, labels, logits = _data(n=41)

    def forward(x):
        return logits[0][x[:, 0].long()]

    shards = [_batches(images[:23], labels[:23], [8, 8, 7]), _batches(images[23:], labels[23:], [9, 9])]
    calls = []

    def rank1_packed():
        # what rank 1 would contribute to the all-reduce: its own evaluation's packed tensor
        seen = []
        evaluate(forward, shards[1], num_classes=7, device=CPU, reduce_sum=lambda t: seen.append(t.clone()) or t)
        return seen[0]

    other = rank1_packed()

    def all_reduce(t):
        calls.append(t)
        return t + other

    result = evaluate(forward, shards[0], num_classes=7, device=CPU, reduce_sum=all_reduce)
    assert len(calls) == 1 and calls[0].dtype == torch.float64  # one packed tensor, one reduction
    _check(result, _reference(logits[0], labels, 7), len(labels))


def test_empty_shard_joins_the_reduction():
    images, labels, logits = _data(n=12)

    def forward(x):
        return logits[0][x[:, 0].long()]

    full = []
    evaluate(forward, _batches(images, labels, [12]), num_classes=7, device=CPU,
             reduce_sum=lambda t: full.append(t.clone()) or t)
    result = evaluate(forward, [], num_classes=7, device=CPU, reduce_sum=lambda t: t + full[0])
    _check(result, _reference(logits[0], labels, 7), 12)
    with pytest.raises(ValueError, match="no image"):
        evaluate(forward, [], num_classes=7, device=CPU)

    # padding forwards (ZeRO-3 keeps ranks in step): forwarded, not scored, and they give the head count
    calls = []

    def heads(x):
        calls.append(len(x))
        return [logits[0][x[:, 0].long()]] * 2

    probe = []
    evaluate(heads, _batches(images, labels, [12]), num_classes=7, device=CPU,
             reduce_sum=lambda t: probe.append(t.clone()) or t)
    padding = [(images[:4], torch.zeros(0, dtype=torch.int64))] * 2
    results = evaluate(heads, padding, num_classes=7, device=CPU, reduce_sum=lambda t: t + probe[0])
    assert calls == [12, 4, 4] and len(results) == 2
    _check(results[1], _reference(logits[0], labels, 7), 12)


@pytest.mark.parametrize("bad", [7, -1])
def test_label_out_of_range_names_it(bad):
    images, labels, logits = _data(n=20)
    labels = labels.clone()
    labels[13] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is out of range \[0, 7\)"):
        evaluate(lambda x: logits[0][x[:, 0].long()], _batches(images, labels, [10, 10]), num_classes=7, device=CPU)


def test_bad_label_on_another_rank_raises_here_too():
    images, labels, logits = _data(n=20)
    labels = labels.clone()
    labels[15] = 9

    def forward(x):
        return logits[0][x[:, 0].long()]

    seen = []
    with pytest.raises(ValueError, match="label 9 is out of range"):  # rank 1 holds the bad label
        evaluate(forward, _batches(images[10:], labels[10:], [10]), num_classes=7, device=CPU,
                 reduce_sum=lambda t: seen.append(t.clone()) or t)
    with pytest.raises(ValueError, match="another process"):  # rank 0 raises as well instead of going on alone
        evaluate(forward, _batches(images[:10], labels[:10], [10]), num_classes=7, device=CPU,
                 reduce_sum=lambda t: t + seen[0])


def test_bad_arguments():
    images, labels, logits = _data(n=8)
    batches = _batches(images, labels, [8])
    with pytest.raises(ValueError, match="bf16=True needs a CUDA device"):
        evaluate(lambda x: logits[0][x[:, 0].long()], batches, num_classes=7, device=CPU, bf16=True)
    with pytest.raises(ValueError, match=r"shape \(8, 7\), expected \(8, 5\)"):
        evaluate(lambda x: logits[0][x[:, 0].long()], batches, num_classes=5, device=CPU)
    with pytest.raises(ValueError, match="integer class indices"):
        evaluate(lambda x: logits[0][x[:, 0].long()], [(images, labels.float())], num_classes=7, device=CPU)


def test_per_class_accuracy_nan_for_an_empty_class_and_to_dict():
    images, labels, logits = _data(n=30, num_classes=5, empty_class=2)
    result = evaluate(lambda x: logits[0][x[:, 0].long()], _batches(images, labels, [30]), num_classes=5, device=CPU)
    acc = result.per_class_accuracy()
    assert acc.shape == (5,) and math.isnan(acc[2])
    conf = result.confusion
    for c in (0, 1, 3, 4):
        assert acc[c].item() == pytest.approx(conf[c, c].item() / conf[c].sum().item())
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["per_class_accuracy"][2] is None and d["count"] == 30 and "confusion" not in d
    assert d["top1"] == result.top1


def test_format_report_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    names = ["circle", "square", "triangle", "star", "ring"]
    images, labels, logits = _data(n=30, num_classes=5, empty_class=2)
    result = evaluate(lambda x: logits[0][x[:, 0].long()], _batches(images, labels, [30]), num_classes=5, device=CPU)
    text = format_report(result, names)
    for name in names:
        assert name in text
    assert f"top-1  {result.top1:.4f}" in text and "count  30" in text
    c0 = int(result.confusion[0, 0])
    assert f"({c0}/{int(result.confusion[0].sum())})" in text and "(0/0)" in text
    with pytest.raises(ValueError, match="3 class names for a 5-class result"):
        format_report(result, names[:3])

    png = plot_confusion(result.confusion, tmp_path / "plots" / "confusion.png", names, title="test")
    assert png == tmp_path / "plots" / "confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["confusion.png"]  # no temporary file left


@pytest.mark.gpu
def test_cuda_no_sync_per_batch_and_bf16():
    import warnings

    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    n, num_classes = 96, 10
    images, labels = torch.randn(n, 16, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    model = torch.nn.Linear(16, num_classes)
    cpu = evaluate(model, _batches(images, labels, [40, 56]), num_classes=num_classes, device=CPU)
    model = model.to(cuda)

    def syncs(sizes, bf16=False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = evaluate(model, _batches(images, labels, sizes), num_classes=num_classes, device=cuda,
                                  bf16=bf16)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return result, sum("synchroniz" in str(w.message) for w in caught)

    few, n_few = syncs([40, 56])
    many, n_many = syncs([16] * 6)
    assert n_many == n_few  # the syncs are the final read's, not one per batch
    for r in (few, many):
        assert r.count == n and r.top1 == pytest.approx(cpu.top1) and r.loss == pytest.approx(cpu.loss, rel=1e-4)
        assert torch.equal(r.confusion, cpu.confusion)
    low, _ = syncs([40, 56], bf16=True)
    assert low.count == n and low.loss == pytest.approx(cpu.loss, abs=0.05)

    bad = labels.clone()
    bad[50] = num_classes
    with pytest.raises(ValueError, match=f"label {num_classes} is out of range"):  # labels already on the device
        evaluate(model, [(images.to(cuda), bad.to(cuda))], num_classes=num_classes, device=cuda)
