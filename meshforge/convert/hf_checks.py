"""Checks of a Hugging Face model directory before anything is imported from it, each failure one line.

- ``config.json`` must be JSON naming a known architecture (:func:`read_config_json`);
- every safetensors file must be whole: its header parsed, every tensor's bytes inside the file
  (:func:`check_safetensors_files`: a truncated download or a file of garbage is named, not
  met later as a traceback from the reader);
- every tensor the config implies must have the shape the config gives it
  (:func:`check_shapes`: a wrong ``num_key_value_heads`` or a missing ``intermediate_size``,
  which transformers fills with its default, is named with the config keys that set that shape).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .safetensors_io import ConvertError

SIZE_KEYS = (
    ("q_norm", ("num_attention_heads", "head_dim")),
    ("k_norm", ("num_key_value_heads", "head_dim")),
    ("q_proj", ("num_attention_heads", "head_dim", "hidden_size")),
    ("k_proj", ("num_key_value_heads", "head_dim", "hidden_size")),
    ("v_proj", ("num_key_value_heads", "head_dim", "hidden_size")),
    ("o_proj", ("num_attention_heads", "head_dim", "hidden_size")),
    ("experts", ("moe_intermediate_size", "intermediate_size", "hidden_size")),
    ("mlp.gate.", ("num_experts", "n_routed_experts", "hidden_size")),
    ("block_sparse_moe.gate.", ("num_local_experts", "hidden_size")),
    ("mlp", ("intermediate_size", "hidden_size")),
    ("embed_tokens", ("vocab_size", "hidden_size")),
    ("lm_head", ("vocab_size", "hidden_size", "d_model")),
    ("shared", ("vocab_size", "d_model")),
    ("relative_attention_bias", ("relative_attention_num_buckets", "num_heads")),
    ("Attention", ("num_heads", "d_kv", "d_model")),
    ("DenseReluDense", ("d_ff", "d_model")),
    ("norm", ("hidden_size", "d_model")),
)
"""HF tensor name fragment -> the config keys its shape comes from (the first fragment found wins)."""


def read_config_json(directory: Path) -> dict:
    """The parsed ``config.json`` of an HF directory (ConvertError naming the file if absent or not JSON)."""
    cfg_file = Path(directory) / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{cfg_file} is not valid JSON ({e}); re-download or re-save the model") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{cfg_file} holds a JSON {type(raw).__name__}, not an object of config keys")
    return raw


def check_safetensors_files(files) -> dict[str, list[int]]:
    """Every tensor's shape (by name) of a :class:`SafetensorsDir`, each of its files checked whole."""
    shapes: dict[str, list[int]] = {}
    for fname in sorted(set(files.weight_map.values())):
        header = files.header(fname)
        listed = [k for k, f in files.weight_map.items() if f == fname and k not in header]
        if listed:
            raise ConvertError(
                f"{files.dir / fname} lacks {listed[0]}, which model.safetensors.index.json puts there; "
                "re-download the model"
            )
        shapes.update({k: v["shape"] for k, v in header.items()})
    return shapes


def _keys_of(hf_name: str, hf_config, raw: dict) -> str:
    keys = next((keys for frag, keys in SIZE_KEYS if frag in hf_name), ())
    said = []
    for k in keys:
        if not hasattr(hf_config, k):
            continue
        said.append(
            f"{k} = {getattr(hf_config, k)}"
            if k in raw
            else f"{k} (not in config.json; transformers' default {getattr(hf_config, k)} was used)"
        )
    return ", ".join(said) or "its sizes"


def check_shapes(directory: Path, hf_config, raw: dict, m, pairs, shapes: dict[str, list[int]]) -> None:
    """Each HF tensor of ``pairs`` ((HF name, our name, expert index or None)) has the shape our model of ``m``
    gives it; otherwise ConvertError naming the tensor and the config keys behind its shape."""
    from ..models import family_spec

    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in family_spec(m.family).build(m).state_dict().items()}
    for hf_name, name, e in pairs:
        want = ours[name][1:] if e is not None else ours[name]
        have = shapes.get(hf_name)
        if have is not None and have != want:
            raise ConvertError(
                f"{hf_name} in {directory} has shape {have}, but config.json makes it {want} "
                f"({_keys_of(hf_name, hf_config, raw)}); fix config.json to match the weights"
            )


__all__ = ["check_safetensors_files", "check_shapes", "read_config_json"]
