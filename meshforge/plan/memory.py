"""Per-GPU memory of a layout, by kind: ``params``, ``grads``, ``optimizer`` (exact, from
:mod:`.state`), ``activations`` and ``comm_buffers`` (modelled, stated below), and ``total``, the
peak of a step: the state plus the larger of the backward peak (activations, communication
buffers) and the optimizer step's temporaries (``optimizer_step``: none for the fused AdamW that
meshforge runs on CUDA and CPU, one parameter-sized buffer for the multi-tensor one elsewhere). Gradients count in the backward
peak only when a backward ran before it (:func:`grads_live_at_peak`) -- as FSDP2's unsharded fp32 gradients
(``grad_accum``) where they accumulate unreduced over microbatches (:func:`accumulation_bytes`); the backward peak is the larger
of the in-flight peak and the last microbatch's backward, when every gradient exists
(:func:`backward_peak`).

Activations are counted tensor by tensor from what autograd keeps for the backward of one
block of this codebase's models (``models/layers.py``, ``models/moe.py``), per microbatch of
``B`` samples of ``T`` tokens, ``e`` bytes per element (2 under bf16 autocast on GPU, 4 in
fp32 on the CPU); under TP the stream is sequence-sharded (``/tp``) and the gathered norm
output is whole:

- dense block: both norm inputs (fp32: ``2 * 4 * BTD/tp``), both gathered norm outputs
  (``2 e BTD``), q, k, v after RoPE, the attention output and its re-laid-out copy for ``wo``
  (``e BT (3D + 2Dkv)/tp``), the SDPA log-sum-exp, QK-norm inputs if any, and the four
  ``BTF/tp`` tensors of SwiGLU (w1 out, silu out, w3 out, their product);
- MoE block (replicated over tp): the gathered input, router logits and probabilities (fp32),
  the expert-sorted tokens and the expert outputs (``2 e N k D``), four ``N k F`` per SwiGLU,
  shared experts like a dense FFN;
- the head: final norm input/output and the loss's fp32 logits-sized buffers at their peak
  (``BTV/tp`` each, :func:`head_activation_bytes`); under ``train.fused_loss``
  no logits, but ``dh``, an fp32 ``dW`` and one chunk of logits;
- activation checkpointing: ``full`` keeps each block's input; ``selective`` keeps the block
  input and the outputs of the matmuls and attention (``SAVE_OPS``); both rebuild one block's
  activations at a time in backward, whose backward also holds two ``BTF/tp`` gradients of its
  SwiGLU intermediates. That block is added once -- or the head's buffers, if larger:
  those are freed by the output layer's backward, before the first block is rebuilt;
- pipeline: a rank keeps its blocks' activations for every microbatch in flight (1F1B: ``pp``
  on stage 0; interleaved / zero-bubble: Megatron's ``pp + (pp-1)/v``-ish count; GPipe: all),
  plus each in-flight microbatch's stage input;
- context parallel: every term above at ``T / cp`` tokens (:func:`local_seq_len`).

Communication buffers: ring attention's K/V (and dK/dV) blocks in flight, all-to-all's
re-laid-out q/k/v; FSDP2 keeps the root's gathered weights (embedding, final norm, output: never
resharded) and the running block's while it gathers the next (compute dtype; ZeRO-2-like, no
reshard: every unit's), the root's output-side gradient from the start of backward to its end
(the root reduces last), and one block's unsharded gradient plus the fp32 reduce-scatter input
FSDP2 copies it into whatever the dtypes; pipeline send/recv buffers; DeepSpeed's
reduce/all-gather buckets (5e8 elements each), under ZeRO-3 the gather one at least the largest
single parameter (gathered whole when its module runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import JobConfig
from ..models import family_spec
from ..parallel.job_checks import use_fused_loss
from .layouts import ZERO_MODES, Layout
from .state import state_bytes, unsharded_numel

DS_BUCKET = 500_000_000
"""DeepSpeed's default reduce and all-gather bucket, elements."""
KINDS = ("params", "grads", "optimizer", "activations", "comm_buffers")
"""The per-GPU byte keys of an estimate (``--json`` prints them)."""


@dataclass(frozen=True)
class Precision:
    act: int
    """Bytes per activation element (autocast dtype)."""
    compute_param: int
    """Bytes per element of the unsharded compute copy FSDP2 gathers."""

    @staticmethod
    def for_device(device_type: str, cfg: JobConfig | None = None) -> "Precision":
        if cfg is not None and cfg.train.dtype != "auto":
            act = 2 if cfg.train.dtype == "bf16" else 4
        else:
            act = 2 if device_type != "cpu" else 4
        return Precision(act, act)


def block_activation_bytes(cfg: JobConfig, layer: int, B: int, T: int, tp: int, e: int) -> dict[str, int]:
    """Bytes one block keeps for backward, per microbatch: ``none``, ``selective``, ``full``."""
    m = cfg.model
    D, Dkv, H = m.dim, m.kv_heads * m.head_dim, m.n_heads
    Dq = H * m.head_dim  # D unless model.head_size is set apart from dim / n_heads
    BT = B * T
    stream = BT * D // tp
    attn = 2 * 4 * stream + 2 * e * BT * D + e * BT * (3 * Dq + 2 * Dkv) // tp + 4 * B * (H // tp) * T
    if m.qk_norm:
        attn += 4 * BT * (Dq + Dkv) // tp
    mm_attn = e * BT * (Dq + 2 * Dkv) // tp + e * BT * D + e * BT * Dq // tp + 4 * B * (H // tp) * T  # q,k,v,wo,sdpa
    if m.is_moe_layer(layer):
        N, k, F, E = BT, m.moe_top_k, m.expert_dim, m.moe_experts
        ffn = e * N * D + 2 * e * N * k * D + 4 * e * N * k * F + 2 * 4 * N * E
        mm_ffn = 3 * e * N * k * F // 1 + e * N * k * D + 4 * N * E  # w1, w3, w2 outputs, router logits
        if e != 4:
            ffn += 4 * N * D  # the router's fp32 copy of its input
        if m.moe_shared_experts:
            Fs = F * m.moe_shared_experts
            ffn += 4 * e * N * Fs
            mm_ffn += 2 * e * N * Fs + e * N * D
    else:
        F = m.hidden_dim
        ffn = 4 * e * BT * F // tp
        mm_ffn = 2 * e * BT * F // tp + e * BT * D
    block_input = e * stream if e != 4 else 4 * stream
    temps = 2 * e * BT * (m.moe_top_k * m.expert_dim if m.is_moe_layer(layer) else m.hidden_dim // tp)
    return {
        "none": attn + ffn,
        "selective": block_input + mm_attn + mm_ffn,
        "full": block_input,
        "backward_temps": temps,
    }


def head_activation_bytes(cfg: JobConfig, B: int, T: int, tp: int, e: int, fused: bool = False) -> int:
    """Final norm, output projection and loss at their peak, in fp32 ``BTV/tp`` logits-sized buffers
    (the logits themselves are freed after the forward) -- vocab-parallel loss (tp > 1): the logits,
    the shifted logits and their exponentials in forward (3; its backward works in place);
    ``lm_loss`` without z-loss (``F.cross_entropy``): log-softmax's saved output, then in backward
    the NLL's gradient and log-softmax's (3; on a CPU, over row blocks, 2); with z-loss: the saved
    logits and the gradient written in place (2).

    ``fused`` (``train.fused_loss`` on, ``kernels/fused_loss.py``): no ``[tokens, vocab]`` logits.
    The loss keeps ``dh`` (``BTD``, hidden dtype) and an fp32 ``dW`` (``VD/tp``); in 16 bits (``e``
    = 2) its matmuls take a 16-bit copy of an fp32 weight (or, with 16-bit parameters, return dW in
    16 bits), and it holds one chunk's fp32 logits, plus their 16-bit copy in 16 bits (the default
    chunk makes a chunk's logits about ``BTD/tp`` elements)."""
    BT, V, D = B * T, cfg.model.vocab_size, cfg.model.dim
    norm = 4 * BT * D // tp + e * BT * D
    if fused:  # under tp the fused loss is vocab-parallel: the weight, dW and a chunk's logits are V / tp wide
        Vl, low = V // tp, e if e != 4 else 0
        return norm + e * BT * D + 4 * Vl * D + low * Vl * D + (4 + low) * BT * D // tp
    buffers = 3 if (tp > 1 and cfg.parallel.loss_parallel) or not cfg.train.z_loss_coef else 2
    return norm + buffers * 4 * BT * V // tp


def fused_loss_on(cfg: JobConfig, layout: Layout) -> bool:
    """Whether the job runs the fused output + loss (``train.fused_loss``, resolved as the trainer does)."""
    return use_fused_loss(cfg, layout.degrees, cfg.train.device)


def in_flight(layout: Layout, n_microbatches: int, spr: int, pp_rank: int) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak (in units of all its blocks)."""
    pp = layout.pp
    if pp == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(n_microbatches)
    if spr == 1:  # 1F1B: stage r keeps pp - r
        return float(min(n_microbatches, pp - pp_rank))
    # interleaved (Megatron): rank r warms up with (pp - r - 1) * 2 + (v - 1) * pp + 1 chunk-microbatches
    chunks = (pp - pp_rank - 1) * 2 + (spr - 1) * pp + 1
    return min(float(n_microbatches), chunks / spr)


def n_microbatches(cfg: JobConfig, layout: Layout) -> int:
    """Forward/backward passes per step on a rank (``parallel.pp_microbatches`` when a pipeline sets it)."""
    if layout.pp > 1 and cfg.parallel.pp_microbatches:
        return cfg.parallel.pp_microbatches
    return cfg.train.global_batch_size // (layout.dp * layout.micro_batch_size)


def microbatch_samples(cfg: JobConfig, layout: Layout) -> int:
    return cfg.train.global_batch_size // layout.dp // n_microbatches(cfg, layout)


def local_seq_len(cfg: JobConfig, layout: Layout) -> int:
    """Tokens of a sample on one rank: ``seq_len / cp`` (context parallel keeps 2 zigzag chunks per rank;
    all-to-all attention holds the whole sequence for ``heads / cp``: the same number of elements)."""
    return cfg.data.seq_len // layout.cp


def activation_bytes(cfg: JobConfig, layout: Layout, pp_rank: int, prec: Precision, late: bool = False) -> int:
    """Activations at the in-flight peak; ``late``: during the backward of the last microbatch (one
    microbatch's saved activations, the rebuilt block and one stage input), when every gradient exists
    -- none when the rank runs a single microbatch without a pipeline: its gradients then appear only
    as its own backward frees its activations, so the two never add up."""
    from ..parallel.mesh import pipeline_stages_per_rank
    from .state import _stage_layers

    B, T, tp, e = microbatch_samples(cfg, layout), local_seq_len(cfg, layout), layout.tp, prec.act
    held, first, last = _stage_layers(cfg, layout, pp_rank)
    kinds: dict[bool, dict[str, int]] = {}  # a dense and an MoE block: every block of a kind keeps the same
    for i in held:
        moe = cfg.model.is_moe_layer(i)
        if moe not in kinds:
            kinds[moe] = block_activation_bytes(cfg, i, B, T, tp, e)
    per = [kinds[cfg.model.is_moe_layer(i)] for i in held]
    ac = layout.ac
    saved = sum(p[ac] for p in per)
    # with checkpointing, one block is rebuilt at a time in backward; its backward then also holds the
    # gradients of two of its largest intermediates (SwiGLU's B T F/tp)
    rebuild = max((p["none"] - p[ac] + p["backward_temps"] for p in per), default=0) if ac != "none" else 0
    spr = pipeline_stages_per_rank(cfg.parallel) if layout.pp > 1 else 1
    n = in_flight(layout, n_microbatches(cfg, layout), spr, pp_rank)
    # the head's buffers live from the loss to the output layer's backward, before any block is rebuilt
    head = head_activation_bytes(cfg, B, T, tp, e, fused_loss_on(cfg, layout)) if last else 0
    if late:
        if layout.pp == 1 and n_microbatches(cfg, layout) == 1:
            return 0
        n, head = 1, 0
    total = n * saved + max(rebuild, head)
    if layout.pp > 1:
        total += n * e * B * T * cfg.model.dim // tp  # each in-flight microbatch's stage input
    return int(total)


def _cut_key(layout: Layout, rank: int) -> tuple:
    """What the state of a rank depends on (not the AC mode, the micro-batch or an equal-split schedule)."""
    return (
        layout.tp,
        layout.pp,
        layout.dp_replicate,
        layout.dp_shard,
        layout.ep,
        layout.cp,
        layout.zero,
        layout.spr,
        layout.pp_split,
        rank,
    )


def _cached(cache: dict | None, what: str, fn, cfg: JobConfig, layout: Layout, rank: int):
    if cache is None:
        return fn(cfg, layout, rank)
    key = (what, *_cut_key(layout, rank))
    if key not in cache:
        cache[key] = fn(cfg, layout, rank)
    return cache[key]


def comm_buffer_bytes(cfg: JobConfig, layout: Layout, rank: int, prec: Precision, cache: dict | None = None) -> int:
    backend, reshard, _ = ZERO_MODES[layout.zero]
    out = 0
    B, T, m = microbatch_samples(cfg, layout), local_seq_len(cfg, layout), cfg.model
    if layout.pp > 1:
        out += 2 * prec.act * B * T * m.dim
    if layout.cp > 1:
        kv = prec.act * B * T * m.kv_heads * m.head_dim // layout.tp  # one of K, V on this rank
        if layout.cp_method == "ring":  # K/V in flight twice over (send + receive); backward adds dK/dV
            out += 2 * 2 * kv + 2 * 2 * kv
        else:  # all-to-all: re-laid-out send and receive copies of q, k, v
            out += 2 * (prec.act * B * T * m.dim // layout.tp + 2 * kv)
    if backend == "fsdp2" and layout.sharded:
        sizes = _cached(cache, "unsharded", unsharded_numel, cfg, layout, rank)
        w, block, root = prec.compute_param, sizes["largest_block"], sizes["root"]
        # gathered weights: the root's (never resharded) and the block running plus the next one prefetched,
        # or every unit when nothing reshards
        out += w * (root + 2 * block if reshard else sizes["all"])
        # the root's output-side gradient, made first and reduced only when the root's backward ends; one
        # block's unsharded gradient and FSDP2's fp32 reduce-scatter input it is copied into
        out += w * sizes["root_grad_early"] + (w + 4) * block
    elif backend == "deepspeed":
        sizes = _cached(cache, "unsharded", unsharded_numel, cfg, layout, rank)
        bucket = min(sizes["all"], DS_BUCKET)
        # ZeRO-3 gathers each parameter whole when its module runs, however large the buckets are set
        gathered = max(bucket, sizes["largest_param"]) if ZERO_MODES[layout.zero][2] == 3 else bucket
        out += prec.compute_param * (bucket + gathered)
    return out


def accumulation_bytes(cfg: JobConfig, layout: Layout, rank: int, cache: dict | None = None) -> int:
    """FSDP2's unsharded fp32 gradients kept between backwards when a rank's gradients are reduced once per
    step over several microbatches -- under pp (torch's ``PipelineStage``) or ``parallel.grad_sync = "step"``:
    every unit's whole gradient in the reduce dtype (fp32), from the first backward until the unit reduces in
    the last one. None when each microbatch reduces, or nothing is sharded."""
    backend = ZERO_MODES[layout.zero][0]
    if backend != "fsdp2" or not layout.sharded or n_microbatches(cfg, layout) == 1:
        return 0
    if layout.pp == 1 and cfg.parallel.grad_sync != "step":
        return 0
    return 4 * _cached(cache, "unsharded", unsharded_numel, cfg, layout, rank)["all"]


def optimizer_step_bytes(state: dict[str, int], device_type: str) -> int:
    """Temporaries of the optimizer step: the fused AdamW (``pretrain/optim.py``, on CUDA and CPU) none;
    the multi-tensor (foreach) one used elsewhere one parameter-sized buffer (the square roots of exp_avg_sq)."""
    return 0 if device_type in ("cuda", "cpu") else state["params"]


def grads_live_at_peak(cfg: JobConfig, layout: Layout, pp_rank: int) -> bool:
    """Whether the gradients already exist when activations peak: only when a backward ran before the
    peak, i.e. when a rank runs more microbatches than it keeps in flight (gradient accumulation, or
    a pipeline's steady state); a single microbatch peaks at the start of its own backward."""
    from ..parallel.mesh import pipeline_stages_per_rank

    spr = pipeline_stages_per_rank(cfg.parallel) if layout.pp > 1 else 1
    n = n_microbatches(cfg, layout)
    return n > in_flight(layout, n, spr, pp_rank)


def backward_peak(est: dict[str, int]) -> int:
    """Memory on top of parameters and optimizer state at the backward peak: the in-flight peak, or
    the last microbatch's backward with every gradient allocated, whichever is larger."""
    # accumulating unreduced (``grad_accum``), the unsharded gradients stand where the sharded ones will be
    # (those are set to None between steps and written as each unit reduces, its unsharded one then freed)
    grads = max(est["grads"], est.get("grad_accum", 0))
    early = est["activations"] + (grads if est["grads_live"] else 0)
    return max(early, grads + est["activations_late"]) + est["comm_buffers"]


def _total(est: dict[str, int]) -> int:
    """The step's peak: the state at rest, then the backward peak or the optimizer step (every gradient
    and the step's temporaries), whichever is larger."""
    return est["params"] + est["optimizer"] + max(backward_peak(est), est["grads"] + est["optimizer_step"])


def _cached_activations(
    cfg: JobConfig, layout: Layout, pp_rank: int, prec: Precision, cache: dict | None
) -> tuple[int, int]:
    """:func:`activation_bytes` at the in-flight peak and late, shared by layouts that differ only in their
    data-parallel mode within a backend (FSDP2's ZeRO-3 / ZeRO-2, DeepSpeed's stages)."""
    key = (
        "activations",
        layout.tp,
        layout.pp,
        layout.cp,
        layout.cp_method,
        layout.ep,
        layout.dp_replicate,
        layout.dp_shard,
        ZERO_MODES[layout.zero][0],
        layout.schedule,
        layout.spr,
        layout.pp_split,
        layout.micro_batch_size,
        layout.ac,
        pp_rank,
    )
    if cache is not None and key in cache:
        return cache[key]
    out = (activation_bytes(cfg, layout, pp_rank, prec), activation_bytes(cfg, layout, pp_rank, prec, late=True))
    if cache is not None:
        cache[key] = out
    return out


def candidate_stages(cfg: JobConfig, layout: Layout) -> list[int]:
    """Pipeline ranks that can be the fullest. With blocks all alike (a decoder, all dense or all MoE) the
    first rank holds at least as many blocks as any other (a split gives the first stages the extra
    layers), the embedding, and the most microbatches in flight; the last holds the head: those two.
    Otherwise (an encoder-decoder, MoE after dense layers, a user's ``pp_split``) every rank."""
    m = cfg.model
    if layout.pp <= 2:
        return list(range(layout.pp))
    if family_spec(m.family).uniform_blocks(m) and not cfg.parallel.pp_split:
        return [0, layout.pp - 1]
    return list(range(layout.pp))


def estimate_memory(
    cfg: JobConfig, layout: Layout, device_type: str = "cuda", cache: dict | None = None
) -> dict[str, int]:
    """Per-GPU bytes by :data:`KINDS` (and ``total``) on the fullest rank: the largest over pipeline stages
    (the first rank of each stage holds the largest pieces of every cut). ``cache`` (a dict) shares the
    state arithmetic between layouts that cut the model alike."""
    prec = Precision.for_device(device_type, cfg)
    best: dict[str, int] | None = None
    stride = layout.world_size // layout.pp
    for pp_rank in candidate_stages(cfg, layout):
        rank = pp_rank * stride
        est = dict(_cached(cache, "state", state_bytes, cfg, layout, rank))
        est["activations"], est["activations_late"] = _cached_activations(cfg, layout, pp_rank, prec, cache)
        est["comm_buffers"] = comm_buffer_bytes(cfg, layout, rank, prec, cache)
        est["grad_accum"] = accumulation_bytes(cfg, layout, rank, cache)
        est["optimizer_step"] = optimizer_step_bytes(est, device_type)
        est["grads_live"] = int(grads_live_at_peak(cfg, layout, pp_rank))
        est["total"] = _total(est)
        est["rank"] = rank
        if best is None or est["total"] > best["total"]:
            best = est
    return best


def estimate_rank(cfg: JobConfig, layout: Layout, rank: int, device_type: str) -> dict[str, int]:
    """The same for one given rank (what ``meshforge train`` compares with its measurement)."""
    from .state import rank_coords

    prec = Precision.for_device(device_type, cfg)
    est = dict(state_bytes(cfg, layout, rank))
    est["activations"] = activation_bytes(cfg, layout, rank_coords(layout, rank).pp, prec)
    est["activations_late"] = activation_bytes(cfg, layout, rank_coords(layout, rank).pp, prec, late=True)
    est["comm_buffers"] = comm_buffer_bytes(cfg, layout, rank, prec)
    est["grad_accum"] = accumulation_bytes(cfg, layout, rank)
    est["optimizer_step"] = optimizer_step_bytes(est, device_type)
    est["grads_live"] = int(grads_live_at_peak(cfg, layout, rank_coords(layout, rank).pp))
    est["total"] = _total(est)
    return est


__all__ = ["KINDS", "Precision", "backward_peak", "estimate_memory", "estimate_rank"]
