"""The manifest of a prepared data dir: writing it (merge), and reading a data dir back for training.

:func:`merge_manifest` writes ``manifest.json`` once every slice of a (multi-node) preparation
is done (the file formats are in :mod:`.layout`). :func:`open_data_dir` is what training
calls: it opens a prepared dir (manifest) or bare Megatron ``*.idx/*.bin`` pairs, checks every
shard and the tokenizer, and returns a :class:`DataInfo`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.indexed import IndexedShard
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
from meshforge.file_hash import file_sha256
from meshforge.text_inputs import sum_skips
from meshforge.tokenizers import TOKENIZER_FILES, Tokenizer, TokenizerError, load_tokenizer


def merge_manifest(data_dir: str | Path, verify: bool = False, target: str | Path | None = None) -> dict:
    """Write ``manifest.json`` from the slice done-markers of a (multi-node) preparation.

    Every slice of the plan must be done; ``verify`` re-hashes every shard against its
    recorded sha256 (otherwise sizes are checked). ``target`` (default ``data_dir``) is
    where the finished data dir goes: a staging dir (overwrite) is swapped into place.
    """
    work = Path(data_dir).resolve()
    out = Path(target).resolve() if target is not None else work
    plan = read_json(work / WORK_DIR / PLAN_FILE)
    if plan is None:
        if (work / MANIFEST).is_file():
            return load_manifest(work)
        raise DataError(
            f"{work} holds no {WORK_DIR}/{PLAN_FILE}: it is not a meshforge preparation, run `meshforge data prepare`"
        )
    n = len(plan["slices"])
    markers = [slice_done(work, i, plan["hash"]) for i in range(n)]
    missing = [i for i, m in enumerate(markers) if m is None]
    if missing:
        nodes = sorted(
            read_json(p).get("num_nodes", 1) for p in (work / WORK_DIR).glob("node_*.json") if read_json(p)
        ) or [1]
        nn = nodes[-1]
        owners = sorted({i % nn for i in missing})
        raise DataError(
            f"{len(missing)} of {n} slices of {work} are not finished (e.g. {missing[:8]}; with {nn} nodes they belong "
            f"to node ranks {owners[:16]}): run those nodes again (finished slices are skipped), then merge"
        )
    shards = [s for m in markers for s in m["shards"]]
    for s in shards if verify else []:
        for ext in ("bin", "idx"):
            if file_sha256(work / f"{s['prefix']}.{ext}") != s[f"{ext}_sha256"]:
                raise DataError(
                    f"{work / s['prefix']}.{ext} does not match its recorded sha256: the file changed or is "
                    f"corrupt; delete {marker_path(work, s['slice']).name} in {WORK_DIR} and re-run its node"
                )
    num_docs = sum(m["documents"] for m in markers)
    skipped = sum_skips(m["skipped"] for m in markers)
    if num_docs == 0:
        shutil.rmtree(work / WORK_DIR, ignore_errors=True)
        for name in TOKENIZER_FILES:
            (work / name).unlink(missing_ok=True)
        if work.exists() and not any(work.iterdir()):
            work.rmdir()
        raise DataError(
            f"inputs {[s['path'] for s in plan['slices']]} hold no documents (skipped: {skipped}): "
            f"check the files and text_field={plan['text_field']!r}"
        )
    manifest = manifest_of(plan, markers, load_tokenizer(work), out)
    lock = work / WORK_DIR / "merge.lock"
    with open(lock, "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            atomic_write_json(work / MANIFEST, manifest)
            if work != out:
                _swap_into_place(work, out)
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)
    return manifest


def manifest_of(plan: dict, markers: list[dict], tok: Tokenizer, out: Path) -> dict:
    """The manifest of a finished preparation: its plan, every slice's done-marker (in slice order),
    its tokenizer, and the dir it lives in (``out``)."""
    return {
        "format": FORMAT,
        "tokenizer": {"path": str(out / tok.path.name), **tok.describe(), "files": sorted(tok.files())},
        "dtype": plan["dtype"],
        "append_eos": plan["append_eos"],
        "add_bos": "bos_id" in plan,
        "num_documents": sum(m["documents"] for m in markers),
        "num_tokens": sum(m["tokens"] for m in markers),
        "num_slices": len(plan["slices"]),
        "plan": plan["hash"],
        "shards": [s for m in markers for s in m["shards"]],
        "sources": [{**m["source"], "documents": m["documents"], "skipped": m["skipped"]} for m in markers],
        "skipped_records": sum_skips(m["skipped"] for m in markers),
    }


def _swap_into_place(staged: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)


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
    return parse_manifest(mp_.read_bytes(), str(mp_))


def parse_manifest(data: bytes, where: str, fix: str = "re-run data preparation") -> dict:
    """The manifest in ``data``, checked: JSON, a meshforge manifest, the keys training reads. ``where`` names
    the file in the error, ``fix`` says what to do."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where} is not valid JSON ({exc}): {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where} is not a {FORMAT} manifest: {fix}")
    for key in ("tokenizer", "dtype", "num_documents", "num_tokens", "shards"):
        if key not in manifest:
            raise DataError(f"{where} lacks the key {key!r}: {fix}")
    return manifest


def open_shards(
    data_dir: str | Path, manifest: dict, remote_bins: bool = False, name: Callable[[Path], str] = str
) -> list[IndexedShard]:
    """Open every shard of a manifest, checking dtype and document/token counts.

    ``remote_bins``: only the ``.idx`` files are in ``data_dir`` (the ``.bin`` sizes come from the manifest);
    ``name`` turns a shard's local prefix into how errors name it (a remote data dir: its URL)."""
    d = Path(data_dir)
    shards = []
    for entry in manifest["shards"]:
        shard = IndexedShard(d / entry["prefix"], bin_size=entry["bin_bytes"] if remote_bins else None)
        if shard.dtype.name != manifest["dtype"]:
            raise DataError(
                f"shard {name(shard.prefix)} has dtype {shard.dtype.name}, manifest says {manifest['dtype']}: "
                "re-run data preparation"
            )
        if shard.num_documents != entry["documents"] or shard.num_tokens != entry["tokens"]:
            raise DataError(
                f"shard {name(shard.prefix)} holds {shard.num_documents} documents / {shard.num_tokens} tokens, "
                f"manifest says {entry['documents']} / {entry['tokens']}: re-run data preparation"
            )
        shards.append(shard)
    return shards


def load_data_tokenizer(path: str | Path, what: str) -> Tokenizer:
    """``load_tokenizer(path)``, its error a :class:`DataError` that starts with ``what``."""
    try:
        return load_tokenizer(path)
    except TokenizerError as exc:
        raise DataError(f"{what}: {exc}") from None


def check_tokenizer(tok: Tokenizer, manifest: dict, where: str) -> None:
    """``tok`` must be the tokenizer the data of ``manifest`` (read from ``where``) was prepared with."""
    mtok = manifest["tokenizer"]
    if tok.fingerprint != mtok.get("fingerprint"):
        raise DataError(
            f"tokenizer {tok.path} (vocab {tok.vocab_size}, sha {tok.fingerprint[:12]}) does not match the data "
            f"manifest {where} (vocab {mtok.get('vocab_size')}, sha {str(mtok.get('fingerprint'))[:12]}): "
            f"use the tokenizer the data was prepared with"
        )


def open_data_dir(data_dir: str | Path, tokenizer_path: str = "") -> DataInfo:
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
        if tokenizer_path:
            tok = load_data_tokenizer(tokenizer_path, "data.tokenizer")
            check_tokenizer(tok, manifest, str(d / MANIFEST))
        else:
            local = any((d / name).is_file() for name in TOKENIZER_FILES)
            tok = load_data_tokenizer(d if local else manifest["tokenizer"].get("path", ""), f"tokenizer of {d}")
        return DataInfo(
            d,
            shards,
            manifest["num_documents"],
            manifest["num_tokens"],
            str(tok.path),
            tok.fingerprint,
            tok.vocab_size,
            manifest,
        )
    if not d.is_dir():
        raise DataError(f"data path {d} is not a directory: point data.path at a prepared data dir")
    prefixes = sorted(p.with_suffix("") for p in d.glob("*.idx"))
    if not prefixes:
        raise DataError(
            f"data path {d} holds neither {MANIFEST} nor .idx/.bin shards: prepare it with `meshforge data prepare`"
        )
    if not tokenizer_path:
        raise DataError(
            f"data path {d} holds Megatron shards but no {MANIFEST}: set data.tokenizer to the tokenizer (.model, "
            f"tokenizer.json or HF dir) the data was tokenized with"
        )
    tok = load_data_tokenizer(tokenizer_path, "data.tokenizer")
    shards = [IndexedShard(p) for p in prefixes]
    for s in shards:
        if s.dtype.kind not in "iu":
            raise DataError(f"shard {s.prefix} stores {s.dtype} values, not token ids: re-tokenize it")
    return DataInfo(
        d,
        shards,
        sum(s.num_documents for s in shards),
        sum(s.num_tokens for s in shards),
        str(tok.path),
        tok.fingerprint,
        tok.vocab_size,
        None,
    )
