"""One training step, whatever runs it: the interface the trainer drives, and the one choice of backend.

The trainer knows a :class:`TrainStep` and nothing else about how a step runs:

- ``train_step(batch, step)``: forward and backward of this rank's slice of one global
  batch over its micro-batches (MoE router statistics collected on the way), the optimizer
  step and the LR schedule; returns the step's metrics record (``loss``, ``z_loss``, ``lr``,
  ``grad_norm`` where it is computed -- every step with clipping on, else on
  ``logging.log_interval`` steps --, and ``skipped``/``skipped_total`` or ``moe_*`` when they
  apply), the same on every rank, read from the device in one transfer
  (:meth:`TrainStep.read_scalars`); it also sets :attr:`TrainStep.stop_requested`, the
  preemption flag agreed through the step's loss all-reduce;
- ``eval_loss(batches, step)``: the mean validation cross-entropy over the job;
- ``save(checkpointer, step, meta, files)`` / ``load(path, rank)``: what a checkpoint holds;
- ``model`` (the weights under the single-process names; a pipeline rank's
  :class:`~meshforge.parallel.pipeline.PipelineModel` view), ``optimizer``, ``scheduler``.

Backends, one per file, picked once by :func:`build_step`:

- :class:`~meshforge.pretrain.step_local.LocalStep` (``step_local.py``): the model is called
  directly -- one process, or FSDP2 / TP / context / expert parallel over many; non-finite
  steps are skipped;
- :class:`~meshforge.pretrain.step_deepspeed.DeepSpeedStep` (``step_deepspeed.py``): the
  DeepSpeed engine runs backward, ZeRO and the optimizer step (a non-finite loss is
  :class:`~meshforge.pretrain.faults.TrainingDiverged`: the update is already applied);
- :class:`~meshforge.pretrain.step_pipeline.PipelineStep` (``step_pipeline.py``): a
  ``torch.distributed.pipelining`` schedule runs the micro-batches through this rank's stages;
- :mod:`~meshforge.pretrain.ft_step` (``ft_step.py``): under ``parallel.fault_tolerance = "torchft"``,
  the replica-group logic around the parts of ``LocalStep`` or ``PipelineStep``.

The loss of one micro-batch is computed in one place, :meth:`TrainStep.microbatch_loss`
(objective inputs, the context-parallel split, the fused or plain loss); under pipeline
parallel the last stage computes it inside the schedule (``PipelineRunner._loss``).

A new backend subclasses :class:`TrainStep` in its own file and adds one line to
:func:`build_step`; the trainer does not change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config import JobConfig, micro_batch_size
from ..models.losses import LossParts
from ..models.moe import RouterStats, collect_router_stats
from ..parallel.compile import compile_enabled, compile_loss
from ..parallel.context_parallel import split_for_context_parallel
from ..parallel.fault_tolerance import replica_groups
from ..parallel.float8 import precompute_float8_scales
from ..parallel.loss_parallel import fused_output_loss, lm_loss_fn
from ..parallel.mesh import Degrees
from .checkpoint import load_checkpoint
from .faults import CollectiveWatch, NonFiniteGuard
from .moe_metrics import reduce_router_stats, update_routing_bias
from .optim import build_optimizer, build_scheduler


@dataclass
class StepSetup:
    """What every backend is built from: the trainer's job, layout and watchers (read, never replaced)."""

    cfg: JobConfig
    degrees: Degrees
    mesh: DeviceMesh | None
    device: torch.device
    objective: Any
    """Turns a batch into model inputs and targets (``model_inputs``): :mod:`meshforge.pretrain.objectives`."""
    collectives: CollectiveWatch
    nonfinite: NonFiniteGuard
    fused_loss: bool
    """Loss from the final hidden states and the output weight in chunks (``parallel.job_checks.use_fused_loss``)."""
    before_update: Callable[[], None] = field(default=lambda: None)
    """Called right before the optimizer changes the weights in place (an asynchronous checkpoint's staging
    of them must be complete: ``Checkpointer.wait_staged``)."""
    stop_signal: Callable[[], bool] = field(default=lambda: False)
    """Whether this rank got a preemption signal; every rank's flag rides the step's loss all-reduce
    (:meth:`TrainStep.with_stop_flag`), so all agree on :attr:`TrainStep.stop_requested` at no extra collective."""
    train_loader: Any = None
    """The training loader (its position is part of what a healing replica group receives: ``pretrain/ft_step.py``)."""
    current_step: Callable[[], int] = field(default=lambda: 0)
    """The trainer's step count (steps done so far)."""


def autocast_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype | None:
    name = cfg.train.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else None


def new_optimizer(setup: StepSetup, model: nn.Module) -> torch.optim.Optimizer:
    """Our AdamW with its parameter groups (muP: block matrices at LR / width multiplier)."""
    cfg = setup.cfg
    return build_optimizer(model, cfg.optim, setup.device.type, 1.0 / cfg.model.width_mult)


class TrainStep:
    """How one training step runs; subclasses implement :meth:`train_step` and :meth:`eval_loss`."""

    def __init__(self, setup: StepSetup, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.setup = setup
        self.cfg = setup.cfg
        self.device = setup.device
        self.model = model
        """The weights under the single-process names (checkpoints, sampling)."""
        self.optimizer = optimizer
        self.scheduler = build_scheduler(optimizer, self.cfg.optim, self.cfg.train.steps)
        self.amp_dtype = autocast_dtype(self.cfg, self.device)
        self.stop_requested = False
        """Some rank got a preemption signal before this rank's last step reduced its losses (the same on every rank)."""
        p = self.cfg.parallel
        self.forward_loss = self._forward_loss
        """``(model, args, targets) -> LossParts``, compiled whole with ``parallel.compile_scope = model``."""
        if p.compile_scope == "model" and compile_enabled(p.compile, self.device.type):
            self.forward_loss = compile_loss(self._forward_loss)

    # ------------------------------------------------------------------ the interface

    def train_step(self, batch, step: int) -> dict:
        """Run training step number ``step`` (1-based) on this rank's ``batch``; return its metrics record."""
        raise NotImplementedError

    def eval_loss(self, batches, step: int) -> float:
        """Mean validation cross-entropy of ``batches`` (this rank's, from the loader) over the job."""
        raise NotImplementedError

    def save(self, checkpointer, step: int, meta: dict, files: dict[str, Path]) -> None:
        """Write checkpoint ``step`` (collective) with the trainer's ``meta`` and extra ``files``."""
        checkpointer.save(step, self.model, self.optimizer, meta, files)

    def close(self) -> None:
        """Release what the backend holds beyond the step (threads, servers); the run is over."""

    def load(self, path: Path, rank: int) -> dict:
        """Restore model, optimizer and this rank's RNG from checkpoint ``path``; return its meta.json."""
        return load_checkpoint(path, self.model, self.optimizer, rank)

    # ------------------------------------------------------------------ pieces the backends share

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch):
        """A loader batch (a tensor, or a tuple of them) on this rank's device."""
        if isinstance(batch, (tuple, list)):
            return tuple(b.to(self.device, non_blocking=True) for b in batch)
        return batch.to(self.device, non_blocking=True)

    def micro_batches(self, batch) -> list:
        """This rank's batch, on the device, cut into ``train.micro_batch_size`` pieces."""
        batch = self.to_device(batch)
        mbs = micro_batch_size(self.cfg.train, self.setup.degrees.dp * replica_groups(self.cfg.parallel))
        if isinstance(batch, tuple):
            return list(zip(*(b.split(mbs) for b in batch)))
        return list(batch.split(mbs))

    def microbatch_loss(self, model: Callable, batch) -> LossParts:
        """The loss of one micro-batch through ``model`` (the module, or the engine that calls it).

        The one place it is computed (outside the pipeline schedule): the objective's inputs
        and targets, this rank's context-parallel chunks, then :attr:`forward_loss` (the fused loss or the logits')."""
        degrees = self.setup.degrees
        args, targets = self.setup.objective.model_inputs(batch)  # lm: shifted tokens; T5: src, tgt_in, src_mask
        if degrees.cp > 1:  # this rank's zigzag chunks of every sample, with their global positions
            args, targets = split_for_context_parallel(
                args, targets, self.setup.mesh["cp"].get_local_rank(), degrees.cp
            )
        return self.forward_loss(model, args, targets)

    def _forward_loss(self, model: Callable, args: tuple, targets: torch.Tensor) -> LossParts:
        """The forward of ``args`` and its loss against ``targets``: what ``parallel.compile_scope = model``
        compiles as one graph (:attr:`forward_loss`)."""
        cfg, degrees = self.cfg, self.setup.degrees
        if self.setup.fused_loss:  # a decoder (use_fused_loss); FSDP2 / TP layouts: fused_output_loss
            with self.autocast():  # the loss too: its matmuls take autocast's dtype, as the output layer's would
                hidden = model(*args, return_hidden=True)
                return fused_output_loss(model, hidden, targets, cfg.train.z_loss_coef)
        with self.autocast():
            logits = model(*args)
        # tp > 1 with parallel.loss_parallel: logits are vocab-sharded DTensors, never gathered
        loss_fn = lm_loss_fn(cfg, degrees.tp)
        return loss_fn(logits, targets, cfg.train.z_loss_coef)

    def forward_backward(
        self, model: nn.Module, micro: list, backward: Callable[[LossParts], None]
    ) -> tuple[torch.Tensor, RouterStats]:
        """Forward and ``backward`` of every micro-batch through ``model``; -> this rank's
        [ce, z_loss] means over them, and the MoE router statistics of the forwards."""
        stats = RouterStats(aux_grad_scale=1.0 / len(micro))  # the aux losses weigh as each microbatch's loss
        loss_sum = torch.zeros((), device=self.device)
        z_sum = torch.zeros((), device=self.device)
        with collect_router_stats(model, stats):
            for mb in micro:
                parts = self.microbatch_loss(model, mb)
                backward(parts)
                loss_sum += parts.ce.detach()
                z_sum += parts.z_loss.detach()
        return torch.stack([loss_sum, z_sum]) / len(micro), stats

    @torch.no_grad()
    def forward_eval(self, model: nn.Module, batches, step: int) -> float:
        """Mean validation ce of whole ``batches`` through ``model``, averaged over every rank."""
        model.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        for batch in batches:
            total += self.microbatch_loss(model, self.to_device(batch)).ce
            count += 1
        model.train()
        return self.all_mean(total / count, f"the validation loss at step {step}").item()

    def all_mean(self, value: torch.Tensor, what: str) -> torch.Tensor:
        world = self.setup.degrees.world_size
        if world > 1:
            self.setup.collectives.at(f"all_reduce of {what}")
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= world
        return value

    def needs_grad_norm(self, step: int) -> bool:
        """Whether step ``step`` computes the global gradient norm: always with clipping on (it needs the
        norm), else only where it is logged (``logging.log_interval`` steps)."""
        every = self.cfg.logging.log_interval
        return self.cfg.optim.grad_clip > 0 or bool(every and step % every == 0)

    def with_stop_flag(self, losses: torch.Tensor) -> torch.Tensor:
        """[ce, z_loss] -> [ce, z_loss, this rank's preemption flag]: reduced together (a mean over ranks
        is > 0 when any rank has the flag), the flag costs no collective and no transfer of its own."""
        flag = torch.full((1,), 1.0 if self.setup.stop_signal() else 0.0, device=losses.device, dtype=losses.dtype)
        return torch.cat([losses, flag])

    def read_scalars(self, losses: torch.Tensor, grad_norm) -> dict:
        """The step's one device-to-host transfer: the reduced [ce, z_loss, stop flag] and the gradient norm
        (a tensor, a float, or None where not computed) -> ``loss``, ``z_loss``, ``grad_norm`` (if any) of the
        record; sets :attr:`stop_requested`."""
        parts = [losses.detach().float().flatten()]
        if isinstance(grad_norm, torch.Tensor):
            parts.append(grad_norm.detach().float().reshape(1).to(losses.device))
        values = torch.cat(parts).tolist()
        self.stop_requested = len(values) > 2 and values[2] > 0
        record = {"loss": values[0], "z_loss": values[1]}
        if grad_norm is not None:
            record["grad_norm"] = values[3] if isinstance(grad_norm, torch.Tensor) else float(grad_norm)
        return record

    def optimizer_update(self, losses: torch.Tensor, grad_norm, step: int, commit: bool = True) -> dict:
        """Step the optimizer unless the (global) loss or gradient norm is not finite; then the
        update is skipped and counted (every rank agrees: both values are already reduced).

        ``losses``: the global [ce, z_loss, stop flag]; ``grad_norm``: None on a step that does not
        compute it (:meth:`needs_grad_norm`), then only the loss is checked. ``commit`` False (replica
        groups whose vote failed): the update is skipped without being counted as non-finite."""
        scalars = self.read_scalars(losses, grad_norm)
        record = {"loss": scalars["loss"], "z_loss": scalars["z_loss"], "lr": self.scheduler.get_last_lr()[0]}
        if "grad_norm" in scalars:
            record["grad_norm"] = scalars["grad_norm"]
        self.setup.before_update()  # from here the weights (and MoE routing biases) change in place
        if commit and self.setup.nonfinite.check(step, record["loss"], record.get("grad_norm", 0.0)):
            self.optimizer.step()
            if self.cfg.train.float8 != "off":  # FSDP2's float8 all-gather: all weight scales in one all-reduce
                precompute_float8_scales(self.model)
        else:
            record["skipped"] = 1
            if commit:
                record["skipped_total"] = self.setup.nonfinite.total_skipped
        self.scheduler.step()  # the LR stays a function of the step, skipped or not
        self.optimizer.zero_grad(set_to_none=True)
        return record

    def moe_update(self, model: nn.Module, stats: RouterStats, all_layers: list[str] | None = None) -> dict:
        """Reduce the step's router statistics to metrics, then move the routing biases by the loads."""
        m = self.cfg.model
        if not m.moe_experts:
            return {}
        metrics, loads = reduce_router_stats(model, stats, all_layers=all_layers)
        update_routing_bias(model, loads, m.moe_bias_update_rate)
        return metrics


def build_step(setup: StepSetup, model: nn.Module) -> TrainStep:
    """The backend of this job for ``model`` (already parallelized): chosen once, here."""
    if setup.degrees.pp > 1 and setup.cfg.parallel.fault_tolerance == "torchft":
        from .ft_step import ReplicaGroupPipelineStep

        return ReplicaGroupPipelineStep(setup, model)
    if setup.degrees.pp > 1:
        from .step_pipeline import PipelineStep

        return PipelineStep(setup, model)
    if setup.cfg.parallel.fault_tolerance == "torchft":
        from .ft_step import ReplicaGroupStep

        return ReplicaGroupStep(setup, model)
    if setup.cfg.parallel.dp_backend == "deepspeed":
        from .step_deepspeed import DeepSpeedStep

        return DeepSpeedStep(setup, model)
    from .step_local import LocalStep

    return LocalStep(setup, model)
