"""Pipeline parallelism: split the decoder or the encoder-decoder into stages by layer ranges and run a schedule.

The split (:func:`plan_pipeline`, :func:`split_model`)
    - ``pp * stages_per_rank`` stages, each a range of consecutive layers: balanced by default
      (when the layers do not divide evenly the *first* stages get one more, since the last
      stage also carries the output projection and the loss), or ``parallel.pp_split``
      (``"3,6"``: the first layer of each stage after the first);
    - stage 0 keeps the token embedding, the last stage the final norm and output projection
      (tied embeddings: each holds a copy of the shared matrix, their gradients summed after
      every backward, see ``tied_embeddings.py``);
    - each stage is the family's stage module (``ModelSpec.stage``: model code, in ``models/``):
      a decoder stage is a pruned :class:`~meshforge.models.decoder.Decoder` whose forward starts
      from / stops at hidden states; an encoder-decoder splits its encoder then decoder layers as
      one sequence, the encoder output riding to every decoder stage
      (:mod:`meshforge.models.encoder_decoder_stage`);
    - placement: ``gpipe``/``1f1b`` one stage per rank; ``interleaved_1f1b`` and
      ``zero_bubble`` loop-style (rank ``r`` holds stages ``r, r+pp, r+2pp, ...``).

Activations between stages are whatever the family's stages pass (a tensor, or a tuple whose
shape differs between boundaries); each stage's activation shapes and gradient placements come
from the schedules' dynamic metadata inference, so every schedule works (tested: gpipe, 1f1b,
interleaved 1F1B and zero-bubble). Keyword inputs of the model (an encoder-decoder's source
mask, ``ModelSpec.stage_inputs``) go to every stage, split into the same microbatches.

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

Microbatches (:func:`pipeline_microbatches`): ``parallel.pp_microbatches``; else
``local batch / train.micro_batch_size`` when that is set (the same microbatches the
non-pipelined trainer accumulates over); else the divisor of the local batch nearest to
``2 * pp * stages per rank`` that the schedule accepts, so that every schedule runs with only
``parallel.pp`` given. The loss of each microbatch is ``lm_loss(...).total / n_microbatches``
so the accumulated gradient is the mean over the local batch, exactly as in the
single-process loop; data parallel then averages over its ranks.

Order in :func:`meshforge.parallel.parallelize`: this split first, then TP, activation
checkpointing, compile and FSDP applied to each stage module.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..models import ModelSpec, family_spec
from ..models.moe import RouterStats, collect_router_stats
from .context_parallel import context_parallel_inputs

# the plan (stages, layer ranges, microbatches) lives in pipeline_plan.py; its names are re-exported here
from .pipeline_plan import (
    SCHEDULES,
    SINGLE_STAGE_SCHEDULES,
    PipelinePlan,
    pipeline_microbatches,
    plan_pipeline,
    schedule_refuses,
    split_layers,
)
from .tied_embeddings import TiedEmbeddingGrads

SHARED_KWARGS = ("positions",)
"""Keyword inputs of every stage that every microbatch shares (not split with the batch)."""


# --------------------------------------------------------------------------- split


class _Part(nn.Module):
    """A named container in a :class:`PipelineModel` view (``encoder``/``decoder``)."""


class PipelineModel(nn.Module):
    """This pipeline rank's stages, under the single-process model's parameter names.

    ``parts`` are the stage modules (in local order, ``stage_ids`` their global indices);
    the attributes ``tok_embeddings``/``layers``/``norm``/``output`` (an encoder-decoder:
    ``tok_embeddings``, ``encoder``/``decoder`` with ``layers``/``rel_bias``/``norm``, ``output``)
    hold the same modules under their original names for the optimizer and checkpoints. Not
    callable: the stages run through :class:`PipelineRunner`.
    """

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], plan: PipelinePlan):
        super().__init__()
        object.__setattr__(self, "parts", list(parts))  # not registered: the names come from below
        self.stage_ids = list(stage_ids)
        self.plan = plan
        self.cfg = parts[0].cfg
        self.tok_embeddings = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
        if self.tok_embeddings is None and self.cfg.tie_embeddings and self.has_last:
            # this rank's copy of the tied matrix is the output's: give it the single-process name
            # first, as the single-process model does (see tied_embeddings.py)
            self.tok_embeddings = _Part()
            self.tok_embeddings.weight = parts[-1].output.weight
        self.spec.stage_view(self, parts)  # layers, norms, ... under the family's names
        self.output = next((p.output for p in parts if p.output is not None), None)

    @property
    def spec(self) -> ModelSpec:
        return family_spec(self.cfg.family)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.plan.n_stages - 1 in self.stage_ids

    def stage_inputs(self, args: tuple) -> tuple[tuple, dict]:
        """The model's positional inputs -> (the first stage's inputs, keyword inputs of every stage)."""
        return self.spec.stage_inputs(args)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a PipelineModel is not called directly; run its stages with PipelineRunner")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n


def split_model(model: nn.Module, plan: PipelinePlan, pp_rank: int) -> list[nn.Module]:
    """The stage modules of ``pp_rank`` (in stage order); the rest of ``model`` is dropped."""
    last, stage = plan.n_stages - 1, family_spec(model.cfg.family).stage
    return [stage(model, *plan.layer_ranges[s], first=s == 0, last=s == last) for s in plan.stages_of_rank(pp_rank)]


def apply_pipeline(
    model: nn.Module, mesh: DeviceMesh, plan: PipelinePlan, parallelize_stage: Callable[[nn.Module], nn.Module]
) -> PipelineModel:
    """Split ``model`` by ``plan`` (:func:`~meshforge.parallel.job_checks.check_job`'s) for this rank's
    pipeline coordinate, parallelize each stage, return the view."""
    pp_rank = mesh.get_local_rank("pp")
    stage_ids = plan.stages_of_rank(pp_rank)
    parts = [parallelize_stage(part) for part in split_model(model, plan, pp_rank)]
    return PipelineModel(parts, stage_ids, plan)


# --------------------------------------------------------------------------- running


def schedule_class(name: str):
    """The torch.distributed.pipelining class of ``parallel.pp_schedule`` ``name`` (the runner builds it; the dry
    run asks it for its order of forwards and backwards)."""
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    return {
        "gpipe": ScheduleGPipe,
        "1f1b": Schedule1F1B,
        "interleaved_1f1b": ScheduleInterleaved1F1B,
        "zero_bubble": ScheduleInterleavedZeroBubble,
    }[name]


LossFn = Callable[[torch.Tensor, torch.Tensor, float], object]
"""``(logits, targets, z_loss_coef) -> LossParts`` (with ``total``, ``ce``, ``z_loss``)."""
InputsFn = Callable[[torch.Tensor], tuple[tuple, torch.Tensor]]
"""A loader batch -> (the model's positional inputs, targets): the objective's ``model_inputs``."""


def stage_takes_mesh() -> bool:
    """Whether this torch's ``PipelineStage`` takes ``get_mesh`` (its stages then pass DTensor
    activations, as TP + SP produce; torch 2.11's stages pass plain tensors only)."""
    from torch.distributed.pipelining import PipelineStage

    return "get_mesh" in inspect.signature(PipelineStage.__init__).parameters


def lm_inputs(batch: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """Next-token prediction: inputs are the first ``seq_len`` tokens, targets the last."""
    return (batch[:, :-1],), batch[:, 1:]


class PipelineRunner:
    """Runs this rank's stages of a :class:`PipelineModel` with the configured schedule.

    ``train_step(batch)`` does forward and backward of every microbatch (gradients land
    in the stage parameters; the optimizer step is the caller's) and returns the mean ce
    and z-loss over the global batch, identical on every rank of the job.
    ``eval_loss(batch)`` is the forward-only counterpart for validation. ``model_inputs``
    turns a batch into the model's inputs and targets (the objective's; next-token by default;
    under context parallel followed by this rank's zigzag split). A decoder's document ids and
    RoPE positions reach every stage as keyword inputs (``PipelineModel.stage_inputs``).
    """

    def __init__(
        self,
        model: PipelineModel,
        mesh: DeviceMesh,
        device: torch.device,
        loss_fn: LossFn,
        z_loss_coef: float,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        model_inputs: InputsFn = lm_inputs,
        stage_kwargs: dict | None = None,
    ):
        from torch.distributed.pipelining import PipelineStage

        self.model = model
        self.plan = model.plan
        self.device = device
        self.pp_group = mesh["pp"].get_group()
        self.loss_fn = loss_fn
        self.z_loss_coef = z_loss_coef
        self.autocast = autocast or contextlib.nullcontext
        self.model_inputs = context_parallel_inputs(model_inputs, mesh)  # cp > 1: this rank's zigzag chunks
        self.stage_kwargs = dict(stage_kwargs or {})
        """Keyword inputs of every stage's forward (the fused loss: ``return_hidden=True``)."""
        self._parts: list[torch.Tensor] = []

        def get_mesh(dim_names: tuple[str, ...], layout) -> DeviceMesh:
            # activations crossing stages may be DTensors (TP/SP keeps the residual stream as
            # one): rebuild them on this rank's sub-mesh of the same named dims
            return mesh[dim_names if len(dim_names) > 1 else dim_names[0]]

        # torch 2.11's PipelineStage takes no get_mesh: its stages pass plain tensors only (check_job)
        dtensor_kw = {"get_mesh": get_mesh} if stage_takes_mesh() else {}
        self.stages = [
            PipelineStage(part, sid, self.plan.n_stages, device, group=self.pp_group, **dtensor_kw)
            for part, sid in zip(model.parts, model.stage_ids)
        ]
        self.schedule = None  # built for the keyword inputs of the first batch (see _schedule_for)
        self._schedule_trains = True  # whether it was built for training (else for evaluation)
        # ranks holding the last stage: one per (dp, cp, tp) coordinate
        self._loss_holders = dist.get_world_size() // self.plan.pp
        tied = model.cfg.tie_embeddings and (model.has_first or model.has_last)
        self.tied = TiedEmbeddingGrads(model.tok_embeddings.weight if tied else None, self.pp_group, model.has_last)

    def _schedule_for(self, kwargs: dict, train: bool):
        """The schedule (built for the keyword inputs every batch of the job has): keyword
        tensors split into microbatches with the batch, except the shared RoPE ``positions`` and the
        runner's own ``stage_kwargs`` (flags such as ``return_hidden``), which every microbatch shares.

        Built anew at each train/eval switch: a schedule sets up its stages' receive buffers once, with
        or without gradients, and torch 2.11's keep them across the switch (newer ones redo it)."""
        if self.schedule is None or self._schedule_trains != train:
            self._schedule_trains = train
            from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate

            shared = set(SHARED_KWARGS) | set(self.stage_kwargs)
            spec = {k: _Replicate() if k in shared else TensorChunkSpec(0) for k in kwargs}
            cls, n = schedule_class(self.plan.schedule), self.plan.n_microbatches
            stages = self.stages[0] if self.plan.schedule in SINGLE_STAGE_SCHEDULES else self.stages
            # The loss is already divided by the microbatch count: no extra scaling of the grads.
            self.schedule = cls(stages, n, loss_fn=self._loss, kwargs_chunk_spec=spec, scale_grads=False)
        return self.schedule

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = self.loss_fn(logits, targets, self.z_loss_coef)
        self._parts.append(torch.stack([parts.ce.detach().float(), parts.z_loss.detach().float()]))
        return parts.total / self.plan.n_microbatches

    def _run(self, batch: torch.Tensor, train: bool, stats: RouterStats | None = None) -> torch.Tensor:
        """Run one batch; return this rank's [ce, z] mean over its microbatches (zeros off the last stage).

        MoE router statistics of the training forwards go to ``stats``. The first schedule call
        after a switch between training and evaluation (the very first one too) runs each stage
        once more, before its microbatches, on placeholder inputs to infer the shapes it sends
        and receives; only the last ``n_microbatches`` passes of each layer are real, so the
        rest are dropped (they must not steer the routing bias; their aux loss may be NaN)."""
        inputs, targets = self.model_inputs(batch)
        # first-stage inputs; keyword inputs (an encoder-decoder's source mask) go to every stage
        inputs, kwargs = self.model.stage_inputs(inputs)
        kwargs.update(self.stage_kwargs)
        # contiguous (token ids and masks): torch 2.11's stages check input strides against
        # their inferred metadata, and ``batch[:, :-1]`` is a strided view
        same = lambda x: x.contiguous() if isinstance(x, torch.Tensor) else x  # noqa: E731
        args = tuple(map(same, inputs)) if self.model.has_first else ()
        kwargs = {k: same(v) for k, v in kwargs.items()}
        target = targets if self.model.has_last else None
        self._parts.clear()
        n = self.plan.n_microbatches
        with self.autocast(), collect_router_stats(self.model.parts, stats or RouterStats()):
            schedule = self._schedule_for(kwargs, train)
            if train:
                schedule.step(*args, target=target, return_outputs=False, **kwargs)
            else:
                schedule.eval(*args, target=target, **kwargs)
        if stats is not None:
            stats.keep_last(n)
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

    def train_step(
        self,
        batch: torch.Tensor,
        stats: RouterStats | None = None,
        extend: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward + backward of ``batch`` (this data-parallel rank's slice); returns global [ce, z_loss].

        MoE router statistics go to ``stats``; with tied embeddings, the two copies' gradients
        are summed before this returns. ``extend`` appends values of this rank to the local
        [ce, z_loss] before the reduction (a flag: a sum over ranks > 0 iff any rank set it);
        they come back after the means, divided as they are."""
        local = self._run(batch, train=True, stats=stats)
        self.tied.sum_()
        return self._global_mean(local if extend is None else extend(local))

    @torch.no_grad()
    def eval_losses(self, batches) -> float:
        """Mean validation ce over ``batches`` (an iterable of local batches on this rank's device), on every rank."""
        for part in self.model.parts:
            part.eval()
        total = torch.zeros(2, device=self.device)
        count = 0
        for batch in batches:
            total += self._run(batch, train=False)
            count += 1
        for part in self.model.parts:
            part.train()
        return (self._global_mean(total) / max(count, 1))[0].item()


def build_runner(
    model: PipelineModel,
    mesh: DeviceMesh,
    device: torch.device,
    loss_fn: LossFn,
    z_loss_coef: float,
    autocast=None,
    model_inputs: InputsFn = lm_inputs,
    stage_kwargs: dict | None = None,
) -> PipelineRunner:
    return PipelineRunner(model, mesh, device, loss_fn, z_loss_coef, autocast, model_inputs, stage_kwargs)


__all__ = [
    "SCHEDULES",
    "SINGLE_STAGE_SCHEDULES",
    "PipelineModel",
    "PipelinePlan",
    "PipelineRunner",
    "apply_pipeline",
    "build_runner",
    "lm_inputs",
    "pipeline_microbatches",
    "plan_pipeline",
    "schedule_class",
    "schedule_refuses",
    "split_layers",
    "split_model",
    "stage_takes_mesh",
]
