"""``meshforge convert inspect``: what a checkpoint or a Hugging Face directory holds, in a few lines."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from .hf_files import read_json
from .safetensors_io import ConvertError, SafetensorsDir


def _count(shapes_dtypes) -> tuple[int, str]:
    n, dtypes = 0, Counter()
    for shape, dtype in shapes_dtypes:
        k = math.prod(shape)
        n += k
        dtypes[str(dtype).replace("torch.", "")] += k
    return n, ", ".join(f"{d} ({100 * c / max(n, 1):.0f}%)" for d, c in dtypes.most_common())


def inspect_hf(directory: Path) -> str:
    from safetensors import safe_open

    cfg = read_json(directory / "config.json")
    files = SafetensorsDir(directory)
    entries = []
    for fname in sorted(set(files.weight_map.values())):
        with safe_open(directory / fname, "pt") as f:
            entries += [(f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]
    n, dtypes = _count(entries)
    lines = [f"Hugging Face model directory {directory}",
             f"  architecture: {(cfg.get('architectures') or ['?'])[0]} (model_type {cfg.get('model_type')})",
             f"  parameters:   {n:,} in {len(entries)} tensors, {len(set(files.weight_map.values()))} shard(s)",
             f"  dtype:        {dtypes}"]
    export = directory / "meshforge_export.json"
    if export.is_file():
        e = json.loads(export.read_text())
        lines.append(f"  exported from {e['checkpoint']} (step {e['step']}, written with {e['layout']})")
    return "\n".join(lines)


def inspect_checkpoint(path: Path) -> str:
    from .dcp_reader import CheckpointReader, resolve_checkpoint
    from ..models import family_spec
    from .families import converter

    reader = CheckpointReader(resolve_checkpoint(path))
    m = reader.config.model
    tied = {"output.weight"} if m.tie_embeddings else set()
    weights = [(reader.shape(k), reader.dtype(k)) for k in reader.entries if k not in tied]
    n, dtypes = _count(weights)
    try:
        hf = converter(m).exports_to(m)
    except ConvertError as e:
        hf = f"none ({e})"
    second_stack = family_spec(m.family).pipeline_blocks(m)[0] - m.n_layers  # an encoder-decoder's decoder layers
    arch = (f"{m.family}: {m.n_layers} layers" + (f" + {second_stack} decoder layers" if second_stack else "")
            + f", dim {m.dim}, {m.n_heads} heads ({m.kv_heads} kv), ffn {m.hidden_dim}, vocab {m.vocab_size}"
            + (f", MoE {m.moe_experts} experts top-{m.moe_top_k}" if m.moe_experts else "")
            + (", qk-norm" if m.qk_norm else "") + (", tied embeddings" if m.tie_embeddings else ""))
    source = reader.meta.get("source")
    return "\n".join([
        f"meshforge checkpoint {reader.path}",
        f"  architecture: {arch}",
        f"  parameters:   {n:,}",
        f"  dtype:        {dtypes}",
        f"  step:         {reader.step}",
        f"  layout:       {reader.layout()}" + (f"; made by convert from {source}" if source else ""),
        f"  exports to:   {hf}",
    ])


def inspect_path(path: str | Path) -> str:
    p = Path(path)
    if (p / "config.json").is_file() and not (p / "meta.json").is_file() and not (p / "checkpoints").is_dir():
        return inspect_hf(p)
    return inspect_checkpoint(p)
