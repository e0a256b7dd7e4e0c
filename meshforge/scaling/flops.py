"""Training FLOPs of a run, by the trainer's own accounting.

Per token: ``6 * N_active + 12 * L * H * q * T`` (PaLM, appendix B) -- the matmuls of every
weight a token passes through (forward 2, backward 4 FLOPs per weight; N_active excludes the
input embedding lookup but includes the output projection) plus the attention scores and
their weighted sum over a sequence of T tokens. It is
:func:`meshforge.models.flops_per_token`, the number the trainer's MFU uses, fed with the
exact parameter count of :func:`meshforge.scaling.shapes.count_params`. Sweeps plan with it,
not with ``6 * N``; at our small widths attention and the output projection are a large share.
"""

from __future__ import annotations

from ..config import JobConfig, ModelConfig
from ..models import flops_per_token as model_flops_per_token
from .shapes import count_params


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of a dense decoder at sequence length ``seq_len``."""
    return model_flops_per_token(m, count_params(m).active, seq_len)


def tokens_per_step(cfg: JobConfig) -> int:
    return cfg.train.global_batch_size * cfg.data.seq_len


def run_flops(cfg: JobConfig) -> float:
    """Training FLOPs of the whole run: FLOPs per token x tokens (steps x batch x seq_len)."""
    return flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step(cfg) * cfg.train.steps
