"""RoPE frequencies of a model config: plain, or scaled for a longer context (``model.rope_scaling``).

With d the rotated width and theta the base, the plain frequencies are
f_i = theta^(-2i/d), i < d/2; the wavelength of f_i is 2 pi / f_i. For a context stretched
``rope_factor`` (s) times beyond the pretraining length L (``rope_original_max_seq_len``):

    linear   f_i / s                                     (positions divided by s)
    llama3   f_i        where wavelength < L / high_freq_factor (kept)
             f_i / s    where wavelength > L / low_freq_factor  (interpolated)
             (1 - a) f_i / s + a f_i between, a = (L / wavelength - low) / (high - low)
    yarn     (1 - r_i) f_i / s + r_i f_i, r_i = 1 - clamp((i - lo) / (hi - lo), 0, 1) where
             lo / hi are the (floored / ceiled) channels that turn beta_fast / beta_slow
             times over L; cos and sin are multiplied by 0.1 ln(s) + 1

Each is what the paper (and the Hugging Face implementation) computes, so imported models
keep their positions.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig
from .layers import rope_inv_freq


def rope_frequencies(m: ModelConfig) -> tuple[torch.Tensor, float]:
    """(f [rope_dim / 2] in float64, the factor cos and sin are multiplied by) of ``m``."""
    d = m.rope_dim
    inv_freq = rope_inv_freq(d, m.rope_theta)
    s, original = m.rope_factor, m.rope_original_max_seq_len or m.max_seq_len
    if m.rope_scaling == "none":
        return inv_freq, 1.0
    if m.rope_scaling == "linear":
        return inv_freq / s, 1.0
    if m.rope_scaling == "llama3":
        low, high = m.rope_low_freq_factor, m.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / s, inv_freq)
        a = (original / wavelen - low) / (high - low)
        smooth = (1 - a) * scaled / s + a * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smooth, scaled), 1.0
    if m.rope_scaling == "yarn":

        def channel(rotations: float) -> float:  # the channel whose frequency turns `rotations` times over L
            return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(m.rope_theta))

        lo, hi = max(math.floor(channel(m.rope_beta_fast)), 0), min(math.ceil(channel(m.rope_beta_slow)), d - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp
        return inv_freq / s * (1 - keep) + inv_freq * keep, 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    raise ValueError(f"model.rope_scaling = {m.rope_scaling!r}")


__all__ = ["rope_frequencies"]
