"""Sparse Mixture-of-Experts feed-forward (Switch / ST-MoE / Mixtral / DeepSeek style).

For the tokens x_1..x_N of a batch (flattened), with E experts and top-k routing:

    logits = x W_r^T                      (fp32)
    s      = softmax(logits) | sigmoid(logits)
    S_t    = top-k of (s_t + b)            (b: aux-loss-free bias, 0 unless enabled)
    g_t,e  = c s_t,e for e in S_t          (renormalised to sum 1 if norm_topk; c = moe_routed_scale)
    y_t    = sum_{e in S_t} g_t,e FFN_e(x_t) + sum_shared FFN_s(x_t)

Capacity routing keeps, per expert, the ceil(cf * N * k / E) assignments with the highest
router probability and drops the rest (their share of y_t is simply absent).

Losses (added to the training loss through the gradient, see :class:`AuxLossToGrad`):

    load balance = E * sum_e f_e P_e      f_e: fraction of the N*k assignments to e,
                                           P_e: mean router probability of e
                                           (under context parallel a rank holds part of the N
                                           tokens: f_e counts all of them, P_e the rank's own, so
                                           the ranks' mean loss and gradient are the whole's)
    router z     = mean_t logsumexp(logits_t)^2

The experts are one module (:class:`GroupedExperts`) taking tokens already sorted by
expert plus the count per expert, so expert parallelism can wrap it with an all-to-all
without touching this file.

Router statistics (expert load, aux and z losses, dropped assignments) are not module state:
a training step owns a :class:`RouterStats` collector and lends it to the layers for its
forward passes (:func:`collect_router_stats`); each training forward adds one row to it. A
forward that autograd runs inside a backward -- activation checkpointing recomputing the
block -- computes the same row (the recomputation must run the same ops) but does not add it,
so the statistics do not depend on whether or how much is recomputed.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import FeedForward, init_linear, matmul_dtype


class AuxLossToGrad(torch.autograd.Function):
    """Identity on ``x``; in backward, also sends gradient ``scale`` into ``aux``.

    This adds ``scale * aux`` to whatever loss is differentiated, wherever the loss is
    computed (another pipeline stage included), without changing any output.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32, device=grad.device), None


def _local(w: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded, DTensor) weight held by this process."""
    return w.to_local() if hasattr(w, "to_local") else w


def swiglu_grouped(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """All experts' SwiGLU in three grouped GEMMs; ``x`` sorted by expert, ``counts`` per expert."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs))
    h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)


def swiglu_loop(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """The same, one expert at a time (any device and dtype)."""
    outs = []
    for e, chunk in enumerate(torch.split(x, counts.tolist())):
        h = F.silu(chunk @ w1[e].T) * (chunk @ w3[e].T)
        outs.append(h @ w2[e].T)
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; input tokens sorted by expert."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, dim] sorted by expert, counts [E_local] tokens per expert -> [M, dim].

        The weights may be sharded over experts by expert parallelism: only this rank's
        experts (the local part of the weights) take part, and ``counts`` has one entry each.
        """
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        dtype = matmul_dtype(x)
        if x.is_cuda and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16:
            return swiglu_grouped(x.to(dtype), w1.to(dtype), w2.to(dtype), w3.to(dtype), counts)
        return swiglu_loop(x, w1, w2, w3, counts)

    def init_weights(self, std: float, out_std: float) -> None:
        for w, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            nn.init.trunc_normal_(w, mean=0.0, std=s, a=-3 * s, b=3 * s)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.moe_experts
        self.top_k = cfg.moe_top_k
        self.score = cfg.moe_score
        self.norm_topk = cfg.moe_norm_topk
        self.routed_scale = cfg.moe_routed_scale
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_coef = cfg.moe_aux_loss_coef
        self.z_coef = cfg.moe_z_loss_coef
        self.router = nn.Linear(cfg.dim, cfg.moe_experts, bias=False)
        self.experts = GroupedExperts(cfg.moe_experts, cfg.dim, cfg.expert_dim)
        self.shared = FeedForward(cfg.dim, cfg.expert_dim * cfg.moe_shared_experts) if cfg.moe_shared_experts else None
        self.register_buffer("route_bias", torch.zeros(cfg.moe_experts), persistent=True)
        self.count_tokens = same_counts
        """Assignments per expert of this forward's tokens -> of all N tokens the balance loss is
        over (the same counts; context parallel, where a rank holds part of each sequence, sums them)."""
        self.collector: RouterStats | None = None
        """The step's collector while a step runs (see :func:`collect_router_stats`), else None."""

    def route(self, x: torch.Tensor):
        """-> (expert ids [N, k], weights [N, k], fp32 logits [N, E], probabilities [N, E])."""
        with torch.autocast(x.device.type, enabled=False):  # the router stays fp32 under bf16 autocast
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        chosen = (probs + self.route_bias).topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, chosen)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
        if self.routed_scale != 1.0:
            weights = weights * self.routed_scale
        return chosen, weights, logits, probs

    def keep_mask(self, expert_ids: torch.Tensor, expert_probs: torch.Tensor, n_tokens: int) -> torch.Tensor | None:
        """Capacity routing: per expert, keep the highest-probability assignments (None = dropless)."""
        if not self.capacity_factor:
            return None
        capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        flat_e, flat_w = expert_ids.flatten(), expert_probs.detach().flatten()
        # order by expert, then by decreasing weight; rank within the expert decides
        order = torch.argsort(flat_e * 2.0 - flat_w.clamp(0, 1), stable=True)
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
        return (rank < capacity).view_as(expert_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        expert_ids, weights, logits, probs = self.route(x)
        keep = self.keep_mask(expert_ids, probs.gather(1, expert_ids), n)

        flat_e = expert_ids.flatten()
        flat_tok = torch.arange(n, device=x.device).repeat_interleave(self.top_k)
        flat_w = weights.flatten()
        if keep is not None:
            kept = keep.flatten()
            flat_e, flat_tok, flat_w = flat_e[kept], flat_tok[kept], flat_w[kept]
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        expert_out = self.experts(x[flat_tok[order]], counts)
        y = torch.zeros_like(x, dtype=expert_out.dtype)
        y.index_add_(0, flat_tok[order], expert_out * flat_w[order, None].to(expert_out.dtype))
        if self.shared is not None:
            y = y + self.shared(x)

        assigned = torch.bincount(expert_ids.flatten(), minlength=self.n_experts).float()
        all_assigned = self.count_tokens(assigned)  # N * k in all
        balance = self.n_experts * torch.sum(all_assigned / all_assigned.sum() * probs.mean(0))
        z = torch.logsumexp(logits, -1).square().mean()
        collector = self.collector
        if self.training:  # validation batches neither count in the metrics nor move the routing bias
            row = stats_row(counts, assigned, balance, z)
            if collector is not None and not recomputing():
                collector.add(self, row)
        aux = self.aux_coef * balance + self.z_coef * z
        if self.training and (self.aux_coef or self.z_coef) and torch.is_grad_enabled():
            scale = collector.aux_grad_scale if collector is not None else 1.0
            y = AuxLossToGrad.apply(y, aux, scale)
        return y.to(x.dtype).view(shape)

    def init_weights(self, std: float, out_std: float) -> None:
        init_linear(self.router, std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            for lin in (self.shared.w1, self.shared.w3):
                init_linear(lin, std)
            init_linear(self.shared.w2, out_std)
        self.route_bias.zero_()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded."""
        self.route_bias += rate * torch.sign(load.float().mean() - load.float())


def same_counts(counts: torch.Tensor) -> torch.Tensor:
    """The default :attr:`MoE.count_tokens`: this forward's tokens are all the tokens."""
    return counts


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


STAT_KEYS = ("aux_loss", "z_loss", "dropped", "assigned", "passes")
"""The scalar columns of a statistics row; the expert load (tokens kept per expert) follows."""


@torch.no_grad()
def stats_row(
    kept_counts: torch.Tensor, assigned: torch.Tensor, balance: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """One forward pass of one layer as a row: the :data:`STAT_KEYS` sums, then the load per expert."""
    scalars = torch.stack(
        [
            balance.detach().float(),
            z.detach().float(),
            (assigned.sum() - kept_counts.sum()).float(),
            assigned.sum(),
            torch.ones((), device=assigned.device),
        ]
    )
    return torch.cat([scalars, kept_counts.float()])


def recomputing() -> bool:
    """Whether this forward runs inside a backward: activation checkpointing's recomputation.

    (torch's own checkpoint tells recomputations apart by the same graph-task id.) A compiled
    block never reruns this Python: it recomputes inside its compiled backward."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class RouterStats:
    """The router statistics of a training step's forward passes: what a step owns and reduces.

    ``rows[layer]`` is a list with one :func:`stats_row` per training forward of that MoE
    layer; ``aux_grad_scale`` is the weight of the layers' aux losses in the gradient (the step
    sets 1 / its number of microbatches, as each microbatch's loss is weighted).
    """

    def __init__(self, aux_grad_scale: float = 1.0):
        self.aux_grad_scale = aux_grad_scale
        self.rows: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)

    def add(self, layer: nn.Module, row: torch.Tensor) -> None:
        self.rows[layer].append(row)

    def keep_last(self, n: int) -> None:
        """Keep each layer's last ``n`` rows (a pipeline schedule's extra shape-inference pass runs first)."""
        for rows in self.rows.values():
            del rows[:-n]

    def sums(self, layer: nn.Module) -> torch.Tensor | None:
        """The layer's rows summed (None when it ran no training forward)."""
        rows = self.rows.get(layer)
        return torch.stack(rows).sum(0) if rows else None


@contextlib.contextmanager
def collect_router_stats(modules: nn.Module | list[nn.Module], stats: RouterStats):
    """Lend ``stats`` to every MoE layer of ``modules`` for the forwards run inside the block."""
    layers = [m for module in (modules if isinstance(modules, list) else [modules]) for _, m in moe_layers(module)]
    for m in layers:
        m.collector = stats
    try:
        yield stats
    finally:
        for m in layers:
            m.collector = None
