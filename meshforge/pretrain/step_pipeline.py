"""The step under pipeline parallel: a schedule runs every micro-batch through this rank's stages.

The :class:`~meshforge.parallel.pipeline.PipelineRunner` does forward and backward of the
micro-batches (the last stage computes each one's loss, divided by their count), sums the
tied embedding's two gradient copies and returns the global [ce, z_loss] means. The gradient
norm is summed over the pipeline ranks, counting a tied embedding once; non-finite steps are
skipped as in :mod:`~meshforge.pretrain.step_local`. MoE statistics are reduced over every
MoE layer of the model, of which this rank holds some or none.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.moe import RouterStats
from ..parallel.grad_norm import clip_grad_norm
from ..parallel.loss_parallel import pipeline_loss_fn
from ..parallel.pipeline import build_runner
from .step import StepSetup, TrainStep, new_optimizer


class PipelineStep(TrainStep):
    def __init__(self, setup: StepSetup, model: nn.Module):
        super().__init__(setup, model, new_optimizer(setup, model))  # model: this rank's PipelineModel
        cfg = setup.cfg
        loss_fn, stage_kwargs = pipeline_loss_fn(model, cfg, setup.degrees.tp, setup.fused_loss)
        self.runner = build_runner(
            model,
            setup.mesh,
            setup.device,
            loss_fn,
            cfg.train.z_loss_coef,
            self.autocast,
            setup.objective.model_inputs,
            stage_kwargs,
        )
        m = cfg.model
        self.moe_layers = [f"layers.{i}.feed_forward" for i in range(m.n_layers) if m.is_moe_layer(i)]

    def train_step(self, batch, step: int) -> dict:
        losses, stats = self.batch_losses(batch, step)
        grad_norm = self.clipped_norm() if self.needs_grad_norm(step) else None
        record = self.optimizer_update(losses, grad_norm, step)
        record.update(self.router_update(stats))
        return record

    # the step's parts, which a replica group's step (pretrain/ft_step.py) runs with its own between them

    def batch_losses(self, batch, step: int) -> tuple[torch.Tensor, RouterStats]:
        """The schedule over this rank's batch; -> global [ce, z_loss, stop flag] means (on every rank; this
        rank's preemption flag rides along), and the step's router statistics."""
        stats = RouterStats(aux_grad_scale=1.0 / self.runner.plan.n_microbatches)  # as each microbatch's loss
        return self.runner.train_step(self.to_device(batch), stats, self.with_stop_flag), stats

    def clipped_norm(self) -> torch.Tensor:
        """Clip the gradients; the norm summed over the pipeline ranks, a tied embedding counted once."""
        return clip_grad_norm(
            self.model.parameters(), self.cfg.optim.grad_clip, self.runner.pp_group, self.runner.tied.counted_elsewhere
        )

    def router_update(self, stats: RouterStats) -> dict:
        return self.moe_update(self.model, stats, self.moe_layers)

    def eval_loss(self, batches, step: int) -> float:
        # forward-only schedule; the mean is already global
        return self.runner.eval_losses(self.to_device(b) for b in batches)
