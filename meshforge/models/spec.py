"""What the rest of the system knows about a model family: one :class:`ModelSpec` per family.

Nothing outside ``models/`` asks which family a model is; it asks the family's spec
(``family_spec(cfg.family)``) for what it needs -- the blocks to checkpoint, compile and
shard, the tensor-parallel plan (data: module path pattern -> style name), how to cut the
model into pipeline stages, its FLOPs per token, its Hugging Face converter -- and whether
the family supports a feature (``spec.supports_context_parallel``, ...). Adding a family is adding a
spec (:func:`register`); the specs of the built-in families are in :mod:`meshforge.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..config import ARCHITECTURE_OPTIONS, ConfigError, ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    """One model family. Every field is model code or data; ``parallel/`` turns the data into sharding."""

    name: str
    """The value of ``model.family`` that selects it."""
    build: Callable[[ModelConfig], nn.Module]
    """``build(cfg)``: the model (called under the meta device); it has ``cfg``, ``init_weights()``, and
    ``tie_weights()`` when it ties its embeddings."""
    blocks: Callable[[nn.Module], dict[str, nn.Module]]
    """The repeated blocks of the model, or of one pipeline stage of it, by module path, in forward order:
    the units that activation checkpointing, compile and FSDP wrap."""
    tp_plan: Callable[[ModelConfig], dict[str, str]]
    """Tensor (+ sequence) parallel plan as data: ``{module path pattern: style name}``, the names
    :data:`meshforge.parallel.tensor_parallel.STYLE_NAMES` defines; entries a pipeline stage lacks
    are dropped. A block whose feed-forward is not a dense gated FFN needs ``"replicated_moe"``."""
    pipeline_blocks: Callable[[ModelConfig], tuple[int, str]]
    """The number of blocks a pipeline splits (as one sequence) and how errors name that count."""
    stage: Callable[[nn.Module, int, int, bool, bool], nn.Module]
    """``stage(model, start, end, first, last)``: the module of blocks ``[start, end)``, holding the
    model's own module objects under their own names; first / last stage say where embedding and
    output go. Its forward takes the previous stage's outputs (the model's inputs on the first)."""
    stage_view: Callable[[nn.Module, list[nn.Module]], None]
    """``stage_view(view, stages)``: set on ``view`` the modules of ``stages`` under the model's names
    (besides ``tok_embeddings`` and ``output``), so a pipeline rank's parameters keep their names."""
    stage_inputs: Callable[[tuple], tuple[tuple, dict]]
    """The model's positional inputs -> (the first stage's inputs, keyword inputs every stage takes)."""
    flops_per_token: Callable[[nn.Module, ModelConfig, tuple[int, ...]], float]
    """``flops_per_token(model, cfg, lengths)``: training FLOPs per token; ``lengths`` are a sample's
    token lengths as the model reads them (``(seq_len,)``; an encoder-decoder ``(encoder, decoder)``)."""
    objectives: tuple[str, ...]
    """The ``data.objective`` values that train this family; the first is ``auto``'s choice."""
    position_encodings: tuple[str, ...]
    """The ``model.position_encoding`` values it implements."""
    hf_converter: str | None = None
    """The module of ``meshforge.convert`` that maps it to and from Hugging Face (None: no conversion)."""
    supports_moe_parallel: bool = False
    """Tensor and pipeline parallelism split its MoE layers."""
    supports_context_parallel: bool = False
    """``parallel.cp > 1`` (its attention cores are swappable; see parallel/context_parallel.py)."""
    supports_fused_loss: bool = False
    """``train.fused_loss``: its forward returns the final hidden states (``return_hidden``) and has ``logit_scale``."""
    supports_mup: bool = False
    """``model.mup_base_dim`` (width-scaled init and logits)."""
    supports_scaling_sweeps: bool = False
    """``meshforge scaling`` plans sweeps of it (its parameter count has a closed form in scaling/shapes.py)."""
    supports_grow: bool = False
    """``meshforge convert grow`` stacks its layers (G_stack)."""
    model_options: tuple[str, ...] = ()
    """The ``model.*`` architecture options (of :data:`ARCHITECTURE_OPTIONS`) it implements; the others must
    keep their defaults."""
    uniform_blocks: Callable[[ModelConfig], bool] = lambda cfg: False
    """``uniform_blocks(cfg)``: every block of the pipeline sequence holds the same modules (all dense or all
    MoE), so a split's first and last stages bound the memory of the others (the planner prices those two)."""


MODEL_SPECS: dict[str, ModelSpec] = {}
"""Every registered family by name (:func:`register`)."""


def register(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a family; returns the spec."""
    MODEL_SPECS[spec.name] = spec
    return spec


def family_spec(family: str) -> ModelSpec:
    """The spec of ``model.family = family``; ConfigError naming the registered ones if there is none."""
    spec = MODEL_SPECS.get(family)
    if spec is None:
        raise ConfigError(f"model.family = {family!r} is not one of {', '.join(MODEL_SPECS)}")
    return spec


def families_with(feature: str) -> str:
    """The families whose spec has ``feature`` set, for error messages (``"decoder"``)."""
    return ", ".join(name for name, spec in MODEL_SPECS.items() if getattr(spec, feature))


__all__ = ["ARCHITECTURE_OPTIONS", "MODEL_SPECS", "ModelSpec", "families_with", "family_spec", "register"]
