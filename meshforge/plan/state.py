"""Exact per-rank parameter, gradient and optimizer-state sizes of a layout, by arithmetic.

The parameter shapes come from the model itself, built on the meta device (no memory);
how each is cut follows the parallel code's rules, restated here as arithmetic so that
thousands of layouts can be priced in a second (the dry run checks it against the real code):

- pipeline: this rank's stages (``pipeline.split_layers``, loop placement), the embedding on
  stage 0, the final norm and output on the last stage;
- tensor parallel: the project's TP plan (``build_tp_plan``): ``ColwiseParallel`` cuts
  weight dim 0, ``RowwiseParallel`` dim 1 of a Linear and dim 0 (the vocab) of an Embedding;
  norms, routers and MoE experts stay whole on every tp rank;
- expert parallel: expert weights ``[E, ...]`` cut on dim 0 over ``ep`` (ep consecutive ranks of
  ``dp_shard x cp``, cp inner, as ``expert_parallel.ep_mesh_layout`` lays them out);
- DeepSpeed ZeRO: the whole model (data x context parallel only), partitioned over ``dp x cp``;
- FSDP2: every parameter cut on dim 0 over ``dp_shard x cp`` (experts under ep: over
  ``dp_shard x cp / ep``, on dim 0 when the local experts divide evenly, else dim 1), replicated
  over ``dp_replicate``. DTensor and FSDP2 both cut like ``torch.chunk``: pieces of
  ``ceil(n / k)``, the last ones shorter or empty.

Bytes: parameters and gradients fp32 (FSDP2 keeps fp32 masters; bf16 is only the compute
copy), AdamW state = exp_avg + exp_avg_sq (fp32) + one 4-byte step count per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from functools import lru_cache

from ..config import JobConfig, ModelConfig
from .layouts import ZERO_MODES, Layout

FP32 = 4


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    module: str
    """Dotted path of the owning module."""
    kind: str
    """``linear``, ``embedding``, ``experts`` or ``other``."""
    layer: int
    """Block index (in pipeline order), or -1 for the embedding, -2 for the final norm/output."""


@lru_cache(maxsize=16)
def _param_table_cached(key: tuple) -> tuple[ParamInfo, ...]:
    import torch
    from torch import nn

    from ..models import MODEL_SPECS, family_spec
    from ..models.moe import GroupedExperts

    cfg = ModelConfig(**dict(key))
    with torch.device("meta"):
        model = MODEL_SPECS[cfg.family].build(cfg)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    modules = dict(model.named_modules())
    blocks = {path: i for i, path in enumerate(family_spec(cfg.family).blocks(model))}  # in pipeline order
    n_enc = cfg.n_layers
    out = []
    for name, p in model.named_parameters():  # a tied weight appears once
        mod = name.rsplit(".", 1)[0]
        m = modules[mod]
        kind = (
            "linear"
            if isinstance(m, nn.Linear)
            else "embedding"
            if isinstance(m, nn.Embedding)
            else "experts"
            if isinstance(m, GroupedExperts)
            else "other"
        )
        parts = name.split(".")
        block = next((b for b in (".".join(parts[:k]) for k in range(2, len(parts))) if b in blocks), None)
        if block is not None:
            layer = blocks[block]
        elif parts[0] in ("tok_embeddings",) or (len(parts) > 1 and parts[1] == "rel_bias"):
            layer = -1
        elif parts[0] == "encoder" and parts[1] == "norm":
            layer = n_enc - 1  # applied by the stage holding the last encoder block
        else:
            layer = -2
        out.append(ParamInfo(name, tuple(p.shape), mod, kind, layer))
    return tuple(out)


def model_key(cfg: ModelConfig) -> tuple:
    """The model config as a hashable key (its fields are plain values: a shallow copy is enough)."""
    from dataclasses import fields

    return tuple(sorted((f.name, getattr(cfg, f.name)) for f in fields(cfg)))


def param_table(cfg: ModelConfig) -> tuple[ParamInfo, ...]:
    return _param_table_cached(model_key(cfg))


def chunk_len(n: int, k: int, i: int) -> int:
    """Length of piece ``i`` of ``torch.chunk`` of ``n`` rows into ``k`` (padded with empty pieces)."""
    size = -(-n // k)
    return max(0, min(size, n - i * size))


@dataclass(frozen=True)
class Coords:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    def token_index(self, cp: int) -> int:
        """Place in the ``dp_shard x cp`` block (cp inner): FSDP's shard, and where ep borrows from."""
        return self.dp_shard * cp + self.cp

    def ep_index(self, ep: int, cp: int = 1) -> int:
        return self.token_index(cp) % ep

    def mod_ep_index(self, ep: int, cp: int = 1) -> int:
        return self.token_index(cp) // ep


def rank_coords(layout: Layout, rank: int) -> Coords:
    """Mesh coordinates of a global rank (dims ``pp, dp_replicate, dp_shard, cp, tp``, row-major; with ep,
    ``dp_shard`` = ``dp_shard_mod_ep x dp_shard_in_ep`` with ep inner, which is the same order)."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} is outside the world of {layout.world_size}")
    sizes = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp)
    coords = []
    for s in reversed(sizes):
        coords.append(rank % s)
        rank //= s
    return Coords(*reversed(coords))


def _tp_styles(cfg: JobConfig) -> dict[str, str]:
    """Module path -> ``colwise`` / ``rowwise`` / ``heads`` from the project's TP plan."""
    return _tp_styles_cached(model_key(cfg.model), cfg.parallel.loss_parallel)


@lru_cache(maxsize=16)
def _tp_styles_cached(model_key: tuple, loss_parallel: bool) -> dict[str, str]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from ..parallel.tensor_parallel import build_tp_plan

    plan = build_tp_plan(ModelConfig(**dict(model_key)), loss_parallel)  # the family's plan
    styles = {}
    for pattern, style in plan.items():
        if isinstance(style, ColwiseParallel):
            styles[pattern] = "colwise"
        elif isinstance(style, RowwiseParallel):
            styles[pattern] = "rowwise"
        elif type(style).__name__ == "HeadParallel":
            styles[pattern] = "heads"
    out = {}
    for info in _param_table_cached(model_key):
        match = next((s for pat, s in styles.items() if fnmatch(info.module, pat)), None)
        if match:
            out[info.module] = match
    return out


def _stage_layers(cfg: JobConfig, layout: Layout, pp_rank: int) -> tuple[set[int], bool, bool]:
    """Blocks held by ``pp_rank`` and whether it holds the first / last stage."""
    from ..parallel.mesh import pipeline_layers, pipeline_stages_per_rank
    from ..parallel.pipeline import split_layers

    n_layers, what = pipeline_layers(cfg.model)
    if layout.pp == 1:
        return set(range(n_layers)), True, True
    spr = pipeline_stages_per_rank(cfg.parallel)
    n_stages = layout.pp * spr
    ranges = split_layers(n_layers, n_stages, cfg.parallel.pp_split, what)
    stages = [pp_rank + k * layout.pp for k in range(spr)]
    held = {i for s in stages for i in range(*ranges[s])}
    return held, 0 in stages, n_stages - 1 in stages


def local_numels(cfg: JobConfig, layout: Layout, rank: int, fsdp: bool | None = None) -> list[tuple[ParamInfo, int]]:
    """Each parameter this rank holds, with the number of its elements stored on the rank
    (``fsdp=False``: before FSDP's cut, i.e. what it all-gathers)."""
    c = rank_coords(layout, rank)
    held, first, last = _stage_layers(cfg, layout, c.pp)
    styles = _tp_styles(cfg) if layout.tp > 1 else {}
    if fsdp is None:
        fsdp = ZERO_MODES[layout.zero][0] == "fsdp2" and layout.sharded
    out = []
    cut: dict[tuple, int] = {}  # (shape, kind, style) -> elements here: every block repeats the same few
    for info in param_table(cfg.model):
        if (
            info.layer >= 0
            and info.layer not in held
            or info.layer == -1
            and not first
            or info.layer == -2
            and not last
        ):
            continue
        key = (info.shape, info.kind, styles.get(info.module))
        if key not in cut:
            cut[key] = _local_numel(*key, layout, c, fsdp)
        out.append((info, cut[key]))
    return out


def _local_numel(shape: tuple[int, ...], kind: str, style: str | None, layout: Layout, c: Coords, fsdp: bool) -> int:
    """Elements of one parameter of ``shape`` on the rank at ``c``: the tp cut of its ``style``, then ep's
    (experts) and FSDP's."""
    shape = list(shape)
    if style == "colwise" or (style == "rowwise" and kind == "embedding"):
        shape[0] = chunk_len(shape[0], layout.tp, c.tp)
    elif style == "rowwise":
        shape[1] = chunk_len(shape[1], layout.tp, c.tp)
    elif style == "heads":
        shape[1] = chunk_len(shape[1], layout.tp, c.tp)
    if kind == "experts" and layout.ep > 1:  # ep: consecutive ranks of dp_shard x cp
        shape[0] = chunk_len(shape[0], layout.ep, c.ep_index(layout.ep, layout.cp))
        if fsdp:
            k = layout.fsdp_shard // layout.ep
            dim = 0 if shape[0] % k == 0 else 1
            shape[dim] = chunk_len(shape[dim], k, c.mod_ep_index(layout.ep, layout.cp))
    elif fsdp:  # over dp_shard x cp, flattened with cp inner
        shape[0] = chunk_len(shape[0], layout.fsdp_shard, c.token_index(layout.cp))
    n = 1
    for s in shape:
        n *= s
    return n


def state_bytes(cfg: JobConfig, layout: Layout, rank: int) -> dict[str, int]:
    """``params``, ``grads``, ``optimizer`` bytes held by ``rank`` (FSDP2 layouts: exact; DeepSpeed: its
    ZeRO rules -- bf16 or fp32 model copy plus the partitioned fp32 master and Adam moments)."""
    held = local_numels(cfg, layout, rank)
    numel = sum(n for _, n in held)
    backend, _, stage = ZERO_MODES[layout.zero]
    if backend == "deepspeed":  # the engine's data-parallel group is every rank: dp x cp
        return _deepspeed_state(cfg, numel, layout.dp * layout.cp)
    return {"params": FP32 * numel, "grads": FP32 * numel, "optimizer": 2 * FP32 * numel + FP32 * len(held)}


def _deepspeed_state(cfg: JobConfig, numel: int, ranks: int) -> dict[str, int]:
    """DeepSpeed ZeRO over ``ranks`` (data x context parallel: the cp ranks are data-parallel ranks to the
    engine): with bf16 a 2-byte model copy (stage 3: partitioned), 2-byte gradients (stage 2/3: partitioned)
    and, partitioned in every stage, the fp32 master plus Adam moments. On the CPU (fp32) the model copy is
    the master."""
    stage = cfg.parallel.zero_stage
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and cfg.train.device != "cpu")
    width = 2 if bf16 else FP32
    part = -(-numel // ranks)
    params = width * (part if stage == 3 else numel)
    grads = width * (part if stage >= 2 else numel)
    optimizer = (3 if bf16 else 2) * FP32 * part
    return {"params": params, "grads": grads, "optimizer": optimizer}


def unsharded_numel(cfg: JobConfig, layout: Layout, rank: int) -> dict[str, int]:
    """Element counts on ``rank`` before FSDP's cut (tp/ep cuts applied): ``largest_unit`` (the
    largest FSDP unit: a block, or the root's embedding + norm + output), ``largest_block``,
    ``root``, ``root_grad_early`` (the root's parameters whose gradient backward makes first: the
    final norm and output, the embedding too when tied to it), ``all``, ``units`` (how many),
    ``roots`` (stage modules whose root holds parameters) and ``largest_param`` (one parameter)."""
    per_layer: dict[int, int] = {}
    held = local_numels(cfg, layout, rank, fsdp=False)
    for info, n in held:
        per_layer[info.layer] = per_layer.get(info.layer, 0) + n
    blocks = [v for k, v in per_layer.items() if k >= 0]
    root = per_layer.get(-1, 0) + per_layer.get(-2, 0)
    early = per_layer.get(-2, 0) + (per_layer.get(-1, 0) if cfg.model.tie_embeddings and per_layer.get(-2) else 0)
    # stage modules whose root holds parameters: one model without a pipeline; under one, the first and
    # the last stage (embedding; final norm and output), never on one rank
    roots = int(root > 0) if layout.pp == 1 else int(per_layer.get(-1, 0) > 0) + int(per_layer.get(-2, 0) > 0)
    return {
        "largest_unit": max([*blocks, root]),
        "largest_block": max(blocks, default=0),
        "root": root,
        "root_grad_early": early,
        "all": sum(per_layer.values()),
        "units": len(blocks) + roots,
        "roots": roots,
        "largest_param": max((n for _, n in held), default=0),
    }
