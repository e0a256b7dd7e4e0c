"""Turn the data config into this rank's training and validation loaders.

Resolves ``builtin:`` corpora (prepared once into the cache, rank 0 first), checks the
shards and the tokenizer against each other and against the model, and slices the
global sample order for this data-parallel rank. With ``data.blend`` every listed data dir
must share one tokenizer; the blended order is cached under ``<cache_dir>/blend`` (built by
whichever rank gets the file lock first) and the train loader's state carries the blend
history, so a changed blend applies from the resume point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from ..config import ConfigError, JobConfig, padded_vocab_size
from ..data_pipeline.blend import BlendedDataset, parse_blend
from ..data_pipeline.builtin import BUILTIN_PREFIX, resolve_cache_dir, resolve_data_path
from ..data_pipeline.dataset import TokenDataset
from ..data_pipeline.errors import DataError
from ..data_pipeline.layout import MANIFEST
from ..data_pipeline.loader import DistributedLoader
from ..data_pipeline.manifest import DataInfo, load_manifest, open_data_dir, parse_manifest
from ..data_pipeline.remote import RemoteStats, RemoteStore, is_url
from ..data_pipeline.remote_cache import RemoteDataInfo, open_remote_data_dir
from ..data_pipeline.remote_dataset import RemoteTokenDataset
from ..launch.env import DistEnv
from ..parallel.fault_tolerance import data_coordinates
from ..parallel.mesh import Degrees
from ..tokenizers import Tokenizer, load_tokenizer
from .objectives import LMObjective, SpanCorruptionObjective, Ul2Objective, build_objective


@dataclass
class TrainData:
    tokenizer: Tokenizer
    tokenizer_path: Path
    train_loader: DistributedLoader
    valid_loader_factory: Callable[[], DistributedLoader]
    """A fresh loader over the validation split from its start (the same samples every eval)."""
    objective: LMObjective | SpanCorruptionObjective | Ul2Objective
    """What a sample is and how a batch becomes model inputs and targets."""
    remote_stats: RemoteStats | None = None
    """Requests, bytes and retries of remote data (``None`` for local data): logged with every step."""


def dp_coordinates(rank: int, d: Degrees) -> tuple[int, int]:
    """(dp rank, dp size) of a global rank in the row-major mesh pp x dp_replicate x dp_shard x cp x tp."""
    return (rank // (d.cp * d.tp)) % d.dp, d.dp


def resolve_data_dir(cfg: JobConfig, env: DistEnv, path: str | None = None) -> Path:
    """The data dir, preparing a ``builtin:`` corpus on rank 0 first (the others then find it ready)."""
    d = cfg.data
    path = d.path if path is None else path
    if env.is_main:
        data_dir = resolve_data_path(path, d.cache_dir, d.builtin_vocab_size, progress=cfg.train.progress)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not env.is_main:
        data_dir = resolve_data_path(path, d.cache_dir, d.builtin_vocab_size, progress=False)
    return Path(data_dir)


def open_data(cfg: JobConfig, env: DistEnv, path: str | None = None, stats: RemoteStats | None = None) -> DataInfo:
    """A data dir's :class:`DataInfo`: local (memory-mapped), ``builtin:``, or a URL (node cache + ranges)."""
    d = cfg.data
    path = d.path if path is None else path
    if is_url(path):
        return open_remote_data_dir(
            path, d.tokenizer, resolve_cache_dir(d.cache_dir), d.remote_mode, d.remote_retry_seconds, stats
        )
    return open_data_dir(resolve_data_dir(cfg, env, path), d.tokenizer)


def _blend_sources(
    cfg: JobConfig, env: DistEnv, stats: RemoteStats | None = None
) -> tuple[list, list[tuple[float, str]]]:
    """(DataInfo per blend item, parsed blend); every item must use the same tokenizer."""
    items = parse_blend(cfg.data.blend)
    infos = [open_data(cfg, env, path, stats) for _, path in items]
    prints = {i.tokenizer_fingerprint for i in infos}
    if len(prints) > 1:
        raise DataError(
            "data.blend mixes data tokenized with different tokenizers: "
            + ", ".join(f"{p} ({str(i.tokenizer_fingerprint)[:12]})" for (_, p), i in zip(items, infos))
            + "; re-prepare them with one tokenizer"
        )
    return infos, items


def _dataset(cfg: JobConfig, infos, items, split: str, objective, prepare: int = 0):
    """The raw windows of one split (one data dir or a blend), turned into samples by the objective."""
    d = cfg.data

    def tokens(info) -> TokenDataset:
        cls = RemoteTokenDataset if isinstance(info, RemoteDataInfo) else TokenDataset
        return cls(info, objective.window, split, d.valid_fraction, cfg.train.seed, return_segments=d.document_mask)

    if not items:
        return objective.wrap(tokens(infos[0]))
    sources = {path: tokens(info) for info, (_, path) in zip(infos, items)}
    cache = resolve_cache_dir(d.cache_dir) / "blend"
    blend = BlendedDataset(sources, {path: w for w, path in items}, cache_dir=cache)
    if prepare:
        blend.prepare(prepare)  # build/load the cached order now
    return objective.wrap(blend)


def tokenizer_vocab_size(cfg: JobConfig) -> int:
    """The training tokenizer's size, read without preparing anything (for ``model.vocab_size = 0``):
    data.tokenizer if set, else the (first) data dir's manifest; a ``builtin:`` corpus's is data.builtin_vocab_size."""
    d = cfg.data
    if d.tokenizer:
        return load_tokenizer(d.tokenizer).vocab_size
    path = parse_blend(d.blend)[0][1] if d.blend else d.path
    if path.startswith(BUILTIN_PREFIX):
        return d.builtin_vocab_size
    if is_url(path):  # read, not cached: the node cache is filled later, by every node's first rank
        store = RemoteStore(path, d.remote_retry_seconds)
        manifest = parse_manifest(store.cat(MANIFEST), store.url_of(MANIFEST), "re-prepare or re-upload the data")
    else:
        manifest = load_manifest(path)
    size = manifest["tokenizer"].get("vocab_size")
    if not isinstance(size, int):
        raise DataError(f"the manifest of {path} records no tokenizer vocab_size: set model.vocab_size explicitly")
    return size


def resolve_vocab_size(cfg: JobConfig) -> None:
    """``model.vocab_size = 0``: set it to the tokenizer's size rounded up to model.vocab_multiple_of (in place)."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = padded_vocab_size(tokenizer_vocab_size(cfg), cfg.model.vocab_multiple_of)


def check_vocab_fits(model_vocab: int, tokens: int, source: str) -> None:
    """Refuse a model vocabulary smaller than the tokenizer's (``source`` says whose, before the count)."""
    if tokens > model_vocab:
        raise ConfigError(
            f"{source} {tokens} tokens but model.vocab_size is {model_vocab}; raise model.vocab_size "
            f"to at least {tokens}"
        )


def check_token_ids(info: DataInfo, vocab_size: int) -> None:
    """Refuse data holding a token id the model has no embedding for (it would crash mid-run).

    The largest id of each shard comes from the manifest (``data prepare`` records it); shards
    without it (bare Megatron dirs, older manifests) are scanned once, here, before any output.
    """
    recorded = {s.get("prefix"): s.get("max_token_id") for s in (info.manifest or {}).get("shards", [])}
    for shard in info.shards:
        top = recorded.get(shard.prefix.name)
        if not isinstance(top, int):
            top = shard.max_token_id()
        if top >= vocab_size:
            raise DataError(
                f"shard {shard.prefix} holds token id {top}, beyond the model's vocabulary (model.vocab_size = "
                f"{vocab_size}, ids 0..{vocab_size - 1}): the data was tokenized with a larger tokenizer than "
                f"{info.tokenizer_path} ({info.vocab_size} tokens); re-prepare it with that tokenizer, or point "
                "data.tokenizer at the one it was tokenized with"
            )


def locate_token_beyond(infos: list[DataInfo], vocab_size: int) -> str:
    """Where the first token id >= ``vocab_size`` is: shard and document (the loader's error, met mid-run)."""
    for info in infos:
        if isinstance(info, RemoteDataInfo) and info.store is not None:  # range reads: no whole shard to scan
            continue
        for shard in info.shards:
            tokens = np.asarray(shard.tokens)
            bad = np.flatnonzero(tokens >= vocab_size)
            if bad.size:
                starts, _ = shard.document_token_ranges()
                doc = int(np.searchsorted(starts, bad[0], side="right")) - 1
                return f"shard {shard.prefix} (document {doc} of it, token {int(bad[0] - starts[doc])})"
    return f"a shard of {', '.join(getattr(i, 'url', '') or str(i.data_dir) for i in infos)}"


def prepare_train_data(cfg: JobConfig, env: DistEnv, degrees: Degrees) -> TrainData:
    paths = [p for _, p in parse_blend(cfg.data.blend)] if cfg.data.blend else [cfg.data.path]
    stats = RemoteStats() if any(is_url(p) for p in paths) else None
    if cfg.data.blend:
        infos, items = _blend_sources(cfg, env, stats)
    else:
        infos, items = [open_data(cfg, env, stats=stats)], []
    info = infos[0]
    data_dir = info.data_dir
    tokenizer = load_tokenizer(info.tokenizer_path)
    check_vocab_fits(cfg.model.vocab_size, tokenizer.vocab_size, f"tokenizer {info.tokenizer_path} has")
    if info.vocab_size is not None:
        check_vocab_fits(cfg.model.vocab_size, info.vocab_size, f"data in {data_dir} was tokenized with a vocab of")
    for i in infos:
        check_token_ids(i, cfg.model.vocab_size)
    d = cfg.data
    dp_rank, dp_size = data_coordinates(cfg.parallel, *dp_coordinates(env.rank, degrees))  # replica groups: theirs
    objective = build_objective(cfg, tokenizer)
    train_ds = _dataset(cfg, infos, items, "train", objective, cfg.train.steps * cfg.train.global_batch_size)
    vocab = dict(vocab_size=cfg.model.vocab_size, locate=lambda v: locate_token_beyond(infos, v))  # checked per batch
    # remote ranges: several batches ahead, read at once (the requests' latency overlaps)
    ahead = RemoteTokenDataset.read_ahead if isinstance(train_ds, RemoteTokenDataset) else 0
    depth = dict(prefetch=ahead, workers=ahead) if ahead else {}
    train_loader = DistributedLoader(train_ds, cfg.train.global_batch_size, dp_rank, dp_size, **depth, **vocab)
    valid_ds = _dataset(cfg, infos, items, "valid", objective) if d.valid_fraction else None

    def valid_loader() -> DistributedLoader:
        if valid_ds is None:
            raise ConfigError("train.eval_interval > 0 needs data.valid_fraction > 0")
        return DistributedLoader(valid_ds, cfg.train.global_batch_size, dp_rank, dp_size, prefetch=0, **vocab)

    if cfg.train.eval_interval and valid_ds is None:
        raise ConfigError("train.eval_interval > 0 needs data.valid_fraction > 0 (or set train.eval_interval = 0)")
    return TrainData(tokenizer, Path(info.tokenizer_path), train_loader, valid_loader, objective, stats)
