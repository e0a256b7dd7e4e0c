"""HTTP multi-range reads: one request per shard per batch, parsed byte for byte, and a server without them.

The parser is checked on answers built here (every shape RFC 9110 allows a server to give);
the requests against real nginx on loopback: its multipart/byteranges answers, and with
``max_ranges 1`` (nginx then answers a multi-range request with the whole file, which the
store must not read).
"""

from __future__ import annotations

import numpy as np
import pytest

from meshforge.data_pipeline import TokenDataset, open_data_dir
from meshforge.data_pipeline.remote import RemoteStats
from meshforge.data_pipeline.remote_cache import open_remote_data_dir
from meshforge.data_pipeline.remote_dataset import RemoteTokenDataset, merge_pieces
from meshforge.data_pipeline.remote_http import cut, parse_parts, range_header
from remote_servers import Nginx, need_nginx

OBJ = bytes(range(256)) * 4  # a 1024-byte object


def _multipart(parts: list[tuple[int, int]], boundary: str = "3d6b6a416f9b5", total: str = "1024") -> bytes:
    out = b""
    for s, e in parts:  # inclusive, as on the wire
        out += (
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {s}-{e}/{total}\r\n\r\n"
        ).encode() + OBJ[s : e + 1]
    return out + f"\r\n--{boundary}--\r\n".encode()


MT = "multipart/byteranges; boundary=3d6b6a416f9b5"
PARSE = [
    # (case, content type, content range, body, requested [start, end) spans)
    (
        "one part per range",
        MT,
        None,
        _multipart([(0, 9), (100, 199), (1000, 1023)]),
        [(0, 10), (100, 200), (1000, 1024)],
    ),
    ("parts in another order", MT, None, _multipart([(1000, 1023), (0, 9)]), [(0, 10), (1000, 1024)]),
    ("ranges merged into one part", MT, None, _multipart([(0, 299)]), [(0, 10), (100, 200), (290, 300)]),
    (
        "a single plain 206 part",
        "application/octet-stream",
        "bytes 100-199/1024",
        OBJ[100:200],
        [(100, 120), (150, 200)],
    ),
    (
        "quoted boundary, unknown total",
        'multipart/byteranges; boundary="3d6b6a416f9b5"',
        None,
        _multipart([(5, 6), (7, 8)], total="*"),
        [(5, 7), (7, 9)],
    ),
]


@pytest.mark.parametrize("case, ctype, crange, body, spans", PARSE, ids=[c[0] for c in PARSE])
def test_parse_answers(case, ctype, crange, body, spans):
    parts = parse_parts(ctype, crange, body)
    assert [cut(parts, s, e) for s, e in spans] == [OBJ[s:e] for s, e in spans]


def test_a_boundary_inside_the_data_does_not_split_a_part():
    data = b"xx\r\n--3d6b6a416f9b5\r\nContent-Range: bytes 0-1/2\r\n\r\nyy"
    body = (f"\r\n--3d6b6a416f9b5\r\nContent-Range: bytes 10-{10 + len(data) - 1}/999\r\n\r\n").encode() + data
    body += b"\r\n--3d6b6a416f9b5\r\nContent-Range: bytes 500-501/999\r\n\r\nzz\r\n--3d6b6a416f9b5--\r\n"
    parts = parse_parts(MT, None, body)
    assert parts == [(10, data), (500, b"zz")]


BAD = [
    ("no boundary", "multipart/byteranges", None, _multipart([(0, 9)]), "without a boundary"),
    ("part cut short", MT, None, _multipart([(0, 99)])[:-60], "cut short"),
    ("no closing boundary", MT, None, _multipart([(0, 9)])[:-20], "closing boundary"),
    (
        "part without Content-Range",
        MT,
        None,
        b"\r\n--3d6b6a416f9b5\r\nContent-Type: x\r\n\r\nab\r\n--3d6b6a416f9b5--",
        "without a Content-Range",
    ),
    ("plain 206 without Content-Range", "application/octet-stream", None, OBJ[:10], "without a usable Content-Range"),
]


@pytest.mark.parametrize("case, ctype, crange, body, message", BAD, ids=[c[0] for c in BAD])
def test_bad_answers_are_refused(case, ctype, crange, body, message):
    with pytest.raises(ValueError, match=message):
        parse_parts(ctype, crange, body)


def test_cut_refuses_bytes_no_part_covers():
    with pytest.raises(ValueError, match="does not cover bytes 5..20"):
        cut([(0, OBJ[:10])], 5, 20)
    assert range_header([(0, 10), (20, 21)]) == "bytes=0-9,20-20"


def _batches(local, remote, stats, seq_len):
    """Read three batches from both; returns (requests, shards touched, bytes fetched, sample bytes)."""
    req0, bytes0, touched, sample = stats.requests, stats.bytes_fetched, 0, 0
    for first in (0, 40, 3 * len(local) + 5):  # one across epochs
        idx = np.arange(first, first + 40)
        np.testing.assert_array_equal(local.read_batch(idx), remote.read_batch(idx))
        touched += len(merge_pieces(remote._pieces(idx)))
        sample += len(idx) * (seq_len + 1) * 2
    return stats.requests - req0, touched, stats.bytes_fetched - bytes0, sample


def test_one_request_per_shard_per_batch(shards_data, http, tmp_path):
    stats = RemoteStats()
    info = open_remote_data_dir(f"{http.url}/data", "", tmp_path / "cache", stats=stats)
    remote = RemoteTokenDataset(info, 48, seed=3)
    requests, touched, fetched, sample = _batches(
        TokenDataset(open_data_dir(shards_data), 48, seed=3), remote, stats, 48
    )
    assert requests == touched and fetched <= 1.1 * sample
    assert remote.store.multi_range


def test_a_server_without_multi_range_is_read_range_by_range(shards_data, tmp_path):
    """nginx with ``max_ranges 1`` sends the whole file for two ranges: the store drops that answer
    unread and asks range by range, so the bytes fetched stay those of the samples."""
    need_nginx()
    server = Nginx(shards_data.parent, tmp_path / "ng", max_ranges=1).start()
    try:
        stats = RemoteStats()
        info = open_remote_data_dir(f"{server.url}/data", "", tmp_path / "cache", stats=stats)
        remote = RemoteTokenDataset(info, 48, seed=3)
        requests, touched, fetched, sample = _batches(
            TokenDataset(open_data_dir(shards_data), 48, seed=3), remote, stats, 48
        )
        assert not remote.store.multi_range and requests > touched
        assert fetched <= 1.1 * sample
    finally:
        server.stop()


def test_batches_read_four_at_once_are_the_local_batches_in_order(shards_data, http, tmp_path):
    """The training loader's depth for remote data (``read_ahead`` batches, each in its own thread)
    gives the local loader's batches, in order, and resumes from its state like it."""
    from meshforge.data_pipeline import DistributedLoader

    info = open_remote_data_dir(f"{http.url}/data", "", tmp_path / "cache")
    k = RemoteTokenDataset.read_ahead
    assert k > 1
    local = DistributedLoader(TokenDataset(open_data_dir(shards_data), 32, seed=1), 12, prefetch=0)
    remote = DistributedLoader(RemoteTokenDataset(info, 32, seed=1), 12, prefetch=k, workers=k)
    try:
        assert remote._pool._max_workers == k
        for _ in range(9):
            np.testing.assert_array_equal(local.next_batch().numpy(), remote.next_batch().numpy())
        state = remote.state_dict()
        resumed = DistributedLoader(RemoteTokenDataset(info, 32, seed=1), 12, prefetch=k, workers=k)
        resumed.load_state_dict(state)
        for _ in range(3):
            np.testing.assert_array_equal(local.next_batch().numpy(), resumed.next_batch().numpy())
        resumed.close()
    finally:
        remote.close()
