"""Which Hugging Face converter maps a model family: the module its spec names (``ModelSpec.hf_converter``).

A converter module (``hf_decoder``, ``hf_t5``) offers ``ARCHITECTURES`` (the HF classes it
imports), ``SEQ2SEQ`` (the kind of tokenizer it exports), ``exports_to(m)``,
``export_plan(m, token_ids, dtype, reader)``, ``import_plan(hf_config, tensor_names)`` and
``import_state(files, m, pairs)``; export, import and inspect call only these.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..config import ModelConfig
from ..models import MODEL_SPECS, family_spec
from .safetensors_io import ConvertError


def converter(m: ModelConfig) -> ModuleType:
    """The converter module of ``m``'s family; ConvertError if the family has none."""
    name = family_spec(m.family).hf_converter
    if name is None:
        raise ConvertError(f"model.family = {m.family!r} has no Hugging Face converter")
    return importlib.import_module(f"{__package__}.{name}")


def converters() -> list[ModuleType]:
    """Every registered family's converter module, once each."""
    names = dict.fromkeys(s.hf_converter for s in MODEL_SPECS.values() if s.hf_converter)
    return [importlib.import_module(f"{__package__}.{n}") for n in names]


def converter_for_architecture(arch: str) -> ModuleType | None:
    """The converter that imports HF architecture ``arch`` (None if none does)."""
    return next((c for c in converters() if arch in c.ARCHITECTURES), None)


def known_architectures() -> list[str]:
    return [a for c in converters() for a in c.ARCHITECTURES]


__all__ = ["converter", "converter_for_architecture", "converters", "known_architectures"]
