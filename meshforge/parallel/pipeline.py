"""Pipeline parallelism: split the decoder or the encoder-decoder into stages by layer ranges and run a schedule.

The split (:func:`plan_pipeline`, :func:`split_model`)
    - ``pp * stages_per_rank`` stages, each a range of consecutive layers: balanced by default
      (when the layers do not divide evenly the *first* stages get one more, since the last
      stage also carries the output projection and the loss), or ``parallel.pp_split``
      (``"3,6"``: the first layer of each stage after the first);
    - stage 0 keeps the token embedding, the last stage the final norm and output projection
      (tied embeddings: each holds a copy of the shared matrix, their gradients summed after
      every backward, see ``tied_embeddings.py``);
      every stage is a pruned :class:`~meshforge.models.decoder.Decoder` whose forward starts
      from / stops at hidden states where those modules are ``None``;
    - placement: ``gpipe``/``1f1b`` one stage per rank; ``interleaved_1f1b`` and
      ``zero_bubble`` loop-style (rank ``r`` holds stages ``r, r+pp, r+2pp, ...``).

The encoder-decoder (:class:`EncoderDecoderStage`) is split the same way over one sequence
of blocks: the encoder's layers, then the decoder's (``pp_split`` counts in that sequence:
with 3 + 3 layers, ``"3"`` puts the encoder on stage 0 and the decoder on stage 1). Each
stage passes the next one a tuple of tensors, as Megatron's encoder-decoder pipeline does:

    stage 0:   h = E[src], y = E[tgt_in]; the relative position biases of both stacks
    boundary inside the encoder:      (h, encoder position bias, y, decoder position bias)
    boundary after the encoder:       (enc, y, decoder position bias)
    last stage: decoder norm, output projection -> logits

- The stage holding the last encoder layer applies the encoder's final norm; from there
  the encoder output ``enc`` travels with the decoder stream to every later stage (each
  decoder layer's cross-attention reads it), and its gradient, summed over those layers,
  travels back the same way.
- Stage 0 holds the token embedding and both relative position tables: it embeds the
  decoder inputs too and computes each stack's position bias once, and the biases ride
  along; they hold only this rank's heads under TP (a plain tensor). Only a tied output
  projection lives on a second stage (the last), as a copy whose gradient is summed with
  the embedding's (``tied_embeddings.py``).
- The source padding mask is not an activation: the runner gives it to every stage as a
  keyword argument (``torch.distributed.pipelining`` splits keyword tensors into the same
  microbatches on each stage), and each stage builds its own attention masks from it.
- The tuples differ between boundaries (and tensors may pass a stage unchanged, e.g. the
  decoder stream through an encoder-only stage): each stage's activation shapes and
  gradient placements come from the schedules' dynamic metadata inference, so every
  schedule works (tested: gpipe, 1f1b, interleaved 1F1B and zero-bubble).

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
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config import CHOICES, ConfigError, JobConfig, micro_batch_size
from ..models.encoder_decoder import Stack, add_biases, padding_bias
from ..models.moe import RouterStats, collect_router_stats
from .compile import compile_enabled
from .mesh import Degrees, pipeline_layers, pipeline_stages_per_rank
from .tied_embeddings import TiedEmbeddingGrads

SCHEDULES = CHOICES["parallel.pp_schedule"]
"""Every pipeline schedule, as the type of ``parallel.pp_schedule`` lists them."""
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


def split_layers(n_layers: int, n_stages: int, pp_split: str = "", what: str = "model.n_layers",
                 stages_from: str = "") -> tuple[tuple[int, int], ...]:
    """Layer ranges of ``n_stages`` stages: balanced, or from ``pp_split`` (first layer of each later stage).

    ``what`` names the layer count in errors (an encoder-decoder splits encoder + decoder layers),
    ``stages_from`` where the stage count comes from."""
    if n_layers < n_stages:
        raise ConfigError(f"{what} = {n_layers} cannot cover {n_stages} pipeline stages{stages_from}")
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
                f"({what} = {n_layers}), so that every stage has at least one layer"
            )
        return tuple(zip(bounds, bounds[1:]))
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
    p, m = cfg.parallel, cfg.model
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
    n_layers, what = pipeline_layers(m)
    ranges = split_layers(n_layers, d.pp * spr, p.pp_split, what, f" (parallel.pp = {d.pp} x {spr} stages per rank)")
    n_mb = pipeline_microbatches(cfg, d, spr)
    return PipelinePlan(d.pp, spr, ranges, n_mb, p.pp_schedule)


def schedule_refuses(schedule: str, n_microbatches: int, pp: int) -> str:
    """Why ``schedule`` cannot run ``n_microbatches`` on ``pp`` ranks (empty when it can)."""
    if schedule != "gpipe" and n_microbatches < pp:
        return f"{n_microbatches} microbatches are fewer than parallel.pp = {pp}, which schedule {schedule!r} needs"
    if schedule in ("interleaved_1f1b", "zero_bubble"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            return (f"schedule {schedule!r} needs the microbatch count ({n_microbatches}) to be a multiple of {rounds} "
                    f"(= microbatches // parallel.pp); a multiple of parallel.pp = {pp} always works")
    return ""


def pipeline_microbatches(cfg: JobConfig, d: Degrees, stages_per_rank: int) -> int:
    """Microbatches per pipeline step, as ``parallel.pp_microbatches`` documents: that value; else
    local batch / ``train.micro_batch_size`` when that is set; else the divisor of the local batch
    nearest to ``2 * pp * stages_per_rank`` that the schedule accepts (the larger one on a tie)."""
    p, t = cfg.parallel, cfg.train
    micro = micro_batch_size(t, d.dp)  # checks that the global batch splits over the dp ranks
    local_batch = t.global_batch_size // d.dp
    if p.pp_microbatches:
        n_mb, source = p.pp_microbatches, f"parallel.pp_microbatches = {p.pp_microbatches}"
        if local_batch % n_mb:
            raise ConfigError(
                f"{source} must divide the local batch (train.global_batch_size / data-parallel degree = "
                f"{t.global_batch_size} / {d.dp} = {local_batch})"
            )
    elif t.micro_batch_size:
        n_mb = local_batch // micro
        source = f"local batch {local_batch} / train.micro_batch_size {micro} = {n_mb} microbatches"
    else:
        target = 2 * d.pp * stages_per_rank
        fits = [n for n in range(1, local_batch + 1)
                if local_batch % n == 0 and not schedule_refuses(p.pp_schedule, n, d.pp)]
        if not fits:
            raise ConfigError(
                f"no microbatch count suits schedule {p.pp_schedule!r} with parallel.pp = {d.pp} on a local batch of "
                f"{local_batch} (train.global_batch_size / data-parallel degree = {t.global_batch_size} / {d.dp}); "
                f"raise train.global_batch_size to a multiple of {d.pp * d.dp}"
            )
        return min(fits, key=lambda n: (abs(n - target), -n))
    why = schedule_refuses(p.pp_schedule, n_mb, d.pp)
    if why:
        raise ConfigError(f"{source}: {why}; set a smaller train.micro_batch_size, parallel.pp_microbatches, or 0 "
                          "for both to pick one that fits")
    return n_mb


# --------------------------------------------------------------------------- split


def stage_module(model: nn.Module, start: int, end: int, first: bool, last: bool) -> nn.Module:
    """A decoder holding only layers ``[start, end)`` of ``model`` (the same module objects).

    The skeleton is built on the meta device (no memory), then given ``model``'s modules;
    the embedding stays only on the first stage, norm and output only on the last.
    An encoder-decoder gets an :class:`EncoderDecoderStage` instead.
    """
    if model.cfg.family == "encoder_decoder":
        return EncoderDecoderStage(model, start, end, first, last)
    with torch.device("meta"):
        stage = type(model)(model.cfg)
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(start, end)})
    stage.tok_embeddings = model.tok_embeddings if first else None
    stage.norm = model.norm if last else None
    stage.output = model.output if last else None
    stage.rope_cos = model.rope_cos
    stage.rope_sin = model.rope_sin
    return stage


class StackPart(Stack):
    """The part of an encoder or decoder :class:`~meshforge.models.encoder_decoder.Stack` that one
    stage holds: some of its layers (under their own indices), maybe its position table and its
    final norm (``None`` where another stage holds them). The same module objects as the model's."""

    def __init__(self, stack: Stack, layer_ids: range, rel_bias: bool, norm: bool):
        nn.Module.__init__(self)  # not Stack.__init__: nothing new is built
        self.causal = stack.causal
        self.layers = nn.ModuleDict({str(i): stack.layers[str(i)] for i in layer_ids})
        self.rel_bias = stack.rel_bias if rel_bias else None
        self.norm = stack.norm if norm else None


class EncoderDecoderStage(nn.Module):
    """Blocks ``[start, end)`` of an encoder-decoder, counting encoder then decoder layers.

    ``forward(src, tgt_in, src_mask=)`` on the first stage, ``forward(*activations, src_mask=)``
    on the others; returns the activations of the next boundary (see the module docstring), or
    the logits on the last stage. Modules keep the model's names (``encoder.layers.<i>``,
    ``decoder.rel_bias``, ...), so the TP plan, FSDP and checkpoints see the usual paths.
    """

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        n_enc = len(model.encoder.layers)
        self.start, self.end, self.n_enc, self.first, self.last = start, end, n_enc, first, last
        self.tok_embeddings = model.tok_embeddings if first else None
        self.encoder = StackPart(model.encoder, range(min(start, n_enc), min(end, n_enc)), rel_bias=first,
                                 norm=start < n_enc <= end)
        self.decoder = StackPart(model.decoder, range(max(start, n_enc) - n_enc, max(end, n_enc) - n_enc),
                                 rel_bias=first, norm=last)
        self.output = model.output if last else None
        self.rope_cos = model.rope_cos
        self.rope_sin = model.rope_sin

    @property
    def relative(self) -> bool:
        return self.cfg.position_encoding == "relative"

    def forward(self, *acts: torch.Tensor, src_mask: torch.Tensor | None = None):
        rope = (self.rope_cos, self.rope_sin) if self.cfg.position_encoding == "rope" else None
        enc_pos = dec_pos = None
        if self.first:
            src, tgt_in = acts
            h, y = self.tok_embeddings(src), self.tok_embeddings(tgt_in)
            if self.relative:
                enc_pos = self.encoder.position_bias(src.shape[1])
                dec_pos = self.decoder.position_bias(tgt_in.shape[1])
        elif self.start < self.n_enc:  # inside the encoder
            h, *rest = acts
            enc_pos, y, dec_pos = rest if self.relative else (None, *rest, None)
        else:  # the encoder is done: h is its output
            h, y, *rest = acts
            dec_pos = rest[0] if self.relative else None
        if self.encoder.layers:
            bias = add_biases(enc_pos, self.encoder.mask_bias(h.shape[1], src_mask, h.device))
            for block in self.encoder.layers.values():
                h = block(h, bias, rope)
        if self.encoder.norm is not None:
            h = self.encoder.norm(h)
        if self.end < self.n_enc:  # the encoder goes on on the next stage
            return _sendable((h, enc_pos, y, dec_pos) if self.relative else (h, y))
        if self.decoder.layers:
            self_bias = add_biases(dec_pos, self.decoder.mask_bias(y.shape[1], None, y.device))
            cross_bias = padding_bias(src_mask)
            for block in self.decoder.layers.values():
                y = block(y, h, self_bias, cross_bias, rope)
        if not self.last:
            return _sendable((h, y, dec_pos) if self.relative else (h, y))
        y = self.decoder.norm(y)
        if self.cfg.tie_embeddings:
            y = y * self.cfg.dim**-0.5
        return self.output(y)


def _sendable(acts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Activations as point-to-point sends need them: contiguous (a position bias is a permuted view)."""
    return tuple(t.contiguous() for t in acts)


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
        if self.encoder_decoder:
            for stack in ("encoder", "decoder"):
                view = _Part()
                view.layers = nn.ModuleDict({n: b for p in parts for n, b in getattr(p, stack).layers.items()})
                for name in ("rel_bias", "norm"):
                    setattr(view, name, next((getattr(getattr(p, stack), name) for p in parts
                                              if getattr(getattr(p, stack), name) is not None), None))
                setattr(self, stack, view)
        else:
            self.layers = nn.ModuleDict({name: block for p in parts for name, block in p.layers.items()})
            self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = next((p.output for p in parts if p.output is not None), None)

    @property
    def encoder_decoder(self) -> bool:
        return self.cfg.family == "encoder_decoder"

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.plan.n_stages - 1 in self.stage_ids

    def stage_inputs(self, args: tuple) -> tuple[tuple, dict]:
        """The model's positional inputs -> (the first stage's inputs, keyword inputs of every stage)."""
        if self.encoder_decoder:
            src, tgt_in, *mask = args
            return (src, tgt_in), ({"src_mask": mask[0]} if mask and mask[0] is not None else {})
        return tuple(args), {}

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


def apply_pipeline(model: nn.Module, mesh: DeviceMesh, plan: PipelinePlan,
                   parallelize_stage: Callable[[nn.Module], nn.Module]) -> PipelineModel:
    """Split ``model`` by ``plan`` (:func:`~meshforge.parallel.job_checks.check_job`'s) for this rank's
    pipeline coordinate, parallelize each stage, return the view."""
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
InputsFn = Callable[[torch.Tensor], tuple[tuple, torch.Tensor]]
"""A loader batch -> (the model's positional inputs, targets): the objective's ``model_inputs``."""


def lm_inputs(batch: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """Next-token prediction: inputs are the first ``seq_len`` tokens, targets the last."""
    return (batch[:, :-1],), batch[:, 1:]


class PipelineRunner:
    """Runs this rank's stages of a :class:`PipelineModel` with the configured schedule.

    ``train_step(batch)`` does forward and backward of every microbatch (gradients land
    in the stage parameters; the optimizer step is the caller's) and returns the mean ce
    and z-loss over the global batch, identical on every rank of the job.
    ``eval_loss(batch)`` is the forward-only counterpart for validation. ``model_inputs``
    turns a batch into the model's inputs and targets (the objective's; next-token by default).
    """

    def __init__(self, model: PipelineModel, mesh: DeviceMesh, device: torch.device, loss_fn: LossFn,
                 z_loss_coef: float, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 model_inputs: InputsFn = lm_inputs, stage_kwargs: dict | None = None):
        from torch.distributed.pipelining import PipelineStage

        self.model = model
        self.plan = model.plan
        self.device = device
        self.pp_group = mesh["pp"].get_group()
        self.loss_fn = loss_fn
        self.z_loss_coef = z_loss_coef
        self.autocast = autocast or contextlib.nullcontext
        self.model_inputs = model_inputs
        self.stage_kwargs = dict(stage_kwargs or {})
        """Keyword inputs of every stage's forward (the fused loss: ``return_hidden=True``)."""
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
        tied = model.cfg.tie_embeddings and (model.has_first or model.has_last)
        self.tied = TiedEmbeddingGrads(model.tok_embeddings.weight if tied else None, self.pp_group, model.has_last)

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
        args = inputs if self.model.has_first else ()
        target = targets if self.model.has_last else None
        self._parts.clear()
        n = self.plan.n_microbatches
        with self.autocast(), collect_router_stats(self.model.parts, stats or RouterStats()):
            if train:
                self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
            else:
                self.schedule.eval(*args, target=target, **kwargs)
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

    def train_step(self, batch: torch.Tensor, stats: RouterStats | None = None) -> torch.Tensor:
        """Forward + backward of ``batch`` (this data-parallel rank's slice); returns global [ce, z_loss].

        MoE router statistics go to ``stats``; with tied embeddings, the two copies' gradients
        are summed before this returns."""
        local = self._run(batch, train=True, stats=stats)
        self.tied.sum_()
        return self._global_mean(local)

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
                 autocast=None, model_inputs: InputsFn = lm_inputs, stage_kwargs: dict | None = None) -> PipelineRunner:
    return PipelineRunner(model, mesh, device, loss_fn, z_loss_coef, autocast, model_inputs, stage_kwargs)


__all__ = ["EncoderDecoderStage", "PipelineModel", "PipelinePlan", "PipelineRunner", "apply_pipeline", "build_runner",
           "lm_inputs", "plan_pipeline", "split_layers", "split_model"]
