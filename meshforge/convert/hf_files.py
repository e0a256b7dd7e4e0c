"""The files of a Hugging Face model directory, checked before they are used: JSON that parses,
safetensors files that are whole, tensors whose shapes agree with config.json.

Each failure is one :class:`ConvertError` line naming the file and what to do, instead of a
parser's traceback (or, for shapes, an init directory that cannot train).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .safetensors_io import ConvertError

_MAX_HEADER = 100 * 2**20
"""A safetensors header longer than this is not one (the format caps it at 100 MB)."""


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a ConvertError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise ConvertError(f"{path} is not valid JSON (not UTF-8 text); copy it again from the model's "
                           "source") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); copy it again from the model's "
                           "source") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} is not valid JSON for this file (a JSON object was expected)")
    return data


def check_safetensors(path: Path) -> None:
    """Refuse a file that is not safetensors, or is cut short of what its header describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER:
            raise ConvertError(f"{path} is not a safetensors file (no valid header); copy it again from the model's "
                               "source or re-save the model with save_pretrained")
        if 8 + n > size:
            raise ConvertError(f"{path} is not a complete safetensors file ({size} bytes, cut inside its header): "
                               "it is truncated; copy it again")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ConvertError(f"{path} is not a safetensors file (its header is not a tensor table); copy it again "
                               "from the model's source or re-save the model with save_pretrained") from None
    if 8 + n + end > size:
        raise ConvertError(f"{path} is not a complete safetensors file ({size} bytes, its header describes "
                           f"{8 + n + end}): it is truncated; copy it again")


def check_shapes(directory: Path, m, state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors whose shapes are not the ones the model config (from config.json) builds."""
    from ..models import MODEL_SPECS

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MODEL_SPECS[m.family].build(m).state_dict().items()}
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise ConvertError(
                f"{directory}: the weights of {name} have shape {list(tensor.shape)} but config.json describes "
                f"{list(want)} (dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}): "
                "config.json and the weights disagree; use the config.json saved with these weights"
            )
