"""Many byte ranges of one HTTP object in one request: ``Range: bytes=a-b,c-d,...`` (RFC 9110 §14).

A server that supports it (nginx does, for static files; ``max_ranges`` is unlimited by
default) answers ``206`` with a ``multipart/byteranges`` body, one part per range, each part
carrying its ``Content-Range``; a single range comes back as a plain ``206`` body. A server may
also merge ranges into fewer parts or answer in another order: every requested range is cut
from whichever part covers it. A server that ignores multiple ranges and would send the whole
object (``200``; nginx does when the ranges add up to more than the object, a server with a low
range limit when there are too many) is not read: :class:`NoMultiRange` tells the caller to ask
range by range instead, so a batch never fetches a whole shard.

Every request carries ``If-Match`` with the object's strong ETag where one is known, so an
object replaced by one of the same size is refused (412), not mixed in.
"""

from __future__ import annotations

import asyncio
import re

MAX_RANGES = 100
"""Ranges per request: ~2 KB of ``Range`` header, far below servers' header limits (nginx: 8 KB per line)."""

_CONTENT_RANGE = re.compile(rb"bytes (\d+)-(\d+)/(\d+|\*)", re.I)


class NoMultiRange(Exception):
    """The server answered a multi-range request with the whole object (it was not read)."""


def range_header(spans: list[tuple[int, int]]) -> str:
    """``[start, end)`` spans -> the ``Range`` header value (HTTP's ends are inclusive)."""
    return "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans)


def parse_parts(content_type: str, content_range: str | None, body: bytes) -> list[tuple[int, bytes]]:
    """``(first byte, bytes)`` of each part of a ``206`` answer (multipart/byteranges or one part)."""
    if content_type.lower().startswith("multipart/byteranges"):
        m = re.search(r'boundary="?([^";]+)"?', content_type)
        if m is None:
            raise ValueError(f"multipart/byteranges answer without a boundary ({content_type})")
        return _multipart(body, m.group(1).encode())
    m = _CONTENT_RANGE.match((content_range or "").encode())
    if m is None:
        raise ValueError(f"206 answer without a usable Content-Range ({content_range!r})")
    return [(int(m.group(1)), body)]


def _multipart(body: bytes, boundary: bytes) -> list[tuple[int, bytes]]:
    """Parts of a multipart/byteranges body, each cut by its Content-Range length (so a boundary-like
    byte string inside the data cannot split it)."""
    parts, delim, pos = [], b"--" + boundary, 0
    while True:
        pos = body.find(delim, pos)
        if pos < 0:
            raise ValueError("multipart/byteranges body ends without its closing boundary")
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ValueError("multipart/byteranges part without a header end")
        m = None
        for line in body[pos:head_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                m = _CONTENT_RANGE.match(value.strip())
        if m is None:
            raise ValueError("multipart/byteranges part without a Content-Range")
        start, last = int(m.group(1)), int(m.group(2))
        data = body[head_end + 4 : head_end + 4 + last - start + 1]
        if len(data) != last - start + 1:
            raise ValueError(f"multipart/byteranges part {start}-{last} is cut short")
        parts.append((start, data))
        pos = head_end + 4 + len(data)


def cut(parts: list[tuple[int, bytes]], start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` from the part that covers them."""
    for first, data in parts:
        if first <= start and end <= first + len(data):
            return data[start - first : end - first]
    raise ValueError(f"the server's answer does not cover bytes {start}..{end}")


async def get_ranges(fs, url: str, spans: list[tuple[int, int]], etag: str | None) -> list[bytes]:
    """Bytes of each ``[start, end)`` of ``spans`` (sorted, disjoint) of ``url``, in one GET through
    ``fs`` (an fsspec ``HTTPFileSystem``: its keep-alive session and its request options).

    Raises ``FileNotFoundError`` (404), the client's status error (others), :class:`NoMultiRange`,
    or ``ValueError`` for an answer that cannot be parsed."""
    kw = dict(fs.kwargs)
    headers = {**kw.pop("headers", {}), "Range": range_header(spans)}
    if etag and not etag.startswith("W/"):
        headers["If-Match"] = f'"{etag}"'
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kw) as resp:
        if resp.status == 404:
            raise FileNotFoundError(url)
        resp.raise_for_status()
        if resp.status != 206:
            resp.close()  # the connection is dropped, not drained: the whole object is never read
            raise NoMultiRange(url)
        body = await resp.read()
        parts = parse_parts(resp.headers.get("Content-Type", ""), resp.headers.get("Content-Range"), body)
    return [cut(parts, s, e) for s, e in spans]


async def gather_ranges(fs, requests: list[tuple[str, list[tuple[int, int]], str | None]]) -> list:
    """:func:`get_ranges` of every ``(url, spans, etag)`` at once; a failed request gives its exception."""
    return await asyncio.gather(*[get_ranges(fs, u, s, t) for u, s, t in requests], return_exceptions=True)
