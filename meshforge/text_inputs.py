"""Input readers: raw text files and local HF datasets -> documents, bad records counted.

Shared by tokenizer training (:mod:`meshforge.tokenizers`) and data preparation
(:mod:`meshforge.data_pipeline.prepare`), so both read the same formats and count or refuse
the same bad records. It imports nothing of ours but :mod:`meshforge.errors` (it sits outside
both rooms so that the tokenizer room keeps its rule: it imports no data pipeline code).

Inputs are expanded (globs, sorted) into **slices**, the unit of work, restart and node
splitting: one slice per input file (``.txt`` = one document, ``.jsonl``/``.jsonl.gz``/
``.jsonl.zst`` = one document per line, ``.parquet`` = one document per row), one per
``hf_rows_per_slice`` rows of a local HF dataset (``save_to_disk``), one per data file of a
streamed local HF dataset (``load_dataset(dir, streaming=True)``). Blank JSONL lines are not
records; every other record that yields no document is counted in a ``skipped`` dict by kind
(:data:`SKIP_KINDS`).
"""

from __future__ import annotations

import glob as globlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from meshforge.errors import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
SKIP_KINDS = ("empty", "invalid_utf8", "invalid_json", "missing_field", "non_string_field")


def no_skips() -> dict:
    """A zero count of every kind of skipped record."""
    return {k: 0 for k in SKIP_KINDS}


def sum_skips(items) -> dict:
    """The sum of several skipped-record counts."""
    total = no_skips()
    for s in items:
        for k, v in s.items():
            total[k] = total.get(k, 0) + v
    return total


@dataclass
class Slice:
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


def file_slice(path: Path, text_field: str) -> Slice:
    if path.is_dir():
        raise DataError(f"input {path} is a directory: pass the files in it (e.g. '{path}/*.jsonl')")
    if not path.is_file():
        raise DataError(f"input {path} does not exist: check the path")
    if not path.name.endswith(FILE_SUFFIXES):
        raise DataError(
            f"input {path} is not {', '.join(FILE_SUFFIXES)}: convert it, or pass a local Hugging Face "
            "dataset with `meshforge data prepare --hf-dataset`"
        )
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"input {path} is not a readable parquet file ({exc}): re-export it") from None
        if text_field not in names:
            raise DataError(f"parquet input {path} has no column {text_field!r} (columns: {names}): set text_field")
    return Slice("file", path, size=path.stat().st_size)


def open_hf(path: Path, split: str, text_field: str, streaming: bool):
    if not path.exists():
        raise DataError(
            f"HF dataset {path} does not exist: pass a local directory (save_to_disk output, or data files)"
        )
    import datasets  # optional dependency, only needed here

    if streaming:
        try:
            ds = datasets.load_dataset(str(path), split=split, streaming=True)
        except Exception as exc:  # datasets raises many kinds
            raise DataError(
                f"{path} cannot be streamed as a local HF dataset ({exc}): pass a dir of jsonl/parquet/csv files"
            ) from None
        cols = ds.column_names
        if cols is not None and text_field not in cols:
            raise DataError(f"HF dataset {path} has no column {text_field!r} (columns: {cols}): set text_field")
        return ds, split
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError or its own errors
        raise DataError(
            f"{path} is not a saved HF dataset ({exc}): write it with save_to_disk, or stream it (hf_streaming)"
        ) from None
    chosen = None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"HF dataset {path} has no split {split!r} (splits: {sorted(ds)}): set hf_split")
        ds, chosen = ds[split], split
    if text_field not in ds.column_names:
        raise DataError(f"HF dataset {path} has no column {text_field!r} (columns: {ds.column_names}): set text_field")
    return ds, chosen


def hf_slices(path_str: str, split: str, text_field: str, streaming: bool, rows_per_slice: int) -> list[Slice]:
    path = Path(path_str).resolve()
    ds, chosen = open_hf(path, split, text_field, streaming)
    if streaming:
        n = max(1, int(ds.n_shards))
        return [Slice("hf_streaming", path, split=split, stream_shard=(i, n)) for i in range(n)]
    rows = len(ds)
    step = rows_per_slice if rows_per_slice > 0 else max(rows, 1)
    return [
        Slice("hf_dataset", path, split=chosen, rows=(a, min(a + step, rows))) for a in range(0, max(rows, 1), step)
    ]


def check_text(text: Any, skipped: dict) -> str | None:
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
                text = check_text(rec[text_field], skipped)
                if text is not None:
                    yield text
    except (OSError, EOFError) as exc:
        raise DataError(
            f"input {path} cannot be read to its end ({exc}): the file is truncated or corrupt, re-fetch it"
        ) from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise DataError(
                f"input {path} is not valid zstd ({exc}): the file is truncated or corrupt, re-fetch it"
            ) from None
        raise


def _parquet_documents(path: Path, text_field: str, skipped: dict) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            text = check_text(value, skipped)
            if text is not None:
                yield text


def file_documents(path: Path, text_field: str, skipped: dict) -> Iterator[str]:
    """Texts of one input file (.txt: the whole file; .jsonl(.gz/.zst): ``text_field`` of each
    line; .parquet: the ``text_field`` column); records that give no document are counted in
    ``skipped`` by kind (:data:`SKIP_KINDS`), a truncated or corrupt file is a :class:`DataError`."""
    name = path.name
    if name.endswith(".txt"):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            return
        text = check_text(text, skipped)
        if text is not None:
            yield text
    elif name.endswith(".parquet"):
        yield from _parquet_documents(path, text_field, skipped)
    else:
        yield from _jsonl_documents(path, text_field, skipped)


def slice_documents(sl: Slice, text_field: str, skipped: dict) -> Iterator[str]:
    """Texts of one slice; records that give no document are counted in ``skipped`` by kind."""
    if sl.kind == "file":
        yield from file_documents(sl.path, text_field, skipped)
        return
    ds, _ = open_hf(sl.path, sl.split or "train", text_field, sl.kind == "hf_streaming")
    if sl.kind == "hf_streaming":
        index, count = sl.stream_shard
        part = ds.shard(num_shards=count, index=index) if count > 1 else ds
        for rec in part:
            if text_field not in rec:
                skipped["missing_field"] += 1
                continue
            text = check_text(rec[text_field], skipped)
            if text is not None:
                yield text
        return
    a, b = sl.rows
    for start in range(a, b, 1000):
        for value in ds[start : min(start + 1000, b)][text_field]:
            text = check_text(value, skipped)
            if text is not None:
                yield text
