"""Remote data: the same samples from nginx (HTTP ranges) and moto (S3) as from the local copy, and its failures.

Every server is real and on loopback (``remote_servers.py``; the ``shards_data``, ``http`` and
``s3`` fixtures of conftest.py); the data is a real prepared dir (four shards). Training from a
URL: ``test_remote_train.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from meshforge.data_pipeline import DataError, TokenDataset, open_data_dir
from meshforge.data_pipeline.prepare import prepare_data
from meshforge.data_pipeline.remote import RemoteStats, RemoteStore, check_url, is_transient, is_url
from meshforge.data_pipeline.remote_cache import cache_path, open_remote_data_dir
from meshforge.data_pipeline.remote_dataset import RemoteTokenDataset, merge_pieces
from meshforge.data_pipeline.remote_upload import prepare_to_url
from remote_servers import Nginx, TcpProxy, need_nginx


def _compare(local: TokenDataset, remote: RemoteTokenDataset, stats: RemoteStats) -> None:
    rng = np.random.default_rng(0)
    before = stats.bytes_fetched
    read = 0
    for first in (0, 7, len(local) - 3, 3 * len(local) + 11):  # across epoch boundaries too
        idx = np.arange(first, first + 16)
        a, b = local.read_batch(idx), remote.read_batch(idx)
        np.testing.assert_array_equal(a[0], b[0]) if isinstance(a, tuple) else np.testing.assert_array_equal(a, b)
        read += 16 * (local.seq_len + 1) * 2
    idx = rng.integers(0, 10 * len(local), size=24)
    np.testing.assert_array_equal(local.read_batch(idx), remote.read_batch(idx))
    read += 24 * (local.seq_len + 1) * 2
    assert 0 < stats.bytes_fetched - before <= 1.1 * read  # no read amplification
    for i in (0, 5, 2 * len(local) + 1):
        np.testing.assert_array_equal(local[i], remote[i])


def test_http_samples_match_local_byte_for_byte(shards_data, http, tmp_path):
    stats = RemoteStats()
    info = open_remote_data_dir(f"{http.url}/data", "", tmp_path / "cache", stats=stats)
    assert len(info.shards) == 4 and info.num_tokens == open_data_dir(shards_data).num_tokens
    local = TokenDataset(open_data_dir(shards_data), 48, seed=5)
    _compare(local, RemoteTokenDataset(info, 48, seed=5), stats)
    # manifest, tokenizer and every .idx are in the node cache; no .bin; a second open fetches none of them again
    cached = cache_path(f"{http.url}/data", tmp_path / "cache")
    assert sorted(p.name for p in cached.glob("*.idx")) == sorted(p.name for p in shards_data.glob("*.idx"))
    assert not list(cached.glob("*.bin")) and not list(cached.glob(".*.part"))
    fetched = stats.bytes_fetched
    open_remote_data_dir(f"{http.url}/data", "", tmp_path / "cache", stats=stats)
    assert stats.bytes_fetched == fetched
    valid_l = TokenDataset(open_data_dir(shards_data), 48, split="valid", seed=5, return_segments=True)
    valid_r = RemoteTokenDataset(info, 48, split="valid", seed=5, return_segments=True)
    for x, y in zip(valid_l.read_batch(np.arange(6)), valid_r.read_batch(np.arange(6))):
        np.testing.assert_array_equal(x, y)


def test_download_mode_memory_maps_checked_copies(shards_data, http, tmp_path):
    info = open_remote_data_dir(f"{http.url}/data", "", tmp_path / "cache", mode="download")
    cached = cache_path(f"{http.url}/data", tmp_path / "cache")
    for p in shards_data.glob("*.bin"):
        assert (cached / p.name).read_bytes() == p.read_bytes()
    local = TokenDataset(open_data_dir(shards_data), 32, seed=1)
    np.testing.assert_array_equal(
        local.read_batch(np.arange(40)), TokenDataset(info, 32, seed=1).read_batch(np.arange(40))
    )


def test_s3_upload_then_samples_match_local(shards_data, s3, tmp_path):
    store = RemoteStore("s3://bucket/data")
    for p in shards_data.iterdir():  # data prepare --output s3:// uploaded the same bytes
        if p.is_file():
            assert store.cat(p.name) == p.read_bytes() or p.name == "manifest.json"
    stats = RemoteStats()
    info = open_remote_data_dir("s3://bucket/data", "", tmp_path / "cache", stats=stats)
    _compare(TokenDataset(open_data_dir(shards_data), 40, seed=2), RemoteTokenDataset(info, 40, seed=2), stats)


def test_s3_object_replaced_mid_run_is_one_line(shards_data, s3, tmp_path):
    store = RemoteStore("s3://bucket/changed")
    for p in shards_data.iterdir():
        if p.is_file():
            store.put_file(p, p.name)
    info = open_remote_data_dir(store.url, "", tmp_path / "cache")
    victim = sorted(shards_data.glob("*.bin"))[1]
    store.fs.pipe(f"bucket/changed/{victim.name}", victim.read_bytes()[::-1])  # same size, other bytes
    with pytest.raises(DataError) as err:
        RemoteTokenDataset(info, 48, seed=0).read_batch(np.arange(0, 400))
    assert f"s3://bucket/changed/{victim.name} changed (its ETag is no longer" in str(err.value)
    assert "\n" not in str(err.value)


def test_s3_upload_resumes_after_a_failed_run(tiny_data, shards_data, s3, tmp_path):
    src = tiny_data.parent
    kwargs = dict(
        inputs=[str(src / "corpus.jsonl")], tokenizer_path=str(src / "tok.model"), docs_per_shard=40, progress=False
    )
    with pytest.raises(DataError, match="s3://resume-bucket/web/"):  # no bucket yet: the uploads fail
        prepare_to_url("s3://resume-bucket/web", tmp_path, prepare_data, **kwargs)
    store = RemoteStore("s3://resume-bucket/web")
    staged = {p.name: p.stat().st_ino for p in (tmp_path / "upload").glob("*/*.bin")}
    assert len(staged) == 4 and not store.exists("manifest.json")
    store.fs.mkdir("resume-bucket")
    calls = []

    def prepare(**kw):  # the real prepare_data; its shards must be found done, not written again
        calls.append(kw["output_dir"])
        out = prepare_data(**kw)
        assert {p.name: p.stat().st_ino for p in Path(kw["output_dir"]).glob("*.bin")} == staged
        return out

    prepare_to_url("s3://resume-bucket/web", tmp_path, prepare, **kwargs)
    assert len(calls) == 1
    assert json.loads(store.cat("manifest.json"))["num_documents"] == 150
    for name in staged:
        assert store.cat(name) == (shards_data / name).read_bytes()
    assert not list((tmp_path / "upload").iterdir())  # staging removed once the manifest is up


def test_s3_upload_refuses_or_keeps_an_existing_data_set(tiny_data, s3, tmp_path):
    store = RemoteStore("s3://bucket/data")
    before = store.cat("manifest.json")
    good = dict(
        inputs=[str(tiny_data.parent / "corpus.jsonl")],
        tokenizer_path=str(tiny_data.parent / "tok.model"),
        progress=False,
    )
    with pytest.raises(DataError, match="s3://bucket/data/manifest.json exists: .* pass --overwrite"):
        prepare_to_url(store.url, tmp_path, prepare_data, **good)
    with pytest.raises(DataError):  # bad input with --overwrite: refused before the old data set is touched
        prepare_to_url(
            store.url, tmp_path, prepare_data, overwrite=True, **{**good, "inputs": [str(tmp_path / "missing.jsonl")]}
        )
    assert store.cat("manifest.json") == before


def test_merge_pieces():
    assert merge_pieces([(1, 10, 20), (0, 5, 9), (1, 20, 25), (1, 3, 12), (1, 30, 31)]) == {
        0: [(5, 9)],
        1: [(3, 25), (30, 31)],
    }
    assert merge_pieces([(0, 0, 4), (0, 6, 8)], max_gap=2) == {0: [(0, 8)]}


def _read_across_an_outage(url: str, server, shards_data: Path, cache: Path) -> None:
    """Open ``url``, take ``server`` away for 2 s, read a batch: retried, then the local copy's samples."""
    stats = RemoteStats()
    remote = RemoteTokenDataset(open_remote_data_dir(url, "", cache, stats=stats, retry_seconds=60), 48, seed=5)
    server.stop()
    back = threading.Timer(2.0, server.start)
    back.start()
    try:
        t0 = time.monotonic()
        got = remote.read_batch(np.arange(100, 116))
    finally:
        back.cancel()  # if the read failed first, no server may start after the test's own stop()
        back.join()
    assert time.monotonic() - t0 >= 1.5 and stats.retries > 0
    np.testing.assert_array_equal(
        got, TokenDataset(open_data_dir(shards_data), 48, seed=5).read_batch(np.arange(100, 116))
    )


def test_server_away_a_few_seconds_then_back(shards_data, tmp_path):
    need_nginx()
    server = Nginx(shards_data.parent, tmp_path / "ng").start()
    try:
        _read_across_an_outage(f"{server.url}/data", server, shards_data, tmp_path / "cache")
    finally:
        server.stop()


def test_s3_endpoint_away_a_few_seconds_then_back(shards_data, s3, tmp_path):
    store = RemoteStore("s3://bucket/data")
    proxy = TcpProxy(s3.port).start()  # the client sees the endpoint through the proxy; moto keeps its objects
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    type(store.fs).clear_instance_cache()  # fsspec reuses filesystem objects: make the next one read the new endpoint
    try:
        _read_across_an_outage(store.url, proxy, shards_data, tmp_path / "cache")
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
        type(store.fs).clear_instance_cache()
        proxy.stop()


def _served_copy(shards_data: Path, tmp_path: Path) -> tuple[Nginx, Path]:
    root = tmp_path / "served"
    shutil.copytree(shards_data, root / "data")
    return Nginx(root, tmp_path / "ng").start(), root / "data"


def _shrink(data: Path) -> str:
    victim = sorted(data.glob("*.bin"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim.name


def _scramble(data: Path) -> str:
    """Replace a shard's .bin by other bytes of the same size (a new file: new mtime, new ETag)."""
    victim = sorted(data.glob("*.bin"))[1]
    st = victim.stat()
    tmp = victim.with_suffix(".new")
    tmp.write_bytes(victim.read_bytes()[::-1])
    os.utime(tmp, (st.st_atime + 10, st.st_mtime + 10))
    os.replace(tmp, victim)
    return victim.name


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True).returncode
        == 0
    )


FAILURES = [
    # (case, what the one line must name)
    ("credentials in the URL", "carries credentials"),
    ("unknown scheme", "no filesystem for nosuch://"),
    ("missing object", "does not exist"),
    ("server stays away", "is the server up?"),
    ("object replaced by a different size", "the manifest says"),
    ("object shrinks mid-run", "changed"),  # ETag (HTTP) or short read, whichever comes first
    ("object replaced by one of the same size mid-run", "changed (its ETag is no longer"),
    ("read-only cache dir", "cannot be written"),
    ("full cache dir", "is full"),
]


@pytest.mark.parametrize("case, message", FAILURES, ids=[c for c, _ in FAILURES])
def test_failures_are_one_line_naming_the_url(case, message, shards_data, tmp_path):
    if case not in ("credentials in the URL", "unknown scheme"):
        need_nginx()
    server, data = (
        _served_copy(shards_data, tmp_path)
        if case not in ("credentials in the URL", "unknown scheme")
        else (None, None)
    )
    cache = tmp_path / "cache"
    mounted = False
    try:
        url = f"{server.url}/data" if server else ""
        named = url
        if case == "credentials in the URL":
            url = named = "s3://AKIAKEY:secret@bucket/data"
            named = "bucket/data"
        elif case == "unknown scheme":
            url = named = "nosuch://bucket/data"
        elif case == "missing object":
            (data / "shard_00000_0002.idx").unlink()
            named = f"{url}/shard_00000_0002.idx"
        elif case == "server stays away":
            server.stop()
            named = f"{url}/manifest.json"
        elif case == "object replaced by a different size":
            open_remote_data_dir(url, "", cache)  # first seen intact (cached); then replaced
            named = f"{url}/{_shrink(data)}"
        elif case == "read-only cache dir":
            mounted = _mount(cache, "ro,size=1m")
            if not mounted:
                cache.chmod(0o555)
            named = str(cache)
        elif case == "full cache dir":
            mounted = _mount(cache, "size=8k")
            if not mounted:
                pytest.skip("needs root to mount a small tmpfs")
            named = str(cache)
        with pytest.raises(DataError) as err:
            if case.endswith("mid-run"):
                info = open_remote_data_dir(url, "", cache)
                named = f"{url}/{_shrink(data) if 'shrinks' in case else _scramble(data)}"
                RemoteTokenDataset(info, 48, seed=0).read_batch(np.arange(0, 400))
            else:
                open_remote_data_dir(url, "", cache, retry_seconds=1)
        text = str(err.value)
        assert "\n" not in text and message in text and named in text, text
        if case == "credentials in the URL":
            assert "secret" not in text and "AKIAKEY" not in text
        assert not list(cache.glob("remote/*/.*.part")) and not list(cache.glob("remote/*/.*.check"))
    finally:
        if mounted:
            subprocess.run(["umount", str(cache)], check=False)
        if server:
            server.stop()


def _http_error(status: int):
    import aiohttp

    return aiohttp.ClientResponseError(None, (), status=status, message="")


def _s3_error(code: str, status: int):
    from botocore.exceptions import ClientError

    cause = ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )
    err = OSError(22, code)  # how s3fs hands a botocore error on
    err.__cause__ = cause
    return err


@pytest.mark.parametrize(
    "make, transient",
    [
        (lambda: _http_error(503), True),
        (lambda: _http_error(500), True),
        (lambda: _http_error(429), True),
        (lambda: _http_error(404), False),
        (lambda: _http_error(403), False),
        (lambda: _http_error(400), False),
        (lambda: _s3_error("SlowDown", 503), True),
        (lambda: _s3_error("InternalError", 500), True),
        (lambda: _s3_error("AccessDenied", 403), False),
        (lambda: _s3_error("InvalidRange", 416), False),
        (lambda: ConnectionResetError(104, "reset"), True),
        (lambda: TimeoutError(), True),
        (lambda: FileNotFoundError("x"), False),
        (lambda: PermissionError(13, "no"), False),
    ],
)
def test_which_errors_are_retried(make, transient):
    assert is_transient(make()) is transient


def test_urls_are_told_apart_from_paths():
    assert is_url("s3://b/p") and is_url("https://h/p") and is_url("gs://b")
    assert not is_url("/data/x") and not is_url("data/web") and not is_url("file:///data") and not is_url("C:/x")
    assert check_url("https://host/prefix/") == "https://host/prefix"


def test_s3_upload_of_hf_tokenized_data_carries_its_tokenizer(byte_bpe_tokenizer, tiny_data, s3, tmp_path):
    """A tokenizer.json data set: the upload carries tokenizer.json + its config, the node cache fetches them."""
    from meshforge.tokenizers import load_tokenizer

    prepare_to_url(
        "s3://bucket/hfdata",
        tmp_path / "stage",
        prepare_data,
        inputs=[str(tiny_data.parent / "corpus.jsonl")],
        tokenizer_path=str(byte_bpe_tokenizer.parent),
        docs_per_shard=40,
        progress=False,
    )
    info = open_remote_data_dir("s3://bucket/hfdata", "", tmp_path / "cache")
    tok = load_tokenizer(byte_bpe_tokenizer)
    assert (info.tokenizer_fingerprint, info.vocab_size) == (tok.fingerprint, 512)
    assert info.manifest["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(info.tokenizer_path).eos_id == tok.eos_id == 1
