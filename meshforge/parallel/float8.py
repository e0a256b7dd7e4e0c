"""float8 training through torchao (``train.float8 = tensorwise | rowwise``).

:func:`apply_float8` swaps the model's ``nn.Linear`` layers for torchao's ``Float8Linear``
(``convert_to_float8_training``): their matmuls (forward, grad-input, grad-weight) run in
float8 with dynamic scales, their weights and the optimizer stay in high precision. It runs
first in :func:`meshforge.parallel.parallelize` (on each pipeline stage), before TP, compile
and FSDP2, as torchao requires. Kept in high precision (:func:`float8_skip_reason`):

- the output projection (the logits feed the softmax; its error is the loss's),
- MoE routers (the top-k choice flips on small errors; they are tiny anyway),
- embeddings and anything that is not an ``nn.Linear`` (the grouped MoE experts too),
- layers with a dimension that is not a multiple of 16 (the float8 GEMM's requirement).

Composition (tensorwise; torchao supports these for tensorwise scaling only):

- FSDP2: ``enable_fsdp_float8_all_gather`` all-gathers the converted weights in float8 (half
  the bytes of bf16); :func:`precompute_float8_scales` after each optimizer step computes all
  their scales in one all-reduce instead of one per weight.
- TP: the block projections use torchao's float8 TP styles (the sequence-parallel all-gather of
  their input runs in float8); see :func:`meshforge.parallel.tensor_parallel.build_tp_plan`.

Rowwise scaling runs with the plain all-gathers and TP styles. float8 GEMMs need a CUDA GPU of
compute capability 8.9 or newer (Ada, Hopper, Blackwell): :func:`check_float8` refuses others
before anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, JobConfig

RECIPES = ("tensorwise", "rowwise")
HIGH_PRECISION_NAMES = {"output": "the output layer", "router": "an MoE router"}
"""Last component of a module's name -> why it stays in high precision."""


def check_float8(cfg: JobConfig, device: torch.device) -> None:
    """ConfigError unless ``train.float8`` can run here: off, or torchao and a GPU with float8 GEMMs."""
    recipe = cfg.train.float8
    if recipe == "off":
        return
    if cfg.parallel.dp_backend == "deepspeed":
        raise ConfigError(
            f"train.float8 = {recipe!r} is not supported with parallel.dp_backend = 'deepspeed' "
            "(torchao's float8 composes with FSDP2); use parallel.dp_backend = 'fsdp2'"
        )
    where = f"train.float8 = {recipe!r} needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
    if device.type != "cuda":
        raise ConfigError(f"{where}; this job runs on {device.type}: use train.float8 = 'off'")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"{where}; {torch.cuda.get_device_name(device)} has {major}.{minor}: use train.float8 = 'off'"
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"train.float8 = {recipe!r} needs torchao (pip install -e '.[gpu]'): {e}") from e


def float8_skip_reason(name: str, module: nn.Module) -> str | None:
    """Why the module called ``name`` stays in high precision, or None when it is converted to float8."""
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in HIGH_PRECISION_NAMES:
        return HIGH_PRECISION_NAMES[leaf]
    out_features, in_features = module.weight.shape
    if out_features % 16 or in_features % 16:
        return f"dims {in_features} -> {out_features} are not multiples of 16"
    return None


def apply_float8(model: nn.Module, recipe: str, fsdp_float8_all_gather: bool = False) -> nn.Module:
    """Convert ``model``'s eligible linear layers to float8 training with the torchao ``recipe``
    (``tensorwise`` or ``rowwise``), in place. ``fsdp_float8_all_gather`` (tensorwise only): FSDP2
    will all-gather those weights in float8."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in RECIPES:
        raise ValueError(f"unknown float8 recipe {recipe!r}; expected one of {RECIPES}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp_float8_all_gather:
        if recipe != "tensorwise":
            raise ValueError("the float8 FSDP all-gather needs tensorwise scaling")
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)  # the tensorwise recipe is the default config
    return convert_to_float8_training(
        model, config=config, module_filter_fn=lambda module, name: float8_skip_reason(name, module) is None
    )


def float8_fsdp_all_gather(cfg: JobConfig, fsdp: bool) -> bool:
    """Whether FSDP2 all-gathers the float8 weights in float8 (tensorwise scaling under FSDP2)."""
    return fsdp and cfg.train.float8 == "tensorwise"


def float8_tp(cfg: JobConfig) -> bool:
    """Whether the TP plan uses torchao's float8 styles (tensorwise scaling only)."""
    return cfg.train.float8 == "tensorwise"


def precompute_float8_scales(model: nn.Module) -> None:
    """After an optimizer step: the float8 scales of every FSDP-sharded float8 weight in one all-reduce
    (a no-op for a model without them)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


__all__ = ["apply_float8", "check_float8", "float8_skip_reason", "precompute_float8_scales"]
