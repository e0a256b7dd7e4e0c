"""A remote data dir's manifest and ``.idx`` files go through the local data dir's checks (``manifest.py``:
``parse_manifest``, ``open_shards``, ``check_tokenizer``), each a one-line error naming the URL.

The server is a real nginx on loopback serving a copy of a real prepared dir (``shards_data``)."""

from __future__ import annotations

import json
import shutil

import pytest

from meshforge.data_pipeline import DataError
from meshforge.data_pipeline.layout import MANIFEST
from meshforge.data_pipeline.remote import RemoteError
from meshforge.data_pipeline.remote_cache import cache_path, open_remote_data_dir
from meshforge.tokenizers import train_tokenizer
from remote_servers import Nginx, need_nginx


def _edit(key: str, change):
    def apply(manifest: dict) -> dict:
        change(manifest[key] if key else manifest)
        return manifest

    return apply


CASES = [
    # (case, how the served manifest.json is changed, what the one line says, what it names)
    ("not JSON", lambda m: "{oops", "is not valid JSON", MANIFEST),
    (
        "another format",
        _edit("", lambda m: m.update(format="something-else")),
        "is not a meshforge-indexed-v1 manifest",
        MANIFEST,
    ),
    ("no format", _edit("", lambda m: m.pop("format")), "is not a meshforge-indexed-v1 manifest", MANIFEST),
    ("a key missing", _edit("", lambda m: m.pop("num_tokens")), "lacks the key 'num_tokens'", MANIFEST),
    (
        "token count",
        _edit("shards", lambda s: s[1].update(tokens=s[1]["tokens"] + 1)),
        "manifest says",
        "shard_00000_0001",
    ),
    ("document count", _edit("shards", lambda s: s[2].update(documents=1)), "manifest says 1 /", "shard_00000_0002"),
    (
        "dtype",
        _edit("", lambda m: m.update(dtype="int32")),
        "has dtype uint16, manifest says int32",
        "shard_00000_0000",
    ),
    (
        "tokenizer",
        _edit("tokenizer", lambda t: t.update(fingerprint="0" * 64)),
        "use the tokenizer the data was prepared with",
        MANIFEST,
    ),
]


@pytest.mark.parametrize("mode", ["range", "download"])
@pytest.mark.parametrize("case, change, message, named", CASES, ids=[c[0] for c in CASES])
def test_remote_manifest_checks_are_the_local_ones(case, change, message, named, mode, shards_data, tmp_path):
    need_nginx()
    served = tmp_path / "served" / "data"
    shutil.copytree(shards_data, served)
    manifest = change(json.loads((served / MANIFEST).read_text()))
    (served / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    server = Nginx(served.parent, tmp_path / "ng").start()
    try:
        url = f"{server.url}/data"
        with pytest.raises(DataError) as err:
            open_remote_data_dir(url, "", tmp_path / "cache", mode=mode, retry_seconds=1)
    finally:
        server.stop()
    text = str(err.value)
    assert "\n" not in text and message in text and f"{url}/{named}" in text, text
    local = cache_path(url, tmp_path / "cache")
    if isinstance(err.value, RemoteError):  # a manifest refused as such is fetched again next time
        assert not (local / MANIFEST).exists()
    assert not list(local.glob(".*.check"))


def test_a_local_tokenizer_other_than_the_datas_is_refused_naming_the_remote_manifest(
    shards_data, small_corpus, tmp_path
):
    need_nginx()
    other = train_tokenizer([small_corpus], tmp_path / "other", vocab_size=420)
    server = Nginx(shards_data.parent, tmp_path / "ng").start()
    try:
        with pytest.raises(
            DataError,
            match=rf"vocab 420.*does not match the data manifest {server.url}/data/"
            r"manifest\.json \(vocab 512.*use the tokenizer",
        ):
            open_remote_data_dir(f"{server.url}/data", str(other), tmp_path / "cache")
    finally:
        server.stop()


@pytest.mark.parametrize("text, message", [("{oops", "is not valid JSON"), ('{"shards": []}', "is not a meshforge")])
def test_model_vocab_from_a_remote_manifest_checks_it_first(text, message, shards_data, tmp_path):
    """``model.vocab_size = 0`` reads the vocabulary from the data's manifest: a URL's goes through the same check."""
    from meshforge.config import load_config
    from meshforge.pretrain.data import tokenizer_vocab_size

    need_nginx()
    served = tmp_path / "served" / "data"
    shutil.copytree(shards_data, served)
    (served / MANIFEST).write_text(text)
    server = Nginx(served.parent, tmp_path / "ng").start()
    try:
        url = f"{server.url}/data"
        with pytest.raises(DataError, match=f"^{url}/manifest.json {message}"):
            tokenizer_vocab_size(load_config("tiny-test", {"data.path": url, "data.remote_retry_seconds": 1}))
    finally:
        server.stop()
