"""``gs://`` (gcsfs) and ``az://`` (adlfs) data: uploaded by ``data prepare``'s path, trained from, equal to local.

The servers are real and on loopback: ``gcp-storage-emulator`` (PyPI) for Google Cloud Storage
and Azurite (npm ``azurite``; ``$AZURITE_HOME/node_modules/.bin`` or on PATH) for Azure Blob.
Both filesystems are optional extras (``pip install -e ".[gcs,azure,test-cloud]"``), so these
tests are ``slow`` and skip when a package or Azurite is missing. Neither protocol has
multi-range reads or ``If-Match`` on reads through fsspec: each batch's merged ranges are read
concurrently by ``fs.cat_ranges``, with the size checks.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from meshforge.data_pipeline import TokenDataset, open_data_dir
from meshforge.data_pipeline.prepare import prepare_data
from meshforge.data_pipeline.remote import RemoteStats, RemoteStore
from meshforge.data_pipeline.remote_cache import open_remote_data_dir
from meshforge.data_pipeline.remote_dataset import RemoteTokenDataset
from meshforge.data_pipeline.remote_upload import prepare_to_url
from parallel_harness import read_result
from remote_servers import Azurite, GcsEmulator, azurite_binary
from test_remote_train import _train, assert_identical

pytestmark = pytest.mark.slow


def _server(kind: str, workdir):
    if kind == "gs":
        for mod in ("gcsfs", "gcp_storage_emulator"):
            if importlib.util.find_spec(mod) is None:
                pytest.skip(f"{mod} is not installed (pip install -e '.[gcs,test-cloud]')")
        return GcsEmulator(workdir), "gs://bucket/data"
    if importlib.util.find_spec("adlfs") is None:
        pytest.skip("adlfs is not installed (pip install -e '.[azure]')")
    if azurite_binary() is None:
        pytest.skip("Azurite is not installed (npm install azurite; set AZURITE_HOME to that dir)")
    return Azurite(workdir), "az://container/data"


@pytest.fixture(scope="module", params=["gs", "az"])
def cloud(request, tiny_data, tmp_path_factory):
    """The emulator started, the environment pointed at it, the data uploaded by ``prepare_to_url``."""
    server, url = _server(request.param, tmp_path_factory.mktemp(f"{request.param}-server"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        store = RemoteStore(url)
        store.fs.mkdir(store.root.split("/")[0])
        prepare_to_url(
            url,
            tmp_path_factory.mktemp("stage"),
            prepare_data,
            inputs=[str(tiny_data.parent / "corpus.jsonl")],
            tokenizer_path=str(tiny_data.parent / "tok.model"),
            docs_per_shard=40,
            progress=False,
        )
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_uploaded_objects_and_samples_equal_local(cloud, shards_data, tmp_path):
    store = RemoteStore(cloud)
    for p in shards_data.glob("*.*"):
        if p.suffix in (".bin", ".idx"):
            assert store.cat(p.name) == p.read_bytes()
    stats = RemoteStats()
    info = open_remote_data_dir(cloud, "", tmp_path / "cache", stats=stats)
    local, remote = TokenDataset(open_data_dir(shards_data), 40, seed=2), RemoteTokenDataset(info, 40, seed=2)
    read, before = 0, stats.bytes_fetched
    for first in (0, 9, 3 * len(local) + 1):
        idx = np.arange(first, first + 24)
        np.testing.assert_array_equal(local.read_batch(idx), remote.read_batch(idx))
        read += 24 * 41 * 2
    assert 0 < stats.bytes_fetched - before <= 1.1 * read  # the samples' ranges only
    assert not list((tmp_path / "cache").rglob("*.bin"))  # range mode: no shard downloaded


def test_train_from_the_store_equals_local(cloud, shards_data, tmp_path):
    _train(shards_data, tmp_path / "local", 1)
    _train(cloud, tmp_path / "remote", 1, "--data.cache_dir", str(tmp_path / "cache"))
    assert_identical(read_result(tmp_path / "local"), read_result(tmp_path / "remote"))
