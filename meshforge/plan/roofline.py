"""Compute of one step on a rank priced op by op: a roofline of the GEMMs, attention, the memory-bound
(elementwise and reduction) ops and the optimizer step.

- GEMMs: each projection at its shape's efficiency on the device's curve (``efficiency.toml`` ``gemm``,
  :func:`.compute.gemm_efficiency`), forward and the backward's two products of the same size.
- Attention's two products (``QK^T`` and ``PV``) run in one flash kernel (``F.scaled_dot_product_attention``
  with ``is_causal``, ``models/layers.py``): causal, so the kernel skips the blocks above the diagonal and
  runs half of the ``12 H hd T`` FLOPs per token of :func:`.compute.block_weights` (forward + backward), at
  the device's attention efficiency by sequence length (``efficiency.toml`` ``attention``; flash kernels'
  published figures count causal FLOPs halved, as here).
- Memory-bound ops: bytes moved / HBM bandwidth (``devices.toml`` ``hbm_bytes_per_s``), counted from the
  shapes the model runs (``models/layers.py``, ``decoder.py``, ``losses.py``), each op one kernel reading its
  inputs and writing its outputs once (``parallel.compile`` fuses a block's elementwise ops on a GPU; the
  Triton kernels of ``train.fused_kernels`` do the same per op), activations at the compute dtype's bytes
  ``e``, per token of the rank (``B T / cp``), ``/ tp`` where tensor parallel cuts them (sequence parallel:
  norms and residual adds hold ``1 / tp`` of the tokens). Per block, forward + backward:
  RMSNorm x2: read x, write y; backward read x, dy, write dx: ``5 D e / tp`` each;
  residual add x2: read two, write one; backward the gradient sum, the same: ``6 D e / tp`` each;
  RoPE on q and k: read, write, both ways: ``4 (H + H_kv) hd e / tp``; QK-norm (if on) ``5 (H + H_kv) hd e / tp``;
  the gate (SwiGLU / GeGLU): read a, b, write; backward read a, b, dy, write da, db: ``8 F e / tp``;
  an MoE layer's gate on its ``k`` routed copies of each token (``8 k F_e e``: its FFN runs replicated over tp)
  and the tokens' dispatch and combine copies (``8 k D e``). Once per model: the embedding lookup
  (``2 D e / tp`` forward, ``3 D e / tp`` backward), the final norm, and the loss over ``V / tp`` logits:
  cast to fp32 (``e + 4``), log-softmax (8), its gradient written (4), log-softmax backward (12), cast
  back (``4 + e``): ``2 e + 32`` bytes per logit. No dropout (the models have none); softmax is inside the
  flash kernel.
- Gradient accumulation: each microbatch after the first adds its gradients into the accumulated ones
  (read + write fp32, 8 bytes per parameter the rank accumulates: the unsharded ones when reduced once per
  step, the shard when reduced every microbatch).
- Optimizer: AdamW on the rank's shard (``all / fsdp_shard`` parameters): fp32 parameter, two moments read
  and written, gradient read (28 bytes per parameter), the gradient-norm pass (4 more with
  ``optim.grad_clip``), bytes / HBM bandwidth, once per step.
- Recompute: ``full`` runs each block's forward again (its GEMMs, attention forward -- a third of the
  forward + backward FLOPs -- and its memory-bound forward ops); ``selective`` re-runs everything but the
  matmuls and attention (``parallel/activation_checkpoint.py`` keeps only their outputs): the blocks'
  memory-bound forward ops.

A pipeline rank runs its stages' share of the model (:func:`.compute.heaviest_share`, by FLOPs). Not
modelled: kernel launch and Python overhead, what the fused loss (``train.fused_loss``) changes, document
masks and sliding windows (full causal attention priced).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import JobConfig
from .compute import efficiency_curves, gemm_efficiency, layout_gemms
from .layouts import Layout

ADAMW_BYTES = 28
"""AdamW per parameter: fp32 parameter, first and second moment read and written (24), fp32 gradient read (4)."""


@dataclass(slots=True)
class ComputeTerms:
    """Seconds of one step's compute on the busiest rank, by kind (recompute included)."""

    gemm: float
    attention: float
    memory: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.gemm + self.attention + self.memory + self.optimizer


def block_bytes(cfg: JobConfig, layout: Layout, moe: bool, e: int) -> tuple[float, float]:
    """Bytes a block's memory-bound ops move per token of the rank: (forward, backward)."""
    m, tp = cfg.model, layout.tp
    D, qk = m.dim, (m.n_heads + m.kv_heads) * m.head_dim
    fwd = 2 * 2 * D * e / tp + 2 * 3 * D * e / tp + 2 * qk * e / tp  # norms, residual adds, RoPE
    bwd = 2 * 3 * D * e / tp + 2 * 3 * D * e / tp + 2 * qk * e / tp
    if m.qk_norm:
        fwd, bwd = fwd + 2 * qk * e / tp, bwd + 3 * qk * e / tp
    if moe:  # the routed copies of each token: the gate on each, dispatch and combine both ways
        k = m.moe_top_k
        fwd += 3 * k * m.expert_dim * e + 4 * k * D * e
        bwd += 5 * k * m.expert_dim * e + 4 * k * D * e
    else:
        fwd += 3 * m.hidden_dim * e / tp
        bwd += 5 * m.hidden_dim * e / tp
    return fwd, bwd


def model_bytes(cfg: JobConfig, layout: Layout, e: int) -> float:
    """Bytes the once-per-model memory-bound ops move per token of the rank, forward + backward: embedding
    lookup, final norm, the loss over the rank's ``V / tp`` logits."""
    m, tp = cfg.model, layout.tp
    return (2 + 3 + 5) * m.dim * e / tp + (2 * e + 32) * m.vocab_size / tp


def roofline_terms(
    cfg: JobConfig,
    layout: Layout,
    B: int,
    mb: int,
    peak: float,
    hbm: float,
    device_key: str,
    e: int,
    numel: dict,
    share: float,
    once: bool,
    cache: dict | None = None,
) -> ComputeTerms | None:
    """One step's compute on the rank that runs ``share`` of the model (``B`` samples a microbatch, ``mb``
    microbatches, ``numel``: :func:`.state.unsharded_numel` of the rank, ``once``: gradients reduced once per
    step); None when the device lacks a GEMM curve, attention points or HBM bandwidth."""
    entry = efficiency_curves().get(device_key)
    if entry is None or hbm <= 0 or "attention" not in entry:
        return None
    key = ("roofline", device_key, layout.tp, layout.cp, layout.ep, layout.ac, B)
    if cache is not None and key in cache:
        gemm, attention, memory = cache[key]
    else:
        gemm, attention, memory = microbatch_seconds(cfg, layout, B, peak, hbm, entry, e)
        if cache is not None:
            cache[key] = gemm, attention, memory
    accumulated = numel["all"] if once else numel["all"] / layout.fsdp_shard
    shard = numel["all"] / layout.fsdp_shard
    k = entry["overhead"]
    return ComputeTerms(
        gemm=k * gemm * mb * share,
        attention=k * attention * mb * share,
        memory=k * (memory * mb * share + 8 * accumulated * (mb - 1) / hbm),
        optimizer=k * shard * (ADAMW_BYTES + (4 if cfg.optim.grad_clip else 0)) / hbm,
    )


def microbatch_seconds(
    cfg: JobConfig, layout: Layout, B: int, peak: float, hbm: float, entry: dict, e: int
) -> tuple[float, float, float]:
    """Seconds of one microbatch through the whole model on a rank of the tp x cp x ep group, before the
    overhead: GEMMs, attention, memory-bound ops (forward, backward, recompute)."""
    m, tp, T = cfg.model, layout.tp, cfg.data.seq_len
    M = B * T // layout.cp  # tokens of a microbatch on the rank
    n_moe = sum(1 for i in range(m.n_layers) if m.is_moe_layer(i))
    n_dense = m.n_layers - n_moe
    points = entry["gemm"]

    def gemm_time(calls) -> float:  # forward GEMMs ``(FLOPs of one call, calls)`` at the curve
        return sum(f * n / gemm_efficiency(points, f) for f, n in calls) / peak

    qkv, out, (products, _), *_, (head_call, _) = layout_gemms(cfg, layout, B)
    dense_ffn = [(2.0 * M * m.hidden_dim / tp * m.dim, 3)]
    routed = max(1.0, M * m.moe_top_k / max(1, m.moe_experts))  # tokens of one expert (balanced routing)
    moe_ffn = [(2.0 * routed * m.expert_dim * m.dim, 3 * m.moe_experts / layout.ep)]
    blocks = m.n_layers * gemm_time([qkv, out]) + n_dense * gemm_time(dense_ffn) + n_moe * gemm_time(moe_ffn)
    passes = 3 + (layout.ac == "full")  # forward, backward's two products, the blocks' recomputed forward
    gemm = blocks * passes + 3 * gemm_time([(head_call, 1)])
    # attention: the causal flash kernel runs half of the products' FLOPs
    attention = m.n_layers * products / 2 / (peak * gemm_efficiency(entry["attention"], T)) * passes
    dense_fb, moe_fb = block_bytes(cfg, layout, False, e), block_bytes(cfg, layout, True, e)
    fwd_bytes = n_dense * dense_fb[0] + n_moe * moe_fb[0]
    bwd_bytes = n_dense * dense_fb[1] + n_moe * moe_fb[1]
    again = fwd_bytes if layout.ac in ("full", "selective") else 0.0
    memory = M * (fwd_bytes + bwd_bytes + again + model_bytes(cfg, layout, e)) / hbm
    return gemm, attention, memory
