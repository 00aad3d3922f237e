"""The run directory (`beit_fast.train.run`): the run lock (flock across processes, its exclusive-file fallback),
finding, checking, removing, cleaning and pruning checkpoints (with `run.checkpoint_problem`), and SignalStop.

Child processes load `run.py` straight from its file (it needs nothing but the standard library), not through the
package, which would import torch and cost seconds per process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from beit_fast.train import run
from beit_fast.train.run import MANIFEST, checkpoint_problem
from beit_fast.train.run import (
    RunDirectoryBusy,
    RunLock,
    SignalStop,
    checkpoint_dir,
    checkpoint_step,
    checkpoints,
    clean_run_directory,
    prune_checkpoints,
    remove_checkpoint,
)

HOST = socket.gethostname()
_LOAD = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('run_under_test', {str(Path(run.__file__))!r})\n"
    "run = importlib.util.module_from_spec(spec)\n"
    "sys.modules['run_under_test'] = run\n"
    "spec.loader.exec_module(run)\n"
)
# argv: out, seconds to hold, [a file to wait for before trying]. Prints "got PID" or "busy MESSAGE" (exit 3).
_TAKE = _LOAD + textwrap.dedent("""
    import os, time
    out, hold = sys.argv[1], float(sys.argv[2])
    if len(sys.argv) > 3:
        print("ready", flush=True)
        deadline = time.monotonic() + 20
        while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
            time.sleep(0.002)
    try:
        lock = run.RunLock(out).acquire()
    except run.RunDirectoryBusy as exc:
        print("busy", exc, flush=True)
        sys.exit(3)
    print("got", os.getpid(), flush=True)
    time.sleep(hold)
    lock.release()
""")


def take_in_child(out: Path, hold: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _TAKE, str(out), str(hold)], capture_output=True, text=True,
                          timeout=30)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    return p.pid


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock: RunLock falls back to `.lock.owner`, created exclusively."""

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


# -- RunLock with flock ------------------------------------------------------------------------------------------------
def test_lock_refuses_another_process_and_names_the_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        text = (tmp_path / ".lock").read_text()
        info = dict(part.split("=", 1) for part in text.split())
        assert info["pid"] == str(os.getpid()) and info["host"] == HOST
        assert abs(float(info["since"]) - time.time()) < 60
        r = take_in_child(tmp_path)
        assert r.returncode == 3, r.stdout + r.stderr
        line = r.stdout.strip()
        assert line.startswith("busy ") and "\n" not in line
        assert f"pid {os.getpid()}" in line and f"host {HOST}" in line and str(tmp_path) in line
    finally:
        lock.release()
    assert (tmp_path / ".lock").exists()  # kept: unlinking a flock'd file would let two runs lock two files
    r = take_in_child(tmp_path)
    assert r.returncode == 0 and r.stdout.split()[0] == "got", r.stdout + r.stderr
    assert (tmp_path / ".lock").read_text() == ""  # released normally: it names nobody


def test_a_killed_holder_is_reported_when_its_lock_is_taken(tmp_path, caplog):
    (tmp_path / ".lock").write_text("pid=999999 host=elsewhere since=0\n")  # what a killed run leaves
    with caplog.at_level(logging.WARNING, logger="beit_fast.pretrain"):
        with RunLock(tmp_path):
            assert f"pid={os.getpid()} " in (tmp_path / ".lock").read_text()
    assert any("ended without releasing" in r.getMessage() and "pid 999999" in r.getMessage()
               for r in caplog.records)


def test_lock_context_manager(tmp_path):
    with RunLock(tmp_path) as lock:
        assert isinstance(lock, RunLock)
        assert take_in_child(tmp_path).returncode == 3
    assert take_in_child(tmp_path).returncode == 0


def test_lock_is_exclusive_in_the_same_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()} on host"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


def test_two_concurrent_processes_exactly_one_gets_the_lock(tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _TAKE, str(tmp_path), "1.0", str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()  # both are polling for it: they try within milliseconds of each other, and the winner holds 1 s
        results = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outcomes = sorted((p.returncode, out.split()[0]) for p, (out, _) in zip(procs, results))
    assert outcomes == [(0, "got"), (3, "busy")], results


def test_lock_of_a_killed_process_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _TAKE, str(tmp_path), "60"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().split()[0] == "got"
        with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid} on host {HOST}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stderr.close()
    assert holder.returncode == -signal.SIGKILL
    with RunLock(tmp_path):  # the kernel dropped the dead holder's flock
        assert f"pid={os.getpid()} " in (tmp_path / ".lock").read_text()


# -- RunLock without flock: the owner file -----------------------------------------------------------------------------
def test_fallback_owner_file_acquire_refuse_release(tmp_path, no_flock):
    owner = tmp_path / ".lock.owner"
    lock = RunLock(tmp_path).acquire()
    assert owner.is_file()
    info = dict(part.split("=", 1) for part in owner.read_text().split())
    assert info["pid"] == str(os.getpid()) and info["host"] == HOST and float(info["since"]) > 0
    with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()} on host {HOST}") as e:
        RunLock(tmp_path).acquire()  # this process is alive: not stale
    assert "\n" not in str(e.value)
    assert owner.is_file()
    lock.release()
    assert not owner.exists()
    with RunLock(tmp_path):
        assert owner.is_file()
    assert not owner.exists()


def test_fallback_stale_owner_on_this_host_is_replaced_with_a_warning(tmp_path, no_flock, caplog):
    owner = tmp_path / ".lock.owner"
    gone = dead_pid()
    owner.write_text(f"pid={gone} host={HOST} since={time.time() - 100:.0f}\n")
    with caplog.at_level(logging.WARNING, logger="beit_fast.pretrain"):
        lock = RunLock(tmp_path).acquire()
    try:
        assert f"pid={os.getpid()} " in owner.read_text()
        warnings = [r for r in caplog.records if r.name == "beit_fast.pretrain" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "stale" in warnings[0].getMessage() and str(gone) in warnings[0].getMessage()
    finally:
        lock.release()
    assert not owner.exists()


@pytest.mark.parametrize("pid", ["alive", "dead"])
def test_fallback_owner_on_another_host_is_refused(tmp_path, no_flock, pid):
    owner = tmp_path / ".lock.owner"
    number = os.getpid() if pid == "alive" else dead_pid()  # on another host a pid cannot be checked either way
    owner.write_text(f"pid={number} host=not-{HOST} since={time.time():.0f}\n")
    with pytest.raises(RunDirectoryBusy) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg and f"pid {number} on host not-{HOST}" in msg
    assert f"delete {owner}" in msg
    assert owner.read_text().startswith(f"pid={number} host=not-{HOST}")  # left alone


def test_fallback_two_runs_replacing_the_same_stale_owner(tmp_path, no_flock, monkeypatch):
    owner = tmp_path / ".lock.owner"
    gone = dead_pid()
    owner.write_text(f"pid={gone} host={HOST} since=0\n")
    other: list = []
    real_alive = run._pid_alive

    def alive(p: int) -> bool:  # run A checks the stale pid; meanwhile run B does the same and takes the lock
        if not other:
            other.append(None)
            other.append(RunLock(tmp_path).acquire())
            assert f"pid={os.getpid()} " in owner.read_text()  # B's own owner file, not the stale one
        return real_alive(p)

    monkeypatch.setattr(run, "_pid_alive", alive)
    try:
        with pytest.raises(RunDirectoryBusy):
            RunLock(tmp_path).acquire()
    finally:
        for lock in other[1:]:
            lock.release()


# -- checkpoints and checkpoint_problem --------------------------------------------------------------------------------
def ds_checkpoint(d: Path, step: int, files: dict, manifest: dict | None = None) -> Path:
    """A DeepSpeed-like checkpoint directory: `files` {name: bytes}; `manifest` {name: size} (None: none written)."""
    p = d / f"step_{step:08d}"
    p.mkdir(parents=True)
    for name, data in files.items():
        (p / name).write_bytes(data)
    if manifest is not None:
        (p / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}))
    return p


def plain_checkpoint(d: Path, step: int, data: bytes = b"weights") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"step_{step:08d}.pt"
    p.write_bytes(data)
    return p


def test_checkpoint_step():
    assert checkpoint_step(Path("step_00000012.pt")) == 12
    assert checkpoint_step(Path("/x/checkpoints/step_00000012")) == 12
    for bad in ("step_12.pt", "step_000000012.pt", "step_00000012.pth", ".del-step_00000012.pt", "notes.txt"):
        with pytest.raises(ValueError, match="not named like a checkpoint"):
            checkpoint_step(Path(bad))


def test_checkpoints_lists_only_complete_ones_oldest_first(tmp_path):
    d = checkpoint_dir(tmp_path)
    assert d == tmp_path / "checkpoints"
    assert checkpoints(tmp_path) == []  # no checkpoint directory yet
    c2 = plain_checkpoint(d, 2)
    c3 = plain_checkpoint(d, 3, b"")
    c4 = ds_checkpoint(d, 4, {"a.pt": b"aaa", "b.pt": b"bbbbb"}, {"a.pt": 3, "b.pt": 5})
    c5 = ds_checkpoint(d, 5, {"a.pt": b"aaa"})
    c6 = ds_checkpoint(d, 6, {"a.pt": b"aaa"}, {"a.pt": 3, "b.pt": 5})
    c7 = ds_checkpoint(d, 7, {"a.pt": b"aaa", "b.pt": b"bb"}, {"a.pt": 3, "b.pt": 5})
    c8 = ds_checkpoint(d, 8, {"a.pt": b"a"}, {"a.pt": 1})
    (c8 / MANIFEST).write_text("{not json")
    c9 = ds_checkpoint(d, 9, {}, {})  # a manifest that lists nothing: nothing is missing
    c10 = plain_checkpoint(d, 10)
    (d / "step_1.pt").write_bytes(b"x")
    (d / "step_00000011").write_bytes(b"x")  # a file without .pt
    (d / "step_00000012.pt").mkdir()  # a directory with .pt
    ds_checkpoint(d, 13, {"a.pt": b"a"}, {"a.pt": 1}).rename(d / ".tmp-step_00000013")
    plain_checkpoint(d, 14).rename(d / ".del-step_00000014.pt")
    (d / "notes.txt").write_text("hello")
    # Written before manifests existed: complete when every file a DeepSpeed checkpoint needs is there.
    legacy = {n: b"x" for n in ("meta.pt", "model.pt", "rng_rank00000.pt", "mp_rank_00_model_states.pt")}
    c15 = ds_checkpoint(d, 15, legacy)
    c16 = ds_checkpoint(d, 16, {k: v for k, v in legacy.items() if k != "model.pt"})
    assert checkpoints(tmp_path) == [c2, c4, c9, c10, c15]

    for complete in (c2, c4, c9, c10, c15):
        assert checkpoint_problem(complete) is None
    problems = {p: checkpoint_problem(p) for p in (c3, c5, c6, c7, c8, c16)}
    assert problems[c3] == "empty file"
    assert MANIFEST in problems[c5] and "meta.pt" in problems[c5] and "missing" in problems[c5]
    assert problems[c16] == f"model.pt missing (no {MANIFEST})"
    assert "b.pt" in problems[c6] and "missing" in problems[c6]
    assert "b.pt" in problems[c7] and "2 bytes" in problems[c7] and "5" in problems[c7]
    assert "unreadable" in problems[c8] and MANIFEST in problems[c8]
    assert checkpoint_problem(d / "step_00000099") is not None  # not there at all


def test_checkpoint_problem_manifest_of_the_wrong_shape(tmp_path):
    p = ds_checkpoint(tmp_path, 1, {"a.pt": b"a"}, {"a.pt": 1})
    for text in ('{"step": 1}', '{"files": ["a.pt"]}', "[]", '{"files": {"a.pt": "1"}}'):
        (p / MANIFEST).write_text(text)
        assert checkpoint_problem(p) is not None, text


# -- remove_checkpoint -------------------------------------------------------------------------------------------------
def test_remove_checkpoint_file_and_directory(tmp_path):
    d = checkpoint_dir(tmp_path)
    f = plain_checkpoint(d, 1)
    g = ds_checkpoint(d, 2, {"a.pt": b"a"}, {"a.pt": 1})
    remove_checkpoint(f)
    remove_checkpoint(g)
    assert sorted(os.listdir(d)) == []
    remove_checkpoint(f)  # already gone: nothing to do


def test_remove_checkpoint_replaces_an_earlier_leftover(tmp_path):
    d = checkpoint_dir(tmp_path)
    (d / ".del-step_00000002").mkdir(parents=True)
    (d / ".del-step_00000002" / "old.pt").write_bytes(b"old")
    remove_checkpoint(ds_checkpoint(d, 2, {"a.pt": b"a"}, {"a.pt": 1}))
    assert os.listdir(d) == []


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_remove_checkpoint_crash_between_rename_and_removal(tmp_path, monkeypatch, kind):
    d = checkpoint_dir(tmp_path)
    keep = plain_checkpoint(d, 1)
    doomed = plain_checkpoint(d, 3) if kind == "file" else ds_checkpoint(d, 3, {"a.pt": b"a"}, {"a.pt": 1})
    assert checkpoints(tmp_path) == [keep, doomed]
    real = run._remove_tree
    calls = []

    def crash_once(p: Path) -> None:
        calls.append(p)
        if len(calls) == 1:
            raise OSError(errno.EIO, "simulated crash")
        real(p)

    monkeypatch.setattr(run, "_remove_tree", crash_once)
    with pytest.raises(OSError, match="simulated crash"):
        remove_checkpoint(doomed)
    leftover = d / f".del-{doomed.name}"
    assert calls == [leftover]
    assert leftover.exists() and not doomed.exists()
    assert checkpoints(tmp_path) == [keep]
    monkeypatch.setattr(run, "_remove_tree", real)
    lines = clean_run_directory(tmp_path)
    assert len(lines) == 1 and str(leftover) in lines[0]
    assert not leftover.exists() and keep.exists()


# -- clean_run_directory -----------------------------------------------------------------------------------------------
def test_clean_run_directory_removes_leftovers_and_keeps_the_rest(tmp_path, caplog):
    out, d = tmp_path, checkpoint_dir(tmp_path)
    strays = [
        out / ".metrics.csv.abc123_9.tmp",
        out / ".metrics.csv.tmp",
        out / ".write-test-123",
        plain_checkpoint(d, 2).rename(d / ".step_00000002.pt.xyz0w1_2.tmp"),
        ds_checkpoint(d, 3, {"a.pt": b"a"}, {"a.pt": 1}).rename(d / ".tmp-step_00000003"),
        ds_checkpoint(d, 9, {"a.pt": b"a"}, {"a.pt": 1}).rename(d / ".old-step_00000008"),  # step 8 is there
        plain_checkpoint(d, 5).rename(d / ".del-step_00000005.pt"),
        ds_checkpoint(d, 6, {"a.pt": b"a"}),  # no manifest: incomplete
        ds_checkpoint(d, 7, {"a.pt": b"a"}, {"a.pt": 1, "b.pt": 2}),  # a listed file missing: incomplete
    ]
    for p in strays[:3]:
        p.write_text("x")
    keep = [
        plain_checkpoint(d, 1),
        ds_checkpoint(d, 8, {"a.pt": b"a"}, {"a.pt": 1}),
        out / "metrics.csv",
        out / "config.json",
        out / ".lock",
        out / "notes.txt",
        d / "notes.txt",
    ]
    for p in keep[2:]:
        p.write_text("x")
    # A re-save of step 4 interrupted between its two renames: the complete old copy becomes step 4 again.
    ds_checkpoint(d, 4, {"a.pt": b"a"}, {"a.pt": 1}).rename(d / ".old-step_00000004")
    with caplog.at_level(logging.WARNING, logger="beit_fast.pretrain"):
        lines = clean_run_directory(out)
    assert (d / "step_00000004" / "a.pt").is_file() and not (d / ".old-step_00000004").exists()
    assert len(lines) == len(strays)
    for p in strays:
        assert not p.exists(), p
        assert sum(f"removed {p} (" in line for line in lines) == 1, (p, lines)
    for p in keep:
        assert p.exists(), p
    assert sum("incomplete checkpoint" in line for line in lines) == 2
    warned = [r.getMessage() for r in caplog.records if r.name == "beit_fast.pretrain" and r.levelno == logging.WARNING]
    assert len(warned) == len(strays) + 1 and any("restored" in w for w in warned)
    assert checkpoints(out) == [keep[0], d / "step_00000004", keep[1]]
    assert clean_run_directory(out) == []  # nothing left to clean


def test_clean_run_directory_on_a_new_or_empty_directory(tmp_path):
    assert clean_run_directory(tmp_path / "missing") == []
    assert clean_run_directory(tmp_path) == []


# -- prune_checkpoints -------------------------------------------------------------------------------------------------
def five(out: Path) -> list:
    d = checkpoint_dir(out)
    return [plain_checkpoint(d, s) for s in (1, 2, 3)] + [ds_checkpoint(d, s, {"a.pt": b"a"}, {"a.pt": 1})
                                                          for s in (4, 5)]


def test_prune_keeps_the_newest(tmp_path):
    c = five(tmp_path)
    prune_checkpoints(tmp_path, 2)
    assert checkpoints(tmp_path) == c[3:]
    assert sorted(os.listdir(checkpoint_dir(tmp_path))) == ["step_00000004", "step_00000005"]


def test_prune_keeps_the_newest_good_one_too(tmp_path):
    c = five(tmp_path)
    prune_checkpoints(tmp_path, 2, good=lambda p: p.name not in ("step_00000005", "step_00000004"))
    assert checkpoints(tmp_path) == [c[2], c[3], c[4]]


def test_prune_when_the_newest_is_good_keeps_only_keep_last(tmp_path):
    c = five(tmp_path)
    prune_checkpoints(tmp_path, 3, good=lambda p: p.name == "step_00000005")
    assert checkpoints(tmp_path) == c[2:]


def test_prune_when_nothing_is_good(tmp_path):
    c = five(tmp_path)
    prune_checkpoints(tmp_path, 2, good=lambda p: False)
    assert checkpoints(tmp_path) == c[3:]


def test_prune_ignores_incomplete_and_temporary_entries(tmp_path):
    c = five(tmp_path)
    d = checkpoint_dir(tmp_path)
    incomplete = ds_checkpoint(d, 6, {"a.pt": b"a"})
    empty = plain_checkpoint(d, 7, b"")
    prune_checkpoints(tmp_path, 1)
    assert checkpoints(tmp_path) == [c[4]]
    assert incomplete.exists() and empty.exists()  # not checkpoints: not pruning's business (cleaning's, at start)


# -- SignalStop --------------------------------------------------------------------------------------------------------
def _wait_for(cond, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stop_sets_the_flag_and_restores(signum, caplog):
    def sentinel(s, frame):
        raise AssertionError("the previous handler must not run while SignalStop is installed")

    before = {s: signal.getsignal(s) for s in SignalStop.SIGNALS}
    try:
        for s in SignalStop.SIGNALS:
            signal.signal(s, sentinel)
        stop = SignalStop(prog="test-prog").install()
        try:
            assert stop.requested is None
            for s in SignalStop.SIGNALS:
                assert signal.getsignal(s) == stop._handle
            os.kill(os.getpid(), signum)
            assert _wait_for(lambda: stop.requested is not None)
            assert stop.requested == signum
        finally:
            stop.restore()  # before anything else: a second signal would end the test process
        for s in SignalStop.SIGNALS:
            assert signal.getsignal(s) is sentinel
        assert any(f"{signal.Signals(signum).name} received" in r.getMessage() for r in caplog.records)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_signal_stop_context_manager():
    before = signal.getsignal(signal.SIGTERM)
    with SignalStop() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: stop.requested == signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_signal_stop_second_signal_exits_at_once():
    code = _LOAD + textwrap.dedent("""
        import os, signal, time
        stop = run.SignalStop().install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        print("first", stop.requested, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("survived", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 128 + signal.SIGTERM == 143, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.split() == ["first", str(int(signal.SIGTERM))]
    assert "SIGTERM received" in r.stderr and "second signal (SIGTERM)" in r.stderr


def test_signal_stop_in_another_thread_is_a_no_op():
    before = {s: signal.getsignal(s) for s in SignalStop.SIGNALS}
    result: dict = {}

    def body():
        try:
            stop = SignalStop().install()
            stop.restore()
            with SignalStop():
                pass
            result["stop"] = stop
        except BaseException as exc:  # reported below
            result["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join(timeout=10)
    assert "error" not in result, result
    assert result["stop"].requested is None and result["stop"]._previous == {}
    assert {s: signal.getsignal(s) for s in SignalStop.SIGNALS} == before
