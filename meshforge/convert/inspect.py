"""``meshforge convert inspect``: what a checkpoint or a Hugging Face directory holds, in a few lines."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from .hf_checks import read_config_json
from .safetensors_io import ConvertError, SafetensorsDir


def _count(shapes_dtypes) -> tuple[int, str]:
    n, dtypes = 0, Counter()
    for shape, dtype in shapes_dtypes:
        k = math.prod(shape)
        n += k
        dtypes[str(dtype).replace("torch.", "")] += k
    return n, ", ".join(f"{d} ({100 * c / max(n, 1):.0f}%)" for d, c in dtypes.most_common())


def inspect_hf(directory: Path) -> str:
    from .import_ import import_checks

    cfg = read_config_json(directory)
    files = SafetensorsDir(directory)
    entries = []
    shards = sorted(set(files.weight_map.values()))
    for fname in shards:
        entries += [(info["shape"], info["dtype"]) for info in files.header(fname).values()]
    n, dtypes = _count(entries)
    try:
        importable = f"yes, as {_architecture(import_checks(directory, cfg, files).model)}"
    except ConvertError as e:
        importable = f"no: {e}"
    lines = [
        f"Hugging Face model directory {directory}",
        f"  architecture: {(cfg.get('architectures') or ['?'])[0]} (model_type {cfg.get('model_type')})",
        f"  parameters:   {n:,} in {len(entries)} tensors, {len(shards)} shard(s)",
        f"  dtype:        {dtypes}",
        f"  importable:   {importable}",
    ]
    export = directory / "meshforge_export.json"
    if export.is_file():
        e = json.loads(export.read_text())
        lines.append(f"  exported from {e['checkpoint']} (step {e['step']}, written with {e['layout']})")
    return "\n".join(lines)


def _architecture(m) -> str:
    """The model section in words: sizes, then every option that is not the default."""
    from ..models import family_spec

    second_stack = family_spec(m.family).pipeline_blocks(m)[0] - m.n_layers  # an encoder-decoder's decoder layers
    options = [
        f"head_size {m.head_size}" if m.head_size else "",
        f"MoE {m.moe_experts} experts top-{m.moe_top_k}" if m.moe_experts else "",
        ("qk-norm" + (" over the projection" if m.qk_norm_scope == "projection" else "")) if m.qk_norm else "",
        "q/k/v bias" if m.qkv_bias else "",
        "post-norm blocks" if m.norm_placement == "post" else "",
        f"RoPE scaling {m.rope_scaling} x{m.rope_factor:g}" if m.rope_scaling != "none" else "",
        f"partial rotary {m.rope_fraction:g}" if m.rope_fraction != 1.0 else "",
        f"sliding window {m.sliding_window}" if m.sliding_window else "",
        "tied embeddings" if m.tie_embeddings else "",
    ]
    return (
        f"{m.family}: {m.n_layers} layers"
        + (f" + {second_stack} decoder layers" if second_stack else "")
        + f", dim {m.dim}, {m.n_heads} heads ({m.kv_heads} kv), ffn {m.hidden_dim}, vocab {m.vocab_size}"
        + "".join(f", {o}" for o in options if o)
    )


def inspect_checkpoint(path: Path) -> str:
    from .dcp_reader import CheckpointReader, resolve_checkpoint
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
    source = reader.meta.get("source")
    return "\n".join(
        [
            f"meshforge checkpoint {reader.path}",
            f"  architecture: {_architecture(m)}",
            f"  parameters:   {n:,}",
            f"  dtype:        {dtypes}",
            f"  step:         {reader.step}",
            f"  layout:       {reader.layout()}" + (f"; made by convert from {_source(source)}" if source else ""),
            f"  exports to:   {hf}",
        ]
    )


def _source(source) -> str:
    """What meta.json's ``source`` records, in words (an HF directory, or key = value pairs)."""
    if isinstance(source, dict):
        if set(source) == {"hf_dir"}:
            return str(source["hf_dir"])
        return ", ".join(f"{k} = {v}" for k, v in source.items())
    return str(source)


def inspect_path(path: str | Path) -> str:
    p = Path(path)
    if (p / "config.json").is_file() and not (p / "meta.json").is_file() and not (p / "checkpoints").is_dir():
        return inspect_hf(p)
    return inspect_checkpoint(p)
