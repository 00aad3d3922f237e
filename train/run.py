"""The run directory: one run at a time, checkpoints found, checked, pruned and removed safely, signals.

- `RunLock`: a run holds an exclusive lock on its `out` for its lifetime (`out/.lock`, with the holder's pid, host
  and start time). `fcntl.flock` where the filesystem supports it: released by the kernel when the process dies,
  however it dies. A forked child (a data-loader worker) closes its copy of the lock's descriptor at once, so a
  killed run's workers cannot keep its directory locked. Elsewhere the lock file itself, created
  exclusively, and a holder on this host that no longer runs is recognised as stale and replaced (with a
  warning). A second run into the same directory is refused with `RunDirectoryBusy` (one line: who holds it).
- Checkpoints: `step_XXXXXXXX.pt` (plain engine) and `step_XXXXXXXX/` (DeepSpeed, complete only when every file its
  manifest lists is there, or, written before manifests, every file a checkpoint needs:
  `beit_fast.train.engine.checkpoint_problem`). Deletes are atomic: a checkpoint is first renamed to `.del-*` (no
  longer a checkpoint to anyone), then removed. `clean_run_directory` removes, at start and with a warning each,
  what a crash can leave: exactly the temporary names this code writes, and checkpoint directories with files
  missing - so they are never resumed and never fill the disk. Nothing else in the directory is touched.
- `prune_checkpoints`: keep the newest `keep_last`, and always the newest checkpoint written outside a run of
  skipped steps (a "good" one), so a streak of non-finite steps never leaves only suspect checkpoints.
- `SignalStop`: SIGTERM and SIGINT set a flag that the loop reads after each step (agreed by every rank); the run
  then writes a checkpoint and exits with 128 + the signal number. A second signal exits at once.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from beit_fast.train.engine import checkpoint_problem

log = logging.getLogger("beit_fast.pretrain")

__all__ = [
    "RunLock",
    "RunDirectoryBusy",
    "SignalStop",
    "checkpoint_dir",
    "checkpoints",
    "checkpoint_step",
    "clean_run_directory",
    "prune_checkpoints",
    "remove_checkpoint",
]

LOCK_NAME = ".lock"
_CKPT_NAME = re.compile(r"step_(\d{8})(\.pt)?")
# Exactly what an interrupted write or delete of this code leaves (nothing else is touched): atomic_save's
# `.NAME.XXXXXXXX.tmp` (mkstemp), the metrics rewrite's `.metrics.csv.tmp`, the plot's `.metrics.png.tmp.png`, the
# manifest's `.manifest.json.tmp`, DeepSpeed's `.tmp-step_*`, a re-save's `.old-step_*`, a delete's `.del-step_*`,
# the out/ write probe and a stale fallback lock moved aside.
_STRAY = re.compile(r"\.[^/]+\.[a-z0-9_]{8}\.tmp|\.metrics\.csv\.tmp|\.metrics\.png\.tmp\.png|\.manifest\.json\.tmp"
                    r"|\.(tmp|old|del)-step_\d{8}(\.pt)?|\.write-test-\d+|\.lock\.owner\.stale-\d+")


class RunDirectoryBusy(ValueError):
    """Another run holds the run directory's lock."""


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    m = _CKPT_NAME.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_XXXXXXXX.pt or step_XXXXXXXX/)")
    return int(m.group(1))


def checkpoints(out: Path) -> List[Path]:
    """Complete checkpoints, oldest first. Temporary names and incomplete directories are not checkpoints."""
    d = checkpoint_dir(out)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT_NAME.fullmatch(p.name)
        if m is None or (p.is_file() != bool(m.group(2))) or not (p.is_file() or p.is_dir()):
            continue
        if checkpoint_problem(p) is None:
            found.append(p)
    return sorted(found, key=lambda p: p.name)


def remove_checkpoint(path: Path) -> None:
    """Rename first (atomic: from then on it is no checkpoint), then remove; a crash in between leaves a `.del-*`
    that the next start removes."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f".del-{path.name}")
    if doomed.exists():
        _remove_tree(doomed)
    os.replace(path, doomed)
    _remove_tree(doomed)


def _remove_tree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def clean_run_directory(out: Path) -> List[str]:
    """Remove what an interrupted run left in `out` and its checkpoint directory (see the module docstring);
    returns one line per thing removed (also logged as warnings)."""
    removed = []
    ckpts = checkpoint_dir(out)
    if ckpts.is_dir():  # a re-save of step N crashed between its two renames: the old copy is step N again
        for old in sorted(ckpts.glob(".old-step_*")):
            final = old.with_name(old.name[len(".old-"):])
            if not final.exists() and checkpoint_problem(old) is None:
                os.replace(old, final)
                log.warning("restored %s from %s (a re-save was interrupted)", final, old.name)
    for d in (Path(out), ckpts):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            why = None
            if _STRAY.fullmatch(p.name):
                why = "left by an interrupted write or delete"
            elif d != Path(out) and p.is_dir() and _CKPT_NAME.fullmatch(p.name):
                problem = checkpoint_problem(p)
                if problem and not problem.startswith("unreadable"):  # missing files: a save or delete cut short
                    why = f"incomplete checkpoint: {problem}"
                elif problem:  # a manifest we cannot read: not ours to delete; never resumed either
                    log.warning("%s is not a checkpoint (%s): left as it is, never resumed", p, problem)
            if why is None:
                continue
            try:
                _remove_tree(p)
            except OSError as exc:
                log.warning("could not remove %s (%s): %s", p, why, exc)
                continue
            removed.append(f"removed {p} ({why})")
            log.warning("removed %s (%s)", p, why)
    return removed


def prune_checkpoints(out: Path, keep_last: int, good: Callable[[Path], bool] = lambda p: True) -> None:
    """Delete all but the newest `keep_last` checkpoints - never the newest one for which `good(path)` holds."""
    found = checkpoints(out)
    keep = set(found[-keep_last:])
    newest_good = next((p for p in reversed(found) if good(p)), None)
    if newest_good is not None:
        keep.add(newest_good)
    for p in found:
        if p not in keep:
            remove_checkpoint(p)


# -- the run lock ----------------------------------------------------------------------------------------------------
def _holder_text(text: str) -> str:
    info = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if not info:
        return "another run"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since))) if since else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, since {when}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD_FDS: set = set()  # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    """After a fork: the child's copies of the lock descriptors would keep the locks held after the parent died."""
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """An exclusive lock on a run directory for the lifetime of this object (or the process)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self._fd: Optional[int] = None
        self._exclusive_file = False

    def _me(self) -> str:
        return f"pid={os.getpid()} host={socket.gethostname()} since={time.time():.0f}\n"

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise RunDirectoryBusy(f"{self.path.parent} is in use by another run ({holder}); wait for it to end or "
                                   "choose another --out") from None
        except OSError as exc:  # a filesystem without flock (some network filesystems): the file itself
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return self._acquire_exclusive_file()
        before = os.pread(fd, 4096, 0).decode(errors="replace")
        if "pid=" in before:  # a run that ended without releasing (killed): the kernel freed its lock
            log.warning("%s: the previous run (%s) ended without releasing its lock (killed?); taking it",
                        self.path, _holder_text(before))
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._me().encode(), 0)
        self._fd = fd
        _HELD_FDS.add(fd)
        return self

    def _acquire_exclusive_file(self) -> "RunLock":
        owner = self.path.with_name(LOCK_NAME + ".owner")
        for _ in range(2):
            try:
                fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text = owner.read_text(errors="replace") if owner.exists() else ""
                info = dict(part.split("=", 1) for part in text.split() if "=" in part)
                if info.get("host") == socket.gethostname() and info.get("pid", "").isdigit() \
                        and not _pid_alive(int(info["pid"])):
                    # Moved aside under a name of our own, then checked: if another run replaced the stale file
                    # in between, what we moved is its live lock - put it back and report the directory busy.
                    aside = owner.with_name(f"{owner.name}.stale-{os.getpid()}")
                    try:
                        os.replace(owner, aside)
                    except FileNotFoundError:
                        continue
                    if aside.read_text(errors="replace") != text:
                        os.replace(aside, owner)
                        continue
                    aside.unlink(missing_ok=True)
                    log.warning("removed the stale lock %s of pid %s, which no longer runs", owner, info["pid"])
                    continue
                raise RunDirectoryBusy(
                    f"{self.path.parent} is in use by another run ({_holder_text(text)}); if no run uses it any more "
                    f"(this filesystem has no flock, and a holder on another host cannot be checked), delete {owner}"
                ) from None
            os.write(fd, self._me().encode())
            os.close(fd)
            self._exclusive_file = True
            return self
        raise RunDirectoryBusy(f"{self.path.parent}: could not take the lock {owner}")

    def release(self) -> None:
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            try:
                os.ftruncate(self._fd, 0)  # emptied: a holder named at the next start is one that was killed
            except OSError:
                pass
            os.close(self._fd)  # the file stays: unlinking a locked file lets two runs lock two different files
            self._fd = None
        if self._exclusive_file:
            self.path.with_name(LOCK_NAME + ".owner").unlink(missing_ok=True)
            self._exclusive_file = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# -- signals ---------------------------------------------------------------------------------------------------------
class SignalStop:
    """SIGTERM / SIGINT -> `requested` (the signal number); the second one exits the process at once with
    128 + its number. Installed only from the main thread (elsewhere signals cannot be caught: a no-op)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, prog: str = "beit-fast pretrain") -> None:
        self.prog = prog
        self.requested: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            sys.stderr.write(f"{self.prog}: second signal ({name}): exiting now; the last checkpoint is intact "
                             "(resume with --resume auto)\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = signum
        log.warning("%s received: finishing this step, then a checkpoint and exit (a second signal exits at once)",
                    name)

    def install(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "SignalStop":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()
