"""Tensor parallelism with sequence parallelism (Megatron-style TP + SP) for the decoder and
encoder-decoder families.

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

The encoder-decoder (:func:`encoder_decoder_tp_plan`) follows the same pattern in both
stacks, with two additions:

    src, tgt_in --shared embedding (vocab rowwise, called twice)--> reduce-scatter --> Shard(1) each
    encoder block: norm (SP) --> all-gather --> self-attention (local heads) --> reduce-scatter
                   norm (SP) --> all-gather --> gated-GELU FFN --> reduce-scatter
    enc = final encoder norm (SP) --> all-gather ONCE --> Replicate: the K/V input of every
          decoder layer's cross-attention
    decoder block: norm --> all-gather --> causal self-attention --> reduce-scatter
                   norm --> all-gather --> cross-attention (q from the gathered stream,
                                           k/v from enc; local heads) --> reduce-scatter
                   norm --> all-gather --> FFN --> reduce-scatter
    final decoder norm (SP) --> all-gather --> output colwise --> vocab-sharded logits

- Every norm in front of a sublayer gathers its own output (:class:`GatheredSequenceParallel`)
  instead of the sublayer gathering its input: self-attention reads the normed stream twice
  (as queries and as keys/values), and a gather per reader would double the traffic. The
  final encoder norm is gathered once and its ``Replicate`` output is read by every
  cross-attention; their key/value gradients (partial sums over this rank's heads) add up
  and are reduce-scattered once in backward.
- The relative position bias table ``[buckets, heads]`` is sharded by heads
  (:class:`HeadParallel`), the same contiguous head ranges the colwise q/k/v projections
  give each rank: each rank computes the bias of its own heads only, without any
  communication forward or backward (a replicated table would need the bias, or its
  gradient, gathered over the heads). The padding/causal masks are plain ``[B or 1, 1, T, T]``
  tensors that broadcast over whatever heads a rank has.
- Per encoder block and forward: 2 all-gathers and 2 reduce-scatters; per decoder block 3
  and 3; plus 1 all-gather for the encoder output, 2 reduce-scatters for the two embedding
  lookups and 1 all-gather in front of the output projection. Backward mirrors them.
"""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ..config import ParallelConfig
from ..models.moe import MoE


def decoder_tp_plan(loss_parallel: bool, sequence_parallel: bool = True, qk_norm: bool = False,
                    has_embedding: bool = True, has_output: bool = True,
                    moe_ffn: dict[str, bool] | None = None, float8: bool = False) -> dict[str, ParallelStyle]:
    """The TP(/SP) plan of :class:`meshforge.models.decoder.Decoder` as ``{path pattern: style}``.

    ``loss_parallel`` keeps the logits vocab-sharded (``Shard(-1)`` DTensor); otherwise the
    output projection returns full logits as a plain tensor. ``has_embedding`` /
    ``has_output`` drop the entries of modules a pipeline split removed.

    ``moe_ffn`` (an MoE model): ``{layer name: its feed-forward is an MoE}``. TP then covers
    the attention only in the MoE layers: the MoE gets the whole (gathered) sequence as a
    plain tensor on every TP rank and runs replicated, and its output goes back onto this
    rank's sequence shard (a slice, no communication; in backward one all-gather of the
    output gradient, as for any gathered input). Every TP rank thus computes the same
    routing, the same aux losses over the whole microbatch and the same expert gradients,
    so the router and expert weights stay plain replicated tensors and need no reduction
    over ``tp``; expert parallelism, when on, shards the experts over ``ep`` as without TP.

    ``float8`` (the block projections are torchao ``Float8Linear`` with tensorwise scaling,
    :mod:`.float8`): torchao's float8 styles for them, which cast the gathered input to float8
    before the all-gather; the embedding and the output layer keep the plain styles.
    """
    stream = Shard(1) if sequence_parallel else Replicate()
    colwise, rowwise, prepare_input = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    if float8:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        colwise, rowwise, prepare_input = Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    plan: dict[str, ParallelStyle] = {}
    if has_embedding:
        # vocab-sharded rows: each rank looks up its own token ids, the partial sums are
        # reduce-scattered onto the sequence dim (SP) or all-reduced
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                                 use_local_output=not sequence_parallel)
    block = {
        "attention": prepare_input(input_layouts=(stream, None, None),
                                   desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=stream, use_local_output=not sequence_parallel),
        "feed_forward": prepare_input(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": colwise(),
        "feed_forward.w3": colwise(),
        "feed_forward.w2": rowwise(output_layouts=stream, use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        block["attention_norm"] = SequenceParallel()
        block["ffn_norm"] = SequenceParallel()
    if qk_norm:
        # q/k are [B, T, local heads, head_dim] after the colwise projections: the norm
        # weight is replicated, its input sharded on the head dim, its grad summed over tp
        block["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        block["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if moe_ffn is None:
        for path, style in block.items():
            plan[f"layers.*.{path}"] = style
    else:
        ffn = {k: v for k, v in block.items() if k.startswith("feed_forward")}
        for path, style in block.items():
            if path not in ffn:
                plan[f"layers.*.{path}"] = style
        replicated_moe = PrepareModuleInputOutput(
            input_layouts=(stream,), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(stream,), use_local_output=not sequence_parallel)
        for layer, is_moe in moe_ffn.items():
            if is_moe:
                plan[f"layers.{layer}.feed_forward"] = replicated_moe
            else:
                plan.update({f"layers.{layer}.{path}": style for path, style in ffn.items()})
    if has_output:
        if sequence_parallel:
            plan["norm"] = SequenceParallel()
        plan["output"] = ColwiseParallel(input_layouts=stream,
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    return plan


class GatheredSequenceParallel(SequenceParallel):
    """:class:`SequenceParallel` (the norm runs on this rank's slice of the sequence, its weight
    replicated) whose output is then all-gathered to the whole sequence (a ``Replicate`` DTensor).

    For a norm whose output several column-parallel projections read: one gather instead of one
    per reader. Backward: the readers' partial input gradients add up, then one reduce-scatter.
    """

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        outputs = outputs.redistribute(placements=(Replicate(),))
        return outputs.to_local() if use_local_output else outputs


class HeadParallel(ParallelStyle):
    """A per-head table ``weight[entries, heads]`` looked up by integer ids (T5's relative position
    bias, whose forward maps bucket ids ``[q, k]`` to a bias ``[1, heads, q, k]``).

    Each rank keeps the columns of its own heads (``Shard(1)``, the same contiguous head ranges
    that the colwise q/k/v projections give it) and returns the bias of those heads as a plain
    local tensor. The ids are the same on every rank. No communication forward or backward: each
    rank's weight gradient is exactly its own columns' gradient.
    """

    def _partition(self, name, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(param, mesh, [Shard(1)], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))

    @staticmethod
    def _prepare_input_fn(module, inputs, mesh):
        return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

    @staticmethod
    def _prepare_output_fn(module, output, mesh):
        return output.redistribute(placements=[Shard(1)]).to_local()  # already Shard(1): no communication

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._prepare_input_fn,
                                 self._prepare_output_fn)


def encoder_decoder_tp_plan(loss_parallel: bool) -> dict[str, ParallelStyle]:
    """The TP+SP plan of :class:`meshforge.models.encoder_decoder.EncoderDecoder` as ``{path pattern: style}``.

    The residual streams of both stacks are ``Shard(1)`` DTensors (sequence parallel; there is
    no variant without it). ``loss_parallel`` keeps the logits vocab-sharded. A pipeline stage
    lacks some of these modules: :func:`apply_tp` drops the entries that match nothing.
    """
    stream = Shard(1)

    def attention(path: str) -> dict[str, ParallelStyle]:
        # q/k/v colwise (this rank's heads; the inputs arrive gathered), wo rowwise back onto the sequence shard
        return {f"{path}.wq": ColwiseParallel(), f"{path}.wk": ColwiseParallel(), f"{path}.wv": ColwiseParallel(),
                f"{path}.wo": RowwiseParallel(output_layouts=stream, use_local_output=False)}

    ffn = {"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
           "feed_forward.w2": RowwiseParallel(output_layouts=stream, use_local_output=False)}
    encoder_block = {"attention_norm": GatheredSequenceParallel(), **attention("attention"),
                     "ffn_norm": GatheredSequenceParallel(), **ffn}
    decoder_block = {"self_attention_norm": GatheredSequenceParallel(), **attention("self_attention"),
                     "cross_attention_norm": GatheredSequenceParallel(), **attention("cross_attention"),
                     "ffn_norm": GatheredSequenceParallel(), **ffn}
    plan: dict[str, ParallelStyle] = {
        # one vocab-sharded table for both stacks: partial lookups reduce-scattered onto the sequence dim
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream, use_local_output=False),
        "encoder.rel_bias": HeadParallel(),
        "decoder.rel_bias": HeadParallel(),
    }
    plan.update({f"encoder.layers.*.{k}": v for k, v in encoder_block.items()})
    plan["encoder.norm"] = GatheredSequenceParallel()  # the encoder output: gathered once for all cross-attentions
    plan.update({f"decoder.layers.*.{k}": v for k, v in decoder_block.items()})
    plan["decoder.norm"] = SequenceParallel()
    plan["output"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                     use_local_output=not loss_parallel)
    return plan


def _resolves(model: nn.Module, pattern: str) -> bool:
    """Some submodule of ``model`` matches the plan key ``pattern``."""
    return any(fnmatch(name, pattern) for name, _ in model.named_modules())


def _all_float8(blocks: dict[str, nn.Module]) -> bool:
    """Every linear layer of the blocks' attention and dense FFN is a torchao Float8Linear."""
    linears = [m for b in blocks.values() for part in (b.attention, b.feed_forward) if not isinstance(part, MoE)
               for m in part.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(type(m).__name__ == "Float8Linear" for m in linears)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, cfg: ParallelConfig, sequence_parallel: bool = True,
             float8: bool = False) -> nn.Module:
    """Shard ``model`` (a decoder or an encoder-decoder, or a pipeline stage of one) over the 1-D ``tp_mesh``
    in place. ``float8``: use torchao's float8 TP styles for the decoder blocks (tensorwise float8), where
    all their linear layers were converted."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs the 1-D tp sub-mesh, got a {tp_mesh.ndim}-D mesh")
    family = model.cfg.family
    if family == "encoder_decoder":
        blocks = {f"{stack}.layers.{n}": b for stack in ("encoder", "decoder")
                  for n, b in getattr(model, stack).layers.items()}
    else:
        blocks = {f"layers.{n}": b for n, b in model.layers.items()}
    for name, block in blocks.items():
        if isinstance(block.feed_forward, MoE) and family == "decoder":
            continue  # replicated over tp (see decoder_tp_plan)
        if not all(isinstance(getattr(block.feed_forward, w, None), nn.Linear) for w in ("w1", "w2", "w3")):
            raise ValueError(f"apply_tp: {name}.feed_forward is a {type(block.feed_forward).__name__}, "
                             "not a dense gated FFN; the TP plans do not cover it (MoE needs its own plan)")
    tied = bool(getattr(model.cfg, "tie_embeddings", False)) and model.tok_embeddings is not None \
        and model.output is not None and model.output.weight is model.tok_embeddings.weight
    if family == "encoder_decoder":
        if not sequence_parallel:
            raise ValueError("apply_tp: the encoder-decoder plan always uses sequence parallel")
        plan = encoder_decoder_tp_plan(loss_parallel=cfg.loss_parallel)
    else:
        plan = decoder_tp_plan(
            loss_parallel=cfg.loss_parallel,
            sequence_parallel=sequence_parallel,
            qk_norm=bool(model.cfg.qk_norm),
            has_embedding=model.tok_embeddings is not None,
            has_output=model.output is not None,
            moe_ffn={n: isinstance(b.feed_forward, MoE) for n, b in model.layers.items()} if model.cfg.moe_experts else None,
            float8=float8 and _all_float8(blocks),
        )
    plan = {k: v for k, v in plan.items() if _resolves(model, k)}  # a pipeline stage holds only some modules
    parallelize_module(model, tp_mesh, plan)
    if tied:
        # both halves are Shard(0) over the vocab on the same mesh: share one parameter again
        model.tie_weights()
        assert model.output.weight is model.tok_embeddings.weight
    return model


__all__ = ["GatheredSequenceParallel", "HeadParallel", "apply_tp", "decoder_tp_plan", "encoder_decoder_tp_plan"]
