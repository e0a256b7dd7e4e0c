"""Our Megatron indexed-format reader/writer, checked against megatron-core both ways."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from meshforge.data_pipeline import DataError, IndexedShard, IndexedShardWriter, dtype_for_vocab
from meshforge.data_pipeline.indexed import HEADER_SIZE, MAGIC

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_docs(n=50, vocab=1000, seed=0, max_len=300):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]
    docs[3] = np.zeros(0, dtype=np.int64)  # an empty document is legal
    return docs


def write_shard(prefix, docs, dtype=np.uint16):
    w = IndexedShardWriter(prefix, dtype)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return prefix


def test_roundtrip(tmp_path):
    docs = random_docs()
    write_shard(tmp_path / "s", docs)
    shard = IndexedShard(tmp_path / "s")
    assert len(shard) == shard.num_documents == len(docs)
    assert shard.num_tokens == sum(len(d) for d in docs)
    assert shard.dtype == np.uint16
    np.testing.assert_array_equal(shard.lengths, [len(d) for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(shard[i], d)
    np.testing.assert_array_equal(shard.get(5, 2, 3), docs[5][2:5])
    np.testing.assert_array_equal(shard.get(5, 2), docs[5][2:])
    starts, lengths = shard.document_token_ranges()
    np.testing.assert_array_equal(lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(shard.tokens[starts[7] : starts[7] + lengths[7]], docs[7])
    with pytest.raises(IndexError):
        shard[len(docs)]


def test_int32_for_large_vocab(tmp_path):
    assert dtype_for_vocab(2048) == np.uint16 and dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32 and dtype_for_vocab(128000) == np.int32
    docs = [np.array([0, 100_000, 127_999]), np.array([70_000])]
    write_shard(tmp_path / "big", docs, np.int32)
    shard = IndexedShard(tmp_path / "big")
    assert shard.dtype == np.int32
    np.testing.assert_array_equal(shard[0], docs[0])
    with pytest.raises(DataError, match="do not fit"):
        IndexedShardWriter(tmp_path / "small", np.uint16).add_document([70_000])


def test_writer_is_atomic(tmp_path):
    w = IndexedShardWriter(tmp_path / "s")
    w.add_document([1, 2, 3])
    assert not (tmp_path / "s.bin").exists() and not (tmp_path / "s.idx").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with IndexedShardWriter(tmp_path / "t") as w:
            w.add_document([1])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_our_writer_megatron_reader(tmp_path):
    docs = random_docs(seed=1)
    write_shard(tmp_path / "s", docs)
    theirs = megatron_indexed.IndexedDataset(str(tmp_path / "s"))
    assert len(theirs) == len(docs)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(docs) + 1))
    np.testing.assert_array_equal(theirs.sequence_lengths, [len(d) for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)
    np.testing.assert_array_equal(theirs.get(9, 1, 4), docs[9][1:5])


def write_with_megatron(prefix, docs, dtype=np.uint16, split_in_two=False):
    """Megatron's own builder; ``split_in_two`` stores each doc as two sequences."""
    builder = megatron_indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        if split_in_two and len(d) >= 2:
            half = len(d) // 2
            builder.add_document(torch.tensor(d), [half, len(d) - half])
        else:
            builder.add_item(torch.tensor(d))
            builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return prefix


@pytest.mark.parametrize("split_in_two", [False, True])
def test_megatron_writer_our_reader(tmp_path, split_in_two):
    docs = [d for d in random_docs(seed=2) if len(d)]
    write_with_megatron(tmp_path / "m", docs, split_in_two=split_in_two)
    shard = IndexedShard(tmp_path / "m")
    theirs = megatron_indexed.IndexedDataset(str(tmp_path / "m"))
    assert shard.num_documents == len(docs)
    assert len(shard) == len(theirs)
    np.testing.assert_array_equal(shard.document_indices, theirs.document_indices)
    for i in range(len(theirs)):
        np.testing.assert_array_equal(shard[i], theirs[i])
    starts, lengths = shard.document_token_ranges()
    for k, d in enumerate(docs):
        np.testing.assert_array_equal(shard.tokens[starts[k] : starts[k] + lengths[k]], d)


def test_missing_files(tmp_path):
    write_shard(tmp_path / "s", random_docs())
    (tmp_path / "s.bin").unlink()
    with pytest.raises(DataError, match=r"s\.bin is missing"):
        IndexedShard(tmp_path / "s")
    with pytest.raises(DataError, match=r"nope\.idx is missing"):
        IndexedShard(tmp_path / "nope")


def test_truncated_and_padded_bin(tmp_path):
    write_shard(tmp_path / "s", random_docs())
    bp = tmp_path / "s.bin"
    data = bp.read_bytes()
    bp.write_bytes(data[:-10])
    with pytest.raises(DataError, match=rf"truncated: {len(data) - 10} bytes, index expects {len(data)}"):
        IndexedShard(tmp_path / "s")
    bp.write_bytes(data + b"\0\0")
    with pytest.raises(DataError, match=rf"padded: {len(data) + 2} bytes, index expects {len(data)}"):
        IndexedShard(tmp_path / "s")


def _patch_idx(path, offset, new):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(new)] = new
    path.write_bytes(bytes(raw))


def test_corrupt_index(tmp_path):
    write_shard(tmp_path / "s", random_docs())
    ip = tmp_path / "s.idx"
    good = ip.read_bytes()
    _patch_idx(ip, 0, b"NOTMAGIC!")
    with pytest.raises(DataError, match="bad magic"):
        IndexedShard(tmp_path / "s")
    ip.write_bytes(good)
    _patch_idx(ip, len(MAGIC), struct.pack("<Q", 2))
    with pytest.raises(DataError, match="version 2"):
        IndexedShard(tmp_path / "s")
    ip.write_bytes(good)
    _patch_idx(ip, len(MAGIC) + 8, struct.pack("<B", 42))
    with pytest.raises(DataError, match="unknown dtype code 42"):
        IndexedShard(tmp_path / "s")
    ip.write_bytes(good[:-16])
    with pytest.raises(DataError, match=r"s\.idx is truncated"):
        IndexedShard(tmp_path / "s")
    ip.write_bytes(good[: HEADER_SIZE - 3])
    with pytest.raises(DataError, match="bad magic"):
        IndexedShard(tmp_path / "s")
    ip.write_bytes(good)
    assert IndexedShard(tmp_path / "s").num_documents == 50
