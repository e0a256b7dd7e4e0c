"""Expert parallelism (EP): shard the experts of every MoE layer over the ``ep`` mesh dim.

``ep`` borrows ranks from ``dp_shard x cp`` (see :func:`build_ep_mesh`): the ranks of
one ep group hold different tokens (other samples, or other chunks of the same sequences
under context parallel), and each holds ``E / ep`` of the experts of every MoE layer.
The model does not change; :func:`apply_ep` hooks each
:class:`~meshforge.models.moe.GroupedExperts` (whose forward already uses only the local
part of DTensor weights) with ``distribute_module``:

- weights ``w1/w2/w3`` ``[E, ...]`` become ``Shard(0)`` DTensors on the ep mesh: rank r
  holds experts ``r*E/ep .. (r+1)*E/ep - 1``;
- before the local experts (input hook): the tokens arrive sorted by global expert with
  ``counts[E]``. An all-to-all of the counts tells every rank how many tokens it gets
  from each rank for each of its local experts; an all-to-all of the tokens
  (``all_to_all_single_autograd``, differentiable, works on gloo and NCCL) sends the slice
  for rank j's experts to rank j. What arrives is grouped by source rank, then by local
  expert; a permutation regroups it by local expert, and the local experts run on it
  with ``counts_local[E/ep]``;
- after the local experts (output hook): the inverse permutation, then the reverse
  all-to-all sends each result back to the rank and the position it came from, so the
  MoE layer combines exactly as in one process.

Gradient scaling. Each rank's loss is the mean over its own tokens, and data parallelism
averages gradients over the ranks (FSDP2 divides by the data-parallel size it reduces
over). An expert's weight gradient on rank r, though, already *sums* the contributions of
the tokens of every rank in its ep group (they came through the all-to-all). The output
hook therefore scales the gradient that reaches the local experts by ``1/ep`` and the
input hook scales it back by ``ep`` on its way to the tokens: token gradients are
untouched, expert weight gradients become the mean over the ep group. FSDP2 on top of the
experts (over the data-parallel ranks *outside* the ep group, see
:func:`apply_expert_fsdp`) then averages over the rest, so the expert gradient is the
single-process gradient with or without FSDP, and for every split of dp into ep x rest.

Capacity routing is decided in ``MoE.forward`` on the rank's own tokens before dispatch,
so it is the same as in one process with the same micro-batch partition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from ..models import transformer_blocks
from ..models.moe import GroupedExperts


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    # functional collectives return an async tensor; wait before using it as a plain tensor
    return torch.ops._c10d_functional.wait_tensor(out) if hasattr(out, "elem") else out


class ExpertDispatcher:
    """The all-to-all dispatch / combine around one GroupedExperts (state between the two hooks)."""

    def __init__(self, n_experts: int, ep_mesh: DeviceMesh):
        self.ep = ep_mesh.size()
        self.n_experts = n_experts
        self.n_local = n_experts // self.ep
        self.group = ep_mesh.get_group()
        self._saved: list[tuple] = []

    def dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, counts = inputs
        ep, n_local = self.ep, self.n_local
        # tokens this rank sends to each ep rank: the sum over that rank's experts
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        # how many tokens each rank sends us, for each of our local experts: [ep, n_local]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        recv_counts = recv_counts.view(ep, n_local)
        recv_splits = recv_counts.sum(1).tolist()
        x_recv = _all_to_all(x, recv_splits, send_splits, self.group)
        # arrived grouped by (source rank, local expert); regroup by (local expert, source rank)
        expert_of_row = torch.arange(n_local, device=x.device).repeat(ep).repeat_interleave(recv_counts.flatten())
        perm = torch.argsort(expert_of_row, stable=True)
        self._saved.append((perm, send_splits, recv_splits))
        x_local = _ScaleGrad.apply(x_recv[perm], float(ep))
        return x_local, recv_counts.sum(0)

    def combine(self, module: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        perm, send_splits, recv_splits = self._saved.pop()
        out = _ScaleGrad.apply(out, 1.0 / self.ep)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return _all_to_all(out[inverse], send_splits, recv_splits, self.group)


def _shard_over_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    if not isinstance(module, GroupedExperts):
        return
    for pname, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(pname, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard every GroupedExperts of ``model`` over the 1-D ``ep_mesh`` and hook the all-to-all, in place.

    Must run on the full (unsharded, identically initialised) model, before FSDP.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_ep needs the 1-D ep sub-mesh, got a {ep_mesh.ndim}-D mesh")
    ep = ep_mesh.size()
    for experts in expert_modules(model):
        n_experts = experts.w1.shape[0]
        if n_experts % ep:
            raise ValueError(f"{n_experts} experts cannot be split over parallel.ep = {ep}")
        d = ExpertDispatcher(n_experts, ep_mesh)
        distribute_module(experts, ep_mesh, partition_fn=_shard_over_experts, input_fn=d.dispatch, output_fn=d.combine)
    return model


def apply_expert_fsdp(
    model: nn.Module,
    expert_dp_mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """FSDP2 on each GroupedExperts over the data-parallel ranks outside the ep group.

    Runs right before :func:`~meshforge.parallel.data_parallel.apply_fsdp` (same options),
    so the block's FSDP unit leaves the expert weights (already managed here) alone. The
    expert weights are DTensors on ``ep``; FSDP2 composes them with ``expert_dp_mesh``
    (1-D ``expert_dp_shard`` or 2-D ``dp_replicate x expert_dp_shard``; it may have size 1:
    FSDP then only manages them). FSDP shards the local experts on dim 0 when they divide
    evenly over ``expert_dp_shard``, else on dim 1 (the hidden/model dim).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": expert_dp_mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=expert_dp_mesh.device_type == "cuda")
    shard_size = expert_dp_mesh.size(-1)
    blocks = transformer_blocks(model)
    # as apply_fsdp's last block: the last block's experts are needed again right away by backward
    last = {id(m) for m in blocks[-1].modules()} if blocks else set()
    for experts in expert_modules(model):
        n_local = _local_rows(experts.w1)
        dim = 0 if n_local % shard_size == 0 else 1
        fully_shard(
            experts,
            shard_placement_fn=lambda p, dim=dim: Shard(dim),
            **{**kwargs, "reshard_after_forward": reshard_after_forward and id(experts) not in last},
        )
    return model


def _local_rows(w: torch.Tensor) -> int:
    return (w.to_local() if hasattr(w, "to_local") else w).shape[0]


# --------------------------------------------------------------------------- mesh

EP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")
"""The mesh dims with ep > 1 when ep is a multiple of cp: ``dp_shard`` split in two, the inner
factor (size ep / cp) times ``cp`` is the ep group."""
EP_IN_CP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp_mod_ep", "cp_in_ep", "tp")
"""The mesh dims with ep > 1 when ep is smaller than cp and divides it: ``cp`` split in two, the
inner factor (size ep) is the ep group."""
EXPERT_DP = "expert_dp_shard"
"""The flattened dim of the ``dp_shard x cp`` ranks outside an ep group: FSDP shards the experts over it."""


def ep_mesh_layout(d) -> tuple[tuple[int, ...], tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(shape, dim names, flattened dims) of the job mesh when ``d.ep > 1``.

    Expert parallel borrows its ranks from ``dp_shard x cp`` (the ranks that split the tokens),
    ep innermost, so an ep group is ep consecutive ranks of that block. With ``ep % cp == 0``
    it takes all of cp and ``ep / cp`` of dp_shard; with ``cp % ep == 0`` a part of cp.
    (:func:`~meshforge.parallel.job_checks.check_job` refuses the other splits.)
    """
    if d.ep % d.cp == 0:
        shape = (d.pp, d.dp_replicate, d.dp_shard * d.cp // d.ep, d.ep // d.cp, d.cp, d.tp)
        flat = {
            "dp_shard": ("dp_shard_mod_ep", "dp_shard_in_ep"),
            "ep": ("dp_shard_in_ep", "cp"),
            EXPERT_DP: ("dp_shard_mod_ep",),
        }
        if d.cp > 1:
            flat["dp_shard_cp"] = ("dp_shard_mod_ep", "dp_shard_in_ep", "cp")
        return shape, EP_MESH_DIMS, flat
    shape = (d.pp, d.dp_replicate, d.dp_shard, d.cp // d.ep, d.ep, d.tp)
    flat = {
        "cp": ("cp_mod_ep", "cp_in_ep"),
        "ep": ("cp_in_ep",),
        EXPERT_DP: ("dp_shard", "cp_mod_ep"),
        "dp_shard_cp": ("dp_shard", "cp_mod_ep", "cp_in_ep"),
    }
    return shape, EP_IN_CP_MESH_DIMS, flat


def build_ep_mesh(d, device_type: str) -> DeviceMesh:
    """The job mesh when ``d.ep > 1``, with the same rank order as the plain mesh.

    ``dp_shard x cp`` is built as an outer and an inner (size ep) factor (:func:`ep_mesh_layout`),
    and the names the other steps use are restored by flattening: ``dp_shard``, ``cp`` and
    ``dp_shard_cp`` (FSDP of non-expert params, the data split and the attention see exactly
    the usual dims), ``ep`` (the inner factor) and ``expert_dp_shard`` (the outer one). Expert
    weights are sharded over ``ep`` and FSDP-sharded over ``expert_dp_shard`` (and replicated
    over ``dp_replicate``).
    """
    from torch.distributed.device_mesh import init_device_mesh

    from .group_timeout import group_timeout, mesh_group_options, mesh_overrides

    shape, names, flat = ep_mesh_layout(d)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names, backend_override=mesh_overrides(shape, names))
    for name, dims in flat.items():
        mesh[dims if len(dims) > 1 else dims[0]]._flatten(name, backend_override=mesh_group_options(group_timeout()))
    return mesh


def expert_dp_mesh(mesh: DeviceMesh, d) -> DeviceMesh:
    """Where FSDP shards/replicates the expert weights: the data-parallel ranks outside the ep group."""
    return mesh["dp_replicate", EXPERT_DP] if d.dp_replicate > 1 else mesh[EXPERT_DP]


__all__ = [
    "EP_IN_CP_MESH_DIMS",
    "EP_MESH_DIMS",
    "EXPERT_DP",
    "apply_ep",
    "apply_expert_fsdp",
    "build_ep_mesh",
    "ep_mesh_layout",
    "expert_dp_mesh",
    "expert_modules",
]
