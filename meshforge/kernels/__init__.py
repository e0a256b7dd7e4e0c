"""Fused compute kernels: pure-PyTorch reference versions that run (and are tested) on CPU."""

from .fused_loss import fused_linear_lm_loss

__all__ = ["fused_linear_lm_loss"]
