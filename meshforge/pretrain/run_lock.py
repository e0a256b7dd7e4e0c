"""One trainer per output directory: an exclusive ``flock`` on ``<output_dir>/.meshforge.lock``.

Rank 0 takes the lock before anything of the run is written (before the ranks check in, so a
refusal stops every rank before any of them writes) and holds it until the run ends. A second
trainer -- a user re-running a command, a SLURM requeue racing a job still running -- is refused
with one line naming the holder (host, pid, SLURM job id, start time), which the holder wrote
into the lock file.

The kernel drops a ``flock`` when its process dies however it dies (even SIGKILL), so a lock
file left by a dead process is free: the next run takes it and says whose it was. The holder
removes the file when it ends (while still holding the lock); a process that opened the old
file just before that notices after locking that the path no longer names what it locked, and
tries again, so two runs never both hold "the" lock.

Where it works: local file systems, NFSv4 and NFSv3 with a lock daemon (Linux maps ``flock``
to POSIX byte-range locks there), Lustre mounted with ``-o flock``, GPFS, BeeGFS. Where the
file system refuses locks (Lustre with ``-o noflock``, NFS mounted ``nolock``: ENOLCK, ENOSYS,
EOPNOTSUPP) the run goes on without the lock and says so; NFS mounted ``local_lock=flock``
locks per client only, so two trainers on different nodes are not kept apart there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import MeshforgeError

LOCK_NAME = ".meshforge.lock"
UNSUPPORTED_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}


class OutputDirBusy(MeshforgeError):
    """Another trainer holds the output directory."""


def holder_info() -> dict:
    """Who holds the lock: written into the lock file for a refused second trainer to name."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        info["slurm_job"] = f"{array[0]}_{array[1]}" if all(array) else job
    return info


def describe_holder(info: dict) -> str:
    if not info:
        return "a trainer that is just starting (it has not written its name yet)"
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job"):
        parts.append(f"SLURM job {info['slurm_job']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return ", ".join(parts)


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace")
        info = json.loads(text) if text.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _names_live_holder(info: dict) -> bool:
    """``info`` names a process that still runs (or one on another host, which cannot be checked from here)."""
    if not info:
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (KeyError, ValueError, TypeError, OverflowError):
        return False
    return True


def _holder_named(fd: int, wait_s: float = 2.0) -> dict:
    """The lock holder's info. A holder that has just taken the lock writes its name a moment later (until
    then the file is empty, or still names the process that held it before), so wait briefly for it."""
    deadline = time.monotonic() + wait_s
    while True:
        info = _read_info(fd)
        if _names_live_holder(info):
            return info
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


class RunLock:
    """The held lock of one output directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False
        self.previous: dict = {}
        """The holder named in a lock file this run took over (its process had ended), else empty."""
        self.unsupported = ""
        """Why the file system gave no lock (the run goes on without one), else empty."""

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`OutputDirBusy` naming the holder."""
        if not self.output_dir.exists():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = describe_holder(_holder_named(fd))
                    os.close(fd)
                    raise OutputDirBusy(
                        f"output dir {self.output_dir} is in use by another meshforge train ({holder}); wait for it "
                        "to end (a rerun then resumes from its newest checkpoint) or choose another train.output_dir"
                    ) from None
                if e.errno in UNSUPPORTED_ERRNOS:
                    os.close(fd)
                    self.unsupported = os.strerror(e.errno)
                    return self
                os.close(fd)
                raise
            try:  # the path must still name the file we locked (its holder may have just removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.previous = _read_info(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(holder_info()).encode())
        return self

    def notice(self) -> str:
        """A line for the log when the lock was taken over or could not be taken; else empty."""
        if self.unsupported:
            return (
                f"output dir lock: the file system of {self.output_dir} does not support flock "
                f"({self.unsupported}); running without it, so nothing stops a second trainer there"
            )
        if self.previous:
            return (
                f"output dir lock: taken over from {describe_holder(self.previous)}, which ended without releasing it"
            )
        return ""

    def __del__(self):  # a Trainer dropped without finishing its run (tests, notebooks) frees the dir too
        try:
            self.release()
        except Exception:
            pass

    def release(self) -> None:
        """Remove the lock file while still holding the lock, then unlock; an output dir this lock
        created and nothing else wrote into is removed too (a run refused during setup leaves nothing)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            try:
                self.output_dir.rmdir()  # only if empty
            except OSError:
                pass
