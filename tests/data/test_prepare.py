"""prepare_data, manifests, open_data_dir and the built-in corpus, on real files."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import numpy as np
import pytest

from meshforge.data_pipeline import (
    DataError,
    IndexedShard,
    ensure_builtin,
    load_manifest,
    open_data_dir,
    open_shards,
    prepare_data,
    resolve_cache_dir,
)
from meshforge.data_pipeline.builtin import builtin_dir
from meshforge.tokenizers import load_tokenizer, train_tokenizer


def expected_tokens(tok, texts):
    return [np.array(tok.encode(t) + [tok.eos_id]) for t in texts]


def shard_docs(data_dir, manifest):
    return [np.asarray(s[i]) for s in open_shards(data_dir, manifest) for i in range(len(s))]


@pytest.fixture
def mixed_inputs(tmp_path, corpus_docs, jsonl_writer):
    docs = corpus_docs(12, max_chars=800, skip=50)
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text(docs[0])
    (d / "empty.txt").write_text("  \n")
    with open(d / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": docs[1]}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"body": "wrong field"}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")
        f.write("\n")
        f.write(json.dumps({"text": docs[2]}) + "\n")
    jsonl_writer(d / "c.jsonl.gz", docs[3:12])
    files = [d / "a.txt", d / "empty.txt", d / "b.jsonl", d / "c.jsonl.gz"]
    texts = [docs[0], docs[1], docs[2]] + docs[3:12]
    return [str(p) for p in files], texts


def test_prepare_txt_jsonl_gz(tmp_path, mixed_inputs, tiny_tokenizer):
    files, texts = mixed_inputs
    out = tmp_path / "data"
    m = prepare_data(files, str(tiny_tokenizer), str(out), progress=False)
    tok = load_tokenizer(tiny_tokenizer)
    want = expected_tokens(tok, texts)
    assert m == load_manifest(out)
    assert m["format"] == "meshforge-indexed-v1"
    assert m["num_documents"] == 12 and m["num_tokens"] == sum(len(w) for w in want)
    assert m["skipped_records"] == {
        "empty": 2,
        "invalid_utf8": 0,
        "invalid_json": 1,
        "missing_field": 1,
        "non_string_field": 0,
    }
    assert [s["documents"] for s in m["shards"]] == [1, 2, 9]  # one shard per non-empty input
    assert [s["documents"] for s in m["sources"]] == [1, 0, 2, 9]
    assert m["dtype"] == "uint16" and m["append_eos"] is True
    assert m["tokenizer"] == {
        "path": str(out / "tokenizer.model"),
        "fingerprint": tok.fingerprint,
        "vocab_size": 400,
        "kind": "sentencepiece",
        "bos_id": 2,
        "eos_id": 3,
        "pad_id": 0,
        "add_bos": False,
        "files": ["tokenizer.model"],
    }
    assert m["add_bos"] is False
    assert (out / "tokenizer.model").read_bytes() == tiny_tokenizer.read_bytes()
    got = shard_docs(out, m)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]  # no temp dirs left


def test_hf_local_dataset(tmp_path, tiny_tokenizer, corpus_docs):
    datasets = pytest.importorskip("datasets")
    texts = corpus_docs(6, max_chars=500, skip=70)
    datasets.Dataset.from_dict({"content": texts + [""]}).save_to_disk(str(tmp_path / "hf"))
    m = prepare_data(
        [],
        str(tiny_tokenizer),
        str(tmp_path / "d1"),
        hf_dataset=str(tmp_path / "hf"),
        text_field="content",
        progress=False,
    )
    assert m["num_documents"] == 6 and m["skipped_records"]["empty"] == 1
    want = expected_tokens(load_tokenizer(tiny_tokenizer), texts)
    for g, w in zip(shard_docs(tmp_path / "d1", m), want):
        np.testing.assert_array_equal(g, w)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts[:2]}),
            "validation": datasets.Dataset.from_dict({"text": texts[2:5]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "hfdict"))
    m2 = prepare_data(
        [],
        str(tiny_tokenizer),
        str(tmp_path / "d2"),
        hf_dataset=str(tmp_path / "hfdict"),
        hf_split="validation",
        progress=False,
    )
    assert m2["num_documents"] == 3 and m2["sources"][0]["split"] == "validation"
    with pytest.raises(DataError, match="no split 'test'"):
        prepare_data(
            [], str(tiny_tokenizer), str(tmp_path / "d3"), hf_dataset=str(tmp_path / "hfdict"), hf_split="test"
        )
    with pytest.raises(DataError, match="no column 'body'"):
        prepare_data([], str(tiny_tokenizer), str(tmp_path / "d3"), hf_dataset=str(tmp_path / "hf"), text_field="body")
    assert not (tmp_path / "d3").exists()


def test_workers_output_identical(tmp_path, small_corpus, tiny_tokenizer):
    m1 = prepare_data(
        [str(small_corpus)], str(tiny_tokenizer), str(tmp_path / "w1"), workers=1, docs_per_shard=25, progress=False
    )
    m2 = prepare_data(
        [str(small_corpus)], str(tiny_tokenizer), str(tmp_path / "w2"), workers=2, docs_per_shard=25, progress=False
    )
    assert [s["documents"] for s in m1["shards"]] == [25, 25, 25, 5]
    assert m1["shards"] == m2["shards"]
    for name in sorted(p.name for p in (tmp_path / "w1").iterdir()):
        if name.startswith("shard_") or name == "tokenizer.model":
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_refuses_to_overwrite_manifest(tmp_path, small_corpus, tiny_tokenizer):
    out = tmp_path / "data"
    prepare_data([str(small_corpus)], str(tiny_tokenizer), str(out), progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely.")
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare_data([str(other)], str(tiny_tokenizer), str(out), progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    m = prepare_data([str(other)], str(tiny_tokenizer), str(out), progress=False, overwrite=True)
    assert m["num_documents"] == 1 and load_manifest(out)["num_documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other.txt"]


def test_input_errors_write_nothing(tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="does not exist"):
        prepare_data([str(tmp_path / "missing.jsonl")], str(tiny_tokenizer), str(out))
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(DataError, match="is not .txt"):
        prepare_data([str(bad)], str(tiny_tokenizer), str(out))
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"text": ""}\n{"other": "x"}\n')
    with pytest.raises(DataError, match="hold no documents"):
        prepare_data([str(empty)], str(tiny_tokenizer), str(out), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare_data([str(empty)], str(tmp_path / "no.model"), str(out), progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_data([str(empty)], str(tiny_tokenizer), str(junk), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "junk", "x.csv"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_corpus, tiny_tokenizer):
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare_data([str(small_corpus)], str(tiny_tokenizer), str(out), docs_per_shard=30, progress=False)
    return out


def test_open_data_dir_and_tokenizer_mismatch(tmp_path, prepared, tiny_tokenizer, small_corpus):
    info = open_data_dir(prepared)
    m = load_manifest(prepared)
    assert info.num_documents == m["num_documents"] == 80 and info.num_tokens == m["num_tokens"]
    assert info.tokenizer_path == str(prepared / "tokenizer.model")
    assert info.vocab_size == 400 and info.tokenizer_fingerprint == m["tokenizer"]["fingerprint"]
    assert open_data_dir(prepared, str(tiny_tokenizer)).tokenizer_fingerprint == info.tokenizer_fingerprint
    other = train_tokenizer([small_corpus], tmp_path / "other", vocab_size=420)
    with pytest.raises(
        DataError, match=r"vocab 420.*does not match the data manifest .*manifest\.json \(vocab 400.*use the tokenizer"
    ):
        open_data_dir(prepared, str(other))


def test_load_manifest_errors(tmp_path, prepared):
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist"):
        open_data_dir(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        load_manifest(tmp_path / "d")
    with pytest.raises(DataError, match="neither manifest.json nor"):
        open_data_dir(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path / "d")


def test_open_shards_checks_counts(prepared):
    m = load_manifest(prepared)
    m["shards"][1]["tokens"] += 1
    with pytest.raises(DataError, match="shard_00000_0001.*manifest says"):
        open_shards(prepared, m)


def test_megatron_dir_without_manifest(tmp_path, tiny_tokenizer, corpus_docs):
    torch = pytest.importorskip("torch")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    tok = load_tokenizer(tiny_tokenizer)
    texts = corpus_docs(8, max_chars=600, skip=90)
    b = indexed.IndexedDatasetBuilder(str(tmp_path / "corpus_text_document.bin"), dtype=np.uint16)
    for t in texts:
        b.add_item(torch.tensor(tok.encode(t) + [tok.eos_id]))
        b.end_document()
    b.finalize(str(tmp_path / "corpus_text_document.idx"))
    with pytest.raises(DataError, match="set data.tokenizer"):
        open_data_dir(tmp_path)
    info = open_data_dir(tmp_path, str(tiny_tokenizer))
    assert info.manifest is None and info.num_documents == 8 and info.vocab_size == 400
    assert isinstance(info.shards[0], IndexedShard)
    assert info.num_tokens == sum(len(tok.encode(t)) + 1 for t in texts)


def _build_builtin(cache, queue):
    try:
        queue.put(str(ensure_builtin("shakespeare", cache, 512, progress=False)))
    except Exception as exc:  # report instead of leaving the parent waiting
        queue.put(f"error: {exc!r}")


def test_ensure_builtin_idempotent_and_concurrent(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="known corpora are shakespeare"):
        ensure_builtin("hamlet", tmp_path, 320)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_builtin, args=(tmp_path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = {queue.get(timeout=90) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    out = builtin_dir("shakespeare", tmp_path, 512)
    assert results == {str(out)}
    stamp = (out / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_builtin("shakespeare", tmp_path, 512, progress=False) == out
    assert time.perf_counter() - t0 < 2.0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    info = open_data_dir(out)
    assert info.num_documents == 1209 and info.vocab_size == 512
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == [out.name]  # no temp dirs left
    monkeypatch.setenv("MESHFORGE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir("") == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv("MESHFORGE_CACHE")
    assert resolve_cache_dir("").name == "meshforge"
