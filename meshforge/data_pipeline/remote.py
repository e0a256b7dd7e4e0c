"""Object storage behind one small store: URLs, retries with backoff, counted traffic.

``data.path`` (and every ``data.blend`` item) may be a URL of any installed ``fsspec``
filesystem: ``s3://bucket/prefix`` (``s3fs``), ``https://host/prefix`` (``aiohttp``), ``gs://``,
``az://`` ... (``pip install -e ".[remote]"``). A local path never comes here: :func:`is_url`
is the one test, and local data keeps its memory-mapped path untouched.

Credentials come only from the environment and each filesystem's own config files
(``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE`` / ``~/.aws``, ``AWS_ENDPOINT_URL`` for an S3-compatible
store, ...): a URL that carries them (``https://user:secret@host``) is refused, so no key ever
reaches a config, a log or ``config.json``.

Errors: connection resets, timeouts, 5xx and throttling (429, SlowDown) are retried with
exponential backoff (counted in :class:`RemoteStats`, which the loader's metrics report) until
``retry_seconds`` have passed; then, and at once for a missing object or refused access, a
:class:`RemoteError` (one line naming the URL) ends the run.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.remote_http import MAX_RANGES, NoMultiRange, gather_ranges

_EXTRA = 'pip install -e ".[remote]"'
_LOCAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class RemoteError(DataError):
    """Remote data that cannot be read (server gone, object missing or changed, bad URL)."""


def is_url(path: str) -> bool:
    """``scheme://...`` other than ``file://``; a Windows drive or a plain path is not a URL."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum() and scheme != "file"


def check_url(url: str) -> str:
    """``url`` without a trailing slash; refuses credentials in it and a scheme fsspec lacks."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise RemoteError(
            f"data URL {parts.scheme}://...@{parts.hostname}{parts.path} carries credentials: remove them from "
            "the URL and give them through the environment or the filesystem's config file"
        )
    if parts.query or parts.fragment:
        raise RemoteError(f"data URL {url} has a query or fragment: give the prefix only (scheme://host/prefix)")
    if not parts.netloc:
        raise RemoteError(f"data URL {url} names no host or bucket: use s3://bucket/prefix or https://host/prefix")
    try:
        import fsspec
    except ImportError:
        raise RemoteError(f"data URL {url} needs fsspec: {_EXTRA}") from None
    try:
        fsspec.get_filesystem_class(parts.scheme)
    except (ImportError, ValueError) as exc:
        raise RemoteError(
            f"data URL {url}: no filesystem for {parts.scheme}:// ({str(exc).splitlines()[0]}): "
            f"{_EXTRA}, or the fsspec package of that scheme"
        ) from None
    return url.rstrip("/")


@dataclass
class RemoteStats:
    """Traffic of one process: requests, bytes and retries (thread-safe counters)."""

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, nbytes: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_fetched += nbytes
            self.retries += retries

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "data_requests": self.requests,
                "data_bytes_fetched": self.bytes_fetched,
                "data_retries": self.retries,
            }


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status behind an error (s3fs wraps botocore's ClientError in an OSError: its cause)."""
    for _ in range(3):
        if exc is None:
            return None
        for attr in ("status", "status_code"):
            v = getattr(exc, attr, None)
            if isinstance(v, int):
                return v
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):  # botocore ClientError
            return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        exc = exc.__cause__
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth a retry: connection trouble, timeouts, 5xx, 429/throttling; not a missing object or refusal."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    text = f"{type(exc).__name__} {exc}"
    if any(k in text for k in ("SlowDown", "Throttl", "RequestTimeout", "ServiceUnavailable", "InternalError")):
        return True
    return isinstance(exc, (OSError, ConnectionError, asyncio.TimeoutError, TimeoutError)) or "Connect" in text


class RemoteStore:
    """Reads (and, for ``data prepare``, writes) objects under one URL prefix, with retries."""

    def __init__(self, url: str, retry_seconds: float = 120.0, stats: RemoteStats | None = None):
        self.url = check_url(url)
        import fsspec

        # retries are ours (one budget, counted); s3fs and botocore would otherwise add their own on top
        options = (
            {"config_kwargs": {"retries": {"max_attempts": 1}}} if self.url.startswith(("s3://", "s3a://")) else {}
        )
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.retry_seconds = float(retry_seconds)
        self.stats = stats or RemoteStats()
        self.multi_range = True
        """HTTP: all ranges of an object in one request (off once the server answers one with the whole object)."""

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _call(self, what: str, name: str, fn, *args, **kwargs):
        """``fn(*args)`` with retries of transient errors; a :class:`RemoteError` naming the URL otherwise."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            try:
                self.stats.add(requests=1)
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- classified here, re-raised as one line
                self._fail_or_wait(exc, what, name, deadline, delay)
                delay = min(delay * 2, 5.0)

    def _fail_or_wait(self, exc: BaseException, what: str, name: str, deadline: float, delay: float) -> None:
        url = self.url_of(name)
        if isinstance(exc, OSError) and (
            exc.errno in _LOCAL_ERRNOS or (isinstance(exc, PermissionError) and exc.filename)
        ):
            raise exc  # the local side (cache dir full or read-only): the caller names the dir
        cause = exc.__cause__
        if isinstance(exc, FileNotFoundError) and cause is not None and _status(cause) != 404:
            exc = cause  # fsspec's HTTP stat reports any failure as "not found": judge the real one
        if isinstance(exc, FileNotFoundError):
            raise RemoteError(f"{url} does not exist ({what}): check data.path, or re-run the upload") from None
        if isinstance(exc, PermissionError) or _status(exc) in (401, 403):
            raise RemoteError(
                f"{url}: access denied ({what}): give credentials through the environment or the "
                "filesystem's config file (e.g. AWS_PROFILE, ~/.aws/credentials)"
            ) from None
        if not is_transient(exc):
            raise RemoteError(
                f"{url}: {what} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        if time.monotonic() + delay > deadline:
            raise RemoteError(
                f"{url}: {what} failed, retried for data.remote_retry_seconds = {self.retry_seconds:g} s ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no answer'}): is the server up? "
                "(data.remote_retry_seconds sets how long to keep trying)"
            ) from None
        self.stats.add(retries=1)
        time.sleep(delay)

    def info(self, name: str) -> dict:
        """Size and ETag (``None`` where the server gives none) of object ``name``."""
        kw = {"refresh": True} if _takes_refresh(self.fs) else {}
        return _size_etag(self._call("stat", name, self.fs.info, self._path(name), **kw))

    def infos(self, names: list[str]) -> list[dict]:
        """:meth:`info` of many objects, asked concurrently where the filesystem is asynchronous."""
        if not getattr(self.fs, "async_impl", False):
            return [self.info(n) for n in names]
        from fsspec.asyn import sync

        kw = {"refresh": True} if _takes_refresh(self.fs) else {}
        out: list = [None] * len(names)
        todo, deadline, delay = list(range(len(names))), time.monotonic() + self.retry_seconds, 0.2
        while todo:
            self.stats.add(requests=len(todo))

            async def gather(ids=tuple(todo)):
                return await asyncio.gather(
                    *[self.fs._info(self._path(names[i]), **kw) for i in ids], return_exceptions=True
                )

            got = sync(self.fs.loop, gather)
            failed = [(i, r) for i, r in zip(todo, got) if isinstance(r, BaseException)]
            for i, r in zip(todo, got):
                if not isinstance(r, BaseException):
                    out[i] = _size_etag(r)
            if failed:
                self._fail_or_wait(failed[0][1], "stat", names[failed[0][0]], deadline, delay)
                delay = min(delay * 2, 5.0)
            todo = [i for i, _ in failed]
        return out

    def cat(self, name: str) -> bytes:
        data = self._call("read", name, self.fs.cat_file, self._path(name))
        self.stats.add(nbytes=len(data))
        return data

    def _cat_ranges(self, ranges: list[tuple[str, int, int]], etags: dict) -> list:
        """One concurrent round of range reads (counted in ``stats.requests``). Over HTTP, all ranges
        of one object go in one multi-range request (``remote_http``); over S3 (no multi-range) each
        range is one request, all at once. Both carry ``If-Match`` with the object's (strong) ETag,
        so an object replaced by one of the same size is refused (412), not mixed in; other
        schemes go through ``fs.cat_ranges`` (size checks only)."""
        if type(self.fs).__name__ == "HTTPFileSystem" and self.multi_range:
            return self._http_multi_range(ranges, etags)
        self.stats.add(requests=len(ranges))
        if etags and type(self.fs).__name__ == "HTTPFileSystem":
            from fsspec.asyn import sync

            def headers(name: str) -> dict:
                tag = etags.get(name)
                return {"headers": {"If-Match": f'"{tag}"'}} if tag and not tag.startswith("W/") else {}

            async def gather():
                return await asyncio.gather(
                    *[self.fs._cat_file(self._path(n), start=s, end=e, **headers(n)) for n, s, e in ranges],
                    return_exceptions=True,
                )

            return sync(self.fs.loop, gather)
        if etags and type(self.fs).__name__ == "S3FileSystem":
            from fsspec.asyn import sync

            async def get(name: str, start: int, end: int) -> bytes:
                bucket, key, _ = self.fs.split_path(self._path(name))
                tag = {"IfMatch": f'"{etags[name]}"'} if etags.get(name) else {}
                resp = await self.fs._call_s3(
                    "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **tag
                )
                try:
                    return await resp["Body"].read()
                finally:
                    resp["Body"].close()

            async def gather_s3():
                return await asyncio.gather(*[get(*r) for r in ranges], return_exceptions=True)

            return sync(self.fs.loop, gather_s3)
        return self.fs.cat_ranges(
            [self._path(n) for n, _, _ in ranges],
            [s for _, s, _ in ranges],
            [e for _, _, e in ranges],
            on_error="return",
        )

    def _http_multi_range(self, ranges: list[tuple[str, int, int]], etags: dict) -> list:
        """:meth:`_cat_ranges` over HTTP: per object, its ranges in requests of up to ``MAX_RANGES``,
        every request of the round at once; a server that would answer with the whole object makes
        this store ask range by range from then on."""
        from fsspec.asyn import sync  # fsspec: the optional `remote` extra

        by_name: dict[str, list[int]] = {}
        for i, (name, _, _) in enumerate(ranges):
            by_name.setdefault(name, []).append(i)
        requests, members = [], []
        for name, ids in by_name.items():
            ids.sort(key=lambda i: ranges[i][1])
            for k in range(0, len(ids), MAX_RANGES):
                chunk = ids[k : k + MAX_RANGES]
                requests.append((self._path(name), [ranges[i][1:] for i in chunk], etags.get(name)))
                members.append(chunk)
        self.stats.add(requests=len(requests))
        out: list = [None] * len(ranges)
        for chunk, got in zip(members, sync(self.fs.loop, gather_ranges, self.fs, requests)):
            if isinstance(got, NoMultiRange):
                self.multi_range = False
                return self._cat_ranges(ranges, etags)
            for j, i in enumerate(chunk):
                out[i] = got if isinstance(got, BaseException) else got[j]
        return out

    def read_ranges(self, ranges: list[tuple[str, int, int]], etags: dict | None = None) -> list[bytes]:
        """Bytes ``[start, end)`` of each ``(name, start, end)``, fetched concurrently; failed ranges retried.
        ``etags`` (name -> ETag first seen) makes a changed object an error where the protocol allows."""
        out: list = [None] * len(ranges)
        todo = list(range(len(ranges)))
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while todo:
            got = self._cat_ranges([ranges[i] for i in todo], etags or {})
            failed = []
            for i, data in zip(todo, got):
                name, start, end = ranges[i]
                if isinstance(data, BaseException):
                    failed.append((i, data))
                    continue
                if len(data) != end - start:
                    raise RemoteError(
                        f"{self.url_of(name)} gave {len(data)} bytes for bytes {start}..{end}: the object "
                        "changed (shorter than the manifest says); re-prepare or re-upload the data"
                    )
                self.stats.add(nbytes=len(data))
                out[i] = data
            if failed:
                i, exc = failed[0]
                if _status(exc) == 412:
                    raise RemoteError(
                        f"{self.url_of(ranges[i][0])} changed (its ETag is no longer {etags.get(ranges[i][0])}, "
                        "the one first seen): re-prepare or re-upload the data"
                    )
                if _status(exc) == 416:
                    raise RemoteError(
                        f"{self.url_of(ranges[i][0])} refused bytes {ranges[i][1]}..{ranges[i][2]} (416): the "
                        "object changed (shorter than the manifest says); re-prepare or re-upload the data"
                    )
                self._fail_or_wait(exc, "range read", ranges[i][0], deadline, delay)
                delay = min(delay * 2, 5.0)
            todo = [i for i, _ in failed]
        return out

    def get_file(self, name: str, local: Path) -> None:
        """Download object ``name`` to ``local`` through a temporary name (atomic rename)."""
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            self._call("download", name, self.fs.get_file, self._path(name), str(tmp))
            self.stats.add(nbytes=tmp.stat().st_size)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local: Path, name: str) -> None:
        self._call("upload", name, self.fs.put_file, str(local), self._path(name))

    def exists(self, name: str) -> bool:
        return bool(self._call("stat", name, self.fs.exists, self._path(name)))


def _size_etag(info: dict) -> dict:
    etag = info.get("ETag") or info.get("etag") or info.get("ETAG")
    return {"size": info.get("size"), "etag": str(etag).strip('"') if etag else None}


def _takes_refresh(fs) -> bool:
    # s3fs caches listings; ``refresh=True`` asks the store again (HTTP has no cache to refresh)
    return type(fs).__name__ == "S3FileSystem"
