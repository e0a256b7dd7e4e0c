"""Tied embeddings under pipeline parallel, as Megatron-LM does it.

With ``model.tie_embeddings`` the token embedding and the output projection are one matrix
W, but a pipeline puts the embedding on the first stage and the output projection on the
last, on different ranks. So each of those two ranks holds its own copy of W:

- both copies start equal: the full model is built with the job's seed on every pipeline
  rank before the split (:func:`~meshforge.parallel.pipeline.apply_pipeline`);
- after every backward, :meth:`TiedEmbeddingGrads.sum_` all-reduces the two copies'
  gradients over the pair of ranks {first stage, last stage} of each pipeline group, so
  each holds dW_embedding + dW_output, the single-process gradient of the shared matrix;
- the optimizer then applies the same update to both, and they stay identical;
- the gradient norm counts W once: the last stage's copy is left out of it
  (:attr:`TiedEmbeddingGrads.counted_elsewhere`).

Under FSDP and TP both copies are sharded alike (rows over ``dp_shard`` and ``tp``: the
embedding's rowwise plan and the output's colwise plan both shard W's rows), and the partner
ranks have the same dp/tp coordinates, so each rank sums its local shard with the partner's
same rows.

Checkpoints: the last stage's :class:`~meshforge.parallel.pipeline.PipelineModel` view names
its copy ``tok_embeddings.weight`` too (as the single-process model names the shared
parameter; ``output.weight`` is its second name there as well), so optimizer state and
weights are written once, under the single-process names, and load into any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .group_timeout import group_timeout


class TiedEmbeddingGrads:
    """Sums the gradients of the shared matrix's two copies over {first stage, last stage}.

    Built on every rank of the pipeline group (a no-op on the middle stages); ``weight`` is
    this rank's copy, ``is_last`` whether it is the output projection's.
    """

    def __init__(self, weight: nn.Parameter | None, pp_group: dist.ProcessGroup, is_last: bool):
        self.weight = weight
        self.group = None
        self.counted_elsewhere: tuple[nn.Parameter, ...] = (weight,) if weight is not None and is_last else ()
        if weight is not None:
            ranks = dist.get_process_group_ranks(pp_group)
            # only the two members create (and synchronise on) their pair group
            self.group = dist.new_group(
                [ranks[0], ranks[-1]], use_local_synchronization=True, timeout=group_timeout(pp_group)
            )

    @torch.no_grad()
    def sum_(self) -> None:
        """In place: each copy's gradient becomes the sum of both (call after the backward)."""
        if self.group is None:
            return
        w, grad = self.weight, self.weight.grad
        if grad is None:  # a stage whose copy took no gradient still contributes zeros
            grad = w.grad = torch.zeros_like(w)
        if isinstance(grad, DTensor) and grad.placements != w.placements:
            # the rowwise embedding's gradient comes back replicated over tp: take this rank's rows
            # (a local slice), laid out as the weight and as the partner's copy
            grad = w.grad = grad.redistribute(w.device_mesh, w.placements)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
