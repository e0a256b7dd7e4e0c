"""The step of a model called directly: one process, or FSDP2 / TP / context / expert parallel over many.

Each micro-batch's loss is divided by the micro-batch count before its backward, so the
accumulated gradient is that of the mean loss over this rank's batch (FSDP2 then averages
over the data-parallel ranks) -- once per step under ``parallel.grad_sync = "step"`` (every backward but
the last leaves FSDP2's gradients unreduced), after each micro-batch under ``"microbatch"``. The gradient norm is clipped over every shard (computed only
where clipping or logging needs it); a step whose
global loss or gradient norm is not finite is skipped and counted
(:class:`~meshforge.pretrain.faults.NonFiniteGuard`), the LR schedule moving on regardless.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.moe import RouterStats
from ..parallel.data_parallel import set_gradient_sync
from ..parallel.grad_norm import clip_grad_norm
from .step import StepSetup, TrainStep, new_optimizer


class LocalStep(TrainStep):
    def __init__(self, setup: StepSetup, model: nn.Module):
        super().__init__(setup, model, new_optimizer(setup, model))

    def accumulate(self, micro: list) -> tuple[torch.Tensor, RouterStats]:
        """Forward and backward of every micro-batch through the model, each loss divided by their count;
        FSDP2 reduces the gradients as ``parallel.grad_sync`` says (``"step"``: in the last backward only)."""
        once = self.cfg.parallel.grad_sync == "step"
        done = 0

        def backward(parts) -> None:
            nonlocal done
            done += 1
            set_gradient_sync(self.model, not once or done == len(micro))
            (parts.total / len(micro)).backward()

        return self.forward_backward(self.model, micro, backward)

    def train_step(self, batch, step: int) -> dict:
        losses, stats = self.accumulate(self.micro_batches(batch))
        grad_norm = self.clipped_norm() if self.needs_grad_norm(step) else None
        losses = self.loss_mean(losses, step)  # the loss after the norm, as it always was
        record = self.optimizer_update(losses, grad_norm, step)
        record.update(self.router_update(stats))
        return record

    # the step's parts, which a replica group's step (pretrain/ft_step.py) runs with its own between them

    def batch_losses(self, batch, step: int) -> tuple[torch.Tensor, RouterStats]:
        """Forward and backward of this rank's batch; -> [ce, z_loss, stop flag] means over the job's ranks
        (a replica group's), and the step's router statistics."""
        losses, stats = self.accumulate(self.micro_batches(batch))
        return self.loss_mean(losses, step), stats

    def loss_mean(self, losses: torch.Tensor, step: int) -> torch.Tensor:
        """[ce, z_loss] of this rank -> [ce, z_loss, stop flag] means over the job's ranks (a replica group's)."""
        return self.all_mean(self.with_stop_flag(losses), f"the loss at step {step}")

    def clipped_norm(self) -> torch.Tensor:
        """Clip the gradients (over every shard); -> their norm before clipping."""
        return clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip)

    def router_update(self, stats: RouterStats) -> dict:
        return self.moe_update(self.model, stats)

    def eval_loss(self, batches, step: int) -> float:
        return self.forward_eval(self.model, batches, step)
