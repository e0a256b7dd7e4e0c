"""prepare_data input formats (globs, .jsonl.zst, .parquet, HF streaming) and bad-record counts."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from meshforge.data_pipeline import DataError, load_manifest, open_shards, prepare_data
from meshforge.tokenizers import load_tokenizer


def docs_of(out):
    m = load_manifest(out)
    return [np.asarray(s[i]) for s in open_shards(out, m) for i in range(len(s))]


def want_docs(tok_path, texts):
    tok = load_tokenizer(tok_path)
    return [np.array(tok.encode(t) + [tok.eos_id]) for t in texts]


def assert_docs(out, tok_path, texts):
    got, want = docs_of(out), want_docs(tok_path, texts)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def bad_jsonl_lines(good: list[str]) -> list[bytes]:
    """Good records interleaved with one record of every bad kind."""
    return [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "caf\xe9 latin-1 bytes"}',  # invalid UTF-8
        b"{broken json",
        json.dumps({"body": "no text field"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "lone \\ud800 surrogate"}',  # valid JSON, not encodable text
        b"",
        json.dumps({"text": good[1]}).encode(),
    ]


BAD_COUNTS = {"empty": 1, "invalid_utf8": 2, "invalid_json": 1, "missing_field": 3, "non_string_field": 1}


def test_zst_gz_jsonl_globs_and_bad_records(tmp_path, tiny_tokenizer, corpus_docs):
    zstd = pytest.importorskip("zstandard")
    good = corpus_docs(6, max_chars=400, skip=200)
    raw = b"\n".join(bad_jsonl_lines(good[:2])) + b"\n"
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_bytes(raw)
    (d / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(raw.replace(good[0][:20].encode(), b"X")))
    (d / "c.jsonl.zst").write_bytes(
        zstd.ZstdCompressor().compress(json.dumps({"text": good[2]}).encode() + b"\n" + raw)
    )
    (d / "d.txt").write_bytes(b"\xff\xfe not utf-8")
    m = prepare_data(
        [str(d / "*.jsonl*"), str(d / "**" / "*.gz"), str(d / "d.txt")],
        str(tiny_tokenizer),
        str(tmp_path / "out"),
        progress=False,
    )
    assert [s["path"] for s in m["sources"]] == [
        str(d / "a.jsonl"),
        str(d / "c.jsonl.zst"),
        str(d / "sub" / "b.jsonl.gz"),
        str(d / "d.txt"),
    ]
    assert [s["documents"] for s in m["sources"]] == [2, 3, 2, 0]
    assert m["sources"][0]["skipped"] == BAD_COUNTS and m["sources"][3]["skipped"]["invalid_utf8"] == 1
    assert m["skipped_records"] == {k: 3 * v + (k == "invalid_utf8") for k, v in BAD_COUNTS.items()}
    b_texts = [json.loads(json.dumps(t).replace(good[0][:20], "X")) for t in good[:2]]
    assert_docs(tmp_path / "out", tiny_tokenizer, good[:2] + [good[2]] + good[:2] + b_texts)
    with pytest.raises(DataError, match="matches no files"):
        prepare_data([str(d / "*.nothing")], str(tiny_tokenizer), str(tmp_path / "o2"), progress=False)


def test_corrupt_compressed_file_is_an_error(tmp_path, tiny_tokenizer):
    zstd = pytest.importorskip("zstandard")
    blob = zstd.ZstdCompressor().compress(b'{"text": "hello there"}\n' * 200)
    (tmp_path / "t.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        prepare_data([str(tmp_path / "t.jsonl.zst")], str(tiny_tokenizer), str(tmp_path / "out"), progress=False)


def test_parquet(tmp_path, tiny_tokenizer, corpus_docs):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = corpus_docs(5, max_chars=300, skip=220)
    pq.write_table(pa.table({"content": texts[:3] + [None, ""], "n": [1, 2, 3, 4, 5]}), tmp_path / "a.parquet")
    pq.write_table(
        pa.table({"content": pa.array([t.encode() for t in texts[3:]] + [b"\xff"], pa.binary())}),
        tmp_path / "b.parquet",
    )
    m = prepare_data(
        [str(tmp_path / "*.parquet")], str(tiny_tokenizer), str(tmp_path / "out"), text_field="content", progress=False
    )
    assert m["skipped_records"] == {
        "empty": 1,
        "invalid_utf8": 1,
        "invalid_json": 0,
        "missing_field": 1,
        "non_string_field": 0,
    }
    assert_docs(tmp_path / "out", tiny_tokenizer, texts)
    with pytest.raises(DataError, match="no column 'text'"):
        prepare_data([str(tmp_path / "a.parquet")], str(tiny_tokenizer), str(tmp_path / "o3"), progress=False)
    assert not (tmp_path / "o3").exists()


def test_non_string_column_counted(tmp_path, tiny_tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a real document here", "another one"], "n": [1, 2]}), tmp_path / "a.parquet")
    m = prepare_data([str(tmp_path / "a.parquet")], str(tiny_tokenizer), str(tmp_path / "o1"), progress=False)
    assert m["num_documents"] == 2
    with pytest.raises(DataError, match="hold no documents.*'non_string_field': 2"):
        prepare_data(
            [str(tmp_path / "a.parquet")], str(tiny_tokenizer), str(tmp_path / "o2"), text_field="n", progress=False
        )
    assert not (tmp_path / "o2").exists()


def test_hf_streaming_local_files(tmp_path, tiny_tokenizer, corpus_docs, jsonl_writer):
    pytest.importorskip("datasets")
    texts = corpus_docs(7, max_chars=300, skip=240)
    d = tmp_path / "hf"
    d.mkdir()
    jsonl_writer(d / "part-0.jsonl", texts[:4])
    with open(d / "part-1.jsonl", "w") as f:
        for t in texts[4:]:
            f.write(json.dumps({"text": t}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")
    m = prepare_data(
        [], str(tiny_tokenizer), str(tmp_path / "out"), hf_dataset=str(d), hf_streaming=True, progress=False
    )
    assert [s["type"] for s in m["sources"]] == ["hf_streaming", "hf_streaming"]
    assert [s["documents"] for s in m["sources"]] == [4, 3] and m["skipped_records"]["empty"] == 1
    assert_docs(tmp_path / "out", tiny_tokenizer, texts)


def test_hf_saved_dataset_in_row_slices(tmp_path, tiny_tokenizer, corpus_docs):
    datasets = pytest.importorskip("datasets")
    texts = corpus_docs(7, max_chars=300, skip=260)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    m = prepare_data(
        [],
        str(tiny_tokenizer),
        str(tmp_path / "out"),
        hf_dataset=str(tmp_path / "hf"),
        hf_rows_per_slice=3,
        progress=False,
    )
    assert [s["rows"] for s in m["sources"]] == [[0, 3], [3, 6], [6, 7]]
    assert [s["prefix"] for s in m["shards"]] == ["shard_00000", "shard_00001", "shard_00002"]
    assert_docs(tmp_path / "out", tiny_tokenizer, texts)
