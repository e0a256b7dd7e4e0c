"""Turn the data config into this rank's training and validation loaders.

Resolves ``builtin:`` corpora (prepared once into the cache, rank 0 first), checks the
shards and the tokenizer against each other and against the model, and slices the
global sample order for this data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from ..config import ConfigError, JobConfig
from ..data_pipeline.builtin import resolve_data_path
from ..data_pipeline.dataset import TokenDataset
from ..data_pipeline.errors import DataError
from ..data_pipeline.loader import DistributedLoader
from ..data_pipeline.prepare import describe_data
from ..launch.env import DistEnv
from ..parallel.mesh import Degrees
from ..tokenizers import Tokenizer, load_tokenizer

@dataclass
class TrainData:
    tokenizer: Tokenizer
    tokenizer_path: Path
    train_loader: DistributedLoader
    valid_loader_factory: Callable[[], DistributedLoader]
    """A fresh loader over the validation split from its start (the same samples every eval)."""


def dp_coordinates(rank: int, d: Degrees) -> tuple[int, int]:
    """(dp rank, dp size) of a global rank in the row-major mesh pp x dp_replicate x dp_shard x cp x tp."""
    return (rank // (d.cp * d.tp)) % d.dp, d.dp


def resolve_data_dir(cfg: JobConfig, env: DistEnv) -> Path:
    """The data dir, preparing a ``builtin:`` corpus on rank 0 first (the others then find it ready)."""
    d = cfg.data
    if env.is_main:
        data_dir = resolve_data_path(d.path, d.cache_dir, d.builtin_vocab_size, progress=cfg.train.progress)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not env.is_main:
        data_dir = resolve_data_path(d.path, d.cache_dir, d.builtin_vocab_size, progress=False)
    return Path(data_dir)


def prepare_train_data(cfg: JobConfig, env: DistEnv, degrees: Degrees) -> TrainData:
    data_dir = resolve_data_dir(cfg, env)
    info = describe_data(data_dir, cfg.data.tokenizer)
    tokenizer = load_tokenizer(info.tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {info.tokenizer_path} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    if info.vocab_size is not None and info.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data in {data_dir} was tokenized with a vocab of {info.vocab_size} but model.vocab_size is "
            f"{cfg.model.vocab_size}"
        )
    d = cfg.data
    dp_rank, dp_size = dp_coordinates(env.rank, degrees)
    train_ds = TokenDataset(info, d.seq_len, "train", d.valid_fraction, cfg.train.seed)
    train_loader = DistributedLoader(train_ds, cfg.train.global_batch_size, dp_rank, dp_size)
    valid_ds = TokenDataset(info, d.seq_len, "valid", d.valid_fraction, cfg.train.seed) if d.valid_fraction else None

    def valid_loader() -> DistributedLoader:
        if valid_ds is None:
            raise ConfigError("train.eval_interval > 0 needs data.valid_fraction > 0")
        return DistributedLoader(valid_ds, cfg.train.global_batch_size, dp_rank, dp_size, prefetch=0)

    if cfg.train.eval_interval and valid_ds is None:
        raise ConfigError("train.eval_interval > 0 needs data.valid_fraction > 0 (or set train.eval_interval = 0)")
    return TrainData(tokenizer, Path(info.tokenizer_path), train_loader, valid_loader)
