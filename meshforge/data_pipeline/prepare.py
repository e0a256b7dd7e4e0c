"""Raw text -> tokenized indexed shards plus ``manifest.json``; reading prepared data back.

A prepared data dir holds ``shard_00000.bin/.idx``, ... (Megatron indexed format),
``tokenizer.model`` (a copy of the tokenizer the data was tokenized with) and
``manifest.json`` (written last)::

    {"format": "meshforge-indexed-v1",
     "tokenizer": {"path": ..., "fingerprint": ..., "vocab_size": ...},
     "dtype": "uint16", "append_eos": true, "num_documents": N, "num_tokens": N,
     "shards": [{"prefix": "shard_00000", "documents": n, "tokens": n,
                 "bin_sha256": ..., "idx_sha256": ...}],
     "sources": [...], "skipped_records": {"empty": n, "invalid_json": n, "missing_field": n}}

Everything is written into a temp dir next to the output dir and renamed into place, so a
failed run leaves nothing half-written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.indexed import IndexedShard, IndexedShardWriter, dtype_for_vocab
from meshforge.tokenizers import Tokenizer, TokenizerError, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "meshforge-indexed-v1"
TOKENIZER_FILE = "tokenizer.model"
FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
_CHUNK_DOCS = 64


@dataclass
class _Source:
    """One input: a text/jsonl file or a local HF dataset (already opened)."""

    kind: str
    path: Path
    split: str | None = None
    dataset: Any = None
    documents: int = 0

    def describe(self) -> dict:
        out = {"type": self.kind, "path": str(self.path), "documents": self.documents}
        if self.split is not None:
            out["split"] = self.split
        return out


@dataclass
class _Skipped:
    counts: dict = field(default_factory=lambda: {"empty": 0, "invalid_json": 0, "missing_field": 0})

    def add(self, kind: str) -> None:
        self.counts[kind] += 1


def _file_source(p: str | Path) -> _Source:
    path = Path(p).resolve()
    if not path.is_file():
        raise DataError(f"input {path} does not exist: check the path")
    if not path.name.endswith(FILE_SUFFIXES):
        raise DataError(f"input {path} is not {', '.join(FILE_SUFFIXES)}: convert it or pass a saved HF dataset via hf_dataset")
    return _Source("file", path)


def _hf_source(path_str: str, split: str, text_field: str) -> _Source:
    path = Path(path_str).resolve()
    if not path.exists():
        raise DataError(f"HF dataset {path} does not exist: pass a directory written by datasets' save_to_disk")
    import datasets  # optional dependency, only needed here

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError or its own errors
        raise DataError(f"{path} is not a saved HF dataset ({exc}): write it with save_to_disk") from None
    chosen = None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"HF dataset {path} has no split {split!r} (splits: {sorted(ds)}): set hf_split")
        ds, chosen = ds[split], split
    if text_field not in ds.column_names:
        raise DataError(f"HF dataset {path} has no column {text_field!r} (columns: {ds.column_names}): set text_field")
    return _Source("hf_dataset", path, split=chosen, dataset=ds)


def _documents(src: _Source, text_field: str, skipped: _Skipped) -> Iterator[str]:
    """Texts of one source; empty/invalid records are counted in ``skipped`` and left out."""
    if src.kind == "hf_dataset":
        for batch in src.dataset.iter(batch_size=1000):
            for text in batch[text_field]:
                if not isinstance(text, str):
                    skipped.add("missing_field")
                elif not text.strip():
                    skipped.add("empty")
                else:
                    yield text
        return
    if src.path.name.endswith(".txt"):
        text = src.path.read_text(encoding="utf-8")
        if text.strip():
            yield text
        else:
            skipped.add("empty")
        return
    import gzip

    opener = gzip.open if src.path.name.endswith(".gz") else open
    with opener(src.path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped.add("invalid_json")
                continue
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                skipped.add("missing_field")
            elif not text.strip():
                skipped.add("empty")
            else:
                yield text


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> Tokenizer:
    return load_tokenizer(path)


def _encode_chunk(task: tuple[str, bool, str, int, list[str]]) -> tuple[int, list[np.ndarray]]:
    """Worker job: token arrays (EOS appended if asked) for one chunk of one source."""
    tok_path, append_eos, dtype, src_idx, texts = task
    tok = _cached_tokenizer(tok_path)
    out = []
    for ids in tok.encode_batch(texts):
        if append_eos:
            ids.append(tok.eos_id)
        out.append(np.asarray(ids, dtype=dtype))
    return src_idx, out


def _chunks(sources, text_field, skipped, tok_path, append_eos, dtype) -> Iterator[tuple]:
    for i, src in enumerate(sources):
        buf: list[str] = []
        for text in _documents(src, text_field, skipped):
            buf.append(text)
            if len(buf) == _CHUNK_DOCS:
                yield (tok_path, append_eos, dtype, i, buf)
                buf = []
        if buf:
            yield (tok_path, append_eos, dtype, i, buf)


class _ShardSink:
    """Routes documents into shards: one per source, or a new one every ``docs_per_shard``."""

    def __init__(self, out_dir: Path, dtype, docs_per_shard: int):
        self.out_dir, self.dtype, self.docs_per_shard = out_dir, dtype, docs_per_shard
        self.writer: IndexedShardWriter | None = None
        self.source: int | None = None
        self.shards: list[dict] = []

    def add(self, src_idx: int, tokens: np.ndarray) -> None:
        new_source = self.docs_per_shard <= 0 and src_idx != self.source
        full = self.docs_per_shard > 0 and self.writer is not None and self.writer.num_documents >= self.docs_per_shard
        if self.writer is None or new_source or full:
            self.close()
            prefix = f"shard_{len(self.shards):05d}"
            self.writer = IndexedShardWriter(self.out_dir / prefix, self.dtype)
            self.shards.append({"prefix": prefix})
        self.source = src_idx
        self.writer.add_document(tokens)

    def close(self) -> None:
        if self.writer is None:
            return
        w = self.writer
        w.finalize()
        entry = self.shards[-1]
        entry["documents"] = w.num_documents
        entry["tokens"] = w.num_tokens
        entry["bin_sha256"] = _sha256(self.out_dir / f"{entry['prefix']}.bin")
        entry["idx_sha256"] = _sha256(self.out_dir / f"{entry['prefix']}.idx")
        self.writer = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output_dir {out} exists and is not a directory: choose another path")
    if not out.exists():
        return
    if (out / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"output_dir {out} already holds prepared data ({MANIFEST}): pass overwrite=True or choose another directory")
        return
    if any(out.iterdir()):
        raise DataError(f"output_dir {out} is not empty and holds no {MANIFEST}: choose an empty or new directory")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "data")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_data(
    inputs: list[str],
    tokenizer_path: str,
    output_dir: str,
    workers: int = 1,
    text_field: str = "text",
    hf_dataset: str | None = None,
    hf_split: str = "train",
    append_eos: bool = True,
    docs_per_shard: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenize text inputs into indexed shards in ``output_dir``; returns the manifest.

    Inputs are .txt (one document per file), .jsonl/.jsonl.gz (one document per line, field
    ``text_field``) and optionally a local HF dataset (``hf_dataset``, saved with
    ``save_to_disk``; ``hf_split`` picks the split of a DatasetDict). One shard per input,
    or a new shard every ``docs_per_shard`` documents when > 0. ``workers`` > 1 tokenizes in
    a process pool (``spawn`` start method, so scripts must call this under
    ``if __name__ == "__main__":``); the output is byte-identical for any worker count.
    Raises :class:`DataError` before writing anything for missing/unsupported inputs or an
    output dir that already holds a manifest (unless ``overwrite``); a run that fails later
    (e.g. no documents at all) removes its temp dir and leaves ``output_dir`` untouched.
    """
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    sources = [_file_source(p) for p in inputs]
    if hf_dataset:
        sources.append(_hf_source(hf_dataset, hf_split, text_field))
    if not sources:
        raise DataError("no inputs given: pass text/jsonl files or hf_dataset")
    out = Path(output_dir).resolve()
    _check_output_dir(out, overwrite)
    try:
        tok = load_tokenizer(tokenizer_path)
    except TokenizerError as exc:
        raise DataError(str(exc)) from None
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
        skipped = _Skipped()
        sink = _ShardSink(tmp, dtype, docs_per_shard)
        tasks = _chunks(sources, text_field, skipped, str(tok.path), append_eos, dtype.str)
        bar = tqdm(desc=f"tokenizing -> {out.name}", unit="doc", disable=not progress)
        pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_encode_chunk, tasks) if pool else map(_encode_chunk, tasks)
            for src_idx, arrays in results:
                for arr in arrays:
                    sink.add(src_idx, arr)
                sources[src_idx].documents += len(arrays)
                bar.update(len(arrays))
            sink.close()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        num_docs = sum(s["documents"] for s in sink.shards)
        if num_docs == 0:
            raise DataError(
                f"inputs {[str(s.path) for s in sources]} hold no documents (skipped: {skipped.counts}): "
                f"check the files and text_field={text_field!r}"
            )
        manifest = {
            "format": FORMAT,
            "tokenizer": {"path": str(out / TOKENIZER_FILE), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
            "dtype": dtype.name,
            "append_eos": append_eos,
            "num_documents": num_docs,
            "num_tokens": sum(s["tokens"] for s in sink.shards),
            "shards": sink.shards,
            "sources": [s.describe() for s in sources],
            "skipped_records": skipped.counts,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _check_output_dir(out, overwrite)  # nobody wrote there meanwhile
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------- reading prepared data


@dataclass
class DataInfo:
    """What the trainer needs to know about a data dir (prepared or Megatron-written)."""

    data_dir: Path
    shards: list[IndexedShard]
    num_documents: int
    num_tokens: int
    tokenizer_path: str
    tokenizer_fingerprint: str | None
    vocab_size: int | None
    manifest: dict | None = None


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check ``<data_dir>/manifest.json``."""
    d = Path(data_dir)
    if not d.exists():
        raise DataError(f"data path {d} does not exist: run `meshforge data prepare` or fix data.path")
    if not d.is_dir():
        raise DataError(f"data path {d} is not a directory: point data.path at a prepared data dir")
    mp_ = d / MANIFEST
    if not mp_.is_file():
        raise DataError(f"data path {d} has no {MANIFEST}: prepare it with `meshforge data prepare`")
    try:
        manifest = json.loads(mp_.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{mp_} is not valid JSON ({exc}): re-run data preparation") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{mp_} is not a {FORMAT} manifest: re-run data preparation")
    for key in ("tokenizer", "dtype", "num_documents", "num_tokens", "shards"):
        if key not in manifest:
            raise DataError(f"{mp_} lacks the key {key!r}: re-run data preparation")
    return manifest


def open_shards(data_dir: str | Path, manifest: dict) -> list[IndexedShard]:
    """Open every shard of a manifest, checking dtype and document/token counts."""
    d = Path(data_dir)
    shards = []
    for entry in manifest["shards"]:
        shard = IndexedShard(d / entry["prefix"])
        if shard.dtype.name != manifest["dtype"]:
            raise DataError(f"shard {shard.prefix} has dtype {shard.dtype.name}, manifest says {manifest['dtype']}: re-run data preparation")
        if shard.num_documents != entry["documents"] or shard.num_tokens != entry["tokens"]:
            raise DataError(
                f"shard {shard.prefix} holds {shard.num_documents} documents / {shard.num_tokens} tokens, "
                f"manifest says {entry['documents']} / {entry['tokens']}: re-run data preparation"
            )
        shards.append(shard)
    return shards


def _load_tok(path: str | Path, what: str) -> Tokenizer:
    try:
        return load_tokenizer(path)
    except TokenizerError as exc:
        raise DataError(f"{what}: {exc}") from None


def describe_data(data_dir: str | Path, tokenizer_path: str = "") -> DataInfo:
    """Open a data dir: a prepared one (manifest) or bare Megatron ``*.idx/*.bin`` pairs.

    With a manifest, ``tokenizer_path`` (if given) must be the tokenizer the data was prepared
    with; without one it is required.
    """
    d = Path(data_dir).resolve()
    if not d.exists():
        raise DataError(f"data path {d} does not exist: run `meshforge data prepare` or fix data.path")
    if (d / MANIFEST).exists():
        manifest = load_manifest(d)
        shards = open_shards(d, manifest)
        mtok = manifest["tokenizer"]
        if tokenizer_path:
            tok = _load_tok(tokenizer_path, "data.tokenizer")
            if tok.fingerprint != mtok.get("fingerprint"):
                raise DataError(
                    f"tokenizer {tok.path} (vocab {tok.vocab_size}, sha {tok.fingerprint[:12]}) does not match the data "
                    f"manifest (vocab {mtok.get('vocab_size')}, sha {str(mtok.get('fingerprint'))[:12]}): "
                    f"use the tokenizer the data was prepared with"
                )
        else:
            local = d / TOKENIZER_FILE
            tok = _load_tok(local if local.exists() else mtok.get("path", ""), f"tokenizer of {d}")
        return DataInfo(d, shards, manifest["num_documents"], manifest["num_tokens"],
                        str(tok.path), tok.fingerprint, tok.vocab_size, manifest)
    if not d.is_dir():
        raise DataError(f"data path {d} is not a directory: point data.path at a prepared data dir")
    prefixes = sorted(p.with_suffix("") for p in d.glob("*.idx"))
    if not prefixes:
        raise DataError(f"data path {d} holds neither {MANIFEST} nor .idx/.bin shards: prepare it with `meshforge data prepare`")
    if not tokenizer_path:
        raise DataError(
            f"data path {d} holds Megatron shards but no {MANIFEST}: set data.tokenizer to the sentencepiece model "
            f"the data was tokenized with"
        )
    tok = _load_tok(tokenizer_path, "data.tokenizer")
    shards = [IndexedShard(p) for p in prefixes]
    for s in shards:
        if s.dtype.kind not in "iu":
            raise DataError(f"shard {s.prefix} stores {s.dtype} values, not token ids: re-tokenize it")
    return DataInfo(d, shards, sum(s.num_documents for s in shards), sum(s.num_tokens for s in shards),
                    str(tok.path), tok.fingerprint, tok.vocab_size, None)
