"""WebDataset tar shards (issue 16): make-shards, the stream's split over ranks and workers, corrupt members, resume."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from helpers import metrics_rows, pretrain_config

from beit_fast.data import MIMDataset
from beit_fast.masking import BlockwiseMaskGenerator
from beit_fast.shards import ShardStream, count_samples, is_shard_spec, make_shards, shard_list
from beit_fast.views import FastTwoViewTransform

pytest.importorskip("webdataset")

IMG = 32


def _folder(root, n: int = 12):
    from test_views import photo

    for i in range(n):
        d = root / ("cat" if i % 3 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        photo(80, 60, i).save(d / f"{i:02d}.jpg", quality=90)
    return root


def _stream(shards, rank=0, world=1, start=0, batch=2, buffer=4):
    gen = BlockwiseMaskGenerator((IMG // 16, IMG // 16), num_masking_patches=2, min_num_patches=1)
    ds = MIMDataset(None, FastTwoViewTransform(IMG, IMG // 2), gen, seed=5, return_skipped=True)
    return ShardStream(shards, ds.make, seed=5, batch_size=batch, rank=rank, world=world, start_micro_batch=start,
                       shuffle_buffer=buffer)


def test_make_shards(tmp_path, capsys):
    from beit_fast.cli import main

    src = _folder(tmp_path / "imgs")
    assert main(["make-shards", str(src), "--out", str(tmp_path / "sh" / "s-%03d.tar"), "--max-count", "5"]) == 0
    shards = shard_list(str(tmp_path / "sh"))
    assert [s.rsplit("/", 1)[1] for s in shards] == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert count_samples(shards) == 12 and is_shard_spec(str(tmp_path / "sh"))
    assert shard_list(str(tmp_path / "sh" / "s-{000..002}.tar")) == shards
    assert is_shard_spec(str(tmp_path / "sh" / "s-{000..002}.tar")) and not is_shard_spec(str(src))
    with tarfile.open(shards[0]) as t:
        names = t.getnames()
        assert names[:2] == ["000000000.jpg", "000000000.cls"]
        assert t.extractfile("000000000.cls").read() == b"0"  # class folders sorted: cat 0, dog 1; cat's first
    assert not list((tmp_path / "sh").glob(".*.tmp"))
    assert main(["make-shards", str(src), "--out", str(tmp_path / "x.tar")]) == 2
    assert "%d-style field" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="do not exist"):
        shard_list(str(tmp_path / "sh" / "s-{000..009}.tar"))


def test_each_sample_once_per_epoch_over_2_ranks_x_2_workers(tmp_path):
    make_shards(str(_folder(tmp_path / "imgs")), str(tmp_path / "sh" / "s-%03d.tar"), max_count=3)
    shards = shard_list(str(tmp_path / "sh"))  # 4 shards of 3
    seen = []
    for rank in range(2):
        stream = _stream(shards, rank=rank, world=2)
        for worker in range(2):
            ids = [sid for epoch, sid, _ in _until_epoch(stream.samples(worker, 2), 1)]
            assert len(ids) == 3  # one shard each
            seen += ids
    assert len(seen) == len(set(seen)) == 12
    orders = [_stream(shards).worker_shards(epoch, 0, 1) for epoch in range(4)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) > 1  # reshuffled


def _until_epoch(samples, epoch):
    for item in samples:
        if item[0] >= epoch:
            return
        yield item


def test_resume_fast_forward_is_exact(tmp_path):
    make_shards(str(_folder(tmp_path / "imgs")), str(tmp_path / "sh" / "s-%03d.tar"), max_count=3)
    shards = shard_list(str(tmp_path / "sh"))
    full = iter(_stream(shards))
    straight = [next(full) for _ in range(14)]  # past an epoch (12 samples)
    resumed = iter(_stream(shards, start=3))  # 3 micro-batches of 2 done
    for a, b in zip(straight[6:], [next(resumed) for _ in range(8)]):
        assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b))
    with pytest.raises(ValueError, match="cannot feed"):
        next(iter(_stream(shards[:1], rank=1, world=2)))


def test_corrupt_member_replaced_and_reported(tmp_path):
    from test_views import photo

    path = tmp_path / "one.tar"
    with tarfile.open(path, "w") as t:
        for i, blob in enumerate([b"bad first", None, b"not a jpeg", None, None]):
            if blob is None:
                buf = io.BytesIO()
                photo(64, 48, i).save(buf, "JPEG")
                blob = buf.getvalue()
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    it = iter(_stream([str(path)], buffer=1))
    items = [next(it) for _ in range(5)]
    assert [x[4] for x in items] == [0, -1, 2, -1, -1]  # each bad sample's id reported once, by its stand-in
    assert torch.equal(items[2][0], items[1][0])  # replaced by the last good sample
    assert items[0][3] == -1 and items[0][0].float().std() < 30  # none before it: a grey stand-in


def test_pretrain_on_shards_resumes_exactly(tmp_path, monkeypatch):
    from helpers import crash_after_checkpoint

    from beit_fast.train.pretrain import pretrain

    make_shards(str(_folder(tmp_path / "imgs", 16)), str(tmp_path / "sh" / "s-%03d.tar"), max_count=4)
    data = str(tmp_path / "sh" / "s-{000..003}.tar")
    kw = dict(data=data, batch_size=4, max_steps=4, save_every=2, num_workers=2, model={"depth": 1})
    pretrain(pretrain_config(tmp_path / "straight", {}, **kw))
    crash_after_checkpoint(monkeypatch, lambda: pretrain(pretrain_config(tmp_path / "crashed", {}, **kw)), 2)
    pretrain(pretrain_config(tmp_path / "crashed", {}, resume="auto", **kw))
    a, b = metrics_rows(tmp_path / "straight"), metrics_rows(tmp_path / "crashed")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 4
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["pretrain"]["data"] == data
