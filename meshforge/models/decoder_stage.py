"""A pipeline stage of the decoder: a pruned :class:`~meshforge.models.decoder.Decoder`.

A stage holds layers ``[start, end)`` of the model (the same module objects, under their own
indices ``layers.<i>``); the token embedding stays only on the first stage, the final norm and
the output projection only on the last. The decoder's forward already starts from hidden
states when ``tok_embeddings`` is ``None`` and stops at them when ``output`` is ``None``, so a
stage is the model class itself, with the modules it does not hold set to ``None``.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_stage(model: nn.Module, start: int, end: int, first: bool, last: bool) -> nn.Module:
    """The decoder of layers ``[start, end)`` of ``model``: its skeleton is built on the meta device
    (no memory), then given ``model``'s modules."""
    with torch.device("meta"):
        stage = type(model)(model.cfg)
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(start, end)})
    stage.tok_embeddings = model.tok_embeddings if first else None
    stage.norm = model.norm if last else None
    stage.output = model.output if last else None
    stage.rope_cos = model.rope_cos
    stage.rope_sin = model.rope_sin
    return stage


def decoder_stage_view(view: nn.Module, stages: list[nn.Module]) -> None:
    """``layers`` and ``norm`` of ``stages`` on ``view``, under the decoder's names."""
    view.layers = nn.ModuleDict({name: block for s in stages for name, block in s.layers.items()})
    view.norm = next((s.norm for s in stages if s.norm is not None), None)


def decoder_stage_inputs(args: tuple) -> tuple[tuple, dict]:
    """(tokens[, document ids[, RoPE positions]]) -> first-stage inputs (tokens); the document ids and
    (context parallel) positions go to every stage as keyword inputs."""
    tokens, *rest = args
    return (tokens,), {name: v for name, v in zip(("segments", "positions"), rest) if v is not None}


def decoder_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``layers.<i>`` of a decoder or of a stage of one."""
    return {f"layers.{n}": b for n, b in model.layers.items()}


def decoder_pipeline_blocks(m) -> tuple[int, str]:
    return m.n_layers, "model.n_layers"


__all__ = ["decoder_blocks", "decoder_pipeline_blocks", "decoder_stage", "decoder_stage_inputs", "decoder_stage_view"]
