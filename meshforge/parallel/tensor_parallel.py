"""Tensor parallelism with sequence parallelism (Megatron-style TP + SP) for the decoder family.

The plan is data: :func:`decoder_tp_plan` returns ``{module path pattern: ParallelStyle}``
and :func:`apply_tp` hands it to ``parallelize_module`` on the ``tp`` sub-mesh. With
sequence parallel the residual stream between blocks is a DTensor sharded on the sequence
dim (``Shard(1)``):

    tokens --embedding (vocab rowwise)--> reduce-scatter --> h: Shard(1)
    h --RMSNorm (SP, local)--> all-gather --> wq/wk/wv colwise (local heads) --> attention
      --> wo rowwise --> reduce-scatter --> Shard(1) (+ residual)
    h --RMSNorm (SP)--> all-gather --> w1/w3 colwise --> SwiGLU --> w2 rowwise --> reduce-scatter
    h --final RMSNorm (SP)--> all-gather --> output colwise --> logits Shard(-1) (vocab-sharded)

Per block and forward that is 2 all-gathers and 2 reduce-scatters of [B, T, dim]
activations; backward mirrors them. The logits stay vocab-sharded DTensors when the loss
is parallel (:mod:`.loss_parallel`); otherwise they are all-gathered to full logits.

Details the model does not know about:

- The residual stream is kept as a DTensor (``use_local_output=False`` on the embedding and
  the rowwise projections), so ``h.shape[1]`` in ``Decoder.forward`` is the *global*
  sequence length and the RoPE tables are sliced for the full sequence that attention sees
  after the all-gather. Inside attention and the FFN tensors are plain local tensors.
- QK-norm acts per head on the local heads after the colwise projections. Its weight is a
  ``Replicate`` DTensor and its input is declared ``Shard(2)`` (the head dim), so the weight
  gradient, a partial sum over this rank's heads, is all-reduced over ``tp``.
- Tied embeddings: ``parallelize_module`` gives the embedding and the output projection
  separate sharded parameters; both are ``Shard(0)`` (vocab rows) on the same mesh, so the
  tie is restored afterwards with ``model.tie_weights()`` and both uses accumulate into one
  gradient.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ..config import ParallelConfig


def decoder_tp_plan(loss_parallel: bool, sequence_parallel: bool = True, qk_norm: bool = False,
                    has_embedding: bool = True, has_output: bool = True) -> dict[str, ParallelStyle]:
    """The TP(/SP) plan of :class:`meshforge.models.decoder.Decoder` as ``{path pattern: style}``.

    ``loss_parallel`` keeps the logits vocab-sharded (``Shard(-1)`` DTensor); otherwise the
    output projection returns full logits as a plain tensor. ``has_embedding`` /
    ``has_output`` drop the entries of modules a pipeline split removed.
    """
    stream = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if has_embedding:
        # vocab-sharded rows: each rank looks up its own token ids, the partial sums are
        # reduce-scattered onto the sequence dim (SP) or all-reduced
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                                 use_local_output=not sequence_parallel)
    block = {
        "attention": PrepareModuleInput(input_layouts=(stream, None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=stream, use_local_output=not sequence_parallel),
        "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=stream, use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        block["attention_norm"] = SequenceParallel()
        block["ffn_norm"] = SequenceParallel()
    if qk_norm:
        # q/k are [B, T, local heads, head_dim] after the colwise projections: the norm
        # weight is replicated, its input sharded on the head dim, its grad summed over tp
        block["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        block["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    for path, style in block.items():
        plan[f"layers.*.{path}"] = style
    if has_output:
        if sequence_parallel:
            plan["norm"] = SequenceParallel()
        plan["output"] = ColwiseParallel(input_layouts=stream,
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, cfg: ParallelConfig, sequence_parallel: bool = True) -> nn.Module:
    """Shard ``model`` (a decoder, or a pipeline stage of one) over the 1-D ``tp_mesh`` in place."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs the 1-D tp sub-mesh, got a {tp_mesh.ndim}-D mesh")
    for name, block in model.layers.items():
        if not all(isinstance(getattr(block.feed_forward, w, None), nn.Linear) for w in ("w1", "w2", "w3")):
            raise ValueError(f"apply_tp: layers.{name}.feed_forward is a {type(block.feed_forward).__name__}, "
                             "not a dense gated FFN; the decoder TP plan does not cover it (MoE needs its own plan)")
    tied = bool(getattr(model.cfg, "tie_embeddings", False)) and model.tok_embeddings is not None \
        and model.output is not None and model.output.weight is model.tok_embeddings.weight
    plan = decoder_tp_plan(
        loss_parallel=cfg.loss_parallel,
        sequence_parallel=sequence_parallel,
        qk_norm=bool(model.cfg.qk_norm),
        has_embedding=model.tok_embeddings is not None,
        has_output=model.output is not None,
    )
    if not model.layers:
        plan = {k: v for k, v in plan.items() if not k.startswith("layers.")}
    parallelize_module(model, tp_mesh, plan)
    if tied:
        # both halves are Shard(0) over the vocab on the same mesh: share one parameter again
        model.tie_weights()
        assert model.output.weight is model.tok_embeddings.weight
    return model


__all__ = ["apply_tp", "decoder_tp_plan"]
