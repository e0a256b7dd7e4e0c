"""Shared data fixtures: small real corpora and a real sentencepiece model per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The shared harness (parallel_harness, cluster_harness, remote_servers, torch_compat, the rank scripts) sits in
# tests/harness/ and the tests are grouped by room in tests/<room>/; every one of these folders is on sys.path so
# that a test imports the harness, or another room's test helpers, by bare name (module names are unique).
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS / "harness")] + sorted(
    str(d) for d in TESTS.iterdir() if d.is_dir() and d.name != "harness" and not d.name.startswith((".", "_"))
)

# Triton's CPU interpreter for tests/kernels/test_fused_kernels.py. Triton reads the variable when it is first
# imported (``import torch._dynamo`` imports it), so it is set here, before any test module; on CPU nothing
# else uses Triton. On a GPU machine the kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from corpus_files import _corpus_slice, builtin_docs, write_jsonl  # noqa: E402 (tests/harness, on sys.path above)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~60 KB of real text as one jsonl file, with some numbers mixed in."""
    d = tmp_path_factory.mktemp("corpus")
    docs = builtin_docs(40)
    docs += [f"In the year {1500 + i} there were {i * 37} players and {i * 11} plays." for i in range(40)]
    return write_jsonl(d / "small.jsonl", docs)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, small_corpus) -> Path:
    """A real 400-piece BPE sentencepiece model (byte fallback, digit splitting)."""
    from meshforge.tokenizers import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer([small_corpus], d / "tiny", vocab_size=400, special_tokens=["<|sep|>"], n_reserved=2)


@pytest.fixture(scope="session")
def corpus_docs():
    """``corpus_docs(n, max_chars=1500, skip=0)``: documents cut from the built-in corpus."""
    return builtin_docs


@pytest.fixture(scope="session")
def jsonl_writer():
    """``jsonl_writer(path, texts, field="text")``: write a .jsonl or .jsonl.gz file."""
    return write_jsonl


# --------------------------------------------------------------------------- training data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data dir: 150 Shakespeare documents, a 512-token BPE tokenizer."""
    from meshforge.data_pipeline.prepare import prepare_data
    from meshforge.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = _corpus_slice(root / "corpus.jsonl", 0, 150)
    tok = train_tokenizer([corpus], root / "tok", 512)
    prepare_data([str(corpus)], str(tok), str(root / "data"), progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer of the same size trained on other documents (a different fingerprint)."""
    from meshforge.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("other_tok")
    return train_tokenizer([_corpus_slice(root / "corpus.jsonl", 600, 100)], root / "tok", 512)


@pytest.fixture(scope="session")
def single_process_ref(tiny_data, tmp_path_factory):
    """The single-process reference run every parallel layout is compared with."""
    from parallel_harness import train_layout

    return train_layout(tiny_data, tmp_path_factory.mktemp("ref") / "run", 1)


# --------------------------------------------------------------------------- remote data (test_remote_*.py)


@pytest.fixture(scope="session")
def shards_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's corpus prepared into four shards (40 documents each), under ``<root>/data``."""
    from meshforge.data_pipeline.prepare import prepare_data

    root = tmp_path_factory.mktemp("remote_src")
    src = tiny_data.parent
    prepare_data(
        [str(src / "corpus.jsonl")], str(src / "tok.model"), str(root / "data"), docs_per_shard=40, progress=False
    )
    return root / "data"


@pytest.fixture(scope="session")
def http(shards_data, tmp_path_factory):
    """nginx serving ``shards_data``'s parent: the data at ``<http.url>/data``."""
    from remote_servers import Nginx, need_nginx

    need_nginx()
    server = Nginx(shards_data.parent, tmp_path_factory.mktemp("nginx")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(tiny_data, tmp_path_factory):
    """moto's S3 server, the environment pointed at it, the data uploaded to ``s3://bucket/data``."""
    from meshforge.data_pipeline.prepare import prepare_data
    from meshforge.data_pipeline.remote import RemoteStore
    from meshforge.data_pipeline.remote_upload import prepare_to_url
    from remote_servers import MotoS3

    server = MotoS3().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        store = RemoteStore("s3://bucket/data")
        store.fs.mkdir("bucket")
        # upload with the project's own path: prepared, staged and uploaded by data prepare --output s3://
        prepare_to_url(
            "s3://bucket/data",
            tmp_path_factory.mktemp("stage"),
            prepare_data,
            inputs=[str(tiny_data.parent / "corpus.jsonl")],
            tokenizer_path=str(tiny_data.parent / "tok.model"),
            docs_per_shard=40,
            progress=False,
        )
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def byte_bpe_tokenizer(tmp_path_factory) -> Path:
    """A real 512-token byte-level BPE ``tokenizer.json`` (+ tokenizer_config.json) trained on the built-in corpus."""
    from meshforge.tokenizers.bpe_train import train_byte_bpe

    return train_byte_bpe(builtin_docs(120), tmp_path_factory.mktemp("bpe"), 512)
