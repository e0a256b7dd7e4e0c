"""Dry run: the real model and the real ``parallelize`` of a layout, at full world size, in one process.

PyTorch's fake process group (``init_process_group("fake")``) lets this process act as
rank ``R`` of any world size: every collective returns at once without moving data. The
model is built on the meta device (shapes only, no memory), the job's own checks run
(``check_layout``: the same ones ``meshforge train`` runs), then
:func:`meshforge.parallel.build_mesh` and :func:`meshforge.parallel.parallelize` shard it
exactly as on a cluster. What this rank then holds is measured from the tensors:

- ``params``: bytes of the local pieces of every parameter (``DTensor.to_local()``);
- ``grads``: a gradient of each parameter's own (sharded) shape is attached, as FSDP2 and
  DTensor leave them after backward;
- ``optimizer``: the job's real AdamW (``build_optimizer``) takes one step on those meta
  tensors, and the bytes of the state it creates are summed.

Collectives of one step are read off the sharded model: one record per FSDP unit (the
all-gather of its parameters in forward, again in backward when it reshards, as read off
the unit (``apply_fsdp`` never reshards the last block or the root) -- and the
reduce-scatter of its gradients, plus the all-reduce over ``dp_replicate`` under HSDP (once per step
under ``parallel.grad_sync = "step"``, else per microbatch); under a
pipeline as torch's ``PipelineStage`` runs them over the order of forwards and backwards that the
schedule class itself computes (:func:`stage_actions`, :func:`pipeline_gathers`): gradients
reduced once per step), per expert-parallel MoE layer (its all-to-alls), per pipeline
stage boundary (send/recv), per context-parallel attention core (the ring's K/V hops or the
all-to-alls, counted as ``ring_attention.py`` / ``ulysses.py`` issue them), and for dense models without pipeline the tensor-parallel
collectives traced with ``CommDebugMode`` on a TP-only copy (FSDP2 refuses to run a forward on
meta parameters): a meta copy of a dense model; for MoE models, whose routing needs real values,
a narrow copy of the same structure on the CPU (:func:`narrow_copy`). Counts are per step.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

from ..config import ConfigError, JobConfig
from ..models import resolve_objective
from .layouts import Layout, check_layout


@dataclass
class DryRunResult:
    rank: int
    world_size: int
    state: dict[str, int]
    """``params``, ``grads``, ``optimizer`` bytes held by this rank."""
    collectives: list[dict] = field(default_factory=list)
    """``{op, group, group_size, bytes, count}`` per kind of collective of one step."""
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """This process as ``rank`` of a fake process group of ``world_size`` ranks (torn down after)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def dry_run(cfg: JobConfig, layout: Layout, rank: int) -> DryRunResult:
    """Shard ``cfg``'s model for ``layout`` as rank ``rank`` of the full world; ConfigError if the code refuses."""
    import torch

    from ..models import MODEL_SPECS
    from ..parallel import build_mesh, parallelize
    from ..parallel.mesh import resolve_degrees
    from ..parallel.pipeline import plan_pipeline
    from ..pretrain.optim import build_optimizer

    if not 0 <= rank < layout.world_size:
        raise ConfigError(f"--rank {rank} is outside the world of {layout.world_size} ranks")
    job = check_layout(cfg, layout)
    if job.parallel.dp_backend == "deepspeed":
        raise ConfigError(
            "the dry run covers the fsdp2 backend; DeepSpeed's engine cannot be built on the meta "
            "device (deepspeed.initialize copies the model to its device, which meta tensors cannot "
            "do; with real weights the whole model would sit in this process), so its ZeRO numbers "
            "are the estimator's only"
        )
    job.parallel.compile = "off"  # compiling changes no shapes; keep the dry run fast
    d = resolve_degrees(job.parallel, layout.world_size)
    plan = plan_pipeline(job, d) if d.pp > 1 else None  # the split check_layout accepted
    with fake_world(rank, layout.world_size):
        mesh = build_mesh(d, torch.device("cpu"))
        with torch.device("meta"):
            model = MODEL_SPECS[job.model.family].build(job.model)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        model = parallelize(model, mesh, d, job, plan)
        params = list(dict.fromkeys(model.parameters()))  # a tied weight once
        state = {"params": sum(_nbytes(p) for p in params)}
        for p in params:
            p.grad = torch.zeros_like(p)
        state["grads"] = sum(_nbytes(p.grad) for p in params)
        optimizer = build_optimizer(
            model, job.optim, "meta"
        )  # foreach: the fused kernel takes no meta tensors; same state
        optimizer.step()
        state["optimizer"] = sum(
            _nbytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
        result = DryRunResult(rank, layout.world_size, state)
        result.collectives = _collectives(model, job, layout, d, mesh, result.notes)
    return result


def _n_microbatches(model, job: JobConfig, layout: Layout) -> int:
    if layout.pp > 1:
        return model.plan.n_microbatches  # the PipelineModel's split
    return job.train.global_batch_size // (layout.dp * job.train.micro_batch_size)


def _collectives(model, job: JobConfig, layout: Layout, d, mesh, notes: list[str]) -> list[dict]:
    from torch.distributed.fsdp import FSDPModule

    from ..parallel.expert_parallel import expert_modules

    mb = _n_microbatches(model, job, layout)
    width = (
        2
        if job.parallel.param_dtype == "bf16" or (job.parallel.param_dtype == "auto" and job.train.device == "cuda")
        else 4
    )
    out: list[dict] = []

    def add(op: str, group: str, size: int, nbytes: int, count: int) -> None:
        for rec in out:
            if (rec["op"], rec["group"], rec["bytes"]) == (op, group, nbytes):
                rec["count"] += count
                return
        out.append({"op": op, "group": group, "group_size": size, "bytes": nbytes, "count": count})

    experts = {id(e) for e in expert_modules(model)}
    parts = getattr(model, "parts", None) or [model]  # a PipelineModel: one FSDP root per stage
    orders = stage_actions(model.plan, model.stage_ids[0] % layout.pp) if layout.pp > 1 else {}
    for k, root in enumerate(parts):
        for unit in (m for m in root.modules() if isinstance(m, FSDPModule)):
            group = unit._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            shard = group.mesh_info.shard_mesh_size
            numel = sum(fp.padded_sharded_param_size.numel() * shard for fp in group.fsdp_params)
            name = "fsdp(experts)" if id(unit) in experts else "fsdp"
            reshard = group.post_forward_mesh_info is not None
            if layout.pp > 1:  # as the stage's schedule runs it: gradients reduced once, after the last backward
                gathers, reductions = pipeline_gathers(orders[model.stage_ids[k]], reshard), 1
            else:
                gathers = mb * (2 if reshard else 1)
                reductions = 1 if job.parallel.grad_sync == "step" else mb  # as LocalStep sets FSDP2's sync
            add("all_gather", name, shard, width * numel, gathers)
            add("reduce_scatter", name, shard, 4 * numel, reductions)
            replicate = getattr(group.mesh_info, "replicate_mesh_size", 1)
            if replicate > 1:
                add("all_reduce", "dp_replicate", replicate, 4 * numel // shard, reductions)
    n_ep = sum(1 for e in expert_modules(model) if hasattr(_local(e.w1), "shape") and layout.ep > 1)
    if n_ep:
        add("all_to_all(counts+tokens)", "ep", layout.ep, 0, mb * n_ep * 5)
        notes.append("ep all-to-all sizes depend on the routing; the time model assumes balanced experts")
    if layout.cp > 1:
        from ..parallel.context_parallel import ContextParallelCore

        cores = sum(1 for m in model.modules() if isinstance(m, ContextParallelCore))
        kv = (
            job.train.micro_batch_size
            * job.data.seq_len
            // layout.cp
            * job.model.kv_heads
            * job.model.head_dim
            // layout.tp
            * width
        )
        fwd = 2 if job.parallel.activation_checkpointing == "full" else 1
        if job.parallel.cp_method == "ring":  # the ring's hops, as ring_attention.py sends them
            add("send/recv(K,V)", "cp", layout.cp, 2 * kv, mb * cores * (fwd + 1) * (layout.cp - 1))
            add("send/recv(dK,dV fp32)", "cp", layout.cp, 2 * kv * 4 // width, mb * cores * layout.cp)
        else:
            add("all_to_all(q,k,v,out)", "cp", layout.cp, 0, mb * cores * 4 * (fwd + 1))
    if layout.pp > 1:
        plan = model.plan
        # the residual stream crosses stages as a DTensor sequence-sharded over tp (SP); PipelineStage sends
        # each rank's local shard (torch.distributed.pipelining.stage: to_local_if_dtensor)
        act = job.train.micro_batch_size * job.data.seq_len // layout.cp * job.model.dim * width // layout.tp
        boundaries = sum((s > 0) + (s < plan.n_stages - 1) for s in model.stage_ids)
        add("send/recv", "pp", 2, act, mb * 2 * boundaries)
    if layout.tp > 1 and layout.pp == 1 and resolve_objective(job) == "lm":
        for op, size, count in _trace_tp(job, mesh):
            add(op, "tp", layout.tp, size, count * mb)
        if job.model.moe_experts:
            notes.append(
                "tp collectives of the MoE model traced on a narrow copy with real values (routing needs "
                "them); the counts do not depend on the widths"
            )
    elif layout.tp > 1:
        notes.append("tp collectives not traced (pipeline or encoder-decoder model): see the estimate")
    return out


def stage_actions(plan, pp_rank: int) -> dict[int, str]:
    """The compute actions of each of ``pp_rank``'s stages in the order torch's schedule runs them
    (``F`` forward, ``B`` full backward, ``I``/``W`` its input and weight halves), read from the
    schedule class the runner builds (``pipeline_order``), given stand-in stages of the right indices."""
    import torch

    from ..parallel.pipeline import SINGLE_STAGE_SCHEDULES, schedule_class

    class Stage:  # what the schedules read of a stage when they compute their order
        def __init__(self, index: int):
            self.stage_index, self.num_stages = index, plan.n_stages
            self.group_size, self.group_rank = plan.pp, pp_rank
            self.is_first, self.is_last = index == 0, index == plan.n_stages - 1
            self.submod = torch.nn.Module()

    stages = [Stage(s) for s in plan.stages_of_rank(pp_rank)]
    cls = schedule_class(plan.schedule)
    single = plan.schedule in SINGLE_STAGE_SCHEDULES
    schedule = cls(stages[0] if single else stages, plan.n_microbatches, loss_fn=None, scale_grads=False)
    out = {s.stage_index: "" for s in stages}
    for action in schedule.pipeline_order[pp_rank]:
        kind = action.computation_type.value if action is not None else ""
        if kind in ("F", "B", "I", "W"):
            out[action.stage_index] += kind
    return out


def pipeline_gathers(actions: str, reshard: bool) -> int:
    """All-gathers of one FSDP unit over its stage's actions under ``PipelineStage``: each backward runs
    with reshard-after-backward off, so the unit stays gathered from a backward (``B``, ``I``) through
    the forward after it; a forward reshards it (``reshard``: ZeRO-3 blocks but the last); the weight
    half ``W`` uses what ``I`` left. The step ends resharded (``perform_reduce_grad``)."""
    gathered, n = False, 0
    for a in actions:
        if a in "FBI" and not gathered:
            n += 1
            gathered = True
        if a == "F" and reshard:
            gathered = False
    return n


def narrow_copy(job: JobConfig, tp: int) -> JobConfig:
    """The job with the same structure (layers, heads, experts, routing, tying, QK-norm) but the smallest
    widths TP accepts: 4 per head, FFN and vocab widths of a few per tp rank, a sequence of 2 per tp rank."""
    import copy
    from dataclasses import replace

    m = job.model
    narrow = replace(
        m,
        dim=4 * m.n_heads,
        ffn_dim=4 * tp,
        moe_ffn_dim=4 * tp if m.moe_experts else 0,
        vocab_size=8 * tp,
        max_seq_len=max(2 * tp, 8),
    )
    out = copy.copy(job)
    out.model, out.data = narrow, replace(job.data, seq_len=2 * tp)
    return out


def _trace_tp(job: JobConfig, mesh) -> list[tuple[str, int, int]]:
    """TP collectives of one microbatch's forward+backward, traced with CommDebugMode on a TP-only meta copy."""
    import torch
    from torch.distributed.tensor.debug import CommDebugMode

    from ..models import MODEL_SPECS
    from ..parallel.loss_parallel import lm_loss_fn
    from ..parallel.tensor_parallel import apply_tp

    # MoE routing needs values (top-k, bincount, per-expert splits): a narrow copy on the CPU, whose
    # collectives the fake process group completes without data; dense models on the meta device
    device = "cpu" if job.model.moe_experts else "meta"
    if device == "cpu":
        job = narrow_copy(job, mesh["tp"].size())
    with torch.device(device):
        model = MODEL_SPECS[job.model.family].build(job.model)
    model.tie_weights()
    model = apply_tp(model, mesh["tp"], job.parallel)
    tokens = torch.zeros(job.train.micro_batch_size, job.data.seq_len, dtype=torch.long, device=device)
    mode = CommDebugMode()
    # CommDebugMode's module tracker hooks every module's backward; the embedding's input (token
    # ids) needs no gradient, so torch notes that its full backward hook fires on outputs only --
    # expected here, and nothing a user can act on
    with mode, warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing when gradients are computed", category=UserWarning
        )
        logits = model(tokens)
        lm_loss_fn(job, mesh["tp"].size())(logits, tokens, job.train.z_loss_coef).total.backward()
    return [(str(op).split(".")[-1].rstrip("_"), 0, n) for op, n in mode.get_comm_counts().items()]
