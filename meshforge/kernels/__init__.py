"""Fused compute kernels.

- ``fused_loss.py``: the chunked output projection + cross-entropy (pure PyTorch, runs on CPU);
- ``rmsnorm.py``, ``rope.py``, ``swiglu.py``: Triton kernels (forward and backward) for
  ``train.fused_kernels = 'triton'``, ``liger.py`` the liger-kernel adapters, and ``apply.py``
  the setting and the module swap. These import Triton / liger-kernel, optional packages, so
  nothing here imports them: ``apply_fused_kernels`` does, when a job asks for them.
"""

from .fused_loss import fused_linear_lm_loss

__all__ = ["fused_linear_lm_loss"]
