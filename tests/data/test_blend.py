"""BlendedDataset: proportions, determinism, the on-disk order cache, and resume with changed weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from meshforge.data_pipeline import (
    BlendedDataset,
    DataError,
    DistributedLoader,
    TokenDataset,
    blend_order,
    parse_blend,
    prepare_data,
)

SEQ = 16


class Tagged:
    """A stand-in source: sample j of source s is [s, j] (so every sample says where it came from)."""

    def __init__(self, tag: int, n: int = 50):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        return np.array([self.tag, j], dtype=np.int64)


def tagged(names):
    return {n: Tagged(k) for k, n in enumerate(names)}


def test_parse_blend():
    assert parse_blend("0.7:data/web, 0.3:data/books") == [(0.7, "data/web"), (0.3, "data/books")]
    assert parse_blend("3:a,1:b") == [(0.75, "a"), (0.25, "b")]
    for bad, msg in (
        ("a,b", "WEIGHT:PATH"),
        ("-1:a", "WEIGHT:PATH"),
        ("1:a,2:a", "twice"),
        ("0:a", "no positive"),
        ("", "names no"),
    ):
        with pytest.raises(DataError, match=msg):
            parse_blend(bad)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.125, 0.125], [0.9, 0.09, 0.01], [1 / 3, 1 / 3, 1 / 3]])
def test_proportions_hold_in_every_prefix(weights):
    n = 200_000
    src, idx = blend_order(weights, n)
    steps = np.arange(1, n + 1)
    for k, w in enumerate(weights):
        count = np.cumsum(src == k)
        assert np.abs(count - w * steps).max() <= 1.0  # never more than one sample off its share
        np.testing.assert_array_equal(idx[src == k], np.arange(count[-1]))  # each source in its own order
    longer_src, longer_idx = blend_order(weights, n + 12_345)
    np.testing.assert_array_equal(longer_src[:n], src)  # a longer order starts with the shorter one
    np.testing.assert_array_equal(longer_idx[:n], idx)


def test_blend_of_real_token_datasets(tmp_path, small_corpus, tiny_tokenizer, corpus_docs, jsonl_writer):
    a = tmp_path / "a"
    b = tmp_path / "b"
    prepare_data([str(small_corpus)], str(tiny_tokenizer), str(a), progress=False)
    prepare_data(
        [str(jsonl_writer(tmp_path / "b.jsonl", corpus_docs(30, skip=500)))],
        str(tiny_tokenizer),
        str(b),
        progress=False,
    )
    srcs = {"a": TokenDataset(a, SEQ, "train", 0.1, seed=3), "b": TokenDataset(b, SEQ, "train", 0.1, seed=3)}
    blend = BlendedDataset(srcs, {"a": 0.25, "b": 0.75}, cache_dir=tmp_path / "cache")
    n = 3 * (len(srcs["a"]) + len(srcs["b"]))  # several epochs of both
    names = []
    for i in range(n):
        name, j = blend.locate(i)
        names.append(name)
        if i % 37 == 0:
            np.testing.assert_array_equal(blend[i], srcs[name][j])
    assert abs(names.count("a") / n - 0.25) < 0.01
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(f.endswith(".src.npy") for f in files) and any(f.endswith(".idx.npy") for f in files)


_BUILD = """
import json, sys
from meshforge.data_pipeline.blend import BlendedDataset
b = BlendedDataset({n: None for n in "xyz"}, {"x": 0.5, "y": 0.3, "z": 0.2}, cache_dir=sys.argv[1])
b.prepare(300_000)
print(json.dumps([b.locate(i) for i in (0, 1, 99_999, 299_999)]))
"""


def test_cache_built_once_and_shared(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # two "ranks" race to build the same order
    got = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert got[0] == got[1]
    built = sorted(p.name for p in tmp_path.glob("*.src.npy"))
    assert len(built) == 1 and built[0].endswith("-524288.src.npy")  # one build, rounded up to a power of two
    fresh = BlendedDataset(tagged("xyz"), {"x": 0.5, "y": 0.3, "z": 0.2}, cache_dir=tmp_path)
    assert [fresh.locate(i) for i in (0, 1, 99_999, 299_999)] == [tuple(x) for x in got[0]]
    uncached = BlendedDataset(tagged("xyz"), {"x": 0.5, "y": 0.3, "z": 0.2})
    assert [uncached.locate(i) for i in (0, 1, 99_999, 299_999)] == [tuple(x) for x in got[0]]


def batches(loader, k):
    return [loader.next_batch() for _ in range(k)]


@pytest.mark.parametrize("dp", [2, 4])
def test_order_independent_of_dp_size(tmp_path, dp):
    G = 8
    make = lambda: BlendedDataset(tagged("ab"), {"a": 0.6, "b": 0.4}, cache_dir=tmp_path)  # noqa: E731
    ref = batches(DistributedLoader(make(), G, prefetch=0), 6)
    ds = make()
    ranks = [DistributedLoader(ds, G, dp_rank=r, dp_size=dp) for r in range(dp)]
    for b in range(6):
        torch.testing.assert_close(torch.cat([l.next_batch() for l in ranks]), ref[b], rtol=0, atol=0)
    # and a resume on another dp size continues the same order
    state = ranks[0].state_dict()
    single = DistributedLoader(make(), G, prefetch=0)
    single.load_state_dict(state)
    cont = batches(DistributedLoader(make(), G, prefetch=0), 9)[6:]
    for b in range(3):
        torch.testing.assert_close(single.next_batch(), cont[b], rtol=0, atol=0)


def seen(batch_list):
    rows = torch.cat(batch_list).numpy()
    return [(int(t), int(j)) for t, j in rows]


def test_resume_with_changed_weights(tmp_path):
    G = 10
    names = ["a", "b", "c"]
    srcs = tagged(names)
    first = DistributedLoader(BlendedDataset(srcs, {"a": 0.5, "b": 0.5}, tmp_path), G, prefetch=2)
    before = seen(batches(first, 5))  # 50 samples at 50/50
    state = first.state_dict()
    assert state["consumed_samples"] == 50 and state["blend"]["consumed_per_source"] == {"a": 25, "b": 25}

    # resume with new weights and a new source: the new blend applies from sample 50 on
    changed = BlendedDataset(srcs, {"a": 0.2, "b": 0.3, "c": 0.5}, tmp_path)
    second = DistributedLoader(changed, G, dp_rank=0, dp_size=1, prefetch=0)
    second.load_state_dict(state)
    after = seen(batches(second, 20))  # 200 samples
    per = {k: [j for t, j in after if t == k] for k in range(3)}
    assert per[0] == list(range(25, 25 + len(per[0])))  # a and b continue with their next unseen samples
    assert per[1] == list(range(25, 25 + len(per[1])))
    assert per[2] == list(range(len(per[2])))  # c is new: it starts at its first sample
    assert [len(per[k]) for k in range(3)] == [40, 60, 100]
    assert not set(before) & set(after)  # nothing repeated

    # a second resume (no further change) continues bit-for-bit, on another dp size too
    mid = DistributedLoader(BlendedDataset(srcs, {"a": 0.2, "b": 0.3, "c": 0.5}, tmp_path), G, prefetch=0)
    mid.load_state_dict(state)
    batches(mid, 8)
    state2 = mid.state_dict()
    assert [s["start"] for s in state2["blend"]["segments"]] == [0, 50]
    fresh = BlendedDataset(srcs, {"a": 0.2, "b": 0.3, "c": 0.5}, tmp_path)
    ranks = [DistributedLoader(fresh, G, dp_rank=r, dp_size=2, prefetch=0) for r in range(2)]
    for l in ranks:
        l.load_state_dict(state2)
    resumed = [torch.cat([l.next_batch() for l in ranks]) for _ in range(12)]
    assert seen(resumed) == after[80:]

    # going back to the old weights at 130: a and b again continue, c stops
    back = DistributedLoader(BlendedDataset(srcs, {"a": 0.5, "b": 0.5}, tmp_path), G, prefetch=0)
    back.load_state_dict(ranks[0].state_dict())
    last = seen(batches(back, 4))
    counts = state2["blend"]["consumed_per_source"]
    assert counts == {"a": 25 + 16, "b": 25 + 24, "c": 40}
    consumed = ranks[0].state_dict()["blend"]["consumed_per_source"]
    assert [j for t, j in last if t == 0] == list(range(consumed["a"], consumed["a"] + 20))
    assert all(t != 2 for t, _ in last)


def test_blend_with_segments(tmp_path, small_corpus, tiny_tokenizer):
    out = tmp_path / "d"
    prepare_data([str(small_corpus)], str(tiny_tokenizer), str(out), docs_per_shard=20, progress=False)
    srcs = {
        "a": TokenDataset(out, SEQ, "train", 0.1, seed=1, return_segments=True),
        "b": TokenDataset(out, SEQ, "train", 0.1, seed=2, return_segments=True),
    }
    loader = DistributedLoader(BlendedDataset(srcs, {"a": 1, "b": 1}), 4, prefetch=0)
    tokens, segs = loader.next_batch()
    assert tokens.shape == segs.shape == (4, SEQ + 1) and segs.dtype == torch.int32


def test_trainer_wiring_with_data_blend(tmp_path, small_corpus, tiny_tokenizer, corpus_docs, jsonl_writer):
    """pretrain/data.py builds a BlendedDataset from data.blend; its loader state round-trips through JSON."""
    import json as _json

    from meshforge.config import load_config
    from meshforge.launch.env import DistEnv
    from meshforge.parallel.mesh import Degrees
    from meshforge.pretrain.data import prepare_train_data

    a, b = tmp_path / "a", tmp_path / "b"
    prepare_data([str(small_corpus)], str(tiny_tokenizer), str(a), progress=False)
    prepare_data(
        [str(jsonl_writer(tmp_path / "b.jsonl", corpus_docs(30, skip=500)))],
        str(tiny_tokenizer),
        str(b),
        progress=False,
    )
    over = {
        "data.blend": f"3:{a},1:{b}",
        "data.seq_len": 16,
        "data.cache_dir": str(tmp_path / "cache"),
        "model.vocab_size": 512,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.steps": 10,
    }
    cfg = load_config(None, over)
    data = prepare_train_data(cfg, DistEnv(rank=0, world_size=1, local_rank=0), Degrees(1, 1, 1, 1, 1, 1))
    loader = data.train_loader
    assert isinstance(loader.dataset, BlendedDataset)
    assert [loader.dataset.locate(i)[0] for i in range(4)] == [str(a), str(a), str(b), str(a)]
    batch = loader.next_batch()
    assert batch.shape == (8, 17)
    state = _json.loads(_json.dumps(loader.state_dict()))
    assert state["blend"]["consumed_per_source"] == {str(a): 6, str(b): 2}
    assert list((tmp_path / "cache" / "blend").glob("*.src.npy"))
    data.valid_loader_factory().next_batch()
    other = jsonl_writer(tmp_path / "c.jsonl", corpus_docs(20, skip=700))
    from meshforge.tokenizers import train_tokenizer

    tok2 = train_tokenizer([other], tmp_path / "tok2", 400)
    prepare_data([str(other)], str(tok2), str(tmp_path / "c"), progress=False)
    cfg2 = load_config(None, {**over, "data.blend": f"1:{a},1:{tmp_path / 'c'}"})
    with pytest.raises(DataError, match="different tokenizers"):
        prepare_train_data(cfg2, DistEnv(rank=0, world_size=1, local_rank=0), Degrees(1, 1, 1, 1, 1, 1))
