"""Tensor parallelism with sequence parallelism (Megatron-style TP + SP) for the decoder and
encoder-decoder families.

The plan is data and belongs to the model family: ``ModelSpec.tp_plan`` (``models/tp_plans.py``)
returns ``{module path pattern: style name}``; :func:`build_tp_plan` turns the names
(:data:`STYLE_NAMES`) into DTensor ``ParallelStyle``\ s and :func:`apply_tp` hands them to
``parallelize_module`` on the ``tp`` sub-mesh. With
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
  gradient, a partial sum over this rank's heads, is all-reduced over ``tp``. A q/k norm over the
  whole projection (OLMo 2) gathers the projection's channels first (:class:`GatheredChannelNorm`).
- Tied embeddings: ``parallelize_module`` gives the embedding and the output projection
  separate sharded parameters; both are ``Shard(0)`` (vocab rows) on the same mesh, so the
  tie is restored afterwards with ``model.tie_weights()`` and both uses accumulate into one
  gradient.

The encoder-decoder's plan follows the same pattern in both
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

from ..config import ModelConfig, ParallelConfig
from ..models import family_spec


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


def _distribute_params(module: nn.Module, mesh: DeviceMesh, placement, src_data_rank) -> None:
    """``module``'s own parameters made DTensors of ``placement`` on ``mesh``."""
    for pname, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(
            pname,
            nn.Parameter(
                distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
                requires_grad=param.requires_grad,
            ),
        )


class HeadParallel(ParallelStyle):
    """A per-head table ``weight[entries, heads]`` looked up by integer ids (T5's relative position
    bias, whose forward maps bucket ids ``[q, k]`` to a bias ``[1, heads, q, k]``).

    Each rank keeps the columns of its own heads (``Shard(1)``, the same contiguous head ranges
    that the colwise q/k/v projections give it) and returns the bias of those heads as a plain
    local tensor. The ids are the same on every rank. No communication forward or backward: each
    rank's weight gradient is exactly its own columns' gradient.
    """

    def _partition(self, name, module: nn.Module, mesh: DeviceMesh) -> None:
        _distribute_params(module, mesh, Shard(1), self.src_data_rank)

    @staticmethod
    def _prepare_input_fn(module, inputs, mesh):
        return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

    @staticmethod
    def _prepare_output_fn(module, output, mesh):
        return output.redistribute(placements=[Shard(1)]).to_local()  # already Shard(1): no communication

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._prepare_input_fn, self._prepare_output_fn)


class GatheredChannelNorm(ParallelStyle):
    """A norm over the whole of a column-parallel projection's output (OLMo 2's q/k norm), whose
    channels are sharded over tp: the local channels ``[B, T, C / tp]`` are all-gathered, the norm
    runs on the whole projection with its weight replicated (every rank computes the same thing,
    so the weight gradient needs no reduction), and each rank keeps its own channels back.
    Backward: the channel gradients are all-gathered once, then each rank takes its slice.
    """

    def _partition(self, name, module: nn.Module, mesh: DeviceMesh) -> None:
        _distribute_params(module, mesh, Replicate(), self.src_data_rank)

    @staticmethod
    def _prepare_input_fn(module, inputs, mesh):
        return tuple(
            DTensor.from_local(t, mesh, [Shard(t.dim() - 1)], run_check=False).redistribute(placements=[Replicate()])
            for t in inputs
        )

    @staticmethod
    def _prepare_output_fn(module, output, mesh):
        return output.redistribute(placements=[Shard(output.dim() - 1)]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._prepare_input_fn, self._prepare_output_fn)


STYLE_NAMES = {
    "embedding": "vocab-sharded rows (RowwiseParallel): each rank looks up its own token ids, the partial sums "
    "are reduce-scattered onto the sequence dim (SP) or all-reduced",
    "colwise": "ColwiseParallel: output features (heads) sharded; the input arrives gathered",
    "rowwise": "RowwiseParallel back onto the residual stream: reduce-scatter (SP) or all-reduce",
    "gather_input": "the module's input, the residual stream, gathered to the whole sequence (PrepareModuleInput); "
    "'gather_input:N' for a module of N positional inputs, the first the stream",
    "norm": "SequenceParallel: a norm on this rank's sequence shard, weight replicated (dropped without SP)",
    "gathered_norm": "GatheredSequenceParallel: an SP norm whose output is gathered once for all its readers "
    "(needs SP)",
    "head_norm": "a per-head norm on this rank's heads (input sharded on the head dim, weight gradient summed over tp)",
    "channel_norm": "GatheredChannelNorm: a norm over a colwise projection's whole output (its channels gathered, "
    "the norm replicated, this rank's channels kept)",
    "heads": "HeadParallel: a [entries, heads] table sharded by heads",
    "replicated_moe": "an MoE feed-forward run replicated over tp on the gathered sequence (a plain tensor), its "
    "output sliced back onto this rank's sequence shard",
    "output": "ColwiseParallel from the stream to the logits: vocab-sharded DTensor (loss parallel) or gathered",
}
"""The style names a family's TP plan may use (``ModelSpec.tp_plan``), and what each does."""


def _block_styles(float8: bool) -> tuple[type, type, type]:
    """(colwise, rowwise, gather-input) style classes of the block projections: torchao's float8
    styles (the gathered input cast to float8 before the all-gather) for tensorwise float8 layers."""
    if not float8:
        return ColwiseParallel, RowwiseParallel, PrepareModuleInput
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput


def _style(name: str, sequence_parallel: bool, loss_parallel: bool, float8: bool = False) -> ParallelStyle:
    stream = Shard(1) if sequence_parallel else Replicate()
    local = not sequence_parallel  # the residual stream stays a DTensor under SP
    base, _, n_inputs = name.partition(":")
    colwise, rowwise, prepare_input = _block_styles(float8)  # embedding and output keep the plain styles
    if base == "embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=stream, use_local_output=local)
    if base == "colwise":
        return colwise()
    if base == "rowwise":
        return rowwise(output_layouts=stream, use_local_output=local)
    if base == "gather_input":
        rest = (None,) * (int(n_inputs or 1) - 1)
        return prepare_input(input_layouts=(stream, *rest), desired_input_layouts=(Replicate(), *rest))
    if base == "norm":
        return SequenceParallel()
    if base == "gathered_norm":
        return GatheredSequenceParallel()
    if base == "head_norm":
        return SequenceParallel(sequence_dim=2, use_local_output=True)
    if base == "channel_norm":
        return GatheredChannelNorm()
    if base == "heads":
        return HeadParallel()
    if base == "replicated_moe":
        return PrepareModuleInputOutput(
            input_layouts=(stream,),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(),),
            desired_output_layouts=(stream,),
            use_local_output=local,
        )
    if base == "output":
        return ColwiseParallel(
            input_layouts=stream,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    raise ValueError(f"TP plan style {name!r} is not one of {', '.join(STYLE_NAMES)}")


def build_tp_plan(
    m: ModelConfig, loss_parallel: bool, sequence_parallel: bool = True, float8: bool = False
) -> dict[str, ParallelStyle]:
    """The family's TP plan (``ModelSpec.tp_plan``) as ``{path pattern: ParallelStyle}``.

    ``loss_parallel`` keeps the logits vocab-sharded (``Shard(-1)`` DTensor); otherwise the output
    projection returns full logits as a plain tensor. Without ``sequence_parallel`` the residual
    stream is replicated and the norms run unsharded (a plan of gathered norms refuses). ``float8``
    (the block projections are torchao ``Float8Linear`` with tensorwise scaling, :mod:`.float8`):
    torchao's float8 styles for the block projections and their gathered inputs."""
    names = family_spec(m.family).tp_plan(m)
    if not sequence_parallel:
        if "gathered_norm" in names.values():
            raise ValueError(f"apply_tp: the {m.family} plan always uses sequence parallel (it gathers norm outputs)")
        names = {k: v for k, v in names.items() if v != "norm"}
    return {k: _style(v, sequence_parallel, loss_parallel, float8) for k, v in names.items()}


def _resolves(model: nn.Module, pattern: str) -> bool:
    """Some submodule of ``model`` matches the plan key ``pattern``."""
    return any(fnmatch(name, pattern) for name, _ in model.named_modules())


def _all_float8(blocks: dict[str, nn.Module], names: dict[str, str]) -> bool:
    """Every linear layer the plan splits column- or row-wise in the blocks (attention, dense FFN; an MoE
    runs replicated) is a torchao Float8Linear."""
    linears = [
        m
        for name, b in blocks.items()
        for sub, m in b.named_modules()
        if isinstance(m, nn.Linear) and names.get(f"{name}.{sub.split('.')[0]}") != "replicated_moe"
    ]
    return bool(linears) and all(type(m).__name__ == "Float8Linear" for m in linears)


def apply_tp(
    model: nn.Module, tp_mesh: DeviceMesh, cfg: ParallelConfig, sequence_parallel: bool = True, float8: bool = False
) -> nn.Module:
    """Shard ``model`` (a decoder or an encoder-decoder, or a pipeline stage of one) over the 1-D ``tp_mesh``
    in place. ``float8``: torchao's float8 TP styles for the block projections (tensorwise float8), where
    all of them were converted."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs the 1-D tp sub-mesh, got a {tp_mesh.ndim}-D mesh")
    spec = family_spec(model.cfg.family)
    names = spec.tp_plan(model.cfg)
    blocks = spec.blocks(model)
    for name, block in blocks.items():
        if names.get(f"{name}.feed_forward") == "replicated_moe":
            continue  # replicated over tp (see STYLE_NAMES)
        if not all(isinstance(getattr(block.feed_forward, w, None), nn.Linear) for w in ("w1", "w2", "w3")):
            raise ValueError(
                f"apply_tp: {name}.feed_forward is a {type(block.feed_forward).__name__}, "
                "not a dense gated FFN; the TP plans do not cover it (MoE needs its own plan)"
            )
    tied = (
        bool(getattr(model.cfg, "tie_embeddings", False))
        and model.tok_embeddings is not None
        and model.output is not None
        and model.output.weight is model.tok_embeddings.weight
    )
    plan = build_tp_plan(model.cfg, cfg.loss_parallel, sequence_parallel, float8=float8 and _all_float8(blocks, names))
    plan = {k: v for k, v in plan.items() if _resolves(model, k)}  # a pipeline stage holds only some modules
    parallelize_module(model, tp_mesh, plan)
    if tied:
        # both halves are Shard(0) over the vocab on the same mesh: share one parameter again
        model.tie_weights()
        assert model.output.weight is model.tok_embeddings.weight
    return model


__all__ = [
    "STYLE_NAMES",
    "GatheredChannelNorm",
    "GatheredSequenceParallel",
    "HeadParallel",
    "apply_tp",
    "build_tp_plan",
]
