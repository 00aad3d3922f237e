"""The run directory: one run at a time, checkpoints found, checked, pruned and removed safely, signals.

- `RunLock`: a run holds an exclusive lock on its `out` for its lifetime (`out/.lock`, with the holder's pid, host
  and start time). `fcntl.flock` where the filesystem supports it: released by the kernel when the process dies,
  however it dies. A forked child (a data-loader worker) closes its copy of the lock's descriptor at once, so a
  killed run's workers cannot keep its directory locked. Elsewhere the lock file itself, created
  exclusively, and a holder on this host that no longer runs is recognised as stale and replaced (with a
  warning). A second run into the same directory is refused with `RunDirectoryBusy` (one line: who holds it).
- Checkpoints: `step_XXXXXXXX.pt` (plain engine) and `step_XXXXXXXX/` (DeepSpeed, complete only when every file its
  manifest lists is there, or, written before manifests, every file a checkpoint needs:
  `checkpoint_problem`). Deletes are atomic: a checkpoint is first renamed to `.del-*` (no
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
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


log = logging.getLogger("beit_fast.pretrain")

__all__ = [
    "RunLock",
    "MANIFEST",
    "checkpoint_name",
    "checkpoint_problem",
    "atomic_save_json",
    "RunDirectoryBusy",
    "SignalStop",
    "checkpoint_dir",
    "checkpoints",
    "checkpoint_step",
    "clean_run_directory",
    "prune_checkpoints",
    "remove_checkpoint",
    "RunDir",
    "ResumePlan",
    "find_latest_checkpoint",
    "plan_resume",
    "agree_on_resume",
    "resume_differences",
    "start_run_directory",
    "read_checkpoint",
    "checkpoint_model_state",
    "resolve_checkpoint",
    "Checkpointer",
]

LOCK_NAME = ".lock"
_CKPT_NAME = re.compile(r"step_(\d{8})(\.pt)?")
# Exactly what an interrupted write or delete of this code leaves (nothing else is touched): atomic_save's
# `.NAME.XXXXXXXX.tmp` (mkstemp), the metrics rewrite's `.metrics.csv.tmp`, the plot's `.metrics.png.tmp.png`, the
# manifest's `.manifest.json.tmp`, DeepSpeed's `.tmp-step_*`, a re-save's `.old-step_*`, a delete's `.del-step_*`,
# the out/ write probe and a stale fallback lock moved aside.
_STRAY = re.compile(r"\.[^/]+\.[a-z0-9_]{8}\.tmp|\.metrics\.csv\.tmp|\.metrics\.png\.tmp\.png|\.manifest\.json\.tmp"
                    r"|\.[\w-]+\.json\.tmp|\.(tmp|old|del)-step_\d{8}(\.pt)?|\.write-test-\d+|\.lock\.owner\.stale-\d+")


REWRITTEN_AT_START = ("config.json",)  # what a start rewrites in a directory it did not create (restored if it fails)
MANIFEST = "manifest.json"  # written last into a DeepSpeed checkpoint directory: {"files": {name: size}}


def checkpoint_name(step: int) -> str:
    """The name of step `step`'s checkpoint (`.pt` for a plain engine's file, none for a DeepSpeed directory)."""
    return f"step_{step:08d}"


def checkpoint_problem(path: Path) -> Optional[str]:
    """None if `path` is a complete checkpoint, else what is wrong. A plain engine's file is complete by
    construction (written under another name and renamed); a DeepSpeed directory needs its manifest and every file
    the manifest lists, at the listed size. A directory written before manifests existed is complete when it holds
    meta.pt, model.pt, rank 0's RNG file and DeepSpeed's model states (loading checks every rank's RNG file)."""
    if path.is_file():
        return None if path.stat().st_size > 0 else "empty file"
    manifest = path / MANIFEST
    if not manifest.is_file():
        names = {f.name for f in path.iterdir()} if path.is_dir() else set()
        missing = [n for n in ("meta.pt", "model.pt", "rng_rank00000.pt") if n not in names]
        if not any(n.endswith("model_states.pt") for n in names):
            missing.append("DeepSpeed's model states")
        return f"{', '.join(missing)} missing (no {MANIFEST})" if missing else None
    try:
        files = json.loads(manifest.read_text())["files"]
        for name, size in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__})"
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Text to a temporary name, fsync, rename: a reader sees the old file or the new one, never half of it."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Bytes to a temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_json(obj: Any, path: Path, indent: Optional[int] = None) -> None:
    """JSON, written atomically (the manifest: its presence marks a checkpoint complete)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


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


# -- a run's lifetime in its directory -------------------------------------------------------------------------------
class RunDir:
    """A run's `out`: created if needed, locked by rank 0 for the run's lifetime (`RunLock`), cleaned of what an
    interrupted run left, and - if the run fails before it wrote anything of its own - removed again when this run
    created it. `session()` also catches SIGTERM / SIGINT from the start (`SignalStop`)."""

    def __init__(self, out: Path, prog: str) -> None:
        self.out, self.prog = Path(out), prog
        self.lock: Optional[RunLock] = None
        self.created: Optional[Path] = None
        self.signals = SignalStop(prog)
        self._before: Optional[set] = None  # what `out` held when this run took it (None: not taken)
        self._kept: Dict[str, bytes] = {}  # the small files a start rewrites (config.json), as they were

    def acquire(self) -> None:
        """Create (if needed) and lock `out`, then remove what an interrupted run left there (rank 0 only)."""
        out = self.out
        try:
            if not out.exists():
                out.mkdir(parents=True)
                self.created = out
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"out={str(out)!r} is not a writable directory ({type(exc).__name__}: {exc})") from None
        had_lock = (out / LOCK_NAME).exists()
        self.lock = RunLock(out).acquire()
        clean_run_directory(out)
        self._before = {p.name for p in out.iterdir()} - ({LOCK_NAME} if not had_lock else set())
        self._checkpoints = {p.name for p in checkpoints(out)}
        self._kept = {name: (out / name).read_bytes() for name in REWRITTEN_AT_START if (out / name).is_file()}

    def started(self) -> bool:
        """Has this run left anything of a run: a checkpoint of its own, or metrics rows in a metrics file it
        created? (Before that, a failure is a failed start, undone by `_abandon`.)"""
        if {p.name for p in checkpoints(self.out)} - self._checkpoints:
            return True
        for name in ("metrics.csv", "val_metrics.csv"):
            f = self.out / name
            if name not in (self._before or ()) and f.is_file():
                with open(f, "rb") as fh:
                    if sum(1 for _ in fh) > 1:  # rows after the header
                        return True
        return False

    def _abandon(self) -> None:
        """A failed start leaves `out` as it was: what this run created there is removed (the directory itself
        if it made it), the files it rewrote are restored, its lock file goes if it made that too."""
        if self.lock is None or self._before is None or self.started():
            return
        if self.created is not None:
            self.lock.release()
            self.lock = None
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for p in sorted(self.out.iterdir()):
            if p.name not in self._before and p.name != LOCK_NAME:
                try:
                    _remove_tree(p)
                except OSError as exc:
                    log.warning("could not remove %s (made by a run that failed to start): %s", p, exc)
        for name, data in self._kept.items():
            if (self.out / name).read_bytes() != data if (self.out / name).is_file() else True:
                atomic_write_bytes(self.out / name, data)
        if LOCK_NAME not in self._before:  # made by this run: removed while still held, then released
            (self.out / LOCK_NAME).unlink(missing_ok=True)

    def __enter__(self) -> "RunDir":
        self.signals.install()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is not None:
                self._abandon()
        finally:
            self.signals.restore()
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def finished_summary(self, step: int, steps_run: int) -> Optional[Dict[str, Any]]:
        """The summary.json of a run that had already finished at `step` and was resumed without a step to train
        (`steps_run` 0): kept as it is, not rewritten with nothing run (None: there is none, or it is of another
        step)."""
        if steps_run:
            return None
        try:
            summary = json.loads((self.out / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(summary, dict) or summary.get("step") != step:
            return None
        log.info("%s: the run had finished at step %d; its summary.json is kept", self.out, step)
        return summary

    def write_json(self, name: str, obj: Any) -> Path:
        """out/NAME as indented JSON, atomically (temporary name, fsync, rename)."""
        path = self.out / name
        atomic_save_json(obj, path, indent=2)
        return path


def find_latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run directory (None if it has none)."""
    paths = checkpoints(Path(out))
    return paths[-1] if paths else None


@dataclass
class ResumePlan:
    path: Optional[Path]  # the checkpoint resumed from (None: a fresh run)
    ckpt: Optional[Dict[str, Any]]  # its run state (`read_checkpoint`)
    start_at: int  # the step this run continues from in this directory (0: fresh, or resumed from elsewhere)
    stale: List[Path]  # checkpoints of a run this one replaces: deleted once the run has started


def resume_differences(ckpt: Dict[str, Any], cfg: Any, model_config: Dict[str, Any]) -> List[str]:
    """`key: old -> new` for every setting that differs from the checkpoint's and may not (cfg.RESUME_MAY_DIFFER).
    The model is compared as the resolved BeitConfig, so `preset` + overrides spelt differently still match."""
    defaults = type(cfg)().to_dict()
    old, new = ckpt["config"], cfg.to_dict()
    diffs = []
    for key in new:
        if key in cfg.RESUME_MAY_DIFFER or key in ("model", "preset"):
            continue
        before = old.get(key, defaults[key])
        if before != new[key]:
            diffs.append(f"{key}: {before!r} -> {new[key]!r}")
    import dataclasses

    from beit_fast.config import BeitConfig

    # a key a checkpoint predates (a BeitConfig field added since) had its default then
    model_defaults = {f.name: f.default for f in dataclasses.fields(BeitConfig) if f.default is not dataclasses.MISSING}
    old_m = ckpt["model_config"]
    for key in sorted(set(old_m) | set(model_config)):
        before = old_m.get(key, model_defaults.get(key))
        if before != model_config.get(key):
            diffs.append(f"model.{key}: {before!r} -> {model_config.get(key)!r}")
    return diffs


# -- what a run's inputs are, by content ------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (a tokenizer, an --init checkpoint): what it holds, not where it is."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def weights_digest(path: Path) -> str:
    """The content identity of a weights source: a file's sha256; a run directory's by its newest checkpoint; a
    DeepSpeed checkpoint directory's by its model.pt (with meta.pt)."""
    path = Path(path)
    if path.is_dir() and not _CKPT_NAME.fullmatch(path.name):
        latest = find_latest_checkpoint(path)
        path = latest if latest is not None else path
    if path.is_dir():
        parts = [file_digest(f) for f in (path / "model.pt", path / "meta.pt") if f.is_file()]
        return "+".join(parts) if parts else f"directory {path}"
    return file_digest(path)


def data_identity(data: str) -> Optional[str]:
    """The identity of a run's data by content: None for procedural data ("builtin", "synthetic": its settings are
    its identity); for a folder, a hash of every file's relative path, size and mtime (the same files unchanged:
    the same identity); for shards (a .tar, a brace pattern), the same over the shard files and their shards.json."""
    import hashlib

    if data in ("builtin", "synthetic"):
        return None
    root = Path(data)
    entries: List[Tuple[str, int, int]] = []
    if root.is_dir():
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if name.startswith("."):
                    continue
                st = os.stat(os.path.join(d, name))
                entries.append((os.path.relpath(os.path.join(d, name), root), st.st_size, st.st_mtime_ns))
    else:
        try:
            from beit_fast.shards import shard_list

            files = [Path(f) for f in shard_list(data)]
        except Exception:  # not a shard spec: the file itself
            files = [root]
        index = files[0].with_name("shards.json") if files else None
        for f in files + ([index] if index is not None and index.is_file() else []):
            if f.is_file():
                st = f.stat()
                entries.append((str(f), st.st_size, st.st_mtime_ns))
    h = hashlib.sha256(json.dumps(entries).encode())
    return f"{len(entries)} files, sha256:{h.hexdigest()}"


INPUT_NAMES = {"tokenizer": "the tokenizer file", "init": "the --init weights", "data": "the data"}


def input_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """`what: old -> new` for every input whose content identity differs (inputs a checkpoint predates: not
    compared)."""
    return [f"{INPUT_NAMES.get(k, k)} changed since the checkpoint ({old[k]} -> {new[k]})"
            for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def plan_resume(out: Path, cfg: Any, model_config: Dict[str, Any], world: int,
                read: Callable[[Path], Dict[str, Any]], inputs: Optional[Dict[str, Any]] = None) -> ResumePlan:
    """What `cfg.resume` means in `out`: the checkpoint to continue (read with `read`, checked against the config,
    the content of the run's `inputs` (tokenizer, --init, data: `data_identity`, `weights_digest`) and the process
    count before anything is written: a refused resume leaves the directory as it was), and which checkpoints a
    fresh or foreign start would replace (refused unless `cfg.overwrite`). A change of the data alone is let through
    with `cfg.allow_changed_data` (a warning then)."""
    path: Optional[Path] = None
    if cfg.resume == "auto":
        path = find_latest_checkpoint(out)
    elif cfg.resume:
        path = Path(cfg.resume)
        if not path.exists():
            raise FileNotFoundError(f"resume checkpoint not found: {path}")
    ckpt = None
    if path is not None:
        ckpt = read(path)
        diffs = resume_differences(ckpt, cfg, model_config)
        if diffs:
            raise ValueError(
                f"refusing to resume from {path}: settings differ from the checkpoint's ({'; '.join(diffs)}); "
                f"only {', '.join(sorted(cfg.RESUME_MAY_DIFFER))} may change"
            )
        changed = input_differences(ckpt.get("inputs") or {}, inputs or {})
        allowed = [c for c in changed if c.startswith(INPUT_NAMES["data"]) and getattr(cfg, "allow_changed_data",
                                                                                           False)]
        for c in allowed:
            log.warning("resuming although %s (--allow-changed-data)", c)
        refused = [c for c in changed if c not in allowed]
        if refused:
            escape = " (--allow-changed-data resumes on changed data)" if any(
                c.startswith(INPUT_NAMES["data"]) for c in refused) else ""
            raise ValueError(f"refusing to resume from {path}: {'; '.join(refused)}{escape}; start afresh with "
                             "--overwrite, or into another --out")
        old_world = ckpt["engine"].get("world_size", 1)
        if getattr(cfg, "deepspeed", False) and old_world != world:
            raise ValueError(f"refusing to resume from {path}: it was written by {old_world} processes, this "
                             f"run has {world} (ZeRO partitions the optimizer state by process)")
        old_max = ckpt["config"].get("max_steps", cfg.max_steps)
        if old_max != cfg.max_steps:
            log.warning("max_steps changed from %s to %d on resume: the cosine schedule after step %d differs "
                        "from the original run's (and from a straight run to %d)", old_max, cfg.max_steps,
                        ckpt["step"], cfg.max_steps)
    existing = checkpoints(out)
    foreign = path is not None and path.resolve().parent != checkpoint_dir(out).resolve()
    if existing and (path is None or foreign) and not cfg.overwrite:
        what = "start afresh" if path is None else f"resume {path} there"
        raise ValueError(f"{out} already holds checkpoints of a run (newest {existing[-1].name}): continue it with "
                         f"--resume auto, or {what} with --overwrite (deletes them)")
    # Checkpoints past the one resumed from belong to a run this one replaces: keeping them would make the
    # next `--resume auto` continue that other run (and pruning by age could delete this run's newest).
    start_at = ckpt["step"] if ckpt is not None and not foreign else 0
    stale = [p for p in existing if checkpoint_step(p) > start_at]
    return ResumePlan(path=path, ckpt=ckpt, start_at=start_at, stale=stale)


def agree_on_resume(plan: ResumePlan, world: int, read: Callable[[Path], Dict[str, Any]]) -> ResumePlan:
    """Under several processes: rank 0's choice of checkpoint for every rank (the others listed the checkpoints
    while rank 0 may have been cleaning the directory). A collective."""
    if world <= 1:
        return plan
    import torch.distributed as dist

    mine = str(plan.path) if plan.path is not None else ""
    chosen = [mine]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] != mine:
        path = Path(chosen[0]) if chosen[0] else None
        plan = ResumePlan(path=path, ckpt=read(path) if path is not None else None, start_at=plan.start_at,
                          stale=plan.stale)
    return plan


def start_run_directory(out: Path, plan: ResumePlan, start_step: int, outputs: Sequence[str]) -> None:
    """Rank 0, once the run has started (engine built, checkpoint loaded): delete the checkpoints this run replaces;
    a fresh run also deletes an earlier run's `outputs` (summary, plot) and TensorBoard files."""
    why = "--overwrite" if plan.start_at == 0 else f"it is past step {plan.start_at}, where this run starts"
    for p in plan.stale:
        log.warning("removing %s (%s)", p, why)
        remove_checkpoint(p)
    if start_step == 0:
        shutil.rmtree(Path(out) / "tensorboard", ignore_errors=True)
        for name in outputs:
            (Path(out) / name).unlink(missing_ok=True)


TASK_NAMES = {"pretrain": "pretraining", "finetune": "fine-tuning", "segment": "segmentation",
              "tokenizer": "dVAE training"}


def read_checkpoint(path: Path, task: Optional[str] = "pretrain",
                    stats_problems: Callable[[Dict[str, Any], Dict[str, Any]], List[str]] = lambda s, m: []
                    ) -> Dict[str, Any]:
    """A checkpoint's run state: the whole file for the plain engine, `meta.pt` of a DeepSpeed directory
    (its weights and optimizer shards stay for DeepSpeed to load). Read weights-only (`safe_load`: nothing in the
    file runs). CheckpointError (a ValueError, one line) if it is incomplete, not one of this engine's `task`
    checkpoints (checkpoints without a task are pretraining's; task None: either), or hand-edited into something
    that is not; `stats_problems(stats, model_config)` adds the task's own checks of its run statistics."""
    import torch

    from beit_fast.checkpoint import CheckpointError, safe_load
    from beit_fast.train.config import type_ok

    path = Path(path)
    if path.is_dir():
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
    ckpt = safe_load(path / "meta.pt" if path.is_dir() else path, what="checkpoint")
    needed = ("step", "config", "model_config", "stats") + (() if path.is_dir() else ("model", "optimizer", "rng"))
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    name = TASK_NAMES.get(task or "", "training")
    if missing:
        raise CheckpointError(f"{path} is not a {name} checkpoint of this engine (missing {missing})")
    got = ckpt.get("task", "pretrain")
    if task is not None and got != task:
        raise CheckpointError(f"{path} is a {TASK_NAMES.get(got, repr(got))} checkpoint, not a {name} one")
    wrong = [f"step={ckpt['step']!r} (not an int >= 0)"] if not (type_ok(ckpt["step"], int) and ckpt["step"] >= 0) \
        else []
    wrong += [f"{k} is a {type(ckpt[k]).__name__}, not a dict" for k in needed
              if k != "step" and not isinstance(ckpt[k], dict)]
    if not path.is_dir() and isinstance(ckpt["model"], dict):
        wrong += [f"model[{k!r}] is a {type(v).__name__}" for k, v in ckpt["model"].items() if not torch.is_tensor(v)]
    if isinstance(ckpt["stats"], dict):
        stats = ckpt["stats"]
        wrong += [f"stats.{k}={stats[k]!r} (not an int >= 0)" for k in ("skipped_steps", "skipped_images",
                                                                          "bad_in_row")
                  if k in stats and not (type_ok(stats[k], int) and stats[k] >= 0)]
        for k in ("bad_files", "suspect_steps"):
            if not (isinstance(stats.get(k, []), list) and all(type_ok(x, int) for x in stats.get(k, []))):
                wrong.append(f"stats.{k} is not a list of ints")
        wrong += stats_problems(stats, ckpt["model_config"] if isinstance(ckpt["model_config"], dict) else {})
    if wrong:
        raise CheckpointError(f"{path}: malformed checkpoint: {'; '.join(wrong[:3])}")
    ckpt.setdefault("engine", {"kind": "plain", "world_size": 1})
    return ckpt


def checkpoint_model_state(path: Path, task: Optional[str] = "pretrain") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(full fp32 model state dict, the checkpoint's run state) of a checkpoint of either engine."""
    import torch

    from beit_fast.checkpoint import CheckpointError, safe_load

    path = Path(path)
    ckpt = read_checkpoint(path, task)
    if not path.is_dir():
        return ckpt["model"], ckpt
    model_file = path / "model.pt"
    state = safe_load(model_file, what="checkpoint's model.pt")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{model_file}: not a model file (expected {{'model': state_dict}})")
    bad = [k for k, v in state["model"].items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{model_file}: non-tensor entries {bad[:3]}")
    return state["model"], ckpt


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint path as given, or a run directory's newest checkpoint; FileNotFoundError / ValueError else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and not _CKPT_NAME.fullmatch(path.name):
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path} is neither a checkpoint nor a run directory with complete checkpoints")
        return latest
    return path


class Checkpointer:
    """Writes a run's checkpoints through its engine: never from non-finite weights (checked on every rank), the
    metrics on disk first, then the newest `keep_last` kept - and always the newest written outside a streak of
    skipped steps (`stats["suspect_steps"]` remembers the others across resumes)."""

    def __init__(self, out: Path, engine: Any, keep_last: int, is_main: bool, stats: Dict[str, Any],
                 meta: Callable[[int], Dict[str, Any]], flush: Callable[[], None] = lambda: None) -> None:
        self.out, self.engine, self.keep_last, self.is_main = Path(out), engine, keep_last, is_main
        self.stats, self.meta, self.flush = stats, meta, flush
        self.suspect = set(stats.get("suspect_steps", []))

    def save(self, step: int) -> Path:
        from beit_fast.train.step import TrainingStopped

        if self.stats.get("bad_in_row"):
            self.suspect.add(step)
        self.stats["suspect_steps"] = sorted(self.suspect)
        if not self.engine.params_finite():  # (every rank) a checkpoint is never written from non-finite weights
            raise TrainingStopped(f"the weights are not finite at step {step}: no checkpoint written (the newest "
                                  f"one is {find_latest_checkpoint(self.out)})")
        self.flush()  # every metrics row up to the checkpoint is on disk before it
        path = self.engine.save(checkpoint_dir(self.out), step, self.meta(step))
        if self.is_main:
            prune_checkpoints(self.out, self.keep_last, good=lambda p: checkpoint_step(p) not in self.suspect)
        return path
