"""The checks of a job config that need its model family's facts: the family's spec validates its config.

:func:`meshforge.config.validate` checks what needs neither a family nor a world size; this file checks
the rest against the family's :class:`~meshforge.models.spec.ModelSpec` (whether the family exists,
implements the architecture options, position encoding, muP and objective the config asks for), so the
config room imports nothing above it. Every entry point runs both before anything is written
(:func:`meshforge.config.load_config` then :func:`check_config`; ``meshforge train`` does it in
``pretrain/trainer.py:train``).
"""

from __future__ import annotations

from ..config import ARCHITECTURE_OPTIONS, ConfigError, JobConfig, ModelConfig, mode_token_pieces
from .spec import MODEL_SPECS, families_with, family_spec


def resolve_objective(cfg: JobConfig) -> str:
    """The objective a job trains: ``data.objective``, or with ``auto`` its family's first."""
    if cfg.data.objective != "auto":
        return cfg.data.objective
    return family_spec(cfg.model.family).objectives[0]


def check_config(cfg: JobConfig) -> JobConfig:
    """ConfigError unless the model family is registered and implements what ``cfg`` asks of it; returns ``cfg``."""
    m, d = cfg.model, cfg.data
    spec = family_spec(m.family)  # ConfigError naming the registered families
    if m.mup_base_dim < 0 or (m.mup_base_dim and (not spec.supports_mup or m.moe_experts)):
        raise ConfigError(
            f"model.mup_base_dim = {m.mup_base_dim}: muP is for dense decoders (model.family = "
            f"{families_with('supports_mup')!r}, model.moe_experts = 0) and needs a positive base width, or 0 "
            "to turn it off"
        )
    defaults = ModelConfig()
    for option in ARCHITECTURE_OPTIONS:
        if getattr(m, option) != getattr(defaults, option) and option not in spec.model_options:
            users = ", ".join(n for n, s in MODEL_SPECS.items() if option in s.model_options)
            raise ConfigError(
                f"model.{option} = {getattr(m, option)!r} is implemented by {users} models, not "
                f"{m.family}; leave it at {getattr(defaults, option)!r}"
            )
    if m.position_encoding not in spec.position_encodings:
        users = ", ".join(n for n, s in MODEL_SPECS.items() if m.position_encoding in s.position_encodings)
        raise ConfigError(
            f"model.position_encoding = {m.position_encoding!r} is for {users} models; {m.family} models "
            f"use {', '.join(spec.position_encodings)}"
        )
    objective = resolve_objective(cfg)
    if objective not in spec.objectives:
        fits = "; ".join(
            f"{', '.join(s.objectives)} train{'s' if len(s.objectives) == 1 else ''} {n} models"
            for n, s in MODEL_SPECS.items()
        )
        raise ConfigError(f"data.objective = {objective!r} does not fit model.family = {m.family!r}: {fits}")
    if d.document_mask and objective != "lm":
        raise ConfigError(
            f"data.document_mask applies to the decoder LM objective; {objective} windows are "
            "taken across document boundaries as in T5 (set data.document_mask = false)"
        )
    if d.ul2_mode_tokens:
        if objective != "ul2":
            raise ConfigError(
                f"data.ul2_mode_tokens is for data.objective = 'ul2' (got {objective!r}); "
                "set data.ul2_mode_tokens = '' or data.objective = 'ul2'"
            )
        mode_token_pieces(d.ul2_mode_tokens)
    return cfg
