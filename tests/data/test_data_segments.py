"""Per-position document ids (segments) for document-masked attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshforge.data_pipeline import DistributedLoader, IndexedShardWriter, TokenDataset, open_data_dir, prepare_data

SEQ = 24


def reference(ds, docs, epoch):
    """Tokens and document ids of every sample of one epoch, written plainly."""
    rng = np.random.default_rng([ds.seed, epoch])
    order = rng.permutation(len(ds.doc_ids))
    stream = np.concatenate([docs[ds.doc_ids[k]] for k in order])
    owner = np.concatenate([np.full(len(docs[ds.doc_ids[k]]), j) for j, k in enumerate(order)])
    n = (len(stream) - 1) // ds.seq_len
    out = []
    for j in rng.permutation(n):
        sl = slice(j * ds.seq_len, j * ds.seq_len + ds.seq_len + 1)
        own = owner[sl]
        out.append((stream[sl], np.unique(own, return_inverse=True)[1].astype(np.int32)))
    return out


def all_docs(info):
    docs = []
    for shard in info.shards:
        starts, lengths = shard.document_token_ranges()
        docs += [np.asarray(shard.tokens[s : s + n], dtype=np.int64) for s, n in zip(starts, lengths)]
    return docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_corpus, tiny_tokenizer):
    out = tmp_path_factory.mktemp("seg") / "data"
    prepare_data([str(small_corpus)], str(tiny_tokenizer), str(out), docs_per_shard=13, progress=False)
    return out


def test_segments_match_document_boundaries(data_dir):
    plain = TokenDataset(data_dir, SEQ, "train", 0.1, seed=5)
    ds = TokenDataset(data_dir, SEQ, "train", 0.1, seed=5, return_segments=True)
    want = reference(ds, all_docs(ds.info), 1)
    eos = 3
    crossings = 0
    for j in range(len(ds)):
        tokens, seg = ds[len(ds) + j]
        np.testing.assert_array_equal(tokens, plain[len(ds) + j])
        np.testing.assert_array_equal(tokens, want[j][0])
        np.testing.assert_array_equal(seg, want[j][1])
        assert seg.dtype == np.int32 and seg[0] == 0 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
        # prepare_data appends EOS: every position after an EOS starts a new document
        ends = np.flatnonzero(tokens[:-1] == eos)
        np.testing.assert_array_equal(np.flatnonzero(np.diff(seg)), ends)
        crossings += len(ends)
    assert crossings > 10


def test_loader_returns_tokens_and_segments(data_dir):
    ds = TokenDataset(data_dir, SEQ, "train", 0.1, seed=5, return_segments=True)
    plain = DistributedLoader(TokenDataset(data_dir, SEQ, "train", 0.1, seed=5), 8, prefetch=0)
    parts = [DistributedLoader(ds, 8, dp_rank=r, dp_size=2, prefetch=1) for r in range(2)]
    for b in range(3):
        ref = plain.next_batch()
        got = [p.next_batch() for p in parts]
        tokens = torch.cat([g[0] for g in got])
        segs = torch.cat([g[1] for g in got])
        assert tokens.dtype == torch.int64 and segs.dtype == torch.int32 and segs.shape == (8, SEQ + 1)
        torch.testing.assert_close(tokens, ref, rtol=0, atol=0)
        for k in range(8):
            np.testing.assert_array_equal(segs[k].numpy(), ds[b * 8 + k][1])


def test_segments_without_eos_and_with_empty_documents(tmp_path, tiny_tokenizer):
    """Megatron-written data: no EOS, an empty document; boundaries come from the index."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(4, 400, size=int(rng.integers(3, 30))) for _ in range(40)]
    docs[7] = np.zeros(0, dtype=np.int64)
    w = IndexedShardWriter(tmp_path / "m_text_document", np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    ds = TokenDataset(open_data_dir(tmp_path, str(tiny_tokenizer)), 16, "train", 0.0, seed=0, return_segments=True)
    want = reference(ds, [d.astype(np.int64) for d in docs], 0)
    for j in range(len(ds)):
        tokens, seg = ds[j]
        np.testing.assert_array_equal(tokens, want[j][0])
        np.testing.assert_array_equal(seg, want[j][1])
