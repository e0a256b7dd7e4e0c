"""Raw text -> tokenized indexed shards: the slice plan, tokenizing workers, markers, node partials.

The inputs (read by :mod:`meshforge.text_inputs`) are cut into **slices**, the unit of work,
restart and node splitting. Node ``r`` of ``n`` tokenizes slices ``r, r+n, r+2n, ...``; each
slice becomes ``shard_<slice>`` (or ``shard_<slice>_<part>`` every ``docs_per_shard``
documents; :mod:`.shard_writer`). The files of a prepared dir are described in :mod:`.layout`.

Restart: a slice with a done-marker whose shard files exist with the recorded sizes is
skipped; a slice without one (a crash mid-slice) has its files deleted and is redone. Shard
files are written as ``.tmp`` and renamed, the marker is written (tmp + rename) after its
shards, the manifest after all markers: whatever a crash leaves is either complete and
recorded, or ignored and redone. The node that finds every slice done writes the manifest
(:func:`meshforge.data_pipeline.manifest.merge_manifest`, which also runs by hand). Records
that yield no document are counted in ``skipped_records`` by kind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import shutil
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.indexed import dtype_for_vocab
from meshforge.data_pipeline.layout import (
    FORMAT,
    MANIFEST,
    PLAN_FILE,
    WORK_DIR,
    atomic_write_json,
    marker_path,
    read_json,
    slice_done,
)
from meshforge.data_pipeline.manifest import merge_manifest
from meshforge.data_pipeline.shard_writer import SliceSink
from meshforge.text_inputs import Slice, expand_inputs, file_slice, hf_slices, no_skips, slice_documents, sum_skips
from meshforge.tokenizers import Tokenizer, TokenizerError, load_tokenizer

from .node_rank import default_node_rank

_CHUNK_DOCS = 64


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> Tokenizer:
    return load_tokenizer(path)


def _encode_chunk(task: tuple) -> tuple[int, list[np.ndarray], bool]:
    """Worker job: token arrays (BOS / EOS added as planned) for one chunk of one slice."""
    tok_path, bos, eos, dtype, slice_idx, texts, last = task
    tok = _cached_tokenizer(tok_path)
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    out = [np.asarray(head + ids + tail, dtype=dtype) for ids in (tok.encode_batch(texts) if texts else [])]
    return slice_idx, out, last


def document_ends(tok: Tokenizer, add_bos: bool | None, append_eos: bool | None) -> tuple[int | None, int | None]:
    """(BOS id or None, EOS id or None) each document gets: the tokenizer's convention unless overridden."""
    add_bos = tok.add_bos if add_bos is None else add_bos
    append_eos = tok.eos_id is not None if append_eos is None else append_eos
    for wanted, role, i in ((add_bos, "BOS", tok.bos_id), (append_eos, "EOS", tok.eos_id)):
        if wanted and i is None:
            raise DataError(
                f"tokenizer {tok.path} has no {role} token, so documents cannot get one: drop the "
                f"{role.lower()} override (or name the token in its tokenizer_config.json)"
            )
    return (tok.bos_id if add_bos else None), (tok.eos_id if append_eos else None)


def _plan(slices: list[Slice], tok: Tokenizer, dtype, ends: tuple, text_field: str, docs_per_shard: int) -> dict:
    body = {
        "format": FORMAT,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "append_eos": ends[1] is not None,
        "text_field": text_field,
        "docs_per_shard": docs_per_shard,
        "slices": [{**s.describe(), "bytes": s.size} for s in slices],
    }
    if ends[0] is not None:  # only when set, so plans of EOS-only preparations keep their hash
        body["bos_id"] = ends[0]
    body["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body


def _is_partial(d: Path) -> bool:
    """``d`` holds an unfinished preparation: its plan, or only the work dir (another node that has just
    created it and is writing its plan, when several nodes start at once)."""
    return (d / WORK_DIR / PLAN_FILE).is_file() or [p.name for p in d.iterdir()] == [WORK_DIR]


def _work_dir(out: Path, overwrite: bool, num_nodes: int, plan: dict) -> Path:
    """Where this run writes: ``out``, or a staging dir next to it when replacing finished data."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {out} exists and is not a directory: choose another path")
    if out.exists() and (out / MANIFEST).exists():
        if not overwrite:
            raise DataError(
                f"--output {out} already holds prepared data ({MANIFEST}): pass --overwrite or choose another directory"
            )
        work = out.parent / f".{out.name}.overwrite"
    else:
        work = out
    if work.exists() and any(work.iterdir()):
        if not _is_partial(work):
            raise DataError(f"--output {work} is not empty and holds no {MANIFEST}: choose an empty or new directory")
        plan_file = work / WORK_DIR / PLAN_FILE
        # no plan yet: another node is writing it (the same plan, or the check below refuses on the next run)
        theirs = (read_json(plan_file) or {}) if plan_file.exists() else {"hash": plan["hash"]}
        if theirs.get("hash") != plan["hash"]:
            if overwrite and num_nodes == 1:
                shutil.rmtree(work)
            else:
                raise DataError(
                    f"{work} holds an unfinished preparation of other inputs or settings (plan {theirs.get('hash')} there, "
                    f"{plan['hash']} here): re-run with the same inputs and settings to finish it, or remove the dir "
                    f"(or pass --overwrite on a single node)"
                )
    return work


def prepare_data(
    inputs: list[str],
    tokenizer_path: str,
    output_dir: str,
    workers: int = 1,
    text_field: str = "text",
    hf_dataset: str | None = None,
    hf_split: str = "train",
    hf_streaming: bool = False,
    hf_rows_per_slice: int = 0,
    append_eos: bool | None = None,
    docs_per_shard: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    node_rank: int | None = None,
    num_nodes: int | None = None,
    merge: bool = True,
    add_bos: bool | None = None,
) -> dict:
    """Tokenize this node's slices of the inputs into ``output_dir``; returns a manifest.

    ``inputs``: files or glob patterns (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet);
    ``hf_dataset``: a local HF dataset, saved with ``save_to_disk`` (``hf_split`` picks the
    split of a DatasetDict; ``hf_rows_per_slice`` > 0 cuts it into slices) or, with
    ``hf_streaming``, a dir of data files read by ``load_dataset(dir, streaming=True)``.
    ``node_rank``/``num_nodes`` default to :func:`meshforge.data_pipeline.node_rank.default_node_rank`
    (the one arrow from this room into ``launch/``). Slices finished by an earlier (crashed)
    run with the same plan are skipped. When every slice is done and
    ``merge`` is on, writes ``manifest.json`` and returns it; otherwise returns this node's
    partial manifest (``"format": "meshforge-node-partial-v1"``). ``workers`` > 1 tokenizes
    in a ``spawn`` process pool (call under ``if __name__ == "__main__":``); the output is
    byte-identical for any worker and node count. ``tokenizer_path``: a sentencepiece
    ``.model``, a ``tokenizer.json``, or a directory holding one; vocabularies of 65,500 and
    more are stored as int32. Each document starts with BOS when the tokenizer's convention
    says so (``add_bos`` overrides) and ends with EOS when the tokenizer has one
    (``append_eos`` overrides). Input and settings errors raise
    :class:`DataError` before anything is written.
    """
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if docs_per_shard < 0:
        raise DataError(f"--docs-per-shard must be >= 0 (0: one shard per input slice), got {docs_per_shard}")
    if node_rank is None or num_nodes is None:
        r, n = default_node_rank()
        node_rank = r if node_rank is None else node_rank
        num_nodes = n if num_nodes is None else num_nodes
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise DataError(f"node_rank {node_rank} is not a rank of num_nodes {num_nodes}")
    slices = [file_slice(p, text_field) for p in expand_inputs(inputs)]
    if hf_dataset:
        slices += hf_slices(hf_dataset, hf_split, text_field, hf_streaming, hf_rows_per_slice)
    if not slices:
        raise DataError("no inputs given: pass text/jsonl/parquet files (or globs) with --input, or --hf-dataset")
    out = Path(output_dir).resolve()
    try:
        tok = load_tokenizer(tokenizer_path)
    except TokenizerError as exc:
        raise DataError(str(exc)) from None
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))
    ends = document_ends(tok, add_bos, append_eos)
    plan = _plan(slices, tok, dtype, ends, text_field, docs_per_shard)
    work = _work_dir(out, overwrite, num_nodes, plan)
    existed = work.exists()
    fresh = num_nodes == 1 and not (existed and any(work.iterdir()))
    try:
        return _prepare_in(
            work,
            out,
            slices,
            tok,
            dtype,
            plan,
            ends,
            text_field,
            docs_per_shard,
            workers,
            progress,
            node_rank,
            num_nodes,
            merge,
        )
    except DataError:  # bad input met while reading: what this run started holds nothing worth keeping
        if fresh:
            for p in list(work.iterdir()) if existed else [work]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _prepare_in(
    work: Path,
    out: Path,
    slices,
    tok,
    dtype,
    plan,
    ends,
    text_field,
    docs_per_shard,
    workers,
    progress,
    node_rank,
    num_nodes,
    merge,
) -> dict:
    (work / WORK_DIR).mkdir(parents=True, exist_ok=True)
    if not (work / WORK_DIR / PLAN_FILE).exists():
        atomic_write_json(work / WORK_DIR / PLAN_FILE, plan)
    saved = tok.save(work)  # each file atomically; the data dir holds a self-contained copy

    mine = list(range(node_rank, len(slices), num_nodes))
    todo = [i for i in mine if slice_done(work, i, plan["hash"]) is None]
    _tokenize_slices(
        work,
        slices,
        todo,
        plan["hash"],
        str(saved),
        ends,
        dtype,
        text_field,
        docs_per_shard,
        workers,
        progress,
        out.name,
    )
    markers = [slice_done(work, i, plan["hash"]) for i in mine]
    partial = {
        "format": "meshforge-node-partial-v1",
        "plan": plan["hash"],
        "node_rank": node_rank,
        "num_nodes": num_nodes,
        "slices": mine,
        "num_documents": sum(m["documents"] for m in markers),
        "num_tokens": sum(m["tokens"] for m in markers),
        "skipped_records": sum_skips(m["skipped"] for m in markers),
    }
    atomic_write_json(work / WORK_DIR / f"node_{node_rank:05d}-of-{num_nodes:05d}.json", partial)
    if merge and all(marker_path(work, i).exists() for i in range(len(slices))):
        return merge_manifest(work, target=out)
    return partial


def _tokenize_slices(
    work, slices, todo, plan_hash, tok_path, ends, dtype, text_field, docs_per_shard, workers, progress, name
) -> None:
    if not todo:
        return
    skipped = {i: no_skips() for i in todo}

    def tasks() -> Iterator[tuple]:
        for i in todo:
            buf: list[str] = []
            for text in slice_documents(slices[i], text_field, skipped[i]):
                buf.append(text)
                if len(buf) == _CHUNK_DOCS:
                    yield (tok_path, *ends, dtype.str, i, buf, False)
                    buf = []
            yield (tok_path, *ends, dtype.str, i, buf, True)

    sinks: dict[int, SliceSink] = {}
    bar = tqdm(desc=f"tokenizing -> {name}", unit="doc", disable=not progress)

    def handle(result) -> None:
        i, arrays, last = result
        sink = sinks.get(i)
        if sink is None:
            sink = sinks[i] = SliceSink(work, i, dtype, docs_per_shard)
        for arr in arrays:
            sink.add(arr)
        bar.update(len(arrays))
        if last:
            shards = sink.finish()
            del sinks[i]
            atomic_write_json(
                marker_path(work, i),
                {
                    "plan": plan_hash,
                    "slice": i,
                    "source": slices[i].describe(),
                    "documents": sum(s["documents"] for s in shards),
                    "tokens": sum(s["tokens"] for s in shards),
                    "skipped": skipped[i],
                    "shards": shards,
                },
            )

    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    window = 4 * workers
    try:
        if pool is None:
            for task in tasks():
                handle(_encode_chunk(task))
        else:
            pending: deque = deque()
            for task in tasks():  # a bounded window: reading never runs far ahead of tokenizing
                pending.append(pool.apply_async(_encode_chunk, (task,)))
                while len(pending) >= window:
                    handle(pending.popleft().get())
            while pending:
                handle(pending.popleft().get())
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
