"""``data prepare --output s3://...`` from two node ranks (moto's real S3 server on loopback).

Each node uploads its own slices and then their done-markers; node 0 alone writes the
manifest, last, once every slice's marker is up. The uploaded data set equals a one-node local
preparation of the same inputs, byte for byte.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from meshforge.data_pipeline import DataError, TokenDataset, open_data_dir
from meshforge.data_pipeline.prepare import prepare_data
from meshforge.data_pipeline.remote import RemoteStore
from meshforge.data_pipeline.remote_cache import open_remote_data_dir
from meshforge.data_pipeline.remote_dataset import RemoteTokenDataset
from meshforge.data_pipeline.remote_upload import prepare_to_url


def _inputs(tiny_data: Path, tmp_path: Path) -> dict:
    """The tiny corpus cut into three files: three slices (node 0 gets 0 and 2, node 1 gets 1)."""
    lines = (tiny_data.parent / "corpus.jsonl").read_text().splitlines(keepends=True)
    paths = []
    for k in range(3):
        p = tmp_path / f"part{k}.jsonl"
        p.write_text("".join(lines[k::3]))
        paths.append(str(p))
    return dict(inputs=paths, tokenizer_path=str(tiny_data.parent / "tok.model"), docs_per_shard=20, progress=False)


def test_two_nodes_upload_their_slices_and_node_0_writes_the_manifest_last(tiny_data, s3, tmp_path):
    kwargs = _inputs(tiny_data, tmp_path)
    url = "s3://bucket/two-nodes"
    store = RemoteStore(url)
    node0: dict = {}

    def run_node0():
        try:
            node0["manifest"] = prepare_to_url(
                url, tmp_path / "cache0", prepare_data, num_nodes=2, node_rank=0, wait_seconds=120, **kwargs
            )
        except BaseException as exc:  # noqa: BLE001 -- re-raised below
            node0["error"] = exc

    t = threading.Thread(target=run_node0)
    t.start()
    deadline = time.monotonic() + 60
    while not store.exists(".prepare/slice_00002.json") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.exists(".prepare/slice_00000.json") and store.exists(".prepare/slice_00002.json")
    time.sleep(2.5)  # node 0 has polled at least once more: still no manifest without node 1's slice
    assert t.is_alive() and not store.exists("manifest.json") and not store.exists(".prepare/slice_00001.json")
    partial = prepare_to_url(url, tmp_path / "cache1", prepare_data, num_nodes=2, node_rank=1, **kwargs)
    assert partial["format"] == "meshforge-node-partial-v1" and partial["slices"] == [1]
    t.join(60)
    assert "error" not in node0, node0.get("error")
    remote_manifest = json.loads(store.cat("manifest.json"))

    local_dir = tmp_path / "local"
    local_manifest = prepare_data(output_dir=str(local_dir), **kwargs)
    assert remote_manifest["shards"] == local_manifest["shards"] == node0["manifest"]["shards"]
    assert remote_manifest["num_documents"] == local_manifest["num_documents"] == 150
    for s in local_manifest["shards"]:
        for ext in ("bin", "idx"):
            assert store.cat(f"{s['prefix']}.{ext}") == (local_dir / f"{s['prefix']}.{ext}").read_bytes()
    assert not list((tmp_path / "cache0" / "upload").iterdir()) and not list((tmp_path / "cache1" / "upload").iterdir())
    info = open_remote_data_dir(url, "", tmp_path / "read-cache")
    local, remote = TokenDataset(open_data_dir(local_dir), 32, seed=4), RemoteTokenDataset(info, 32, seed=4)
    idx = np.arange(0, 3 * len(local))
    np.testing.assert_array_equal(local.read_batch(idx), remote.read_batch(idx))


def test_node_0_without_the_other_nodes_is_one_line_and_writes_no_manifest(tiny_data, s3, tmp_path):
    kwargs = _inputs(tiny_data, tmp_path)
    url = "s3://bucket/node1-missing"
    with pytest.raises(DataError) as err:
        prepare_to_url(url, tmp_path / "cache0", prepare_data, num_nodes=2, node_rank=0, wait_seconds=0, **kwargs)
    text = str(err.value)
    assert "\n" not in text and "1 of 3 slices for s3://bucket/node1-missing are not up" in text
    assert "node ranks [1]" in text
    store = RemoteStore(url)
    assert not store.exists("manifest.json") and store.exists(".prepare/slice_00000.json")
    # node 1 runs, then node 0 again: its finished slices are skipped, the manifest goes up
    prepare_to_url(url, tmp_path / "cache1", prepare_data, num_nodes=2, node_rank=1, **kwargs)
    manifest = prepare_to_url(
        url, tmp_path / "cache0", prepare_data, num_nodes=2, node_rank=0, wait_seconds=0, **kwargs
    )
    assert json.loads(store.cat("manifest.json")) == manifest and manifest["num_documents"] == 150


@pytest.mark.parametrize("rank, nodes", [(2, 2), (-1, 2), (0, 0)])
def test_bad_node_rank_is_refused_before_anything_is_written(rank, nodes, tiny_data, s3, tmp_path):
    with pytest.raises(DataError, match=f"node_rank {rank} is not a rank of num_nodes {nodes}"):
        prepare_to_url(
            "s3://bucket/bad-rank",
            tmp_path,
            prepare_data,
            num_nodes=nodes,
            node_rank=rank,
            **_inputs(tiny_data, tmp_path),
        )
    assert not (tmp_path / "upload").exists() and not RemoteStore("s3://bucket/bad-rank").exists(".prepare/plan.json")
