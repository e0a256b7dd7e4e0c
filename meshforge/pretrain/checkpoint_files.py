"""What a checkpoint's meta.json records about its files, and the check against it.

:func:`file_records` runs when a checkpoint is finalized (rank 0, just before meta.json is
written); :func:`damage` runs before a checkpoint is resumed or generated from. Sizes catch a
truncated or partly copied file at the cost of a ``stat``; checksums catch changed contents,
but only for files up to :data:`CHECKSUM_MAX_BYTES`, so a big model's shards are never read
back at save time. :func:`verify_checkpoint` and :func:`unreadable` turn damage into a
CheckpointError naming the file and the intact checkpoints to use instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from ..file_hash import file_sha256

CHECKSUM_MAX_BYTES = 256 << 20
"""Files up to this size get a sha256 in meta.json; larger ones (model/optimizer shards) their size only,
so finalizing a big checkpoint never reads it back."""


def file_records(ckpt: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint dir except meta.json: relative path -> bytes (and sha256 if small)."""
    out = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != "meta.json":
            size = p.stat().st_size
            rec: dict[str, Any] = {"bytes": size}
            if size <= CHECKSUM_MAX_BYTES:
                rec["sha256"] = file_sha256(p)
            out[str(p.relative_to(ckpt))] = rec
    return out


def damage(ckpt: Path, meta: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's files against what meta.json recorded; None if intact
    (or written before meta.json recorded its files)."""
    for name, rec in (meta.get("files") or {}).items():
        p = ckpt / name
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != rec.get("bytes"):
            return f"{p} has {size} bytes, {rec.get('bytes')} when written ({'truncated' if size < rec.get('bytes', 0) else 'grown'})"
        if "sha256" in rec and file_sha256(p) != rec["sha256"]:
            return f"{p} does not match the sha256 recorded when it was written (its contents changed)"
    return None


def intact_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints whose files match their meta.json, oldest first."""
    from .checkpoint import CheckpointError, list_checkpoints, read_meta

    good = []
    for p in list_checkpoints(ckpt_root):
        try:
            if damage(p, read_meta(p)) is None:
                good.append(p)
        except CheckpointError:
            pass
    return good


def verify_checkpoint(ckpt: Path, how_to_pick: str) -> dict[str, Any]:
    """meta.json of ``ckpt`` after checking its files; CheckpointError naming the damage otherwise.

    ``how_to_pick`` completes "use another checkpoint with ...", e.g. ``--checkpoint.resume_from DIR``.
    """
    from .checkpoint import CheckpointError, read_meta

    try:
        meta = read_meta(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_pick_hint(ckpt, how_to_pick)}") from None
    bad = damage(ckpt, meta)
    if bad is not None:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {bad}{_pick_hint(ckpt, how_to_pick)}")
    return meta


def _pick_hint(ckpt: Path, how_to_pick: str) -> str:
    others = [p for p in intact_checkpoints(ckpt.parent) if p != ckpt]
    if not others:
        return f"; no intact checkpoint is left in {ckpt.parent} (move the damaged one away to start over)"
    return (
        f"; intact: {', '.join(p.name for p in others)}: use one with {how_to_pick.replace('DIR', str(others[-1]))}"
        f" (or move {ckpt.name} away)"
    )


@contextmanager
def unreadable(path: Path, how_to_pick: str):
    """A file of the checkpoint that cannot be read (garbage a size check could not see): a
    CheckpointError naming the checkpoint and the intact ones. A peer's failure stays what it is."""
    from .checkpoint import CheckpointError
    from .faults import is_collective_failure

    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        inner = e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException) and is_collective_failure(inner):
            raise
        reason = str(inner).strip().splitlines()[-1] if str(inner).strip() else type(inner).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(inner).__name__}: {reason[:300]}){_pick_hint(path, how_to_pick)}"
        ) from e
