"""The job config tree: dataclasses, TOML presets, dotted CLI overrides, validation.

A job is one :class:`JobConfig` with the sections ``model``, ``parallel``, ``data``,
``optim``, ``train``, ``checkpoint`` and ``logging``. It is built from the dataclass
defaults (which are the small CPU preset), then a TOML preset, then ``--section.key value``
overrides, in that order. Unknown keys and values of the wrong type are errors that name
the key; :func:`validate` checks the relations between fields before any heavy work starts.

Every field carries a docstring (the string literal under it); ``meshforge train
--help-config`` prints them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MeshforgeError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
"""Where named presets (``--config small``) are looked up."""


class ConfigError(MeshforgeError, ValueError):
    """A config that cannot run: unknown key, wrong type, or inconsistent values."""


@dataclass
class ModelConfig:
    family: str = "decoder"
    """Model family from the registry in ``meshforge.models``: ``decoder`` or ``encoder_decoder`` (T5-style)."""
    vocab_size: int = 2048
    """Size of the embedding/output vocabulary; must be at least the tokenizer's vocab size (ids the tokenizer lacks are never sampled). 0 means the tokenizer's size rounded up to ``vocab_multiple_of``."""
    vocab_multiple_of: int = 64
    """With ``vocab_size = 0``: round the tokenizer's size up to a multiple of this (64 keeps the embedding and output matmuls on fast tensor-core shapes and divides by common tensor-parallel degrees); 1 means no padding."""
    dim: int = 192
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 6
    """Number of query heads; ``dim`` must divide by it."""
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
    """RMSNorm on queries and keys per head before attention (QK-layernorm)."""
    init_std: float = 0.02
    """Standard deviation of the normal init; output projections of each block are scaled by 1/sqrt(2*n_layers)."""
    mup_base_dim: int = 0
    """muP (maximal update parametrisation, Yang et al. 2022) relative to this base width; 0 disables it. With the width multiplier m = dim / mup_base_dim the block matrices are initialised with std init_std / sqrt(m) and trained with Adam LR lr / m, and the logits are multiplied by 1 / m; embeddings, norms and their LRs stay as at the base width, so an LR tuned at the base width transfers. Dense decoders only."""
    n_decoder_layers: int = 0
    """Encoder-decoder only: decoder blocks (``n_layers`` counts the encoder's); 0 means ``n_layers``."""
    position_encoding: str = "rope"
    """``rope``, or ``relative`` (T5 bucketed relative position bias; encoder-decoder only)."""
    rel_pos_buckets: int = 32
    """Relative position bias: number of buckets."""
    rel_pos_max_distance: int = 128
    """Relative position bias: distance beyond which all positions share the last bucket."""
    ffn_activation: str = "silu"
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
    moe_score: str = "softmax"
    """Router score function: ``softmax`` or ``sigmoid``."""
    moe_norm_topk: bool = True
    """Renormalise each token's top-k router weights to sum to 1."""
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
        return self.dim // self.n_heads

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
    cp_method: str = "ring"
    """Context parallel attention: ``ring`` (K/V blocks travel around the cp ranks, partial results merged by log-sum-exp) or ``alltoall`` (DeepSpeed-Ulysses: heads scattered, sequence gathered; heads and KV heads per tp rank must divide by cp)."""
    tp: int = 1
    """Tensor-parallel degree (with sequence parallel)."""
    ep: int = 1
    """Expert-parallel degree of MoE models: experts sharded over ep ranks borrowed from ``dp_shard x cp`` (fsdp2 only)."""
    loss_parallel: bool = True
    """With tp > 1: compute the loss on vocab-sharded logits without gathering them."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: ``gpipe``, ``1f1b``, ``interleaved_1f1b``, ``zero_bubble`` (interleaved zero-bubble)."""
    pp_microbatches: int = 0
    """Microbatches per pipeline step (per data-parallel rank); 0 means local batch / train.micro_batch_size when train.micro_batch_size > 0, else the divisor of the local batch (global_batch_size / data-parallel degree) nearest to 2 * pp * stages per rank among those the schedule accepts (the larger one on a tie)."""
    pp_stages_per_rank: int = 0
    """Virtual stages per pipeline rank; 0 means 1 for gpipe/1f1b and 2 for the interleaved schedules."""
    pp_split: str = ""
    """First layer of each stage after the first, comma separated (e.g. ``"3,6"``; an encoder-decoder counts its encoder layers, then its decoder layers); empty means balanced."""
    dp_backend: str = "fsdp2"
    """Data-parallel backend: ``fsdp2`` (torch FSDP2) or ``deepspeed`` (DeepSpeed engine)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered params after forward (ZeRO-3); false keeps them until backward (ZeRO-2-like)."""
    fsdp_cpu_offload: bool = False
    """FSDP2: keep sharded params, grads and optimizer state on the CPU."""
    param_dtype: str = "auto"
    """FSDP2 mixed precision compute dtype for params: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp32``; reductions stay fp32."""
    zero_stage: int = 1
    """DeepSpeed: ZeRO stage 1, 2 or 3."""
    offload_optimizer: str = "none"
    """DeepSpeed: offload optimizer state to ``none``, ``cpu`` or ``nvme``."""
    offload_param: str = "none"
    """DeepSpeed ZeRO-3: offload parameters to ``none``, ``cpu`` or ``nvme``."""
    nvme_path: str = ""
    """DeepSpeed: directory for NVMe offload files."""
    activation_checkpointing: str = "none"
    """Activation checkpointing per block: ``none``, ``full``, ``selective`` (save matmul outputs, recompute the rest)."""
    compile: str = "auto"
    """``torch.compile`` each block: ``auto`` (on for GPU, off for CPU), ``on``, ``off``."""


@dataclass
class DataConfig:
    path: str = "builtin:shakespeare"
    """A prepared data dir (``meshforge data prepare`` output, with manifest.json), or ``builtin:shakespeare``."""
    tokenizer: str = ""
    """Sentencepiece model file; empty means the tokenizer recorded in the data manifest."""
    seq_len: int = 128
    """Tokens per training sample (each sample holds seq_len+1 tokens: inputs and shifted targets)."""
    valid_fraction: float = 0.02
    """Fraction of documents held out for validation (chosen deterministically by document)."""
    objective: str = "auto"
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
    """Where ``builtin:`` corpora are prepared; empty means $MESHFORGE_CACHE or ~/.cache/meshforge."""
    blend: str = ""
    """Blend of data dirs ``"0.7:data/web,0.3:data/books"`` (weights normalised); when set, data.path is not used. May change on resume: the new blend applies from the resume point."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    schedule: str = "cosine"
    """LR schedule after warmup: ``cosine``, ``wsd`` (warmup-stable-decay), ``constant``."""
    warmup_steps: int = 30
    """Linear warmup steps from 0 to ``lr``."""
    decay_fraction: float = 0.2
    """For ``wsd``: fraction of all steps spent in the final decay."""
    wsd_decay: str = "linear"
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
    """Clip the global gradient norm to this value; 0 disables clipping."""


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
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """Autocast dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    z_loss_coef: float = 1e-4
    """Coefficient of the output z-loss (log of the softmax normaliser, squared); 0 disables it."""
    fused_loss: str = "auto"
    """Fused output projection + loss (``meshforge.kernels.fused_loss``): ``on`` computes the logits, loss and gradients in chunks of tokens from the final hidden states, never holding the [tokens, vocab] logits; ``off`` uses the plain output layer and loss; ``auto`` is off for now (its speed on a GPU is not measured yet; it will turn on where a GPU benchmark shows it faster), as it is in the layouts ``on`` refuses: pipeline, tensor or context parallel, more than one process, the encoder_decoder family."""
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
    """Print a metrics line every this many steps (metrics.jsonl gets every step)."""


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


# --------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def describe(cfg: JobConfig | None = None) -> str:
    """Every key with its current value and docstring, for ``--help-config``."""
    cfg = cfg or JobConfig()
    lines = []
    for sec in dataclasses.fields(JobConfig):
        section = getattr(cfg, sec.name)
        docs = field_docs(type(section))
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(section):
            lines.append(f"  {sec.name}.{f.name} = {getattr(section, f.name)!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- building


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobConfig)}


def _coerce(key: str, value: Any, typ: Any, from_cli: bool) -> Any:
    """Return ``value`` as ``typ`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0], from_cli)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every field has one of the types above
        raise ConfigError(f"{key}: unsupported field type {typ}")
    raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(sorted(choices))}")


def _set(cfg: JobConfig, dotted: str, value: Any, from_cli: bool) -> None:
    parts = dotted.split(".")
    sections = _section_types()
    if len(parts) != 2:
        raise ConfigError(f"config key '{dotted}' must look like section.key (sections: {', '.join(sections)})")
    sec, name = parts
    if sec not in sections:
        raise _unknown(sec, list(sections))
    section = getattr(cfg, sec)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise _unknown(dotted, list(hints))
    setattr(section, name, _coerce(dotted, value, hints[name], from_cli))


def resolve_preset(name_or_path: str) -> Path:
    """A preset path, or the name of a file in ``configs/`` (with or without ``.toml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (REPO_CONFIGS / name_or_path, REPO_CONFIGS / f"{name_or_path}.toml"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in REPO_CONFIGS.glob("*.toml"))
    raise ConfigError(f"config file '{name_or_path}' not found (presets: {', '.join(known) or 'none'})")


def load_config(preset: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> JobConfig:
    """Defaults, then the TOML preset, then the overrides; then :func:`validate`.

    ``overrides`` is either ``["--model.dim", "256", ...]`` (CLI form) or a dict of
    dotted keys to typed values.
    """
    cfg = JobConfig()
    if preset:
        path = resolve_preset(preset)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for sec, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key '{sec}' must be a [section] table")
            for key, value in table.items():
                _set(cfg, f"{sec}.{key}", value, from_cli=False)
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _set(cfg, key, value, from_cli=False)
    elif overrides:
        for key, value in parse_cli_overrides(overrides):
            _set(cfg, key, value, from_cli=True)
    validate(cfg)
    return cfg


def parse_cli_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``[("a.b", "1"), ("c.d", "x")]``."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        out.append((key, value))
    return out


def config_from_dict(data: dict[str, dict[str, Any]]) -> JobConfig:
    """Rebuild a config saved with :func:`config_to_dict` (checked like a preset)."""
    cfg = JobConfig()
    for sec, table in data.items():
        for key, value in table.items():
            _set(cfg, f"{sec}.{key}", value, from_cli=False)
    validate(cfg)
    return cfg


def config_to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- validation

CHOICES = {
    "model.family": ("decoder", "encoder_decoder"),
    "model.position_encoding": ("rope", "relative"),
    "model.ffn_activation": ("silu", "gelu"),
    "data.objective": ("auto", "lm", "span_corruption", "prefix_lm", "ul2"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "model.moe_score": ("softmax", "sigmoid"),
    "optim.wsd_decay": ("linear", "sqrt"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "bf16", "fp32"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"),
    "parallel.dp_backend": ("fsdp2", "deepspeed"),
    "parallel.param_dtype": ("auto", "bf16", "fp32"),
    "parallel.offload_optimizer": ("none", "cpu", "nvme"),
    "parallel.offload_param": ("none", "cpu", "nvme"),
    "parallel.activation_checkpointing": ("none", "full", "selective"),
    "parallel.compile": ("auto", "on", "off"),
    "train.fused_loss": ("auto", "on", "off"),
    "parallel.cp_method": ("ring", "alltoall"),
}


def validate(cfg: JobConfig) -> None:
    """Check value ranges and the relations between fields that need no world size."""
    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")
    m, t, d = cfg.model, cfg.train, cfg.data
    positive = {
        "model.dim": m.dim, "model.vocab_multiple_of": m.vocab_multiple_of, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.max_seq_len": m.max_seq_len, "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.global_batch_size": t.global_batch_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "model.vocab_size": m.vocab_size, "model.n_kv_heads": m.n_kv_heads, "model.ffn_dim": m.ffn_dim, "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip, "train.eval_interval": t.eval_interval,
        "train.z_loss_coef": t.z_loss_coef, "checkpoint.interval": cfg.checkpoint.interval,
        "logging.log_interval": cfg.logging.log_interval, "train.sample_tokens": t.sample_tokens,
        "train.micro_batch_size": t.micro_batch_size,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    _check_finite(cfg)
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr must be a positive number, got {cfg.optim.lr} (0 would never change the weights)")
    _check_backend_options(cfg.parallel)
    if m.mup_base_dim < 0 or (m.mup_base_dim and (m.family != "decoder" or m.moe_experts)):
        raise ConfigError(f"model.mup_base_dim = {m.mup_base_dim}: muP is for dense decoders (model.family = "
                          "'decoder', model.moe_experts = 0) and needs a positive base width, or 0 to turn it off")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim ({m.dim}) must divide by model.n_heads ({m.n_heads})")
    if m.head_dim % 2:
        raise ConfigError(f"head dim model.dim/model.n_heads = {m.head_dim} must be even for RoPE")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must divide by model.n_kv_heads ({m.kv_heads})")
    if m.family == "decoder" and m.position_encoding != "rope":
        raise ConfigError("model.position_encoding = 'relative' is for encoder_decoder models; decoders use rope")
    if m.moe_experts:
        if not 1 <= m.moe_top_k <= m.moe_experts:
            raise ConfigError(f"model.moe_top_k ({m.moe_top_k}) must be between 1 and model.moe_experts ({m.moe_experts})")
        if m.moe_capacity_factor < 0 or m.moe_bias_update_rate < 0 or m.moe_shared_experts < 0:
            raise ConfigError("model.moe_capacity_factor, moe_bias_update_rate and moe_shared_experts must be >= 0")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len ({d.seq_len}) is beyond the model's positions (model.max_seq_len = {m.max_seq_len}); "
            "lower data.seq_len or raise model.max_seq_len"
        )
    if not 0.0 < d.noise_density < 1.0 or d.mean_noise_span < 1.0:
        raise ConfigError(f"data.noise_density must be in (0, 1) and data.mean_noise_span >= 1, got "
                          f"{d.noise_density} and {d.mean_noise_span}")
    objective = resolve_objective(cfg)
    if (objective in ENCODER_DECODER_OBJECTIVES) != (m.family == "encoder_decoder"):
        raise ConfigError(f"data.objective = {objective!r} does not fit model.family = {m.family!r}: "
                          f"{', '.join(ENCODER_DECODER_OBJECTIVES)} train encoder_decoder models, lm trains decoders")
    if d.document_mask and objective != "lm":
        raise ConfigError(f"data.document_mask applies to the decoder LM objective; {objective} windows are "
                          "taken across document boundaries as in T5 (set data.document_mask = false)")
    if not 0.0 < d.prefix_lm_min <= d.prefix_lm_max < 1.0:
        raise ConfigError(f"data.prefix_lm_min and data.prefix_lm_max must satisfy 0 < min <= max < 1 (fractions of "
                          f"the window), got {d.prefix_lm_min} and {d.prefix_lm_max}")
    parse_denoisers(d.ul2_denoisers)
    if d.ul2_mode_tokens:
        if objective != "ul2":
            raise ConfigError(f"data.ul2_mode_tokens is for data.objective = 'ul2' (got {objective!r}); "
                              "set data.ul2_mode_tokens = '' or data.objective = 'ul2'")
        mode_token_pieces(d.ul2_mode_tokens)
    if not 0.0 <= d.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {cfg.optim.decay_fraction}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if t.micro_batch_size and t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must divide by train.micro_batch_size ({t.micro_batch_size})"
        )
    for name in ("pp", "dp_replicate", "cp", "tp", "ep"):
        if getattr(cfg.parallel, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(cfg.parallel, name)}")
    if cfg.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.parallel.pp_microbatches < 0 or cfg.parallel.pp_stages_per_rank < 0:
        raise ConfigError("parallel.pp_microbatches and parallel.pp_stages_per_rank must be >= 0")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {cfg.parallel.dp_shard}")
    if t.max_nonfinite_steps < 1 or t.spike_sigmas < 0 or t.collective_timeout_s <= 0 or t.setup_timeout_s <= 0:
        raise ConfigError(f"train.max_nonfinite_steps must be >= 1, train.spike_sigmas >= 0 and "
                          f"train.collective_timeout_s and train.setup_timeout_s > 0 (got {t.max_nonfinite_steps}, "
                          f"{t.spike_sigmas}, {t.collective_timeout_s}, {t.setup_timeout_s})")
    if not t.output_dir:
        raise ConfigError("train.output_dir must be set")


def _check_finite(cfg: JobConfig) -> None:
    """No float setting may be NaN or infinite (every comparison with NaN is false, so range checks miss it)."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{sec.name}.{f.name} must be a finite number, got {value}")


FSDP2_ONLY = {"fsdp_reshard_after_forward": True, "fsdp_cpu_offload": False, "param_dtype": "auto"}
"""FSDP2 settings (with their defaults) that the DeepSpeed backend does not read."""
DEEPSPEED_ONLY = {"zero_stage": 1, "offload_optimizer": "none", "offload_param": "none", "nvme_path": ""}
"""DeepSpeed settings (with their defaults) that the FSDP2 backend does not read."""


def _check_backend_options(p: ParallelConfig) -> None:
    """A setting of one data-parallel backend given to the other would be silently ignored: refuse it."""
    other, backend, instead = ((DEEPSPEED_ONLY, "deepspeed", "FSDP2's parallel.fsdp_reshard_after_forward / fsdp_cpu_offload")
                               if p.dp_backend == "fsdp2" else
                               (FSDP2_ONLY, "fsdp2", "parallel.zero_stage / offload_optimizer / offload_param, and train.dtype"))
    changed = [f"parallel.{k} = {getattr(p, k)!r}" for k, default in other.items() if getattr(p, k) != default]
    if changed:
        raise ConfigError(f"{', '.join(changed)} {'is a setting' if len(changed) == 1 else 'are settings'} of "
                          f"parallel.dp_backend = '{backend}', which this job does not use (dp_backend = "
                          f"'{p.dp_backend}'); remove {'it' if len(changed) == 1 else 'them'}, or set "
                          f"parallel.dp_backend = '{backend}' (with '{p.dp_backend}' use {instead})")


def padded_vocab_size(tokenizer_size: int, multiple_of: int) -> int:
    """The tokenizer's size rounded up to a multiple of ``multiple_of`` (what ``model.vocab_size = 0`` means)."""
    return multiple_of * -(-tokenizer_size // multiple_of)


ENCODER_DECODER_OBJECTIVES = ("span_corruption", "prefix_lm", "ul2")
"""Objectives whose samples are [encoder inputs | decoder targets]."""
UL2_KINDS = {"R": "regular span corruption", "X": "extreme span corruption", "S": "sequential (prefix LM)"}
"""UL2 denoiser kinds (paradigms), in the order of data.ul2_mode_tokens."""


@dataclass(frozen=True)
class Denoiser:
    """One entry of data.ul2_denoisers: span corruption (R/X) with its mean span and density, or S (prefix LM)."""

    kind: str
    mean_span: float = 0.0
    density: float = 0.0
    weight: float = 1.0

    def __str__(self) -> str:
        spec = self.kind if self.kind == "S" else f"{self.kind}:{self.mean_span:g}:{self.density:g}"
        return f"{spec}={self.weight:g}"


def parse_denoisers(text: str) -> list[Denoiser]:
    """``"R:3:0.15=0.4,X:32:0.5=0.2,S=0.2"`` -> denoisers; ConfigError naming data.ul2_denoisers on bad input."""
    key = "data.ul2_denoisers"
    form = "KIND:MEAN_SPAN:DENSITY=WEIGHT for R/X, S=WEIGHT for the prefix LM, comma separated"
    out: list[Denoiser] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            raise ConfigError(f"{key} = {text!r} has an empty entry; expected {form}")
        spec, _, weight_text = entry.partition("=")
        parts = [p.strip() for p in spec.split(":")]
        kind = parts[0]
        if kind not in UL2_KINDS:
            raise ConfigError(f"{key}: {entry!r} has kind {kind!r}; kinds are "
                              + ", ".join(f"{k} ({v})" for k, v in UL2_KINDS.items()))
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
            nums = [float(p) for p in parts[1:]]
        except ValueError:
            raise ConfigError(f"{key}: {entry!r} is not {form}") from None
        if not (weight > 0 and weight < float("inf")):
            raise ConfigError(f"{key}: {entry!r} has weight {weight_text.strip()}; weights must be positive")
        if kind == "S":
            if nums:
                raise ConfigError(f"{key}: {entry!r}: the S denoiser takes no numbers (write S=WEIGHT); its split "
                                  "bounds are data.prefix_lm_min and data.prefix_lm_max")
            d = Denoiser("S", weight=weight)
        else:
            if len(nums) != 2:
                raise ConfigError(f"{key}: {entry!r} needs a mean span and a density, e.g. {kind}:3:0.15=1")
            mean_span, density = nums
            if mean_span < 1.0 or not 0.0 < density < 1.0:
                raise ConfigError(f"{key}: {entry!r} needs mean span >= 1 and density in (0, 1), got "
                                  f"{mean_span:g} and {density:g}")
            d = Denoiser(kind, mean_span, density, weight)
        if any((o.kind, o.mean_span, o.density) == (d.kind, d.mean_span, d.density) for o in out):
            raise ConfigError(f"{key}: denoiser {spec.strip()!r} is listed twice; give it one entry with the summed weight")
        out.append(d)
    return out


def mode_token_pieces(text: str) -> tuple[str, str, str]:
    """The (R, X, S) pieces named by data.ul2_mode_tokens (``reserved`` or three comma-separated pieces)."""
    if text.strip() == "reserved":
        return ("<reserved_0>", "<reserved_1>", "<reserved_2>")
    pieces = tuple(p.strip() for p in text.split(","))
    if len(pieces) != 3 or not all(pieces) or len(set(pieces)) != 3:
        raise ConfigError(f"data.ul2_mode_tokens = {text!r} must be 'reserved' or three distinct comma-separated "
                          "tokenizer pieces for R, X and S (e.g. '[NLU],[NLG],[S2S]'), or empty for none")
    return pieces  # type: ignore[return-value]


def micro_batch_size(t: TrainConfig, dp: int) -> int:
    """``train.micro_batch_size`` on ``dp`` data-parallel ranks: 0 resolves to the whole local batch.

    Raises ConfigError, naming the numbers, when the global batch does not split into
    micro batches on ``dp`` ranks."""
    if not t.micro_batch_size:
        if t.global_batch_size % dp:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) does not divide by the data-parallel degree ({dp}); "
                f"train.micro_batch_size = 0 takes global / data-parallel samples per rank: use a global batch that "
                f"{dp} divides, or another number of ranks"
            )
        return t.global_batch_size // dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must divide by train.micro_batch_size * data-parallel "
            f"degree ({t.micro_batch_size} * {dp} = {t.micro_batch_size * dp}); set train.micro_batch_size = 0 for "
            "global / data-parallel samples per rank"
        )
    return t.micro_batch_size


def resolve_objective(cfg: JobConfig) -> str:
    if cfg.data.objective != "auto":
        return cfg.data.objective
    return "span_corruption" if cfg.model.family == "encoder_decoder" else "lm"


# --------------------------------------------------------------------------- identity

RUN_IDENTITY_KEYS = ("model", "data.path", "data.seq_len", "data.valid_fraction", "data.tokenizer", "train.seed",
                     "train.global_batch_size")
"""Keys that make two runs 'the same run' for resuming: changing them in an existing
output dir is refused. Steps, intervals, logging and parallel layout may change."""


def run_identity(cfg: JobConfig) -> dict[str, Any]:
    flat = {}
    full = config_to_dict(cfg)
    for key in RUN_IDENTITY_KEYS:
        if "." in key:
            sec, name = key.split(".")
            flat[key] = full[sec][name]
        else:
            for name, value in full[key].items():
                flat[f"{key}.{name}"] = value
    return flat


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
