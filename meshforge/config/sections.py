"""The job config's sections: one dataclass per section of a :class:`JobConfig`, every field documented.

Every field carries a docstring (the string literal under it); ``meshforge train --help-config``
prints them. A field with a fixed set of values is typed ``Literal[...]``: :data:`CHOICES`, which
:func:`meshforge.config.checks.validate` checks, is read from those types, so they cannot disagree.
Loading (presets, CLI overrides) is :mod:`meshforge.config`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from ..errors import MeshforgeError


class ConfigError(MeshforgeError, ValueError):
    """A config that cannot run: unknown key, wrong type, or inconsistent values."""


@dataclass
class ModelConfig:
    family: str = "decoder"
    """Model family, a name registered in ``meshforge.models`` (``MODEL_SPECS``): ``decoder`` or ``encoder_decoder`` (T5-style)."""
    vocab_size: int = 2048
    """Size of the embedding/output vocabulary; must be at least the tokenizer's vocab size (ids the tokenizer lacks are never sampled). 0 means the tokenizer's size rounded up to ``vocab_multiple_of``."""
    vocab_multiple_of: int = 64
    """With ``vocab_size = 0``: round the tokenizer's size up to a multiple of this (64 keeps the embedding and output matmuls on fast tensor-core shapes and divides by common tensor-parallel degrees); 1 means no padding."""
    dim: int = 192
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 6
    """Number of query heads; ``dim`` must divide by it unless ``head_size`` is set."""
    n_kv_heads: int = 0
    """Number of key/value heads for grouped-query attention; 0 means ``n_heads`` (plain MHA)."""
    ffn_dim: int = 0
    """Hidden width of the SwiGLU feed-forward; 0 means 8/3 * dim rounded up to ``ffn_multiple_of``."""
    ffn_multiple_of: int = 64
    """Rounding multiple for the derived ``ffn_dim``."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (RoPE tables are built for this length)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection (under pipeline parallel the first and last stages each hold a copy, their gradients summed every step)."""
    qk_norm: bool = False
    """RMSNorm on queries and keys before RoPE (QK-layernorm); ``qk_norm_scope`` says over what."""
    qk_norm_scope: Literal["head", "projection"] = "head"
    """With ``qk_norm``: ``head`` normalises each head (one weight of head_dim shared by the heads; Qwen3), ``projection`` the whole query / key projection (a weight per channel; OLMo 2)."""
    norm_placement: Literal["pre", "post"] = "pre"
    """Decoder blocks: ``pre`` is x + f(RMSNorm(x)) (Llama); ``post`` is x + RMSNorm(f(x)) (OLMo 2: the norm on the sublayer's output, inside the residual)."""
    head_size: int = 0
    """Width of each attention head (queries, keys, values; Hugging Face's ``head_dim``); 0 means dim / n_heads. Qwen3 and others set it independently of dim."""
    qkv_bias: bool = False
    """A learned bias on the query, key and value projections (Qwen2 / Qwen2.5)."""
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    """RoPE frequency scaling for long context: ``none``; ``linear`` (positions / rope_factor); ``llama3`` (Llama 3.1: low frequencies / rope_factor, high kept, a smooth ramp between, by rope_low_freq_factor / rope_high_freq_factor); ``yarn`` (YaRN: the same ramp by rope_beta_fast / rope_beta_slow, cos and sin scaled by 0.1 ln(rope_factor) + 1)."""
    rope_factor: float = 1.0
    """RoPE scaling: how much longer than ``rope_original_max_seq_len`` the context is made."""
    rope_original_max_seq_len: int = 0
    """RoPE scaling (llama3, yarn): the context length the model was pretrained at; 0 means max_seq_len."""
    rope_low_freq_factor: float = 1.0
    """``llama3`` scaling: wavelengths above original_max / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """``llama3`` scaling: wavelengths below original_max / this are kept."""
    rope_beta_fast: float = 32.0
    """``yarn`` scaling: rotations at which a frequency is kept (extrapolated)."""
    rope_beta_slow: float = 1.0
    """``yarn`` scaling: rotations below which a frequency is interpolated (divided by rope_factor)."""
    rope_fraction: float = 1.0
    """Partial rotary: RoPE rotates the first rope_fraction * head_dim channels of each head and passes the rest through (GLM-4.5 uses 0.5)."""
    sliding_window: int = 0
    """Sliding-window attention: each token attends to itself and the sliding_window - 1 tokens before it (Mistral v0.1); 0 means full causal attention."""
    init_std: float = 0.02
    """Standard deviation of the normal init; output projections of each block are scaled by 1/sqrt(2*n_layers)."""
    mup_base_dim: int = 0
    """muP (maximal update parametrisation, Yang et al. 2022) relative to this base width; 0 disables it. With the width multiplier m = dim / mup_base_dim the block matrices are initialised with std init_std / sqrt(m) and trained with Adam LR lr / m, and the logits are multiplied by 1 / m; embeddings, norms and their LRs stay as at the base width, so an LR tuned at the base width transfers. Dense decoders only."""
    n_decoder_layers: int = 0
    """Encoder-decoder only: decoder blocks (``n_layers`` counts the encoder's); 0 means ``n_layers``."""
    position_encoding: Literal["rope", "relative"] = "rope"
    """``rope``, or ``relative`` (T5 bucketed relative position bias; encoder-decoder only)."""
    rel_pos_buckets: int = 32
    """Relative position bias: number of buckets."""
    rel_pos_max_distance: int = 128
    """Relative position bias: distance beyond which all positions share the last bucket."""
    ffn_activation: Literal["silu", "gelu"] = "silu"
    """Gate activation of the gated feed-forward: ``silu`` (SwiGLU) or ``gelu`` (tanh GELU, T5 v1.1 gated-GELU)."""
    attn_scale: float = 0.0
    """Attention logit scale; 0 means 1/sqrt(head_dim). T5 uses 1 (the scale is folded into its init)."""
    moe_experts: int = 0
    """Routed experts in each MoE feed-forward; 0 means a dense model."""
    moe_top_k: int = 2
    """Experts each token is routed to."""
    moe_shared_experts: int = 0
    """Always-active shared experts (DeepSeek-style), each of width ``moe_ffn_dim``."""
    moe_ffn_dim: int = 0
    """Hidden width of each expert; 0 means the dense ``ffn_dim`` rule."""
    moe_dense_layers: int = 0
    """The first this many layers keep a dense feed-forward."""
    moe_score: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function: ``softmax`` or ``sigmoid``."""
    moe_norm_topk: bool = True
    """Renormalise each token's top-k router weights to sum to 1."""
    moe_routed_scale: float = 1.0
    """Multiplier of each token's top-k router weights, after any renormalisation (GLM-4.5's and DeepSeek-V3's routed_scaling_factor, 2.5 there); shared experts are not scaled."""
    moe_capacity_factor: float = 0.0
    """0 routes dropless; otherwise each expert takes at most ceil(factor * tokens * top_k / experts) tokens and drops the lowest-probability rest."""
    moe_aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss (Switch/GShard form); 0 disables it."""
    moe_z_loss_coef: float = 0.001
    """Coefficient of the router z-loss (ST-MoE); 0 disables it."""
    moe_bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): step size of the per-expert routing bias update; 0 disables it."""

    @property
    def width_mult(self) -> float:
        """muP width multiplier m = dim / mup_base_dim (1 without muP)."""
        return self.dim / self.mup_base_dim if self.mup_base_dim else 1.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """The width of each attention head: ``head_size``, or dim / n_heads."""
        return self.head_size or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Channels of each head that RoPE rotates (even): the first rope_fraction * head width."""
        return int(self.head_dim * self.rope_fraction) // 2 * 2

    @property
    def expert_dim(self) -> int:
        return self.moe_ffn_dim or self.hidden_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe_experts > 0 and layer_id >= self.moe_dense_layers

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        raw = int(8 * self.dim / 3)
        m = self.ffn_multiple_of
        return m * ((raw + m - 1) // m)


@dataclass
class ParallelConfig:
    pp: int = 1
    """Pipeline-parallel degree."""
    dp_replicate: int = 1
    """Replicated data-parallel degree (the outer dim of HSDP)."""
    dp_shard: int = -1
    """Sharded data-parallel degree (FSDP2/ZeRO); -1 takes the rest of the world."""
    cp: int = 1
    """Context-parallel degree: every sample's sequence split over cp ranks (zigzag: 2*cp chunks, rank r holds chunks r and 2*cp-1-r); decoder family only."""
    cp_method: Literal["ring", "alltoall"] = "ring"
    """Context parallel attention: ``ring`` (K/V blocks travel around the cp ranks, partial results merged by log-sum-exp) or ``alltoall`` (DeepSpeed-Ulysses: heads scattered, sequence gathered; heads and KV heads per tp rank must divide by cp)."""
    tp: int = 1
    """Tensor-parallel degree (with sequence parallel)."""
    ep: int = 1
    """Expert-parallel degree of MoE models: experts sharded over ep ranks borrowed from ``dp_shard x cp`` (fsdp2 only)."""
    loss_parallel: bool = True
    """With tp > 1: compute the loss on vocab-sharded logits without gathering them."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """Pipeline schedule: ``gpipe``, ``1f1b``, ``interleaved_1f1b``, ``zero_bubble`` (interleaved zero-bubble)."""
    pp_microbatches: int = 0
    """Microbatches per pipeline step (per data-parallel rank); 0 means local batch / train.micro_batch_size when train.micro_batch_size > 0, else the divisor of the local batch (global_batch_size / data-parallel degree) nearest to 2 * pp * stages per rank among those the schedule accepts (the larger one on a tie)."""
    pp_stages_per_rank: int = 0
    """Virtual stages per pipeline rank; 0 means 1 for gpipe/1f1b and 2 for the interleaved schedules."""
    pp_split: str = ""
    """First layer of each stage after the first, comma separated (e.g. ``"3,6"``; an encoder-decoder counts its encoder layers, then its decoder layers); empty means balanced."""
    dp_backend: Literal["fsdp2", "deepspeed"] = "fsdp2"
    """Data-parallel backend: ``fsdp2`` (torch FSDP2) or ``deepspeed`` (DeepSpeed engine)."""
    grad_sync: Literal["step", "microbatch"] = "step"
    """FSDP2 without a pipeline, when a rank accumulates several micro-batches: ``step`` reduces the gradients once per optimizer step (the reduce-scatter, and under HSDP the all-reduce over dp_replicate, skipped on every micro-batch but the last -- what Megatron-LM's and DDP's ``no_sync`` accumulation do; FSDP2 then keeps each unit's unsharded fp32 gradient between micro-batches: the rank's whole unsharded gradient, ``4 x params / (tp x pp)`` bytes); ``microbatch`` reduces after every micro-batch (gradients stay sharded: less memory, micro-batches times the traffic). Under pp torch's ``PipelineStage`` always reduces once per step; DeepSpeed follows its ZeRO stage."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered params after forward (ZeRO-3); false keeps them until backward (ZeRO-2-like). The ``zero_bubble`` pipeline schedule with data parallel needs false (its split backward finds only gathered params)."""
    fsdp_cpu_offload: bool = False
    """FSDP2: keep sharded params, grads and optimizer state on the CPU."""
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """FSDP2 mixed precision compute dtype for params: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp32``; reductions stay fp32."""
    zero_stage: int = 1
    """DeepSpeed: ZeRO stage 1, 2 or 3."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """DeepSpeed: offload optimizer state to ``none``, ``cpu`` or ``nvme``."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """DeepSpeed ZeRO-3: offload parameters to ``none``, ``cpu`` or ``nvme``."""
    nvme_path: str = ""
    """DeepSpeed: directory for NVMe offload files."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing per block: ``none``, ``full``, ``selective`` (save matmul outputs, recompute the rest)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """``torch.compile``: ``auto`` (on for GPU, off for CPU), ``on``, ``off``; what is compiled is parallel.compile_scope."""
    compile_scope: Literal["blocks", "model"] = "blocks"
    """What ``parallel.compile`` compiles: ``blocks``, each transformer block on its own (compile time flat in depth); ``model``, the whole forward of a micro-batch together with its loss (output projection and cross-entropy fuse too; the backward is AOT-autograd's of that graph). ``model`` needs parallel.compile on or auto and is refused with pipeline parallel, DeepSpeed, expert parallel and activation checkpointing; under FSDP2 the graph breaks at each sharded module (its hooks run eagerly)."""
    fault_tolerance: Literal["none", "torchft"] = "none"
    """``torchft``: this job is one of parallel.ft_groups replica groups (each its own torchrun job, with the usual mesh inside) coordinated by a torchft lighthouse; gradients are averaged over the groups alive at each step, the optimizer steps only when the quorum commits, a failed group's share of the batch is skipped (recorded in metrics.jsonl) or, with parallel.ft_spares, trained by a standby group, and a restarted group heals from a live peer. Needs the ``ft`` extra; FSDP2 (with TP, CP, EP or PP inside a group) and dp_replicate = 1 (the groups are the replicated dimension)."""
    ft_groups: int = 1
    """torchft: how many replica groups train the job's data; each step's global batch is cut into ft_groups x (data-parallel ranks per group) slices, group g reading slices g*dp ... g*dp + dp - 1 (its slot)."""
    ft_spares: int = 0
    """torchft: standby replica groups beyond ft_groups (ids ft_groups ... ft_groups + ft_spares - 1). A standby holds the live weights and steps with the others but trains no data until a step's quorum lacks a group: then, at that step, it trains the missing group's slot (standbys in id order take the missing slots in order), so a failure costs the batch only until the quorum drops the dead group, not until it is back. Not with pipeline parallel or MoE."""
    ft_replica_group: int = 0
    """torchft: this group's id, 0 ... ft_groups + ft_spares - 1 (ids below ft_groups own that slot of every global batch, the others are standbys; its output dir is train.output_dir/group_<id>)."""
    ft_lighthouse: str = ""
    """torchft: the lighthouse's address, ``http://host:port`` (``torchft_lighthouse --bind [::]:port``); empty takes $TORCHFT_LIGHTHOUSE."""
    ft_min_replicas: int = 1
    """torchft: fewest replica groups a step needs to commit (fewer: the step is not committed and retried on the next batch)."""
    ft_timeout_s: float = 60.0
    """torchft: seconds a cross-group collective, commit vote or state transfer may take before the peer counts as failed."""
    ft_quorum_timeout_s: float = 60.0
    """torchft: seconds a step waits for the lighthouse's quorum (a lighthouse gone longer than this ends the group with an error)."""


@dataclass
class DataConfig:
    path: str = "builtin:shakespeare"
    """A prepared data dir (``meshforge data prepare`` output, with manifest.json), its URL (``s3://bucket/prefix``, ``https://host/prefix``, any installed fsspec scheme; credentials from the environment only), or ``builtin:shakespeare``."""
    tokenizer: str = ""
    """The tokenizer: a sentencepiece ``.model``, a ``tokenizer.json``, a tiktoken BPE file, or a directory holding one (an HF model or init dir); empty means the data dir's copy. It must be the one the data was prepared with (same fingerprint)."""
    seq_len: int = 128
    """Tokens per training sample (each sample holds seq_len+1 tokens: inputs and shifted targets)."""
    valid_fraction: float = 0.02
    """Fraction of documents held out for validation (chosen deterministically by document)."""
    objective: Literal["auto", "lm", "span_corruption", "prefix_lm", "ul2"] = "auto"
    """Training objective: ``lm`` (next token), ``span_corruption`` (T5), ``prefix_lm`` (encoder reads a prefix, decoder writes the continuation), ``ul2`` (a mixture of denoisers, see data.ul2_denoisers), or ``auto`` (lm for decoders, span_corruption for encoder-decoders). All but ``lm`` train encoder_decoder models."""
    noise_density: float = 0.15
    """Span corruption: fraction of tokens masked."""
    mean_noise_span: float = 3.0
    """Span corruption: mean length of a masked span."""
    decoder_seq_len: int = 0
    """Encoder-decoder: decoder (target) length; 0 derives it from data.seq_len (the encoder length): as T5 does for span_corruption, and for prefix_lm/ul2 the longest target any configured denoiser can make (shorter targets are padded and left out of the loss)."""
    prefix_lm_min: float = 0.25
    """Prefix LM (``prefix_lm``, UL2's S-denoiser): shortest prefix as a fraction of the raw window; the split point is drawn uniformly per sample from [prefix_lm_min, prefix_lm_max] of the window, deterministically by global sample index and seed."""
    prefix_lm_max: float = 0.75
    """Prefix LM: longest prefix as a fraction of the raw window; the window is sized so that this longest prefix (plus EOS and any mode token) fills the encoder, and the decoder holds the longest continuation."""
    ul2_denoisers: str = "R:3:0.15=0.4,X:32:0.5=0.2,X:64:0.15=0.2,S=0.2"
    """UL2 mixture (data.objective = ul2): comma-separated denoisers ``KIND:MEAN_SPAN:DENSITY=WEIGHT`` for span corruption (KIND ``R`` regular or ``X`` extreme) and ``S=WEIGHT`` for the prefix LM (split bounds from data.prefix_lm_min/max); ``=WEIGHT`` may be left out (1). Weights are normalised; each sample's denoiser is drawn from its global index and the seed, so it does not depend on the world size. data.noise_density and data.mean_noise_span are not used by ul2."""
    ul2_mode_tokens: str = ""
    """UL2 paradigm tokens prepended to the encoder inputs of each sample: empty means none; ``reserved`` means the tokenizer's ``<reserved_0>,<reserved_1>,<reserved_2>``; otherwise three comma-separated pieces for R, X and S (e.g. ``[NLU],[NLG],[S2S]``), each a single special token of the tokenizer (`meshforge tokenizer train --reserved 3` or --special-tokens add them). Put the same token at the start of a `meshforge generate` prompt to pick the mode."""
    document_mask: bool = False
    """Decoder LM: attend only within each document of a packed sample (positions carry document ids; FlexAttention on GPU, a dense mask on CPU)."""
    builtin_vocab_size: int = 2048
    """Vocab size of the tokenizer trained for a ``builtin:`` corpus on first use."""
    cache_dir: str = ""
    """Where ``builtin:`` corpora are prepared and remote data dirs are cached (``remote/``: manifest, tokenizer, every .idx); empty means $MESHFORGE_CACHE or ~/.cache/meshforge."""
    remote_mode: Literal["range", "download"] = "range"
    """Remote data (data.path or a blend item is a URL, e.g. ``s3://bucket/prefix``, ``https://host/prefix``): ``range`` reads each batch's tokens from the ``.bin`` objects by byte ranges (prefetched in the background); ``download`` fetches every ``.bin`` into data.cache_dir once per node (checked against the manifest's sha256) and memory-maps it."""
    remote_retry_seconds: float = 120.0
    """Remote data: how long transient errors (connection lost, timeouts, 5xx, throttling) are retried with backoff before the run ends with an error naming the URL."""
    blend: str = ""
    """Blend of data dirs ``"0.7:data/web,0.3:data/books"`` (weights normalised); when set, data.path is not used. May change on resume: the new blend applies from the resume point."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """LR schedule after warmup: ``cosine``, ``wsd`` (warmup-stable-decay), ``constant``."""
    warmup_steps: int = 30
    """Linear warmup steps from 0 to ``lr``."""
    decay_fraction: float = 0.2
    """For ``wsd``: fraction of all steps spent in the final decay."""
    wsd_decay: Literal["linear", "sqrt"] = "linear"
    """For ``wsd``: shape of the final decay, ``linear`` or ``sqrt`` (1 - sqrt)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping. The norm (``grad_norm`` in
    metrics.jsonl, non-finite check) is computed every step while clipping is on; with 0, only on
    ``logging.log_interval`` steps (other steps skip a non-finite update by its loss alone)."""


@dataclass
class TrainConfig:
    steps: int = 600
    """Number of optimizer steps."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 0
    """Samples per forward/backward on one rank; 0 means the whole local batch (global_batch_size / data-parallel degree: no gradient accumulation, on any number of ranks that divides the global batch). A positive value accumulates gradients over global_batch_size / (micro_batch_size * data-parallel degree) micro batches; under pipeline parallel it sets the microbatch size (see parallel.pp_microbatches)."""
    seed: int = 1234
    """Seed of model init and of the data order."""
    output_dir: str = "runs/small"
    """Where checkpoints, metrics.jsonl and TensorBoard logs go."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda``."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Autocast dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    z_loss_coef: float = 1e-4
    """Coefficient of the output z-loss (log of the softmax normaliser, squared); 0 disables it."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """Fused output projection + loss (``meshforge.kernels.fused_loss``): ``on`` computes the logits, loss and gradients in chunks of tokens from the final hidden states, never holding the [tokens, vocab] logits; ``off`` uses the plain output layer and loss; Works under FSDP2, TP (vocab-parallel: each rank's slice of the vocabulary, the log-sum-exp reduced over tp; needs ``parallel.loss_parallel``), pipeline (the last stage) and context parallel. ``auto`` is off for now (its speed on a GPU is not measured yet; it will turn on where a GPU benchmark shows it faster), as it is where ``on`` is refused: the encoder_decoder family, TP without loss parallel, the DeepSpeed backend on more than one process."""
    fused_kernels: Literal["auto", "triton", "liger", "off"] = "auto"
    """Who computes RMSNorm, RoPE and SwiGLU (``meshforge.kernels.apply``): ``triton``, meshforge's own Triton kernels (forward and backward, fp32 inside; CUDA, or a CPU under TRITON_INTERPRET=1 for tests); ``liger``, liger-kernel's (CUDA only); ``off``, the models' PyTorch code (fused by torch.compile where parallel.compile is on); ``auto`` is off for now, the same rule as train.fused_loss: it turns on only where bench/bench_kernels.py measures the kernels faster than compiled PyTorch on a GPU. Under tensor parallel the norms stay PyTorch's (their weights are DTensors). Needs the package (pip install -e ".[gpu]")."""
    float8: Literal["off", "tensorwise", "rowwise"] = "off"
    """float8 training through torchao (``meshforge.parallel.float8``): the linear layers of the blocks run their matmuls in float8 with dynamic ``tensorwise`` (one scale per tensor; fastest; FSDP2 then all-gathers those weights in float8 and TP gathers their inputs in float8) or ``rowwise`` scales (one per row; more accurate); the output layer, MoE routers, embeddings and layers with dims not multiples of 16 stay in high precision. Needs a CUDA GPU of compute capability 8.9+ (refused elsewhere) and ``pip install -e '.[gpu]'``."""
    eval_interval: int = 100
    """Run validation every this many steps (and at the last step); 0 disables it."""
    eval_batches: int = 4
    """Global batches per validation."""
    sample_prompt: str = "ROMEO:"
    """Prompt for the text sample generated at the end of training; empty disables it."""
    sample_tokens: int = 48
    """Tokens to generate for the end-of-training sample."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient norm is not finite is skipped (no update, counted in the metrics); this many in a row stop the run with the newest checkpoint intact."""
    spike_sigmas: float = 6.0
    """Flag (log) a loss more than this many standard deviations above the mean of the last 50 steps; 0 turns it off."""
    collective_timeout_s: float = 600.0
    """Timeout of every collective: a rank that died or hangs makes the others fail with an error naming the operation instead of waiting forever."""
    setup_timeout_s: float = 300.0
    """How long the ranks wait for each other to start (the check-in before the process group). A rank that fails while starting stops the others at once, with its message; this bounds the wait for one that dies without a word."""


@dataclass
class CheckpointConfig:
    interval: int = 200
    """Save a checkpoint every this many steps (and at the last step); 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many newest checkpoints; older ones are deleted after a newer one is complete."""
    resume: bool = True
    """Resume automatically from the newest complete checkpoint in the output dir."""
    resume_from: str = ""
    """Resume from this checkpoint directory (e.g. ``runs/x/checkpoints/step_00000200``) instead of the newest one, e.g. when the newest is damaged; it must belong to this output dir's run. Newer checkpoints are replaced as the run reaches their steps again."""
    async_save: bool = False
    """Write checkpoints in a background thread: the step waits only while the state is copied to CPU memory (pinned on GPU), training continues during the write, and the checkpoint appears (atomically, as with synchronous saves) once written. Costs one CPU copy of the model and optimizer state. The DeepSpeed backend always saves synchronously."""
    init_from: str = ""
    """Start a new run from the model weights of this directory (``meshforge convert import`` / ``convert grow`` output, or any checkpoint dir) with a fresh optimizer at step 0, under any layout; empty starts from random init. Ignored when the output dir already holds a checkpoint to resume."""
    on_preemption: bool = True
    """On SIGTERM or SIGUSR1 (SLURM's warning before the time limit, ``scancel --signal``): finish the step, write a checkpoint and exit with status 42 so the job script can requeue; the restart resumes from it."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under <output_dir>/tb."""
    log_interval: int = 10
    """Print a metrics line every this many steps (metrics.jsonl gets every step; its ``grad_norm``
    every step with ``optim.grad_clip`` > 0, else only on these steps)."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism degrees on the device mesh."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""


def section_types() -> dict[str, type]:
    """Each section name of :class:`JobConfig` with its dataclass."""
    hints = typing.get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobConfig)}


def choice_fields() -> dict[str, tuple[str, ...]]:
    """``"section.key"`` -> allowed values, for every field typed ``Literal[...]``."""
    out = {}
    for sec, cls in section_types().items():
        for name, typ in typing.get_type_hints(cls).items():
            if typing.get_origin(typ) is Literal:
                out[f"{sec}.{name}"] = typing.get_args(typ)
    return out


CHOICES = choice_fields()
"""The allowed values of each choice field, read from its ``Literal`` type."""
