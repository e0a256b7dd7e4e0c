"""TokenDataset (splits, epochs, determinism) and DistributedLoader (DP slices, resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshforge.data_pipeline import DataError, DistributedLoader, TokenDataset, open_data_dir, prepare_data
from meshforge.data_pipeline.dataset import split_documents
from meshforge.tokenizers import load_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_corpus, tiny_tokenizer):
    out = tmp_path_factory.mktemp("ds") / "data"
    prepare_data([str(small_corpus)], str(tiny_tokenizer), str(out), docs_per_shard=17, progress=False)
    return out


def all_documents(info):
    docs = []
    for shard in info.shards:
        starts, lengths = shard.document_token_ranges()
        docs += [np.asarray(shard.tokens[s : s + n], dtype=np.int64) for s, n in zip(starts, lengths)]
    return docs


def reference_epoch(ds, docs, epoch):
    """The spec, written plainly: shuffle docs, concatenate, cut with stride seq_len, shuffle samples."""
    rng = np.random.default_rng([ds.seed, epoch])
    order = rng.permutation(len(ds.doc_ids))
    stream = np.concatenate([docs[ds.doc_ids[k]] for k in order])
    n = (len(stream) - 1) // ds.seq_len
    samples = [stream[j * ds.seq_len : j * ds.seq_len + ds.seq_len + 1] for j in range(n)]
    return [samples[j] for j in rng.permutation(n)]


def test_samples_follow_the_spec(data_dir):
    ds = TokenDataset(data_dir, SEQ, "train", valid_fraction=0.1, seed=7)
    docs = all_documents(ds.info)
    for epoch in (0, 1):
        want = reference_epoch(ds, docs, epoch)
        assert len(ds) == len(want)
        for j in (0, 1, len(ds) // 2, len(ds) - 1):
            got = ds[epoch * len(ds) + j]
            assert got.dtype == np.int64 and got.shape == (SEQ + 1,)
            np.testing.assert_array_equal(got, want[j])


@pytest.mark.parametrize("segments", [False, True])
def test_read_batch_rows_are_the_samples(data_dir, segments):
    """The loader's batched read gives, row by row, what indexing gives, across an epoch boundary."""
    ds = TokenDataset(data_dir, SEQ, "train", valid_fraction=0.1, seed=7, return_segments=segments)
    idx = [len(ds) - 2, len(ds) - 1, len(ds), 3, 2 * len(ds) + 5]
    got = ds.read_batch(idx)
    want = [ds[i] for i in idx]
    if segments:
        np.testing.assert_array_equal(got[0], np.stack([w[0] for w in want]))
        np.testing.assert_array_equal(got[1], np.stack([w[1] for w in want]))
        assert got[0].dtype == np.int64 and got[1].dtype == np.int32
    else:
        np.testing.assert_array_equal(got, np.stack(want))
        assert got.dtype == np.int64 and got.shape == (len(idx), SEQ + 1)
    with pytest.raises(IndexError):
        ds.read_batch([0, -1])


def test_determinism_and_seed(data_dir):
    a = TokenDataset(data_dir, SEQ, "train", 0.1, seed=1)
    b = TokenDataset(open_data_dir(data_dir), SEQ, "train", 0.1, seed=1)
    c = TokenDataset(data_dir, SEQ, "train", 0.1, seed=2)
    idx = [0, 5, 17, len(a) + 3]
    for i in idx:
        np.testing.assert_array_equal(a[i], b[i])
    assert any(not np.array_equal(a[i], c[i]) for i in idx)
    np.testing.assert_array_equal(a.doc_ids, c.doc_ids)  # the split does not depend on the seed


def test_valid_and_train_are_disjoint_by_document(data_dir):
    train = TokenDataset(data_dir, SEQ, "train", 0.2, seed=0)
    valid = TokenDataset(data_dir, SEQ, "valid", 0.2, seed=0)
    n_docs = train.info.num_documents
    assert set(train.doc_ids).isdisjoint(valid.doc_ids)
    assert sorted(set(train.doc_ids) | set(valid.doc_ids)) == list(range(n_docs))
    assert 0.05 < len(valid.doc_ids) / n_docs < 0.4
    assert split_documents(2, 1e-9).sum() == 1  # at least one validation doc
    assert split_documents(1, 0.5).sum() <= 1
    assert split_documents(100, 0.0).sum() == 0
    with pytest.raises(DataError, match="valid_fraction"):
        split_documents(10, 1.0)


def test_epoch_rollover_and_cache_eviction(data_dir):
    ds = TokenDataset(data_dir, SEQ, "train", 0.1, seed=3)
    n = len(ds)
    first = [ds[j].copy() for j in range(n)]
    second = [ds[n + j].copy() for j in range(n)]
    assert any(not np.array_equal(x, y) for x, y in zip(first, second))
    for e in range(2, 8):  # push epochs 0 and 1 out of the cache
        ds[e * n]
    np.testing.assert_array_equal(ds[5], first[5])
    np.testing.assert_array_equal(ds[n + 5], second[5])
    with pytest.raises(IndexError):
        ds[-1]


def test_split_too_small(data_dir):
    with pytest.raises(DataError, match="valid split .* fewer than seq_len\\+1"):
        TokenDataset(data_dir, 100_000, "valid", 0.05, seed=0)
    with pytest.raises(DataError, match="split must be"):
        TokenDataset(data_dir, SEQ, "test", 0.05, seed=0)


def test_megatron_prepared_data_trains(tmp_path, tiny_tokenizer):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    tok = load_tokenizer(tiny_tokenizer)
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, tok.vocab_size, size=int(rng.integers(20, 80))) for _ in range(30)]
    b = indexed.IndexedDatasetBuilder(str(tmp_path / "m_text_document.bin"), dtype=np.uint16)
    for d in docs:
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(str(tmp_path / "m_text_document.idx"))
    ds = TokenDataset(open_data_dir(tmp_path, str(tiny_tokenizer)), 16, "train", 0.1, seed=0)
    want = reference_epoch(ds, docs, 0)
    for j in range(len(ds)):
        np.testing.assert_array_equal(ds[j], want[j])


@pytest.fixture(scope="module")
def train_ds(data_dir):
    return TokenDataset(data_dir, SEQ, "train", 0.1, seed=11)


def take(loader, k):
    return [loader.next_batch() for _ in range(k)]


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_slices_concatenate_to_the_global_batch(train_ds, dp):
    G = 8
    ref = take(DistributedLoader(train_ds, G, prefetch=0), 3)
    parts = [take(DistributedLoader(train_ds, G, dp_rank=r, dp_size=dp), 3) for r in range(dp)]
    for b in range(3):
        assert parts[0][b].shape == (G // dp, SEQ + 1) and parts[0][b].dtype == torch.int64
        torch.testing.assert_close(torch.cat([p[b] for p in parts]), ref[b], rtol=0, atol=0)
    np.testing.assert_array_equal(ref[1][2].numpy(), train_ds[G + 2])


def test_loader_gives_a_wrapping_datasets_own_samples(data_dir):
    """A wrapper that forwards unknown attributes to its TokenDataset (span corruption, UL2) is read
    sample by sample through the wrapper: never the base's raw windows by its batched read."""
    from meshforge.config import Denoiser
    from meshforge.data_pipeline.span_corruption import SpanCorruptionDataset, make_spec
    from meshforge.data_pipeline.ul2 import Ul2Dataset, make_ul2_spec

    sentinels = list(range(500, 400, -1))
    spec = make_spec(24, 0, 0.15, 3.0)
    ul2 = make_ul2_spec(24, 0, [Denoiser("R", 3, 0.15, 0.5), Denoiser("S", weight=0.5)], 0.25, 0.75)
    for ds in (
        SpanCorruptionDataset(
            TokenDataset(data_dir, spec.raw_len - 1, "train", 0.1, seed=3), spec, sentinels, 3, 0, seed=1
        ),
        Ul2Dataset(TokenDataset(data_dir, ul2.raw_len - 1, "train", 0.1, seed=3), ul2, sentinels, 3, 0, seed=1),
    ):
        batch = DistributedLoader(ds, 4, prefetch=0).next_batch()
        np.testing.assert_array_equal(batch.numpy(), np.stack([ds[i] for i in range(4)]))


def test_resume_continues_the_same_order(train_ds):
    G = 6
    full = take(DistributedLoader(train_ds, G, prefetch=2), 7)
    first = DistributedLoader(train_ds, G, prefetch=2)
    take(first, 3)
    state = first.state_dict()
    assert state == {"consumed_samples": 18}
    resumed = DistributedLoader(train_ds, G, prefetch=0)
    resumed.load_state_dict(state)
    for b, batch in enumerate(take(resumed, 4)):
        torch.testing.assert_close(batch, full[3 + b], rtol=0, atol=0)
    first.load_state_dict({"consumed_samples": 0})  # rewinding drops prefetched batches
    torch.testing.assert_close(first.next_batch(), full[0], rtol=0, atol=0)
    first.close()


def test_resume_with_a_different_dp_size(train_ds):
    G = 8
    full = take(DistributedLoader(train_ds, G), 5)
    single = DistributedLoader(train_ds, G)
    take(single, 2)
    state = single.state_dict()
    ranks = [DistributedLoader(train_ds, G, dp_rank=r, dp_size=4) for r in range(4)]
    for loader in ranks:
        loader.load_state_dict(state)
    for b in range(2, 5):
        torch.testing.assert_close(torch.cat([l.next_batch() for l in ranks]), full[b], rtol=0, atol=0)
    assert all(l.state_dict() == {"consumed_samples": 40} for l in ranks)


def test_prefetch_does_not_change_batches_or_state(train_ds):
    a, b = DistributedLoader(train_ds, 4, prefetch=0), DistributedLoader(train_ds, 4, prefetch=5)
    for _ in range(6):
        torch.testing.assert_close(a.next_batch(), b.next_batch(), rtol=0, atol=0)
        assert a.state_dict() == b.state_dict()


def test_loader_errors(train_ds):
    with pytest.raises(DataError, match="does not divide by dp_size 3"):
        DistributedLoader(train_ds, 8, dp_rank=0, dp_size=3)
    with pytest.raises(DataError, match="not a rank"):
        DistributedLoader(train_ds, 8, dp_rank=2, dp_size=2)
