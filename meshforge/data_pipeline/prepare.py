"""Raw text -> tokenized indexed shards plus ``manifest.json``; reading prepared data back.

Inputs are expanded (globs, sorted) into **slices**, the unit of work, restart and node
splitting: one slice per input file (``.txt`` = one document, ``.jsonl``/``.jsonl.gz``/
``.jsonl.zst`` = one document per line, ``.parquet`` = one document per row), one per
``hf_rows_per_slice`` rows of a local HF dataset (``save_to_disk``), one per data file of a
streamed local HF dataset (``load_dataset(dir, streaming=True)``). Node ``r`` of ``n``
tokenizes slices ``r, r+n, r+2n, ...``; each slice becomes ``shard_<slice>`` (or
``shard_<slice>_<part>`` every ``docs_per_shard`` documents). A prepared data dir holds::

    shard_00000.bin/.idx ...   Megatron indexed format (no shard for a slice without documents)
    tokenizer.model            the tokenizer the data was tokenized with
    .prepare/plan.json         the slices and settings (same on every node and restart)
    .prepare/slice_00000.json  done-marker of one slice: its shards with sizes and sha256
    .prepare/node_00000-of-00002.json   per-node partial manifest
    manifest.json              written last, by the merge step: the data dir is complete

``manifest.json``::

    {"format": "meshforge-indexed-v1",
     "tokenizer": {"path": ..., "fingerprint": ..., "vocab_size": ...},
     "dtype": "uint16", "append_eos": true, "num_documents": N, "num_tokens": N,
     "num_slices": S, "plan": "<hash>",
     "shards": [{"prefix": "shard_00000", "slice": 0, "documents": n, "tokens": n,
                 "bin_bytes": n, "idx_bytes": n, "bin_sha256": ..., "idx_sha256": ...,
                 "max_token_id": n}],
     "sources": [{"type": "file", "path": ..., "documents": n, "skipped": {...}}, ...],
     "skipped_records": {"empty": n, "invalid_utf8": n, "invalid_json": n,
                         "missing_field": n, "non_string_field": n}}

Restart: a slice with a done-marker whose shard files exist with the recorded sizes is
skipped; a slice without one (a crash mid-slice) has its files deleted and is redone. Shard
files are written as ``.tmp`` and renamed, the marker is written (tmp + rename) after its
shards, the manifest after all markers: whatever a crash leaves is either complete and
recorded, or ignored and redone. The node that finds every slice done writes the manifest
(``merge_manifest`` does the same by hand). Blank JSONL lines are not records; every other
record that yields no document is counted in ``skipped_records`` by kind.
"""

from __future__ import annotations

import fcntl
import functools
import glob as globlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass
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
WORK_DIR = ".prepare"
PLAN_FILE = "plan.json"
FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
SKIP_KINDS = ("empty", "invalid_utf8", "invalid_json", "missing_field", "non_string_field")
FAULT_ENV = "MESHFORGE_PREPARE_FAULT"
"""Test hook: ``slice=<i>,docs=<n>`` makes the process exit (as if killed) after adding
``n`` documents of slice ``i`` to its shard."""
_CHUNK_DOCS = 64


def _no_skips() -> dict:
    return {k: 0 for k in SKIP_KINDS}


# ---------------------------------------------------------------- inputs -> slices


@dataclass
class _Slice:
    """One unit of work: a file, a row range of a saved HF dataset, or a shard of a stream."""

    kind: str  # "file" | "hf_dataset" | "hf_streaming"
    path: Path
    split: str | None = None
    rows: tuple[int, int] | None = None
    stream_shard: tuple[int, int] | None = None  # (index, count)
    size: int = 0  # bytes of the input file (for the plan hash)

    def describe(self) -> dict:
        out: dict[str, Any] = {"type": self.kind, "path": str(self.path)}
        if self.split is not None:
            out["split"] = self.split
        if self.rows is not None:
            out["rows"] = list(self.rows)
        if self.stream_shard is not None:
            out["stream_shard"] = list(self.stream_shard)
        return out


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs``: paths or glob patterns (``*``, ``?``, ``[..]``, ``**``), each sorted."""
    out: list[Path] = []
    for p in inputs:
        if any(c in p for c in "*?["):
            hits = sorted(h for h in globlib.glob(p, recursive=True) if Path(h).is_file())
            if not hits:
                raise DataError(f"input pattern {p!r} matches no files: check the pattern")
            out.extend(Path(h).resolve() for h in hits)
        else:
            out.append(Path(p).resolve())
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def _file_slice(path: Path, text_field: str) -> _Slice:
    if not path.is_file():
        raise DataError(f"input {path} does not exist: check the path")
    if not path.name.endswith(FILE_SUFFIXES):
        raise DataError(f"input {path} is not {', '.join(FILE_SUFFIXES)}: convert it or pass a local HF dataset via hf_dataset")
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"input {path} is not a readable parquet file ({exc}): re-export it") from None
        if text_field not in names:
            raise DataError(f"parquet input {path} has no column {text_field!r} (columns: {names}): set text_field")
    return _Slice("file", path, size=path.stat().st_size)


def _open_hf(path: Path, split: str, text_field: str, streaming: bool):
    if not path.exists():
        raise DataError(f"HF dataset {path} does not exist: pass a local directory (save_to_disk output, or data files)")
    import datasets  # optional dependency, only needed here

    if streaming:
        try:
            ds = datasets.load_dataset(str(path), split=split, streaming=True)
        except Exception as exc:  # datasets raises many kinds
            raise DataError(f"{path} cannot be streamed as a local HF dataset ({exc}): pass a dir of jsonl/parquet/csv files") from None
        cols = ds.column_names
        if cols is not None and text_field not in cols:
            raise DataError(f"HF dataset {path} has no column {text_field!r} (columns: {cols}): set text_field")
        return ds, split
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError or its own errors
        raise DataError(f"{path} is not a saved HF dataset ({exc}): write it with save_to_disk, or stream it (hf_streaming)") from None
    chosen = None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"HF dataset {path} has no split {split!r} (splits: {sorted(ds)}): set hf_split")
        ds, chosen = ds[split], split
    if text_field not in ds.column_names:
        raise DataError(f"HF dataset {path} has no column {text_field!r} (columns: {ds.column_names}): set text_field")
    return ds, chosen


def _hf_slices(path_str: str, split: str, text_field: str, streaming: bool, rows_per_slice: int) -> list[_Slice]:
    path = Path(path_str).resolve()
    ds, chosen = _open_hf(path, split, text_field, streaming)
    if streaming:
        n = max(1, int(ds.n_shards))
        return [_Slice("hf_streaming", path, split=split, stream_shard=(i, n)) for i in range(n)]
    rows = len(ds)
    step = rows_per_slice if rows_per_slice > 0 else max(rows, 1)
    return [_Slice("hf_dataset", path, split=chosen, rows=(a, min(a + step, rows))) for a in range(0, max(rows, 1), step)]


# ---------------------------------------------------------------- slices -> documents


def _check_text(text: Any, skipped: dict) -> str | None:
    if text is None:
        skipped["missing_field"] += 1
        return None
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            return None
    if not isinstance(text, str):
        skipped["non_string_field"] += 1
        return None
    if not text.strip():
        skipped["empty"] += 1
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes
        skipped["invalid_utf8"] += 1
        return None
    return text


def _open_binary(path: Path):
    name = path.name
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return _ZstdLines(path)
    return open(path, "rb")


class _ZstdLines:
    """Lines of a (multi-frame) zstd file; a truncated last frame is an error, not a short read."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __iter__(self) -> Iterator[bytes]:
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        dobj, fed, rest = dctx.decompressobj(), False, b""
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                while block:
                    data = dobj.decompress(block)
                    fed, block = True, b""
                    if dobj.eof:  # a frame ended; the next one starts in unused_data
                        block = dobj.unused_data
                        dobj, fed = dctx.decompressobj(), False
                    lines = (rest + data).split(b"\n")
                    rest = lines.pop()
                    yield from lines
        if fed:
            raise OSError("the last zstd frame is incomplete")
        if rest:
            yield rest


def _jsonl_documents(path: Path, text_field: str, skipped: dict) -> Iterator[str]:
    try:
        with _open_binary(path) as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["invalid_utf8"] += 1
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    skipped["invalid_json"] += 1
                    continue
                if not isinstance(rec, dict) or text_field not in rec:
                    skipped["missing_field"] += 1
                    continue
                text = _check_text(rec[text_field], skipped)
                if text is not None:
                    yield text
    except (OSError, EOFError) as exc:
        raise DataError(f"input {path} cannot be read to its end ({exc}): the file is truncated or corrupt, re-fetch it") from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise DataError(f"input {path} is not valid zstd ({exc}): the file is truncated or corrupt, re-fetch it") from None
        raise


def _parquet_documents(path: Path, text_field: str, skipped: dict) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            text = _check_text(value, skipped)
            if text is not None:
                yield text


def _slice_documents(sl: _Slice, text_field: str, skipped: dict) -> Iterator[str]:
    """Texts of one slice; records that give no document are counted in ``skipped`` by kind."""
    if sl.kind == "file":
        name = sl.path.name
        if name.endswith(".txt"):
            try:
                text = sl.path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                return
            text = _check_text(text, skipped)
            if text is not None:
                yield text
        elif name.endswith(".parquet"):
            yield from _parquet_documents(sl.path, text_field, skipped)
        else:
            yield from _jsonl_documents(sl.path, text_field, skipped)
        return
    ds, _ = _open_hf(sl.path, sl.split or "train", text_field, sl.kind == "hf_streaming")
    if sl.kind == "hf_streaming":
        index, count = sl.stream_shard
        part = ds.shard(num_shards=count, index=index) if count > 1 else ds
        for rec in part:
            if text_field not in rec:
                skipped["missing_field"] += 1
                continue
            text = _check_text(rec[text_field], skipped)
            if text is not None:
                yield text
        return
    a, b = sl.rows
    for start in range(a, b, 1000):
        for value in ds[start:min(start + 1000, b)][text_field]:
            text = _check_text(value, skipped)
            if text is not None:
                yield text


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> Tokenizer:
    return load_tokenizer(path)


def _encode_chunk(task: tuple) -> tuple[int, list[np.ndarray], bool]:
    """Worker job: token arrays (EOS appended if asked) for one chunk of one slice."""
    tok_path, append_eos, dtype, slice_idx, texts, last = task
    tok = _cached_tokenizer(tok_path)
    out = []
    for ids in tok.encode_batch(texts) if texts else []:
        if append_eos:
            ids.append(tok.eos_id)
        out.append(np.asarray(ids, dtype=dtype))
    return slice_idx, out, last


# ---------------------------------------------------------------- writing one slice


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _slice_prefix(i: int, part: int | None) -> str:
    return f"shard_{i:05d}" if part is None else f"shard_{i:05d}_{part:04d}"


def _remove_slice_files(out: Path, i: int) -> None:
    for p in list(out.glob(f"shard_{i:05d}.*")) + list(out.glob(f"shard_{i:05d}_*")):
        p.unlink(missing_ok=True)


class _SliceSink:
    """Writes the documents of one slice: one shard, or a new one every ``docs_per_shard``."""

    def __init__(self, out: Path, index: int, dtype, docs_per_shard: int):
        self.out, self.index, self.dtype, self.docs_per_shard = out, index, dtype, docs_per_shard
        self.writer: IndexedShardWriter | None = None
        self.shards: list[dict] = []
        self.documents = 0
        _remove_slice_files(out, index)  # debris of a crash mid-slice is never reused

    def add(self, tokens: np.ndarray) -> None:
        full = self.docs_per_shard > 0 and self.writer is not None and self.writer.num_documents >= self.docs_per_shard
        if self.writer is None or full:
            self._close_writer()
            part = len(self.shards) if self.docs_per_shard > 0 else None
            prefix = _slice_prefix(self.index, part)
            self.writer = IndexedShardWriter(self.out / prefix, self.dtype)
            self.shards.append({"prefix": prefix, "slice": self.index})
        self.writer.add_document(tokens)
        self.documents += 1

    def _close_writer(self) -> None:
        if self.writer is None:
            return
        w, entry = self.writer, self.shards[-1]
        w.finalize()
        bp, ip = self.out / f"{entry['prefix']}.bin", self.out / f"{entry['prefix']}.idx"
        entry.update(documents=w.num_documents, tokens=w.num_tokens, bin_bytes=bp.stat().st_size,
                     idx_bytes=ip.stat().st_size, bin_sha256=_sha256(bp), idx_sha256=_sha256(ip),
                     max_token_id=w.max_token_id)
        self.writer = None

    def finish(self) -> list[dict]:
        self._close_writer()
        return self.shards

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _fault_point() -> tuple[int, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    kv = dict(item.split("=") for item in spec.split(","))
    return int(kv["slice"]), int(kv["docs"])


# ---------------------------------------------------------------- the plan and node ranks


def default_node_rank() -> tuple[int, int]:
    """(node rank, node count) from torchrun's ``RANK``/``WORLD_SIZE``, else MPI, else (0, 1)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")) or "mpi4py" in sys.modules:
        try:
            from mpi4py import MPI  # optional: only under an MPI launcher

            return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        except ImportError:
            for r, n in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
                if n in os.environ:
                    return int(os.environ.get(r, "0")), int(os.environ[n])
    return 0, 1


def _plan(slices: list[_Slice], tok: Tokenizer, dtype, append_eos: bool, text_field: str, docs_per_shard: int) -> dict:
    body = {
        "format": FORMAT,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "append_eos": append_eos,
        "text_field": text_field,
        "docs_per_shard": docs_per_shard,
        "slices": [{**s.describe(), "bytes": s.size} for s in slices],
    }
    body["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _marker_path(work: Path, i: int) -> Path:
    return work / WORK_DIR / f"slice_{i:05d}.json"


def _slice_done(work: Path, i: int, plan_hash: str) -> dict | None:
    """The done-marker of slice ``i`` if it belongs to this plan and its shard files are all there."""
    m = _read_json(_marker_path(work, i))
    if m is None or m.get("plan") != plan_hash:
        return None
    for s in m["shards"]:
        bp, ip = work / f"{s['prefix']}.bin", work / f"{s['prefix']}.idx"
        if not (bp.is_file() and ip.is_file() and bp.stat().st_size == s["bin_bytes"] and ip.stat().st_size == s["idx_bytes"]):
            return None
    return m


def _is_partial(d: Path) -> bool:
    return (d / WORK_DIR / PLAN_FILE).is_file()


def _work_dir(out: Path, overwrite: bool, num_nodes: int, plan: dict) -> Path:
    """Where this run writes: ``out``, or a staging dir next to it when replacing finished data."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output_dir {out} exists and is not a directory: choose another path")
    if out.exists() and (out / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"output_dir {out} already holds prepared data ({MANIFEST}): pass overwrite=True or choose another directory")
        work = out.parent / f".{out.name}.overwrite"
    else:
        work = out
    if work.exists() and any(work.iterdir()):
        if not _is_partial(work):
            raise DataError(f"output_dir {work} is not empty and holds no {MANIFEST}: choose an empty or new directory")
        theirs = _read_json(work / WORK_DIR / PLAN_FILE) or {}
        if theirs.get("hash") != plan["hash"]:
            if overwrite and num_nodes == 1:
                shutil.rmtree(work)
            else:
                raise DataError(
                    f"{work} holds an unfinished preparation of other inputs or settings (plan {theirs.get('hash')} there, "
                    f"{plan['hash']} here): re-run with the same inputs and settings to finish it, or remove the dir "
                    f"(or pass overwrite=True on a single node)"
                )
    return work


# ---------------------------------------------------------------- prepare


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
    append_eos: bool = True,
    docs_per_shard: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    node_rank: int | None = None,
    num_nodes: int | None = None,
    merge: bool = True,
) -> dict:
    """Tokenize this node's slices of the inputs into ``output_dir``; returns a manifest.

    ``inputs``: files or glob patterns (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet);
    ``hf_dataset``: a local HF dataset, saved with ``save_to_disk`` (``hf_split`` picks the
    split of a DatasetDict; ``hf_rows_per_slice`` > 0 cuts it into slices) or, with
    ``hf_streaming``, a dir of data files read by ``load_dataset(dir, streaming=True)``.
    ``node_rank``/``num_nodes`` default to :func:`default_node_rank`. Slices finished by an
    earlier (crashed) run with the same plan are skipped. When every slice is done and
    ``merge`` is on, writes ``manifest.json`` and returns it; otherwise returns this node's
    partial manifest (``"format": "meshforge-node-partial-v1"``). ``workers`` > 1 tokenizes
    in a ``spawn`` process pool (call under ``if __name__ == "__main__":``); the output is
    byte-identical for any worker and node count. Input and settings errors raise
    :class:`DataError` before anything is written.
    """
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if node_rank is None or num_nodes is None:
        r, n = default_node_rank()
        node_rank = r if node_rank is None else node_rank
        num_nodes = n if num_nodes is None else num_nodes
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise DataError(f"node_rank {node_rank} is not a rank of num_nodes {num_nodes}")
    slices = [_file_slice(p, text_field) for p in expand_inputs(inputs)]
    if hf_dataset:
        slices += _hf_slices(hf_dataset, hf_split, text_field, hf_streaming, hf_rows_per_slice)
    if not slices:
        raise DataError("no inputs given: pass text/jsonl/parquet files (or globs) or hf_dataset")
    out = Path(output_dir).resolve()
    try:
        tok = load_tokenizer(tokenizer_path)
    except TokenizerError as exc:
        raise DataError(str(exc)) from None
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))
    plan = _plan(slices, tok, dtype, append_eos, text_field, docs_per_shard)
    work = _work_dir(out, overwrite, num_nodes, plan)

    (work / WORK_DIR).mkdir(parents=True, exist_ok=True)
    if not (work / WORK_DIR / PLAN_FILE).exists():
        _atomic_write_json(work / WORK_DIR / PLAN_FILE, plan)
    if not (work / TOKENIZER_FILE).exists() or _sha256(work / TOKENIZER_FILE) != tok.fingerprint:
        tmp = work / f".{TOKENIZER_FILE}.{os.getpid()}.tmp"
        shutil.copyfile(tok.path, tmp)
        os.replace(tmp, work / TOKENIZER_FILE)

    mine = list(range(node_rank, len(slices), num_nodes))
    todo = [i for i in mine if _slice_done(work, i, plan["hash"]) is None]
    _tokenize_slices(work, slices, todo, plan["hash"], str(tok.path), append_eos, dtype, text_field, docs_per_shard,
                     workers, progress, out.name)
    markers = [_slice_done(work, i, plan["hash"]) for i in mine]
    partial = {
        "format": "meshforge-node-partial-v1",
        "plan": plan["hash"],
        "node_rank": node_rank,
        "num_nodes": num_nodes,
        "slices": mine,
        "num_documents": sum(m["documents"] for m in markers),
        "num_tokens": sum(m["tokens"] for m in markers),
        "skipped_records": _sum_skips(m["skipped"] for m in markers),
    }
    _atomic_write_json(work / WORK_DIR / f"node_{node_rank:05d}-of-{num_nodes:05d}.json", partial)
    if merge and all(_marker_path(work, i).exists() for i in range(len(slices))):
        return merge_manifest(work, target=out)
    return partial


def _sum_skips(items) -> dict:
    total = _no_skips()
    for s in items:
        for k, v in s.items():
            total[k] = total.get(k, 0) + v
    return total


def _tokenize_slices(work, slices, todo, plan_hash, tok_path, append_eos, dtype, text_field, docs_per_shard,
                     workers, progress, name) -> None:
    if not todo:
        return
    fault = _fault_point()
    skipped = {i: _no_skips() for i in todo}

    def tasks() -> Iterator[tuple]:
        for i in todo:
            buf: list[str] = []
            for text in _slice_documents(slices[i], text_field, skipped[i]):
                buf.append(text)
                if len(buf) == _CHUNK_DOCS:
                    yield (tok_path, append_eos, dtype.str, i, buf, False)
                    buf = []
            yield (tok_path, append_eos, dtype.str, i, buf, True)

    sinks: dict[int, _SliceSink] = {}
    bar = tqdm(desc=f"tokenizing -> {name}", unit="doc", disable=not progress)

    def handle(result) -> None:
        i, arrays, last = result
        sink = sinks.get(i)
        if sink is None:
            sink = sinks[i] = _SliceSink(work, i, dtype, docs_per_shard)
        for arr in arrays:
            sink.add(arr)
            if fault is not None and fault == (i, sink.documents):
                os._exit(86)  # test hook: die like a killed process, mid-shard
        bar.update(len(arrays))
        if last:
            shards = sink.finish()
            del sinks[i]
            _atomic_write_json(_marker_path(work, i), {
                "plan": plan_hash,
                "slice": i,
                "source": slices[i].describe(),
                "documents": sum(s["documents"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "skipped": skipped[i],
                "shards": shards,
            })

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


# ---------------------------------------------------------------- merge


def merge_manifest(data_dir: str | Path, verify: bool = False, target: str | Path | None = None) -> dict:
    """Write ``manifest.json`` from the slice done-markers of a (multi-node) preparation.

    Every slice of the plan must be done; ``verify`` re-hashes every shard against its
    recorded sha256 (otherwise sizes are checked). ``target`` (default ``data_dir``) is
    where the finished data dir goes: a staging dir (overwrite) is swapped into place.
    """
    work = Path(data_dir).resolve()
    out = Path(target).resolve() if target is not None else work
    plan = _read_json(work / WORK_DIR / PLAN_FILE)
    if plan is None:
        if (work / MANIFEST).is_file():
            return load_manifest(work)
        raise DataError(f"{work} holds no {WORK_DIR}/{PLAN_FILE}: it is not a meshforge preparation, run `meshforge data prepare`")
    n = len(plan["slices"])
    markers = [_slice_done(work, i, plan["hash"]) for i in range(n)]
    missing = [i for i, m in enumerate(markers) if m is None]
    if missing:
        nodes = sorted(_read_json(p).get("num_nodes", 1) for p in (work / WORK_DIR).glob("node_*.json") if _read_json(p)) or [1]
        nn = nodes[-1]
        owners = sorted({i % nn for i in missing})
        raise DataError(
            f"{len(missing)} of {n} slices of {work} are not finished (e.g. {missing[:8]}; with {nn} nodes they belong "
            f"to node ranks {owners[:16]}): run those nodes again (finished slices are skipped), then merge"
        )
    shards = [s for m in markers for s in m["shards"]]
    for s in shards if verify else []:
        for ext in ("bin", "idx"):
            if _sha256(work / f"{s['prefix']}.{ext}") != s[f"{ext}_sha256"]:
                raise DataError(f"{work / s['prefix']}.{ext} does not match its recorded sha256: the file changed or is "
                                f"corrupt; delete {_marker_path(work, s['slice']).name} in {WORK_DIR} and re-run its node")
    num_docs = sum(m["documents"] for m in markers)
    skipped = _sum_skips(m["skipped"] for m in markers)
    if num_docs == 0:
        shutil.rmtree(work / WORK_DIR, ignore_errors=True)
        (work / TOKENIZER_FILE).unlink(missing_ok=True)
        if work.exists() and not any(work.iterdir()):
            work.rmdir()
        raise DataError(
            f"inputs {[s['path'] for s in plan['slices']]} hold no documents (skipped: {skipped}): "
            f"check the files and text_field={plan['text_field']!r}"
        )
    tok = load_tokenizer(work / TOKENIZER_FILE)
    manifest = {
        "format": FORMAT,
        "tokenizer": {"path": str(out / TOKENIZER_FILE), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
        "dtype": plan["dtype"],
        "append_eos": plan["append_eos"],
        "num_documents": num_docs,
        "num_tokens": sum(m["tokens"] for m in markers),
        "num_slices": n,
        "plan": plan["hash"],
        "shards": shards,
        "sources": [{**m["source"], "documents": m["documents"], "skipped": m["skipped"]} for m in markers],
        "skipped_records": skipped,
    }
    lock = work / WORK_DIR / "merge.lock"
    with open(lock, "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            _atomic_write_json(work / MANIFEST, manifest)
            if work != out:
                _swap_into_place(work, out)
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)
    return manifest


def _swap_into_place(staged: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)


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
