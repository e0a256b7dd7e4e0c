"""Pipeline parallelism: split the decoder into stages by layer ranges and run a schedule.

The split (:func:`plan_pipeline`, :func:`split_model`)
    - ``pp * stages_per_rank`` stages, each a range of consecutive layers: balanced by default
      (when the layers do not divide evenly the *first* stages get one more, since the last
      stage also carries the output projection and the loss), or ``parallel.pp_split``
      (``"3,6"``: the first layer of each stage after the first);
    - stage 0 keeps the token embedding, the last stage the final norm and output projection;
      every stage is a pruned :class:`~meshforge.models.decoder.Decoder` whose forward starts
      from / stops at hidden states where those modules are ``None``;
    - placement: ``gpipe``/``1f1b`` one stage per rank; ``interleaved_1f1b`` and
      ``zero_bubble`` loop-style (rank ``r`` holds stages ``r, r+pp, r+2pp, ...``).

Initial weights are those of the single-process model: the *full* model is built and
initialised with the job's seed on every pipeline rank (as :func:`build_model` does), then
each rank keeps only its stages' modules. That costs one full fp32 model per rank at
start-up; fine up to models that fit one device, a known limit for larger ones (they need a
per-module seeded init, which the model does not offer yet).

Checkpoint names: :class:`PipelineModel` is this rank's *view* of the model -- the same
module objects under their original names (``tok_embeddings``, ``layers.<i>``, ``norm``,
``output``), so DCP checkpoints written by any pipeline layout hold the same keys as a
single-process model and load into any other layout. The trainer uses it for the
optimizer, gradient clipping and checkpoints; :class:`PipelineRunner` runs the stages.

Microbatches: ``parallel.pp_microbatches``, or by default ``local batch / train.micro_batch_size``
(the same microbatches the non-pipelined trainer accumulates over). The loss of each
microbatch is ``lm_loss(...).total / n_microbatches`` so the accumulated gradient is the mean
over the local batch, exactly as in the single-process loop; data parallel then averages
over its ranks.

Order in :func:`meshforge.parallel.parallelize`: this split first, then TP, activation
checkpointing, compile and FSDP applied to each stage module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config import ConfigError, JobConfig
from .compile import compile_enabled
from .mesh import Degrees, pipeline_stages_per_rank

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class PipelinePlan:
    pp: int
    stages_per_rank: int
    layer_ranges: tuple[tuple[int, int], ...]
    """``[start, end)`` of the layers of each stage, in stage order."""
    n_microbatches: int
    schedule: str

    @property
    def n_stages(self) -> int:
        return len(self.layer_ranges)

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """Loop-style placement: rank ``r`` holds stages ``r, r + pp, ...``."""
        return [pp_rank + k * self.pp for k in range(self.stages_per_rank)]


def split_layers(n_layers: int, n_stages: int, pp_split: str = "") -> tuple[tuple[int, int], ...]:
    """Layer ranges of ``n_stages`` stages: balanced, or from ``pp_split`` (first layer of each later stage)."""
    if pp_split.strip():
        try:
            starts = [int(s) for s in pp_split.split(",")]
        except ValueError:
            raise ConfigError(f"parallel.pp_split = {pp_split!r} must be comma-separated layer numbers, e.g. '3,6'") \
                from None
        if len(starts) != n_stages - 1:
            raise ConfigError(
                f"parallel.pp_split = {pp_split!r} gives {len(starts) + 1} stages but the pipeline has {n_stages} "
                f"(parallel.pp x stages per rank); give {n_stages - 1} split points"
            )
        bounds = [0, *starts, n_layers]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ConfigError(
                f"parallel.pp_split = {pp_split!r}: split points must increase strictly within 1..{n_layers - 1} "
                f"(model.n_layers = {n_layers}), so that every stage has at least one layer"
            )
        return tuple(zip(bounds, bounds[1:]))
    if n_layers < n_stages:
        raise ConfigError(f"model.n_layers = {n_layers} cannot cover {n_stages} pipeline stages")
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        ranges.append((start, end))
        start = end
    return tuple(ranges)


def plan_pipeline(cfg: JobConfig, d: Degrees, device_type: str | None = None) -> PipelinePlan:
    """Check the pipeline settings against the model and batch (ConfigError) and return the plan.

    ``device_type`` (when known) also checks the schedule against ``parallel.compile``.
    """
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if m.family != "decoder" or getattr(m, "moe_experts", 0):
        raise ConfigError(
            f"parallel.pp = {d.pp}: the pipeline split covers the dense decoder only (model.family = {m.family!r}, "
            f"model.moe_experts = {getattr(m, 'moe_experts', 0)}); use parallel.pp = 1"
        )
    spr = pipeline_stages_per_rank(p)
    if p.pp_schedule in SINGLE_STAGE_SCHEDULES and spr != 1:
        raise ConfigError(
            f"parallel.pp_schedule = {p.pp_schedule!r} runs one stage per rank but parallel.pp_stages_per_rank = "
            f"{spr}; use interleaved_1f1b or zero_bubble for several stages per rank"
        )
    if p.pp_schedule == "zero_bubble" and device_type is not None and compile_enabled(p.compile, device_type):
        raise ConfigError(
            "parallel.pp_schedule = 'zero_bubble' splits each backward into input and weight parts, which "
            "torch.compile'd blocks do not support; set parallel.compile = off or use interleaved_1f1b"
        )
    ranges = split_layers(cfg.model.n_layers, d.pp * spr, p.pp_split)
    local_batch = t.global_batch_size // d.dp
    n_mb = p.pp_microbatches or local_batch // t.micro_batch_size
    if local_batch % n_mb:
        raise ConfigError(
            f"parallel.pp_microbatches = {n_mb} must divide the local batch (train.global_batch_size / "
            f"data-parallel degree = {t.global_batch_size} / {d.dp} = {local_batch})"
        )
    if p.pp_schedule != "gpipe" and n_mb < d.pp:
        raise ConfigError(
            f"{n_mb} pipeline microbatches (local batch {local_batch} / train.micro_batch_size "
            f"{t.micro_batch_size}, or parallel.pp_microbatches) are fewer than parallel.pp = {d.pp}, which "
            f"schedule {p.pp_schedule!r} needs; use a smaller train.micro_batch_size or set parallel.pp_microbatches"
        )
    if p.pp_schedule in ("interleaved_1f1b", "zero_bubble"):
        rounds = max(1, n_mb // d.pp)
        if n_mb % rounds:
            raise ConfigError(
                f"schedule {p.pp_schedule!r} needs the microbatch count ({n_mb}) to be a multiple of "
                f"{rounds} (= microbatches // parallel.pp); a multiple of parallel.pp = {d.pp} always works"
            )
    return PipelinePlan(d.pp, spr, ranges, n_mb, p.pp_schedule)


# --------------------------------------------------------------------------- split


def stage_module(model: nn.Module, start: int, end: int, first: bool, last: bool) -> nn.Module:
    """A decoder holding only layers ``[start, end)`` of ``model`` (the same module objects).

    The skeleton is built on the meta device (no memory), then given ``model``'s modules;
    the embedding stays only on the first stage, norm and output only on the last.
    """
    with torch.device("meta"):
        stage = type(model)(model.cfg)
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(start, end)})
    stage.tok_embeddings = model.tok_embeddings if first else None
    stage.norm = model.norm if last else None
    stage.output = model.output if last else None
    stage.rope_cos = model.rope_cos
    stage.rope_sin = model.rope_sin
    return stage


class PipelineModel(nn.Module):
    """This pipeline rank's stages, under the single-process model's parameter names.

    ``parts`` are the stage modules (in local order, ``stage_ids`` their global indices);
    the attributes ``tok_embeddings``/``layers``/``norm``/``output`` hold the same modules
    under their original names for the optimizer and checkpoints. Not callable: the stages
    run through :class:`PipelineRunner`.
    """

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], plan: PipelinePlan):
        super().__init__()
        object.__setattr__(self, "parts", list(parts))  # not registered: the names come from below
        self.stage_ids = list(stage_ids)
        self.plan = plan
        self.cfg = parts[0].cfg
        self.tok_embeddings = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
        self.layers = nn.ModuleDict({name: block for p in parts for name, block in p.layers.items()})
        self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = next((p.output for p in parts if p.output is not None), None)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.plan.n_stages - 1 in self.stage_ids

    def forward(self, *args, **kwargs):
        raise RuntimeError("a PipelineModel is not called directly; run its stages with PipelineRunner")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n


def split_model(model: nn.Module, plan: PipelinePlan, pp_rank: int) -> list[nn.Module]:
    """The stage modules of ``pp_rank`` (in stage order); the rest of ``model`` is dropped."""
    last = plan.n_stages - 1
    return [stage_module(model, *plan.layer_ranges[s], first=s == 0, last=s == last)
            for s in plan.stages_of_rank(pp_rank)]


def apply_pipeline(model: nn.Module, mesh: DeviceMesh, d: Degrees, cfg: JobConfig,
                   parallelize_stage: Callable[[nn.Module], nn.Module]) -> PipelineModel:
    """Split ``model`` for this rank's pipeline coordinate, parallelize each stage, return the view."""
    if getattr(model.cfg, "tie_embeddings", False):
        raise ConfigError("pipeline parallel needs untied embeddings (set model.tie_embeddings = false)")
    plan = plan_pipeline(cfg, d, next(model.parameters()).device.type)
    pp_rank = mesh.get_local_rank("pp")
    stage_ids = plan.stages_of_rank(pp_rank)
    parts = [parallelize_stage(part) for part in split_model(model, plan, pp_rank)]
    return PipelineModel(parts, stage_ids, plan)


# --------------------------------------------------------------------------- running


def _schedule_class(name: str):
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
            "zero_bubble": ScheduleInterleavedZeroBubble}[name]


LossFn = Callable[[torch.Tensor, torch.Tensor, float], object]
"""``(logits, targets, z_loss_coef) -> LossParts`` (with ``total``, ``ce``, ``z_loss``)."""


class PipelineRunner:
    """Runs this rank's stages of a :class:`PipelineModel` with the configured schedule.

    ``train_step(batch)`` does forward and backward of every microbatch (gradients land
    in the stage parameters; the optimizer step is the caller's) and returns the mean ce
    and z-loss over the global batch, identical on every rank of the job.
    ``eval_loss(batch)`` is the forward-only counterpart for validation.
    """

    def __init__(self, model: PipelineModel, mesh: DeviceMesh, device: torch.device, loss_fn: LossFn,
                 z_loss_coef: float, autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        from torch.distributed.pipelining import PipelineStage

        self.model = model
        self.plan = model.plan
        self.device = device
        self.pp_group = mesh["pp"].get_group()
        self.loss_fn = loss_fn
        self.z_loss_coef = z_loss_coef
        self.autocast = autocast or contextlib.nullcontext
        self._parts: list[torch.Tensor] = []

        def get_mesh(dim_names: tuple[str, ...], layout) -> DeviceMesh:
            # activations crossing stages may be DTensors (TP/SP keeps the residual stream as
            # one): rebuild them on this rank's sub-mesh of the same named dims
            return mesh[dim_names if len(dim_names) > 1 else dim_names[0]]

        stages = [PipelineStage(part, sid, self.plan.n_stages, device, group=self.pp_group, get_mesh=get_mesh)
                  for part, sid in zip(model.parts, model.stage_ids)]
        cls = _schedule_class(self.plan.schedule)
        n = self.plan.n_microbatches
        # The loss is already divided by the microbatch count: no extra scaling of the grads.
        if self.plan.schedule in SINGLE_STAGE_SCHEDULES:
            self.schedule = cls(stages[0], n, loss_fn=self._loss, scale_grads=False)
        else:
            self.schedule = cls(stages, n, loss_fn=self._loss, scale_grads=False)
        # ranks holding the last stage: one per (dp, cp, tp) coordinate
        self._loss_holders = dist.get_world_size() // self.plan.pp

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = self.loss_fn(logits, targets, self.z_loss_coef)
        self._parts.append(torch.stack([parts.ce.detach().float(), parts.z_loss.detach().float()]))
        return parts.total / self.plan.n_microbatches

    def _run(self, batch: torch.Tensor, train: bool) -> torch.Tensor:
        """Run one batch; return this rank's [ce, z] mean over its microbatches (zeros off the last stage)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        args = (inputs,) if self.model.has_first else ()
        target = targets if self.model.has_last else None
        self._parts.clear()
        with self.autocast():
            if train:
                self.schedule.step(*args, target=target, return_outputs=False)
            else:
                self.schedule.eval(*args, target=target)
        n = self.plan.n_microbatches
        local = torch.zeros(2, device=self.device)
        if self.model.has_last:
            # the stage's shape inference may have called the loss once more before the real microbatches
            for part in self._parts[-n:]:
                local += part
            local /= n
        self._parts.clear()
        return local

    def _global_mean(self, local: torch.Tensor) -> torch.Tensor:
        """Mean over the data-parallel ranks, known to every rank (the others hold zeros)."""
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        return local / self._loss_holders

    def train_step(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward + backward of ``batch`` (this data-parallel rank's slice); returns global [ce, z_loss]."""
        return self._global_mean(self._run(batch, train=True))

    @torch.no_grad()
    def eval_losses(self, batches) -> float:
        """Mean validation ce over ``batches`` (an iterable of local batches), on every rank."""
        for part in self.model.parts:
            part.eval()
        total = torch.zeros(2, device=self.device)
        count = 0
        for batch in batches:
            total += self._run(batch.to(self.device), train=False)
            count += 1
        for part in self.model.parts:
            part.train()
        return (self._global_mean(total) / max(count, 1))[0].item()


def build_runner(model: PipelineModel, mesh: DeviceMesh, device: torch.device, loss_fn: LossFn, z_loss_coef: float,
                 autocast=None) -> PipelineRunner:
    return PipelineRunner(model, mesh, device, loss_fn, z_loss_coef, autocast)


__all__ = ["PipelineModel", "PipelinePlan", "PipelineRunner", "apply_pipeline", "build_runner", "plan_pipeline",
           "split_layers", "split_model"]
