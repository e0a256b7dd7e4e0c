"""Checks of a job config that need no world size: value ranges, choices, relations between fields.

:func:`validate` runs on every config that is loaded (:func:`meshforge.config.load_config`);
the checks against a world size and a layout are :func:`meshforge.parallel.job_checks.check_job`.
"""

from __future__ import annotations

import dataclasses
import math

from .objectives import parse_denoisers
from .sections import CHOICES, ConfigError, JobConfig, ParallelConfig, TrainConfig

LAYOUT_FIELDS = frozenset(
    {
        "parallel.tp",
        "parallel.pp",
        "parallel.cp",
        "parallel.ep",
        "parallel.dp_replicate",
        "parallel.dp_shard",
        "parallel.dp_backend",
        "parallel.zero_stage",
        "parallel.fsdp_reshard_after_forward",
        "parallel.pp_schedule",
        "parallel.pp_stages_per_rank",
        "parallel.pp_microbatches",
        "parallel.pp_split",
        "parallel.activation_checkpointing",
        "parallel.cp_method",
        "parallel.compile",
        "train.micro_batch_size",
    }
)
"""The fields a layout sets (the planner's ``apply_layout``): :func:`validate_layout` checks what reads them,
:func:`validate_settings` the rest."""


def validate(cfg: JobConfig) -> None:
    """Check value ranges and the relations between fields that need no world size."""
    validate_settings(cfg)
    validate_layout(cfg)


def validate_layout(cfg: JobConfig) -> None:
    """The checks of :func:`validate` that read a :data:`LAYOUT_FIELDS` field: a config that passed
    :func:`validate_settings` passes :func:`validate` exactly when it passes these (the planner checks each
    candidate layout with them alone)."""
    for key, allowed in CHOICES.items():
        if key not in LAYOUT_FIELDS:
            continue
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")
    t, p = cfg.train, cfg.parallel
    if t.micro_batch_size < 0:
        raise ConfigError(f"train.micro_batch_size must be >= 0, got {t.micro_batch_size}")
    _check_backend_options(p)
    _check_compile_scope(p)
    if cfg.model.sliding_window and p.cp > 1:
        raise ConfigError(
            f"model.sliding_window = {cfg.model.sliding_window} with parallel.cp = {p.cp}: the context "
            "parallel attention (ring and all-to-all) does not apply a window; use parallel.cp = 1"
        )
    if t.micro_batch_size and t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must divide by train.micro_batch_size ({t.micro_batch_size})"
        )
    for name in ("pp", "dp_replicate", "cp", "tp", "ep"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3, got {p.zero_stage}")
    if p.pp_microbatches < 0 or p.pp_stages_per_rank < 0:
        raise ConfigError("parallel.pp_microbatches and parallel.pp_stages_per_rank must be >= 0")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {p.dp_shard}")


def validate_settings(cfg: JobConfig) -> None:
    """The checks of :func:`validate` that read no :data:`LAYOUT_FIELDS` field."""
    for key, allowed in CHOICES.items():
        if key in LAYOUT_FIELDS:
            continue
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")
    m, t, d = cfg.model, cfg.train, cfg.data
    positive = {
        "model.dim": m.dim,
        "model.vocab_multiple_of": m.vocab_multiple_of,
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.max_seq_len": m.max_seq_len,
        "data.seq_len": d.seq_len,
        "train.steps": t.steps,
        "train.global_batch_size": t.global_batch_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "data.remote_retry_seconds": d.remote_retry_seconds,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "model.vocab_size": m.vocab_size,
        "model.n_kv_heads": m.n_kv_heads,
        "model.ffn_dim": m.ffn_dim,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "train.eval_interval": t.eval_interval,
        "train.z_loss_coef": t.z_loss_coef,
        "checkpoint.interval": cfg.checkpoint.interval,
        "logging.log_interval": cfg.logging.log_interval,
        "train.sample_tokens": t.sample_tokens,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    _check_finite(cfg)
    _check_data_urls(d)
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr must be a positive number, got {cfg.optim.lr} (0 would never change the weights)")
    _check_architecture_options(cfg)
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must divide by model.n_kv_heads ({m.kv_heads})")
    if m.moe_experts:
        if not 1 <= m.moe_top_k <= m.moe_experts:
            raise ConfigError(
                f"model.moe_top_k ({m.moe_top_k}) must be between 1 and model.moe_experts ({m.moe_experts})"
            )
        if m.moe_capacity_factor < 0 or m.moe_bias_update_rate < 0 or m.moe_shared_experts < 0:
            raise ConfigError("model.moe_capacity_factor, moe_bias_update_rate and moe_shared_experts must be >= 0")
        if not m.moe_routed_scale > 0:
            raise ConfigError(f"model.moe_routed_scale must be positive, got {m.moe_routed_scale}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len ({d.seq_len}) is beyond the model's positions (model.max_seq_len = {m.max_seq_len}); "
            "lower data.seq_len or raise model.max_seq_len"
        )
    if not 0.0 < d.noise_density < 1.0 or d.mean_noise_span < 1.0:
        raise ConfigError(
            f"data.noise_density must be in (0, 1) and data.mean_noise_span >= 1, got "
            f"{d.noise_density} and {d.mean_noise_span}"
        )
    if not 0.0 < d.prefix_lm_min <= d.prefix_lm_max < 1.0:
        raise ConfigError(
            f"data.prefix_lm_min and data.prefix_lm_max must satisfy 0 < min <= max < 1 (fractions of "
            f"the window), got {d.prefix_lm_min} and {d.prefix_lm_max}"
        )
    parse_denoisers(d.ul2_denoisers)
    if not 0.0 <= d.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {cfg.optim.decay_fraction}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if t.max_nonfinite_steps < 1 or t.spike_sigmas < 0 or t.collective_timeout_s <= 0 or t.setup_timeout_s <= 0:
        raise ConfigError(
            f"train.max_nonfinite_steps must be >= 1, train.spike_sigmas >= 0 and "
            f"train.collective_timeout_s and train.setup_timeout_s > 0 (got {t.max_nonfinite_steps}, "
            f"{t.spike_sigmas}, {t.collective_timeout_s}, {t.setup_timeout_s})"
        )
    if not t.output_dir:
        raise ConfigError("train.output_dir must be set")


def _check_data_urls(d) -> None:
    """No credentials in a data URL (they would reach config.json and the logs): the environment gives them."""
    from urllib.parse import urlsplit

    for path in [d.path] + [item.partition(":")[2].strip() for item in d.blend.split(",") if item.strip()]:
        if "://" in path and (urlsplit(path).username or urlsplit(path).password):
            raise ConfigError(
                f"data URL {urlsplit(path).scheme}://...@{urlsplit(path).hostname} carries credentials: remove "
                "them and give them through the environment or the filesystem's config file (e.g. AWS_PROFILE)"
            )


ARCHITECTURE_OPTIONS = (
    "head_size",
    "qkv_bias",
    "qk_norm_scope",
    "norm_placement",
    "rope_scaling",
    "rope_fraction",
    "sliding_window",
)
"""Model options that a family implements or refuses (``ModelSpec.model_options``; the family's check is
:func:`meshforge.models.check_config`)."""


def _check_architecture_options(cfg: JobConfig) -> None:
    """Head width, biases, norm placement, RoPE scaling / partial rotary, sliding window: in range (whether the
    family implements them is :func:`meshforge.models.check_config`'s)."""
    m = cfg.model
    if m.head_size < 0 or m.sliding_window < 0:
        raise ConfigError(
            f"model.head_size and model.sliding_window must be >= 0, got {m.head_size} and {m.sliding_window}"
        )
    if not m.head_size and m.dim % m.n_heads:
        raise ConfigError(f"model.dim ({m.dim}) must divide by model.n_heads ({m.n_heads}), or set model.head_size")
    if m.head_dim % 2:
        raise ConfigError(
            f"the head width ({m.head_dim}: model.head_size, or model.dim / model.n_heads) must be even for RoPE"
        )
    if not 0.0 < m.rope_fraction <= 1.0 or m.rope_dim < 2:
        raise ConfigError(
            f"model.rope_fraction must be in (0, 1] and rotate at least 2 channels of the "
            f"{m.head_dim}-wide heads, got {m.rope_fraction}"
        )
    if m.rope_scaling != "none":
        if not m.rope_factor >= 1.0 or m.rope_original_max_seq_len < 0:
            raise ConfigError(
                f"model.rope_factor must be >= 1 and model.rope_original_max_seq_len >= 0 with "
                f"model.rope_scaling = {m.rope_scaling!r}, got {m.rope_factor} and "
                f"{m.rope_original_max_seq_len}"
            )
        if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
            raise ConfigError(
                f"llama3 RoPE scaling needs 0 < model.rope_low_freq_factor < model.rope_high_freq_factor, "
                f"got {m.rope_low_freq_factor} and {m.rope_high_freq_factor}"
            )
        if m.rope_scaling == "yarn" and not 0 < m.rope_beta_slow < m.rope_beta_fast:
            raise ConfigError(
                f"yarn RoPE scaling needs 0 < model.rope_beta_slow < model.rope_beta_fast, got "
                f"{m.rope_beta_slow} and {m.rope_beta_fast}"
            )


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
    other, backend, instead = (
        (DEEPSPEED_ONLY, "deepspeed", "FSDP2's parallel.fsdp_reshard_after_forward / fsdp_cpu_offload")
        if p.dp_backend == "fsdp2"
        else (FSDP2_ONLY, "fsdp2", "parallel.zero_stage / offload_optimizer / offload_param, and train.dtype")
    )
    changed = [f"parallel.{k} = {getattr(p, k)!r}" for k, default in other.items() if getattr(p, k) != default]
    if changed:
        raise ConfigError(
            f"{', '.join(changed)} {'is a setting' if len(changed) == 1 else 'are settings'} of "
            f"parallel.dp_backend = '{backend}', which this job does not use (dp_backend = "
            f"'{p.dp_backend}'); remove {'it' if len(changed) == 1 else 'them'}, or set "
            f"parallel.dp_backend = '{backend}' (with '{p.dp_backend}' use {instead})"
        )


def _check_compile_scope(p: ParallelConfig) -> None:
    """``parallel.compile_scope = model`` compiles the step's forward + loss: refuse what it cannot compile correctly."""
    if p.compile_scope != "model":
        return
    if p.compile == "off":
        raise ConfigError(
            "parallel.compile_scope = 'model' says what to compile, but parallel.compile = 'off' compiles "
            "nothing; set parallel.compile = 'on' (or 'auto': GPU only), or leave compile_scope = 'blocks'"
        )
    why = None
    if p.pp > 1:
        why = (
            f"parallel.pp = {p.pp}: the pipeline schedule runs each stage and the loss itself, so there is no "
            "whole-model forward to compile"
        )
    elif p.dp_backend == "deepspeed":
        why = (
            "parallel.dp_backend = 'deepspeed': the step calls the DeepSpeed engine, whose ZeRO hooks and loss "
            "scaling are its own, not the model (not tested under a compiled loss)"
        )
    elif p.ep > 1:
        why = (
            f"parallel.ep = {p.ep}: the experts' all-to-all inside the compiled forward hangs the ranks (tested: a "
            "collective timeout in step 1, torch 2.13)"
        )
    elif p.activation_checkpointing != "none":
        why = (
            f"parallel.activation_checkpointing = {p.activation_checkpointing!r}: torch's checkpoint hooks on the "
            "blocks break the whole-model graph at every block and fail in backward under it (tested: recomputed "
            "tensors differ in metadata, torch 2.13)"
        )
    if why:
        raise ConfigError(
            f"parallel.compile_scope = 'model' does not work with {why}; use parallel.compile_scope = "
            "'blocks' (each block compiled)"
        )


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


def check_ft_groups(p: ParallelConfig) -> None:
    """The replica-group counts of ``parallel.fault_tolerance = "torchft"`` (one ConfigError line each):
    checked by the job (``parallel.fault_tolerance.check_fault_tolerance``) and by ``meshforge launch --ft-groups``."""
    if p.ft_spares < 0:
        raise ConfigError(f"parallel.ft_spares = {p.ft_spares} must be >= 0 (standby replica groups)")
    total = p.ft_groups + p.ft_spares
    if p.ft_groups < 1 or not 0 <= p.ft_replica_group < total:
        raise ConfigError(
            f"parallel.ft_replica_group = {p.ft_replica_group} is not a group of parallel.ft_groups = "
            f"{p.ft_groups}"
            + (f" + ft_spares = {p.ft_spares}" if p.ft_spares else "")
            + f"; number the groups 0 ... {max(total, 1) - 1}"
        )
    if not 1 <= p.ft_min_replicas <= p.ft_groups:
        raise ConfigError(
            f"parallel.ft_min_replicas = {p.ft_min_replicas} must be between 1 and parallel.ft_groups = {p.ft_groups}"
        )
