"""Predicted step time of a layout: compute at a stated efficiency, every collective with an
alpha-beta cost on the link it crosses, the pipeline bubble, and stated overlap.

Inputs: the device table (:mod:`.devices`), the model's FLOPs per token
(:func:`.compute.model_flops_per_token`: 6N + attention, summed over the blocks and the head), the layout,
``gpus_per_node``.

- Compute: by default op by op (:mod:`.roofline`) where the device has GEMM and attention curves
  (``efficiency.toml``) and ``hbm_bytes_per_s``: GEMMs and causal flash attention at their curves'
  points, memory-bound ops and the AdamW step as bytes / HBM bandwidth, recompute per AC mode, times
  the device's calibrated ``overhead``; the busiest pipeline rank's share (:mod:`.compute`: uneven
  layer splits and the output projection on the last stage); its parts kept for ``--why``. Under
  ``--efficiency F`` (and on a device without the curves or bandwidth: 0.5 of peak, times its GEMM
  curve at the layout's shapes relative to its best where it has one,
  :func:`.compute.shape_efficiency`): ``flops_per_token * tokens_per_step / world / (peak_bf16 * F)``
  on the busiest rank's share, times 4/3 under full activation checkpointing (one more forward) and
  1.03 under selective (norms, activations and RoPE again). The peak is the compute dtype's: bf16 on
  GPUs, fp32 on the CPU (whose ``cpu`` entry is one thread's measured matmul rate,
  ``bench/bench_plan_calibrate.py``).
- Time-sharing: a device with ``cores`` set (the CPU) runs at most that many ranks of a node at
  once; with more, every rank's compute and communication stretch by ranks per node / cores.
- Links: a mesh dim's group of ``n`` ranks at stride ``s`` (dims ``pp, dp_replicate,
  dp_shard, cp, tp``, tp innermost; ep is ep consecutive ranks of dp_shard x cp) stays inside a
  node when ``s * n <= gpus_per_node`` and uses NVLink; otherwise every ring step is
  limited by the per-GPU NIC.
- Costs (ring algorithms, ``S`` bytes of the whole tensor): all-gather and reduce-scatter
  ``(n-1) alpha + (n-1)/n S / bw``; all-reduce twice that; all-to-all ``(n-1) alpha + (n-1)/n
  S / bw`` of the rank's send buffer; point-to-point ``alpha + S / bw``.
- Collectives of one step: TP/SP per block and microbatch 2 all-gathers + 2 reduce-scatters of
  the ``B T D`` activations forward and the same backward (an MoE block, whose FFN runs
  replicated over tp: 4 all-gathers and 2 reduce-scatters; +2 all-gathers under selective AC,
  +4 under full, which recompute them), one of each for the embedding and the head, 3
  all-reduces of per-token numbers in the vocab-parallel loss (the dry run's trace); FSDP2 per
  microbatch one all-gather of each unit (compute dtype) forward, again backward under ZeRO-3
  (not the last block and the root); per step (``parallel.grad_sync = "step"``, the default; per
  microbatch under ``"microbatch"``) a reduce-scatter of its fp32 gradient, and under HSDP an
  all-reduce of the shard over ``dp_replicate`` -- under pp always once per step, and a
  resharding unit gathered ``m + 1`` times, as torch's ``PipelineStage`` runs FSDP2
  (:func:`fsdp_calls`; the dry run reads the same off the schedule's order); DeepSpeed ZeRO-1 one gradient all-reduce at
  the accumulation boundary, ZeRO-2 a reduce-scatter per microbatch (its gradient partitions
  are reduced in every backward), both one parameter all-gather per step, ZeRO-3 like
  FSDP2, all over ``dp x cp`` (the engine's group: cp ranks are data-parallel ranks to it); EP per MoE layer and microbatch 4
  all-to-alls of ``N k D`` (balanced routing); CP ``ring``: per layer ``cp-1`` point-to-point
  hops of the rank's K and V forward (twice under full AC) and backward, ``cp`` hops of fp32 dK, dV;
  CP ``alltoall``: per layer all-to-alls of q, k, v and the output forward and again backward;
  FSDP2 under cp shards over ``dp_shard x cp``; activations at ``T / cp`` tokens; PP two
  point-to-point sends of ``B T D`` per microbatch and stage boundary.
- Overlap: FSDP and DeepSpeed traffic runs behind the compute that runs while it is issued
  (prefetch, post-backward hooks): ZeRO-3 gathers behind the whole step, ZeRO-2's behind the
  forwards (under pp: the first microbatch's forward, the only one that gathers), gradient
  reductions behind the backwards -- or, reduced once per step (pp, ``grad_sync = "step"``,
  DeepSpeed ZeRO-1), behind the last microbatch's backward only; DeepSpeed ZeRO-1/2's gather of
  the updated parameters after the optimizer step behind nothing. What exceeds its window (and
  at least what exceeds the whole compute, and the first unit's all-gather) is exposed -- unless the device says
  ``comm_overlap = false`` (the CPU: gloo collectives are issued inline), when all of it is.
  TP, EP, CP and PP traffic sits on the critical path (exposed in full).
- Not modelled: per-operation software cost (Python, DTensor dispatch and sharding propagation,
  FSDP2's copy-in/copy-out, kernel launches), which dominates small models on the CPU, and
  load from other processes.
- Bubble: ``(pp-1) / (m v)`` of the compute (m microbatches, v stages per rank) for GPipe, 1F1B
  and interleaved 1F1B; a third of that for zero-bubble. The optimizer step and data loading
  are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import JobConfig
from .compute import heaviest_share, model_flops_per_token, shape_efficiency
from .devices import Device
from .layouts import ZERO_MODES, Layout
from .memory import _cached, microbatch_samples, n_microbatches
from .roofline import ComputeTerms, roofline_terms
from .state import unsharded_numel

DEFAULT_EFFICIENCY = 0.5
"""Fraction of the dense bf16 peak that the matmuls reach on a device without a GEMM curve in
``efficiency.toml`` (MFU of a well-tuned dense job ~40-55%)."""
AC_RECOMPUTE = {"none": 1.0, "selective": 1.03, "full": 4.0 / 3.0}


@dataclass
class Link:
    bw: float
    alpha: float
    name: str


def link_for(device: Device, stride: int, size: int, gpus_per_node: int) -> Link:
    if stride * size <= gpus_per_node:
        return Link(device.nvlink_bw, device.nvlink_latency, "nvlink")
    return Link(device.internode_bw, device.internode_latency, "internode")


def device_type(device: Device) -> str:
    """``cpu`` for the table's CPU entries (keys ``cpu`` or ``cpu-...``: fp32 compute), else ``cuda`` (bf16)."""
    return "cpu" if device.key.split("-")[0] == "cpu" else "cuda"


def time_sharing(device: Device, world: int, gpus_per_node: int) -> float:
    """How much slower each rank runs because ranks share compute slots: ranks per node / ``device.cores``
    when there are more ranks than cores on a node (the CPU), else 1."""
    per_node = min(world, gpus_per_node)
    return max(1.0, per_node / device.cores) if device.cores else 1.0


def ring(kind: str, n: int, nbytes: float, link: Link) -> float:
    if n <= 1:
        return 0.0
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * link.alpha + (n - 1) / n * nbytes / link.bw
    if kind == "all_reduce":
        return 2 * ((n - 1) * link.alpha + (n - 1) / n * nbytes / link.bw)
    if kind == "p2p":
        return link.alpha + nbytes / link.bw
    raise ValueError(kind)


@dataclass
class TimeEstimate:
    step_s: float
    compute_s: float
    bubble_fraction: float
    mfu: float
    tokens_per_s: float
    comm: list[dict] = field(default_factory=list)
    """``{group, op, bytes, count, link, seconds, exposed}`` per collective kind."""
    terms: dict[str, float] = field(default_factory=dict)
    """The step's seconds by term: ``compute``, ``bubble``, ``exposed <group>`` per critical-path group,
    ``exposed data parallel`` (what data-parallel traffic adds beyond compute); they sum to ``step_s``."""
    by_op: ComputeTerms | None = None
    """The compute's parts when priced op by op (:mod:`.roofline`); None under a flat efficiency."""

    @property
    def compute_parts(self) -> dict[str, float]:
        """The compute's seconds by kind when priced op by op: ``gemm``, ``attention``, ``memory``
        (memory-bound ops), ``optimizer``; they sum to ``compute_s``. Empty under a flat efficiency."""
        if self.by_op is None:
            return {}
        return {k: getattr(self.by_op, k) for k in ("gemm", "attention", "memory", "optimizer")}

    @property
    def n_collectives(self) -> float:
        """Collective calls of one step on the rank (every group and kind)."""
        return sum(c["count"] for c in self.comm)


def fsdp_calls(units: int, fixed: int, reshard: bool, mb: int, pipelined: bool, once: bool = True) -> tuple[int, int]:
    """FSDP2 all-gathers and reduce-scatters of one step on a rank holding ``units`` FSDP units (each
    block one, each stage module's root one if it holds parameters), ``fixed`` of them never resharded
    after forward (each stage's last block and its root).

    Without a pipeline every microbatch gathers each unit in forward, again in backward under ZeRO-3
    (``reshard``) except each stage's last block and root (never resharded), and reduce-scatters it
    once per step (``once``: ``parallel.grad_sync = "step"``, every backward but the last unsynced) or
    after every microbatch.
    Under a pipeline, torch's ``PipelineStage`` runs every backward with gradient sync and
    reshard-after-backward off and reduces once per step (``perform_reduce_grad``): one reduce-scatter
    per unit per step; a unit gathered by a backward stays gathered through the forward that follows
    it, so over any schedule's order of forwards and backwards a resharding unit gathers ``mb + 1``
    times (once per run of forwards or backwards, plus the forwards inside a run), the others once."""
    resharding = units - fixed if reshard else 0
    if not pipelined:
        return mb * (units + resharding), units if once else mb * units
    return resharding * (mb + 1) + (units - resharding), units


def estimate_time(
    cfg: JobConfig,
    layout: Layout,
    device: Device,
    gpus_per_node: int,
    efficiency: float | None = None,
    cache: dict | None = None,
    rank: int = 0,
) -> TimeEstimate:
    m = cfg.model
    world, tp, pp, cp, ep = layout.world_size, layout.tp, layout.pp, layout.cp, layout.ep
    B, T = microbatch_samples(cfg, layout), cfg.data.seq_len
    Tl = T // cp  # tokens of a sample on one rank
    from .memory import Precision

    e = Precision.for_device(device_type(device), cfg).act  # bf16 on GPU, fp32 on the CPU
    mb = n_microbatches(cfg, layout)
    tokens = cfg.train.global_batch_size * T
    if cache is None:
        cache = {}
    f_tok = model_flops_per_token(cfg, cache)
    share = time_sharing(device, world, gpus_per_node)
    sizes = _cached(cache, "unsharded", unsharded_numel, cfg, layout, rank)
    backend, reshard, stage = ZERO_MODES[layout.zero]
    # gradients accumulated unsharded and reduced once per step (else reduced into the shard every microbatch)
    once = pp > 1 or cfg.parallel.grad_sync == "step" or not layout.sharded or (backend, stage) == ("deepspeed", 1)
    by_op = None
    if efficiency is None:  # op by op where the device has the curves and bandwidth (roofline.py)
        by_op = roofline_terms(
            cfg, layout, B, mb, device.peak_bf16_flops, device.hbm_bytes_per_s, device.key, e, sizes,
            heaviest_share(cfg, layout, cache), once, cache,
        )  # fmt: skip
    if by_op is not None:
        compute = by_op.total * share
    else:
        if efficiency is None:  # 0.5, lowered where this layout's GEMMs are smaller than the device's best
            efficiency = DEFAULT_EFFICIENCY * (shape_efficiency(cfg, layout, B, device.key, cache) or 1.0)
        # a pipeline goes at the pace of its busiest rank: its stages' share of the FLOPs (1 / pp when balanced)
        busiest = heaviest_share(cfg, layout, cache) * pp
        flat = f_tok * tokens / world * busiest / (device.peak_bf16_flops * efficiency)
        compute = flat * AC_RECOMPUTE[layout.ac] * share
    spr = layout.spr
    bubble = (pp - 1) / (mb * spr) if pp > 1 else 0.0
    if layout.schedule == "zero_bubble" and pp > 1:
        bubble /= 3
    layers = m.n_layers / pp
    moe_layers = sum(1 for i in range(m.n_layers) if m.is_moe_layer(i)) / pp
    strides = {
        "tp": 1,
        "cp": tp,
        "dp_shard": tp * cp,
        "dp_shard_cp": tp,
        "dp_replicate": tp * cp * layout.dp_shard,
        "pp": tp * cp * layout.dp,
        "ep": tp,
        "dp_shard_mod_ep": tp * ep,
    }
    comm: list[dict] = []

    def add(group: str, op: str, n: int, nbytes: float, count: float, exposed: bool, behind: str = "") -> None:
        """``behind``: for traffic off the critical path, the compute it is issued during (:data:`WINDOWS`)."""
        if n <= 1 or count <= 0:
            return
        link = link_for(device, strides[group], n, gpus_per_node)
        secs = ring(op, n, nbytes, link) * count * share
        comm.append(
            {
                "group": group,
                "op": op,
                "group_size": n,
                "bytes": int(nbytes),
                "count": count,
                "link": link.name,
                "seconds": secs,
                "exposed": exposed,
                "behind": behind,
            }
        )

    act = B * Tl * m.dim * e
    # per block forward + backward: 4 all-gathers, and 4 reduce-scatters (2 in an MoE block, whose FFN
    # runs replicated over tp and hands back a slice); recompute adds gathers; the embedding and the
    # head one of each; the vocab-parallel loss 3 all-reduces of per-token numbers (as the dry run traces)
    ends = 2 if pp == 1 else 1
    ag = layers * (4 + {"none": 0, "selective": 2, "full": 4}[layout.ac]) + ends
    add("tp", "all_gather", tp, act, mb * ag, True)
    add("tp", "reduce_scatter", tp, act, mb * (4 * (layers - moe_layers) + 2 * moe_layers + ends), True)
    if cfg.parallel.loss_parallel:
        add("tp", "all_reduce", tp, 4 * B * Tl, mb * 3, True)
    kv = B * Tl * m.kv_heads * m.head_dim * e // tp  # one of K, V on a rank
    fwd = 2 if layout.ac == "full" else 1  # full AC runs each block's forward twice
    if layout.cp_method == "ring":  # K/V pass cp-1 hops forward and again backward; fp32 dK/dV cp hops
        add("cp", "p2p", cp, 2 * kv, mb * layers * (fwd + 1) * (cp - 1), True)
        add("cp", "p2p", cp, 2 * kv * 4 // e, mb * layers * cp, True)
    else:  # all-to-all: q, k, v to heads and the output back, forward and the same backward
        add("cp", "all_to_all", cp, B * Tl * m.n_heads * m.head_dim * e // tp, mb * layers * 2 * (fwd + 1), True)
        add("cp", "all_to_all", cp, kv, mb * layers * 2 * (fwd + 1), True)
    add("ep", "all_to_all", ep, B * Tl * m.moe_top_k * m.dim * e, mb * moe_layers * 4, True)
    if pp > 1:  # a stage's output is the residual stream, sequence-sharded over tp (SP): PipelineStage sends
        # each tp rank's local shard (torch.distributed.pipelining.stage: to_local_if_dtensor), act / tp
        add("pp", "p2p", 2, act // tp, mb * 2 * spr, True)
    w = Precision.for_device(device_type(device), cfg).compute_param
    fs, fs_group = layout.fsdp_shard, ("dp_shard_cp" if cp > 1 else "dp_shard")
    if backend == "fsdp2" and layout.sharded:
        total, units = sizes["all"], sizes["units"]
        unit = total / units
        gathers, reductions = fsdp_calls(units, min(units, spr + sizes["roots"]), reshard, mb, pp > 1, once)
        # ZeRO-3 gathers in forwards and backwards all step long; ZeRO-2 in each microbatch's forward, and under
        # pp in the first microbatch's only; reductions in every backward, or once: in the last backward
        gather_window = "step" if reshard else ("first forward" if pp > 1 else "forwards")
        reduce_window = "last backward" if once else "backwards"
        add(fs_group, "all_gather", fs, w * unit, gathers, False, gather_window)
        add(fs_group, "reduce_scatter", fs, 4 * unit, reductions, False, reduce_window)
        add("dp_replicate", "all_reduce", layout.dp_replicate, 4 * unit / fs, reductions, False, reduce_window)
    elif backend == "deepspeed":  # the engine's group is every rank, dp x cp (= dp_shard x cp: no tp/pp/HSDP)
        total = sizes["all"]
        if stage == 3:
            add(fs_group, "all_gather", fs, w * total, 2 * mb, False, "step")
            add(fs_group, "reduce_scatter", fs, w * total, mb, False, "backwards")
        else:  # ZeRO-2 reduces its gradient partitions in every microbatch's backward; ZeRO-1 accumulates
            # whole gradients and all-reduces them once, at the accumulation boundary
            if stage == 2:
                add(fs_group, "reduce_scatter", fs, w * total, mb, False, "backwards")
            else:
                add(fs_group, "all_reduce", fs, w * total, 1, False, "last backward")
            # the updated parameters, once per step, after the optimizer step: nothing left to hide behind
            add(fs_group, "all_gather", fs, w * total, 1, False, "none")
    exposed = sum(c["seconds"] for c in comm if c["exposed"])
    hidden = sum(c["seconds"] for c in comm if not c["exposed"])
    first_gather = 0.0
    if backend in ("fsdp2", "deepspeed") and layout.sharded:
        first_gather = ring(
            "all_gather", fs, w * sizes["largest_unit"], link_for(device, strides[fs_group], fs, gpus_per_node)
        )
    if not device.comm_overlap:  # issued inline (gloo on the CPU): every second of it is on the critical path
        dp_exposed = hidden
    else:
        # each kind of traffic hides behind the compute running while it is issued; all of it behind the step
        windows = {
            "step": compute,
            "forwards": compute / 3,
            "backwards": 2 * compute / 3,
            "first forward": compute / (3 * mb),
            "last backward": 2 * compute / (3 * mb),
            "none": 0.0,
        }
        by_window: dict[str, float] = {}
        for c in comm:
            if not c["exposed"]:
                by_window[c["behind"]] = by_window.get(c["behind"], 0.0) + c["seconds"]
        beyond = sum(max(0.0, secs - windows[name]) for name, secs in by_window.items())
        dp_exposed = max(first_gather * share, hidden - compute, beyond) if hidden else 0.0
    step = compute * (1 + bubble) + exposed + dp_exposed
    mfu = f_tok * tokens / (step * world * device.peak_bf16_flops)
    terms = {"compute": compute, "bubble": compute * bubble}
    for c in comm:
        if c["exposed"]:
            terms[f"exposed {c['group']}"] = terms.get(f"exposed {c['group']}", 0.0) + c["seconds"]
    terms["exposed data parallel"] = dp_exposed
    if by_op is not None and share != 1:  # time-shared cores stretch every part
        by_op = ComputeTerms(by_op.gemm * share, by_op.attention * share, by_op.memory * share, by_op.optimizer * share)
    return TimeEstimate(step, compute, bubble / (1 + bubble), mfu, tokens / step, comm, terms, by_op)
