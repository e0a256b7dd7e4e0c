"""Shared data fixtures: small real corpora and a real sentencepiece model per session."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

# Triton's CPU interpreter for tests/test_fused_kernels.py. Triton reads the variable when it is first
# imported (``import torch._dynamo`` imports it), so it is set here, before any test module; on CPU nothing
# else uses Triton. On a GPU machine the kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from meshforge.data_pipeline.builtin import BUILTIN_CORPORA


def builtin_docs(n: int, max_chars: int = 1500, skip: int = 0) -> list[str]:
    """The first ``n`` documents of the built-in corpus (after ``skip``), cut to ``max_chars``."""
    out = []
    with gzip.open(BUILTIN_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if len(out) == n:
                break
            out.append(json.loads(line)["text"][:max_chars])
    return out


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


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


def _corpus_slice(path: Path, start: int, n_docs: int) -> Path:
    with gzip.open(BUILTIN_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        lines = f.readlines()[start:start + n_docs]
    path.write_text("".join(lines))
    return path


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


@pytest.fixture(scope="session")
def byte_bpe_tokenizer(tmp_path_factory) -> Path:
    """A real 512-token byte-level BPE ``tokenizer.json`` (+ tokenizer_config.json) trained on the built-in corpus."""
    from meshforge.tokenizers.bpe_train import train_byte_bpe

    return train_byte_bpe(builtin_docs(120), tmp_path_factory.mktemp("bpe"), 512)
