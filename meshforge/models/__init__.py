"""Model families and how to build them.

``build_model(cfg, device)`` creates the model on the meta device (no memory, no init
cost), materialises it on ``device`` and initialises it explicitly with torch's global
RNG, so the same seed gives the same weights on any device layout that initialises the
full model before sharding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .decoder import Decoder


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the system needs to know about a model family."""

    name: str
    build: Callable[[ModelConfig], nn.Module]


MODEL_SPECS: dict[str, ModelSpec] = {
    "decoder": ModelSpec("decoder", Decoder),
}


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", init: bool = True) -> nn.Module:
    spec = MODEL_SPECS[cfg.family]
    with torch.device("meta"):
        model = spec.build(cfg)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if init:
        model.init_weights()
    return model


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * L * H * Q * T (PaLM appendix B).

    N excludes the input embedding (a lookup, no matmul) but includes the output
    projection; L layers, H heads, Q head dim, T sequence length.
    """
    return 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


__all__ = ["Decoder", "MODEL_SPECS", "ModelSpec", "build_model", "flops_per_token"]
