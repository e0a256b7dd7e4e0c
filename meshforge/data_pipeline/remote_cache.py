"""A remote data dir's node-local cache: manifest, tokenizer and every ``.idx``, fetched once per node.

``open_remote_data_dir(url, ...)`` keeps ``<cache_dir>/remote/<sha256(url)[:16]>/``::

    manifest.json       the remote manifest, as fetched
    tokenizer.model     the data's tokenizer (or tokenizer.json + its config; fingerprint checked against the manifest)
    shard_00000.idx     every shard's index (size and sha256 checked against the manifest)
    shard_00000.bin     only with data.remote_mode = download (size and sha256 checked)
    objects.json        size and ETag of every remote object when it was first seen

The first process on a node to take the directory's ``fcntl`` lock fetches what is missing;
the others find it ready. Every file arrives under a temporary name and is renamed into
place after its check, so a crash leaves nothing half-written. Each open also asks the store
for the size and ETag of the manifest and of every ``.bin`` (one HEAD each): a new manifest
(the data set was re-prepared) empties the cache; a ``.bin`` whose size differs from the
manifest, or whose ETag differs from the one recorded, is one error naming its URL.

A cache dir that cannot be written (read-only, no permission, full) is one error that says
which dir and to set data.cache_dir.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.layout import MANIFEST, TOKENIZER_FILE, atomic_write_json, read_json
from meshforge.data_pipeline.manifest import DataInfo, check_tokenizer, load_data_tokenizer, open_shards, parse_manifest
from meshforge.data_pipeline.remote import RemoteError, RemoteStats, RemoteStore
from meshforge.file_hash import file_sha256

OBJECTS = "objects.json"
_FETCHERS = 8
"""Files (``.idx``; ``.bin`` in download mode) fetched at once when a node fills its cache."""
REMOTE_MODES = ("range", "download")


@dataclass
class RemoteDataInfo(DataInfo):
    """A :class:`DataInfo` whose ``.bin`` files stay remote (range mode): ``store`` reads them by name."""

    store: RemoteStore | None = None
    bin_names: list[str] = field(default_factory=list)
    url: str = ""
    etags: dict = field(default_factory=dict)
    """``.bin`` name -> the ETag first seen (range reads insist on it where the protocol allows)."""


def cache_path(url: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "remote" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _cache_error(exc: OSError, where: Path) -> DataError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataError(
            f"the data cache dir {where} is full ({exc.strerror}): free space there or set data.cache_dir "
            "(or $MESHFORGE_CACHE) to a dir with room for the manifest and every .idx"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DataError(
            f"the data cache dir {where} cannot be written ({exc.strerror}): set data.cache_dir "
            "(or $MESHFORGE_CACHE) to a writable dir"
        )
    return DataError(f"the data cache dir {where} failed: {exc.strerror or exc}: set data.cache_dir to a working dir")


def open_remote_data_dir(
    url: str,
    tokenizer_path: str,
    cache_dir: Path,
    mode: str = "range",
    retry_seconds: float = 120.0,
    stats: RemoteStats | None = None,
) -> DataInfo:
    """Open the prepared data dir at ``url`` (fetching its small files into the node cache)."""
    if mode not in REMOTE_MODES:
        raise DataError(f"data.remote_mode {mode!r} is not one of {', '.join(REMOTE_MODES)}")
    store = RemoteStore(url, retry_seconds, stats)
    local = cache_path(store.url, cache_dir)
    try:
        local.mkdir(parents=True, exist_ok=True)
        lock = open(local / ".lock", "a")
    except OSError as exc:
        raise _cache_error(exc, local) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest, objects = _sync(store, local, mode)
        except OSError as exc:
            raise _cache_error(exc, local) from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    tok = load_data_tokenizer(tokenizer_path or local, f"tokenizer of {store.url}")  # else the cached copy
    check_tokenizer(tok, manifest, store.url_of(MANIFEST))
    counts = (
        manifest["num_documents"],
        manifest["num_tokens"],
        str(tok.path),
        tok.fingerprint,
        tok.vocab_size,
        manifest,
    )
    shards = open_shards(
        local,
        manifest,
        remote_bins=mode != "download",
        name=lambda prefix: store.url_of(str(prefix.relative_to(local))),
    )
    if mode == "download":
        return DataInfo(local, shards, *counts)
    for e in manifest["shards"]:
        if not isinstance(
            e.get("max_token_id"), int
        ):  # a local shard is scanned instead; a remote one is not read whole
            raise DataError(
                f"the manifest of {store.url} records no max_token_id for {e['prefix']}: re-prepare the data "
                "with this meshforge (or use data.remote_mode = download)"
            )
    return RemoteDataInfo(
        local,
        shards,
        *counts,
        store=store,
        bin_names=[f"{e['prefix']}.bin" for e in manifest["shards"]],
        url=store.url,
        etags={k: v.get("etag") for k, v in objects.items() if isinstance(v, dict) and v.get("etag")},
    )


def _sync(store: RemoteStore, local: Path, mode: str) -> tuple[dict, dict]:
    """Bring the cache up to date with the store (under the node lock); returns the manifest and the
    size and ETag of each object."""
    objects = read_json(local / OBJECTS) or {}
    head = store.info(MANIFEST)
    if objects.get(MANIFEST) != head or not (local / MANIFEST).is_file():
        for p in local.iterdir():  # a new (or first) manifest: start the cache afresh
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        objects = {}
        store.get_file(MANIFEST, local / MANIFEST)
    manifest = _read_manifest(local / MANIFEST, store)
    for name in manifest["tokenizer"].get("files", [TOKENIZER_FILE]):  # older manifests: the sentencepiece model
        if not (local / name).is_file():
            store.get_file(name, local / name)
    with ThreadPoolExecutor(_FETCHERS, thread_name_prefix="meshforge-fetch") as pool:  # the first error, in shard order
        list(pool.map(lambda e: _fetch_checked(store, local, e, "idx"), manifest["shards"]))
    names = [f"{e['prefix']}.bin" for e in manifest["shards"]]
    for e, name, info in zip(manifest["shards"], names, store.infos(names)):  # one concurrent round of HEADs
        if info["size"] != e["bin_bytes"]:
            raise RemoteError(
                f"{store.url_of(name)} has {info['size']} bytes, the manifest says {e['bin_bytes']}: the object "
                "changed after preparation; re-prepare or re-upload the data"
            )
        seen = objects.get(name)
        if seen and seen.get("etag") and info["etag"] and seen["etag"] != info["etag"]:
            raise RemoteError(
                f"{store.url_of(name)} changed (ETag {info['etag']}, was {seen['etag']}) while its manifest "
                "did not: re-prepare or re-upload the data"
            )
        objects[name] = info
    if mode == "download":
        with ThreadPoolExecutor(_FETCHERS, thread_name_prefix="meshforge-fetch") as pool:
            list(pool.map(lambda e: _fetch_checked(store, local, e, "bin"), manifest["shards"]))
    objects[MANIFEST] = head
    atomic_write_json(local / OBJECTS, objects)
    return manifest, objects


def _read_manifest(path: Path, store: RemoteStore) -> dict:
    try:
        return parse_manifest(path.read_bytes(), store.url_of(MANIFEST), "re-prepare or re-upload the data")
    except DataError as exc:
        path.unlink()  # fetched afresh next time
        raise RemoteError(str(exc)) from None


def _fetch_checked(store: RemoteStore, local: Path, entry: dict, ext: str) -> None:
    """``<prefix>.<ext>`` into the cache, unless there already; its size and sha256 must match the manifest."""
    name = f"{entry['prefix']}.{ext}"
    dest = local / name
    if dest.is_file() and dest.stat().st_size == entry[f"{ext}_bytes"]:
        return  # checked when it arrived (renamed into place only after the check)
    tmp = local / f".{name}.{os.getpid()}.check"
    try:
        store.get_file(name, tmp)
        size, sha = tmp.stat().st_size, file_sha256(tmp)
        if size != entry[f"{ext}_bytes"] or sha != entry[f"{ext}_sha256"]:
            raise RemoteError(
                f"{store.url_of(name)} ({size} bytes, sha {sha[:12]}) does not match the manifest "
                f"({entry[f'{ext}_bytes']} bytes, sha {entry[f'{ext}_sha256'][:12]}): re-prepare or re-upload the data"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
