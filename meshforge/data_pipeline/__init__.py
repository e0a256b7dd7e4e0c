"""Data pipeline: raw text -> indexed shards + manifest -> samples -> distributed batches.

Preparation: :mod:`meshforge.text_inputs` reads the inputs (shared with tokenizer training),
:mod:`.prepare` plans slices and tokenizes them, :mod:`.shard_writer` writes a slice's shards,
:mod:`.layout` names the files of a prepared dir, :mod:`.manifest` merges the manifest and
opens a prepared dir for training (:func:`open_data_dir`).
"""

from meshforge.data_pipeline.blend import BlendedDataset, blend_order, parse_blend
from meshforge.data_pipeline.builtin import (
    BUILTIN_CORPORA,
    BUILTIN_PREFIX,
    ensure_builtin,
    resolve_cache_dir,
    resolve_data_path,
)
from meshforge.data_pipeline.dataset import TokenDataset
from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.indexed import IndexedShard, IndexedShardWriter, dtype_for_vocab
from meshforge.data_pipeline.loader import DistributedLoader
from meshforge.data_pipeline.manifest import DataInfo, load_manifest, merge_manifest, open_data_dir, open_shards
from meshforge.data_pipeline.prepare import prepare_data

__all__ = [
    "BUILTIN_CORPORA",
    "BUILTIN_PREFIX",
    "BlendedDataset",
    "DataError",
    "DataInfo",
    "DistributedLoader",
    "IndexedShard",
    "IndexedShardWriter",
    "TokenDataset",
    "blend_order",
    "dtype_for_vocab",
    "ensure_builtin",
    "load_manifest",
    "merge_manifest",
    "open_data_dir",
    "open_shards",
    "parse_blend",
    "prepare_data",
    "resolve_cache_dir",
    "resolve_data_path",
]
