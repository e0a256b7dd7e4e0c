"""A pipeline stage of the encoder-decoder: blocks ``[start, end)`` counting encoder then decoder layers.

The pipeline splits one sequence of blocks: the encoder's layers, then the decoder's
(``parallel.pp_split`` counts in that sequence: with 3 + 3 layers, ``"3"`` puts the encoder on
stage 0 and the decoder on stage 1). Each stage passes the next one a tuple of tensors, as
Megatron's encoder-decoder pipeline does:

    stage 0:   h = E[src], y = E[tgt_in]; the relative position biases of both stacks
    boundary inside the encoder:      (h, encoder position bias, y, decoder position bias)
    boundary after the encoder:       (enc, y, decoder position bias)
    last stage: decoder norm, output projection -> logits

- The stage holding the last encoder layer applies the encoder's final norm; from there the
  encoder output ``enc`` travels with the decoder stream to every later stage (each decoder
  layer's cross-attention reads it), and its gradient, summed over those layers, travels back
  the same way.
- Stage 0 holds the token embedding and both relative position tables: it embeds the decoder
  inputs too and computes each stack's position bias once, and the biases ride along (under
  tensor parallel they hold only this rank's heads: a plain tensor). Only a tied output
  projection lives on a second stage (the last), as a copy whose gradient the pipeline sums
  with the embedding's.
- The source padding mask is not an activation: every stage takes it as the keyword
  ``src_mask`` (:func:`encoder_decoder_stage_inputs`) and builds its own attention masks.
- The tuples differ between boundaries, and tensors may pass a stage unchanged (the decoder
  stream through an encoder-only stage); the pipeline schedules infer each stage's shapes.

A stage is an :class:`~meshforge.models.encoder_decoder.EncoderDecoder` holding only some of
the model's modules (its blocks, norms and embedding run through the model's own methods),
under the model's names (``encoder.layers.<i>``, ``decoder.rel_bias``, ...), so the TP plan,
FSDP and checkpoints see the usual paths.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .encoder_decoder import EncoderDecoder, Stack, add_biases, padding_bias


class StackPart(Stack):
    """The part of an encoder or decoder :class:`~meshforge.models.encoder_decoder.Stack` that one
    stage holds: some of its layers (under their own indices), maybe its position table and its
    final norm (``None`` where another stage holds them). The same module objects as the model's."""

    def __init__(self, stack: Stack, layer_ids: range, rel_bias: bool, norm: bool):
        nn.Module.__init__(self)  # not Stack.__init__: nothing new is built
        self.causal = stack.causal
        self.layers = nn.ModuleDict({str(i): stack.layers[str(i)] for i in layer_ids})
        self.rel_bias = stack.rel_bias if rel_bias else None
        self.norm = stack.norm if norm else None


class EncoderDecoderStage(EncoderDecoder):
    """Blocks ``[start, end)`` of an encoder-decoder, counting encoder then decoder layers.

    ``forward(src, tgt_in, src_mask=)`` on the first stage, ``forward(*activations, src_mask=)``
    on the others; returns the activations of the next boundary (see the module docstring), or
    the logits on the last stage.
    """

    def __init__(self, model: EncoderDecoder, start: int, end: int, first: bool, last: bool):
        nn.Module.__init__(self)  # not EncoderDecoder.__init__: the modules are the model's
        self.cfg = model.cfg
        n_enc = len(model.encoder.layers)
        self.start, self.end, self.n_enc, self.first, self.last = start, end, n_enc, first, last
        self.tok_embeddings = model.tok_embeddings if first else None
        self.encoder = StackPart(
            model.encoder, range(min(start, n_enc), min(end, n_enc)), rel_bias=first, norm=start < n_enc <= end
        )
        self.decoder = StackPart(
            model.decoder, range(max(start, n_enc) - n_enc, max(end, n_enc) - n_enc), rel_bias=first, norm=last
        )
        self.output = model.output if last else None
        self.rope_cos = model.rope_cos
        self.rope_sin = model.rope_sin

    def tie_weights(self) -> None:
        """A stage holds embedding and output together only when it is the whole model."""
        if self.tok_embeddings is not None and self.output is not None:
            super().tie_weights()

    @property
    def relative(self) -> bool:
        return self.cfg.position_encoding == "relative"

    def forward(self, *acts: torch.Tensor, src_mask: torch.Tensor | None = None):
        enc_pos = dec_pos = None
        if self.first:
            src, tgt_in = acts
            h, y = self.tok_embeddings(src), self.tok_embeddings(tgt_in)
            if self.relative:
                enc_pos = self.encoder.position_bias(src.shape[1])
                dec_pos = self.decoder.position_bias(tgt_in.shape[1])
        elif self.start < self.n_enc:  # inside the encoder
            h, *rest = acts
            enc_pos, y, dec_pos = rest if self.relative else (None, *rest, None)
        else:  # the encoder is done: h is its output
            h, y, *rest = acts
            dec_pos = rest[0] if self.relative else None
        if self.encoder.layers:
            h = self.encoder_layers(h, add_biases(enc_pos, self.encoder.mask_bias(h.shape[1], src_mask, h.device)))
        if self.encoder.norm is not None:
            h = self.encoder.norm(h)
        if self.end < self.n_enc:  # the encoder goes on on the next stage
            return _sendable((h, enc_pos, y, dec_pos) if self.relative else (h, y), acts)
        if self.decoder.layers:
            self_bias = add_biases(dec_pos, self.decoder.mask_bias(y.shape[1], None, y.device))
            y = self.decoder_layers(y, h, self_bias, padding_bias(src_mask))
        if not self.last:
            return _sendable((h, y, dec_pos) if self.relative else (h, y), acts)
        return self.logits(y)


def _sendable(out: tuple[torch.Tensor, ...], acts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Activations as point-to-point sends need them: contiguous (a position bias is a permuted view), and
    a tensor this stage only passes on is a copy, not its input (a pipeline runtime may detach a stage's
    outputs in place after their backward: torch 2.11's split backward, zero-bubble's, does)."""
    return tuple(t.clone() if any(t is a for a in acts) else t.contiguous() for t in out)


class _Names(nn.Module):
    """A named container (``encoder``/``decoder``) of a pipeline rank's view."""


def encoder_decoder_stage_view(view: nn.Module, stages: list[nn.Module]) -> None:
    """``encoder`` and ``decoder`` (each with ``layers``, ``rel_bias``, ``norm``) of ``stages`` on ``view``."""
    for stack in ("encoder", "decoder"):
        names = _Names()
        names.layers = nn.ModuleDict({n: b for s in stages for n, b in getattr(s, stack).layers.items()})
        for name in ("rel_bias", "norm"):
            setattr(
                names,
                name,
                next(
                    (getattr(getattr(s, stack), name) for s in stages if getattr(getattr(s, stack), name) is not None),
                    None,
                ),
            )
        setattr(view, stack, names)


def encoder_decoder_stage_inputs(args: tuple) -> tuple[tuple, dict]:
    """(src, tgt_in[, src_mask]) -> first-stage inputs (src, tgt_in); ``src_mask`` for every stage."""
    src, tgt_in, *mask = args
    return (src, tgt_in), ({"src_mask": mask[0]} if mask and mask[0] is not None else {})


def encoder_decoder_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``encoder.layers.<i>`` then ``decoder.layers.<i>`` of an encoder-decoder or of a stage of one."""
    return {
        f"{stack}.layers.{n}": b for stack in ("encoder", "decoder") for n, b in getattr(model, stack).layers.items()
    }


def encoder_decoder_pipeline_blocks(m: ModelConfig) -> tuple[int, str]:
    """Encoder then decoder layers, split as one sequence."""
    n_dec = m.n_decoder_layers or m.n_layers
    return m.n_layers + n_dec, f"model.n_layers + decoder layers ({m.n_layers} + {n_dec})"


__all__ = [
    "EncoderDecoderStage",
    "StackPart",
    "encoder_decoder_blocks",
    "encoder_decoder_pipeline_blocks",
    "encoder_decoder_stage_inputs",
    "encoder_decoder_stage_view",
]
