"""The output directory as storage: can it be written, and what a failed write means.

:func:`check_writable` runs before a job writes anything (so a read-only or foreign
directory fails at once, not after the first steps); :func:`storage_error` turns an
``OSError`` met while writing (disk full, quota, read-only file system) into a one-line
:class:`~meshforge.errors.OutputError` that says what happened and what to do.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from ..errors import OutputError

SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
"""No space left on the device, or the disk quota is exhausted."""
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
"""No permission to write there, or a read-only file system."""


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(output_dir: str | Path) -> None:
    """Refuse an output dir this process cannot write to (tried for real: a probe file, created
    and removed, in the dir or the nearest existing parent it would be created in)."""
    out = Path(output_dir)
    where = _nearest_existing(out)
    if not where.is_dir():
        raise OutputError(f"train.output_dir = {out}: {where} is not a directory; choose another train.output_dir")
    probe = where / f".meshforge-write-test-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = out if where == out.absolute() else f"{out} (to be created in {where})"
        raise storage_error(e, f"the output dir {what} cannot be written") from None


def storage_error(error: OSError, doing: str) -> OutputError:
    """One line for a failed write: ``doing`` (e.g. "writing checkpoint step_00000200") and the remedy."""
    if error.errno in SPACE_ERRNOS:
        why = "no space left on the device" if error.errno == errno.ENOSPC else "the disk quota is exhausted"
        fix = "free space there (older runs, checkpoint.keep_last) or point train.output_dir at a larger disk"
    elif error.errno in ACCESS_ERRNOS:
        why = "read-only file system" if error.errno == errno.EROFS else "permission denied"
        fix = "choose a train.output_dir this user can write to"
    else:
        why, fix = (error.strerror or str(error)), "check the disk and the path"
    return OutputError(f"{doing}: {why} ({errno.errorcode.get(error.errno, error.errno)}); {fix}")


def find_os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, its cause/context chain, or one of the failures a
    ``torch.distributed.checkpoint`` CheckpointException collected from the ranks."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: exception or WRAPPED_EXCEPTION}
        if isinstance(failures, dict):
            for f in failures.values():
                stack.append(f[0] if isinstance(f, tuple) else f)
    return None
