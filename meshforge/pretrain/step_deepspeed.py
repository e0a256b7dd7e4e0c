"""The step on the DeepSpeed engine (``parallel.dp_backend = "deepspeed"``).

The engine divides each micro-batch loss by its gradient-accumulation steps (so the gradient
is that of the global-batch mean), reduces, clips and steps the optimizer at the last
micro-batch; our LR schedule is stepped here, once per step. The engine applies the update
itself, so a non-finite loss cannot be skipped: it stops the run
(:class:`~meshforge.pretrain.faults.TrainingDiverged`). Checkpoints hold the engine's own
files plus the full fp32 weights (:mod:`meshforge.parallel.deepspeed_engine`).
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from ..errors import CheckpointError
from ..parallel.deepspeed_engine import CHECKPOINT_TAG, build_deepspeed_engine
from .checkpoint import load_checkpoint
from .step import StepSetup, TrainStep, new_optimizer


class DeepSpeedStep(TrainStep):
    def __init__(self, setup: StepSetup, model: nn.Module):
        self.engine, optimizer = build_deepspeed_engine(
            model, new_optimizer(setup, model), setup.cfg, setup.degrees.dp, setup.device
        )
        super().__init__(setup, self.engine.module, optimizer)  # optimizer: the torch one the engine steps

    def train_step(self, batch, step: int) -> dict:
        micro = self.micro_batches(batch)
        assert len(micro) == self.engine.gradient_accumulation_steps(), (
            len(micro),
            self.engine.gradient_accumulation_steps(),
        )
        lr = self.scheduler.get_last_lr()[0]

        def backward(parts):
            self.engine.backward(parts.total)
            self.engine.step()  # the optimizer steps only at the accumulation boundary

        losses, stats = self.forward_backward(self.engine, micro, backward)
        self.scheduler.step()
        grad_norm = self.engine.get_global_grad_norm()
        losses = self.all_mean(self.with_stop_flag(losses), f"the loss at step {step}")
        scalars = self.read_scalars(losses, float("nan") if grad_norm is None else grad_norm)
        record = {"loss": scalars["loss"], "z_loss": scalars["z_loss"], "lr": lr, "grad_norm": scalars["grad_norm"]}
        if not math.isfinite(record["loss"]):  # the engine has stepped already: nothing left to skip
            self.setup.nonfinite.stop_after_this_step(  # the trainer logs this step's record, then stops
                f"non-finite loss {record['loss']} at step {step} under the DeepSpeed engine, which applies the "
                "update itself: resume from the newest checkpoint with a lower LR, or use parallel.dp_backend = "
                "'fsdp2' to skip such steps"
            )
        record.update(self.moe_update(self.engine.module, stats))  # metric names as in every other backend (layers.<i>)
        return record

    def eval_loss(self, batches, step: int) -> float:
        return self.forward_eval(self.engine, batches, step)

    def save(self, checkpointer, step: int, meta: dict, files: dict[str, Path]) -> None:
        checkpointer.save(step, self.engine, self.optimizer, meta, files, engine=self.engine)

    def load(self, path: Path, rank: int) -> dict:
        return load_checkpoint(path, self.engine, self.optimizer, rank, load_state=self._load_engine)

    def _load_engine(self, directory: Path) -> None:
        """Restore module and optimizer state written by the engine (``save_engine``: same dp degree and stage)."""
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(
                f"DeepSpeed found no checkpoint under {directory}/{CHECKPOINT_TAG}: the checkpoint is "
                "incomplete; resume from an older one with --checkpoint.resume_from"
            )
