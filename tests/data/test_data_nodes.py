"""prepare_data split across nodes, merge-manifest, and restart after a crash mid-shard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshforge.data_pipeline import DataError, load_manifest, merge_manifest, prepare_data
from meshforge.data_pipeline.node_rank import default_node_rank
from meshforge.data_pipeline.shard_writer import SliceSink


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus_docs, jsonl_writer):
    d = tmp_path_factory.mktemp("node_inputs")
    docs = corpus_docs(25, max_chars=400, skip=300)
    for k in range(5):
        jsonl_writer(d / f"part_{k}.jsonl", docs[5 * k : 5 * k + 5] + ([""] if k == 1 else []))
    return str(d / "part_*.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs, tiny_tokenizer):
    out = tmp_path_factory.mktemp("node_ref") / "data"
    prepare_data([inputs], str(tiny_tokenizer), str(out), docs_per_shard=2, progress=False, node_rank=0, num_nodes=1)
    return out


def files(d):
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name != "manifest.json"}


def same_data(a, b):
    ma, mb = load_manifest(a), load_manifest(b)
    for m in (ma, mb):
        m["tokenizer"].pop("path")
    assert ma == mb
    assert files(a) == files(b)


def test_two_nodes_merge_to_the_single_node_result(tmp_path, inputs, tiny_tokenizer, reference):
    out = tmp_path / "data"
    kw = dict(docs_per_shard=2, progress=False, num_nodes=2)
    p0 = prepare_data([inputs], str(tiny_tokenizer), str(out), node_rank=0, **kw)
    assert p0["format"] == "meshforge-node-partial-v1" and p0["slices"] == [0, 2, 4]
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match=r"2 of 5 slices .* node ranks \[1\]"):
        merge_manifest(out)
    m = prepare_data([inputs], str(tiny_tokenizer), str(out), node_rank=1, **kw)  # the last node merges
    assert m["format"] == "meshforge-indexed-v1" and m["num_slices"] == 5
    assert m["skipped_records"]["empty"] == 1 and m["sources"][1]["skipped"]["empty"] == 1
    same_data(out, reference)
    assert sorted(p.name for p in (out / ".prepare").glob("node_*")) == [
        "node_00000-of-00002.json",
        "node_00001-of-00002.json",
    ]


def test_a_node_starting_while_another_creates_the_work_dir_joins_it(tmp_path, inputs, tiny_tokenizer, reference):
    """Nodes started at once: node 1 may find node 0's empty `.prepare/` before node 0 wrote its plan there."""
    out = tmp_path / "data"
    (out / ".prepare").mkdir(parents=True)  # node 0 between creating the work dir and writing its plan
    kw = dict(docs_per_shard=2, progress=False, num_nodes=2)
    p1 = prepare_data([inputs], str(tiny_tokenizer), str(out), node_rank=1, **kw)
    assert p1["slices"] == [1, 3]
    prepare_data([inputs], str(tiny_tokenizer), str(out), node_rank=0, **kw)
    same_data(out, reference)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")  # anything else in the dir is still refused
    with pytest.raises(DataError, match="is not empty and holds no manifest.json"):
        prepare_data([inputs], str(tiny_tokenizer), str(tmp_path / "other"), node_rank=0, **kw)


def test_no_merge_then_merge_manifest_with_verify(tmp_path, inputs, tiny_tokenizer, reference):
    out = tmp_path / "data"
    for r in (1, 0):
        prepare_data(
            [inputs],
            str(tiny_tokenizer),
            str(out),
            docs_per_shard=2,
            progress=False,
            node_rank=r,
            num_nodes=2,
            merge=False,
        )
    assert not (out / "manifest.json").exists()
    merge_manifest(out, verify=True)
    same_data(out, reference)
    assert merge_manifest(out) == load_manifest(out)  # merging again is harmless
    blob = bytearray((out / "shard_00003_0000.bin").read_bytes())
    blob[0] ^= 1
    (out / "shard_00003_0000.bin").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="shard_00003_0000.bin does not match its recorded sha256"):
        merge_manifest(out, verify=True)


def test_default_node_rank(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert default_node_rank() == (3, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(k, raising=False)
    if "mpi4py" not in sys.modules:
        assert default_node_rank() == (0, 1)
    with pytest.raises(DataError, match="node_rank 2 is not a rank of num_nodes 2"):
        prepare_data(["x.jsonl"], "t.model", "o", node_rank=2, num_nodes=2)


_CRASH = """
import os

from meshforge.data_pipeline import prepare_data
from meshforge.data_pipeline.shard_writer import SliceSink

real_add = SliceSink.add


def add(self, tokens):  # die like a killed process after document {docs} of slice {slice}, mid-shard
    real_add(self, tokens)
    if (self.index, self.documents) == ({slice}, {docs}):
        os._exit(86)


SliceSink.add = add
prepare_data([{inputs!r}], {tok!r}, {out!r}, docs_per_shard=2, progress=False, workers=2, node_rank=0, num_nodes=1)
"""


def _crash_run(inputs, tok, out, fault):
    where = dict(item.split("=") for item in fault.split(","))
    code = _CRASH.format(inputs=inputs, tok=str(tok), out=str(out), slice=int(where["slice"]), docs=int(where["docs"]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_restart_after_crash_mid_shard(tmp_path, inputs, tiny_tokenizer, reference, monkeypatch):
    out = tmp_path / "data"
    proc = _crash_run(inputs, tiny_tokenizer, out, "slice=2,docs=3")  # dies in the 2nd shard of slice 2
    assert proc.returncode == 86, proc.stderr
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / ".prepare").glob("slice_*"))
    assert done == ["slice_00000.json", "slice_00001.json"]
    assert (out / "shard_00002_0000.idx").exists()  # a finished shard of the unfinished slice ...
    assert (out / "shard_00002_0001.bin.tmp").exists()  # ... and a half one
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[01]*")}

    built = []
    real_init = SliceSink.__init__

    def spy(self, out_dir, index, *a, **kw):
        built.append(index)
        real_init(self, out_dir, index, *a, **kw)

    monkeypatch.setattr(SliceSink, "__init__", spy)
    m = prepare_data(
        [inputs], str(tiny_tokenizer), str(out), docs_per_shard=2, progress=False, node_rank=0, num_nodes=1
    )
    assert built == [2, 3, 4]  # finished slices are skipped, the crashed one is redone from scratch
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[01]*")} == stamps
    assert m["num_documents"] == 25
    assert not list(out.glob("*.tmp"))
    same_data(out, reference)


def test_a_slice_whose_files_changed_is_redone(tmp_path, inputs, tiny_tokenizer, reference):
    out = tmp_path / "data"
    proc = _crash_run(inputs, tiny_tokenizer, out, "slice=3,docs=1")
    assert proc.returncode == 86, proc.stderr
    (out / "shard_00001_0000.bin").write_bytes(b"")  # a finished shard lost its data
    prepare_data([inputs], str(tiny_tokenizer), str(out), docs_per_shard=2, progress=False, node_rank=0, num_nodes=1)
    same_data(out, reference)


def test_unfinished_dir_of_other_inputs_is_refused(tmp_path, inputs, tiny_tokenizer, corpus_docs, jsonl_writer):
    out = tmp_path / "data"
    proc = _crash_run(inputs, tiny_tokenizer, out, "slice=1,docs=1")
    assert proc.returncode == 86
    other = jsonl_writer(tmp_path / "other.jsonl", corpus_docs(3, skip=400))
    with pytest.raises(DataError, match="unfinished preparation of other inputs or settings"):
        prepare_data([str(other)], str(tiny_tokenizer), str(out), progress=False, node_rank=0, num_nodes=1)
    with pytest.raises(DataError, match="unfinished preparation"):  # same inputs, other settings
        prepare_data(
            [inputs], str(tiny_tokenizer), str(out), docs_per_shard=3, progress=False, node_rank=0, num_nodes=1
        )
    m = prepare_data(
        [str(other)], str(tiny_tokenizer), str(out), progress=False, overwrite=True, node_rank=0, num_nodes=1
    )
    assert m["num_documents"] == 3 and sorted(p.name for p in out.glob("shard_*")) == [
        "shard_00000.bin",
        "shard_00000.idx",
    ]
    json.loads((out / "manifest.json").read_text())
