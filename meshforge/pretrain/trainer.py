"""The training loop: wire config, data, model, parallelism, optimizer, metrics, checkpoints.

``train(cfg)`` is what ``meshforge train`` runs. The order of work is fixed so that bad
input fails before anything is written:

1. environment, device, vocabulary size, parallel degrees (config errors),
2. output dir: writable, locked for this run (a second trainer is refused, :mod:`.run_lock`),
   ownership (another run's checkpoints), the checkpoint to resume from intact, changed
   settings allowed (:mod:`.resume_policy`) (output and checkpoint errors),
3. every rank checks in (a rank that failed so far stops the others at once, named),
4. data and tokenizer (data errors: missing, corrupt, vocab mismatch, token ids beyond the model's vocabulary),
5. only then: model, output files, the loop.

In a multi-rank job an error is printed once, by rank 0 (:mod:`meshforge.launch.setup`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import JobConfig, config_to_dict, fingerprint, run_identity
from ..errors import MeshforgeError
from ..launch.env import DistEnv, discover, init_distributed, resolve_device, shutdown_distributed
from ..launch.setup import share_failure
from ..models import MODEL_SPECS, active_params, build_model, check_config, family_spec
from ..parallel import build_mesh, parallelize
from ..parallel.float8 import check_float8
from ..parallel.job_checks import check_job, use_fused_loss
from ..parallel.mesh import Degrees, resolve_degrees
from ..parallel.pipeline import PipelinePlan
from .checkpoint import check_init, check_resume_backend, load_model_weights
from .checkpoint_writer import Checkpointer
from .data import TrainData, prepare_train_data, resolve_vocab_size
from .faults import EXIT_PREEMPTED, CollectiveWatch, NonFiniteGuard, PreemptionWatcher, SpikeDetector, mark_preempted
from .generate import generate_text
from .memory_probe import MemoryPlan, MemoryProbe
from .metrics import MetricsLogger, peak_flops
from .optim import schedule_notes
from .output_dir import ACCESS_ERRNOS, SPACE_ERRNOS, check_writable, storage_error
from .resume_policy import optimizer_settings, restore_optimizer_settings, resume_changes
from .run_lock import RunLock
from .step import StepSetup, TrainStep, build_step


@dataclass
class TrainResult:
    """What a finished run reports back (rank 0 fills all of it)."""

    output_dir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)
    """Training loss of each step run in this process (not of resumed-over steps)."""
    val_losses: dict[int, float] = field(default_factory=dict)
    sample: str = ""
    preempted: bool = False
    """The run stopped early on a preemption signal, after writing a checkpoint."""


class Trainer:
    """One training run; ``run()`` executes it. Build with :func:`train` or directly."""

    def __init__(self, cfg: JobConfig, env: DistEnv | None = None, memory_plan: MemoryPlan | None = None):
        check_config(cfg)  # the model family's checks (config.validate ran when the config was loaded)
        if cfg.model.vocab_size == 0:  # the tokenizer's size, padded: the run (and its checkpoints) hold the number
            cfg = copy.deepcopy(cfg)
            resolve_vocab_size(cfg)
        self.cfg = cfg
        self.memory_plan = memory_plan
        self.env = env or discover()
        self.device = resolve_device(cfg.train.device, self.env)
        self.started = False
        """True once the first training step begins (errors before it are setup errors)."""
        self.degrees: Degrees = resolve_degrees(cfg.parallel, self.env.world_size)
        self.pipeline_plan: PipelinePlan | None = check_job(cfg, self.degrees, self.device.type)
        """Every check of the job against its world size, once, before any process group; the pipeline split."""
        check_float8(cfg, self.device)  # train.float8: a GPU with float8 matmuls, and torchao
        self.fused_loss = use_fused_loss(cfg, self.degrees, self.device.type)
        """Loss from the final hidden states and the output weight in chunks (no [tokens, vocab] logits)."""
        self.output_dir = Path(cfg.train.output_dir)
        if cfg.parallel.fault_tolerance == "torchft":  # each replica group has its own lock, metrics and checkpoints
            self.output_dir = self.output_dir / f"group_{cfg.parallel.ft_replica_group}"
        check_writable(self.output_dir)
        # One trainer per output dir, from before anything is written until the run ends (rank 0 holds it;
        # a refusal reaches the other ranks at their check-in, before any of them writes).
        self.lock = RunLock(self.output_dir).acquire() if self.env.is_main else None
        try:
            self._check_inputs(cfg)
        except BaseException:
            self.release()
            raise

    def _check_inputs(self, cfg: JobConfig) -> None:
        if self.lock is not None and self.lock.notice():
            print(self.lock.notice(), flush=True)
        self.identity = run_identity(cfg)
        self.checkpointer = Checkpointer(
            self.output_dir, cfg.checkpoint.keep_last, self.env.rank, async_save=cfg.checkpoint.async_save
        )
        # Everything above only reads. Validate data and output dir before writing anything.
        self.resume_from = self.checkpointer.check_identity(
            self.identity, cfg.checkpoint.resume, cfg.checkpoint.resume_from
        )
        check_resume_backend(self.resume_from, cfg.parallel.dp_backend, cfg.parallel.zero_stage, self.env.world_size)
        self.cfg, self.resume_notes = resume_changes(self.resume_from, cfg)  # refused changes stop here
        cfg = self.cfg
        self.init_from = None
        if self.resume_from is None and cfg.checkpoint.init_from:
            with torch.device("meta"):
                self.init_from = check_init(cfg.checkpoint.init_from, MODEL_SPECS[cfg.model.family].build(cfg.model))
        store = init_distributed(self.env, self.device, cfg.train.collective_timeout_s, cfg.train.setup_timeout_s)
        self.collectives = CollectiveWatch(self.env.rank, self.env.world_size, cfg.train.collective_timeout_s, store)
        self.data: TrainData = prepare_train_data(cfg, self.env, self.degrees)

    def release(self) -> None:
        """Give the output dir back to other trainers (the end of the run, or a failed start)."""
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.cfg
        self.collectives.at("setup (device mesh, model sharding, checkpoint load)")
        self.mesh = build_mesh(self.degrees, self.device)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, self.device)
        self.n_params = active_params(model, cfg.model)
        spec = getattr(self.data.objective, "spec", None)  # lengths of [encoder | decoder] samples, or one window
        lengths = (spec.encoder_len, spec.decoder_len) if spec is not None else (cfg.data.seq_len,)
        self.flops_per_token = family_spec(cfg.model.family).flops_per_token(model, cfg.model, lengths)
        model = parallelize(model, self.mesh, self.degrees, cfg, self.pipeline_plan)
        if self.init_from is not None:  # fresh optimizer, step 0; any layout (DCP reshards)
            load_model_weights(self.init_from, model)
            if self.env.is_main:
                print(f"initialised from {self.init_from}", flush=True)
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        setup = StepSetup(
            cfg,
            self.degrees,
            self.mesh,
            self.device,
            self.data.objective,
            self.collectives,
            self.nonfinite,
            self.fused_loss,
            before_update=self.checkpointer.wait_staged,
            stop_signal=self._stop_signal,
            train_loader=self.data.train_loader,
            current_step=lambda: self.step,
        )
        self.backend: TrainStep = build_step(setup, model)
        """How a step runs (plain/FSDP2, DeepSpeed engine, pipeline schedule): chosen here, once."""
        self.step = 0
        self.spikes = SpikeDetector(sigmas=cfg.train.spike_sigmas) if cfg.train.spike_sigmas else None
        if self.resume_from is not None:
            # the optimizer's settings and base LRs are the config's, not the checkpoint's
            settings = optimizer_settings(self.backend.optimizer, self.backend.scheduler)
            meta = self.backend.load(self.resume_from, self.env.rank)
            self.backend.scheduler.load_state_dict(meta["scheduler"])
            restore_optimizer_settings(self.backend.optimizer, self.backend.scheduler, settings)
            self.data.train_loader.load_state_dict(meta["loader"])
            self.step = meta["step"]
            if self.env.is_main:
                print(f"resuming from {self.resume_from} (step {self.step})", flush=True)
                for line in self.resume_notes:
                    print(line, flush=True)
        self.checkpointer.clean_partial()
        self.metrics = MetricsLogger(self.output_dir, self.env.is_main, cfg.logging.tensorboard, self.step)
        if self.env.is_main:
            (self.output_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
        self.peak = peak_flops(self.device)
        self.memory_probe = MemoryProbe(
            cfg, self.degrees, self.env.rank, self.device, self.backend.optimizer, self.memory_plan
        )  # planner vs measured
        if self.env.is_main:
            print(self.memory_probe.start_line(), flush=True)
            for note in schedule_notes(cfg.train.steps, cfg.optim):
                print(f"note: {note}", flush=True)

    # ------------------------------------------------------------------ steps

    @property
    def model(self) -> torch.nn.Module:
        """The weights under the single-process names (a pipeline rank: its stages' view)."""
        return self.backend.model

    def _stop_signal(self) -> bool:
        """This rank got a preemption signal (agreed on by all ranks through the step's loss all-reduce)."""
        watcher = getattr(self, "preemption", None)
        return watcher is not None and watcher.received is not None

    def train_step(self) -> dict:
        """Run the next training step; return its metrics record."""
        return self.backend.train_step(self.data.train_loader.next_batch(), self.step + 1)

    def evaluate(self) -> float:
        self.collectives.at(f"validation forward collectives at step {self.step}")
        loader = self.data.valid_loader_factory()
        return self.backend.eval_loss((loader.next_batch() for _ in range(self.cfg.train.eval_batches)), self.step)

    def _checkpoint(self) -> None:
        """Save a checkpoint of the current step (what it blocked the training: ``Checkpointer.completed``)."""
        self.collectives.at(f"checkpoint save at step {self.step}")
        meta = {
            "scheduler": self.backend.scheduler.state_dict(),
            "loader": self.data.train_loader.state_dict(),
            "config": config_to_dict(self.cfg),
            "identity": self.identity,
            "identity_fingerprint": fingerprint(self.identity),
            "world_size": self.env.world_size,
        }
        self.backend.save(self.checkpointer, self.step, meta, self.data.tokenizer.files())

    def _newest_checkpoint(self) -> str | None:
        """The newest complete checkpoint this run can resume from (its own, or the one it resumed from)."""
        newest = self.checkpointer.latest() or self.resume_from
        return str(newest) if newest is not None else None

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        self._setup()
        cfg, t = self.cfg, self.cfg.train
        result = TrainResult(self.output_dir, self.step)
        tokens_per_step = t.global_batch_size * self.data.objective.tokens_per_sample()
        bar = None
        if self.env.is_main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.preemption = PreemptionWatcher() if cfg.checkpoint.on_preemption else None
        try:
            self.started = True
            if self.step == 0 and t.eval_interval:
                result.val_losses[0] = self.evaluate()  # the starting point of the curve
                self.metrics.log({"step": 0, "val_loss": result.val_losses[0]})
                self._say(bar, f"step      0 | val_loss {result.val_losses[0]:.4f}")
            save_due = False  # a scheduled checkpoint not yet written (it waits out a non-finite streak)
            while self.step < t.steps:
                self.checkpointer.poll()  # an asynchronous save that has finished becomes visible
                start = time.perf_counter()
                self.collectives.at(f"forward/backward collectives of step {self.step + 1}")
                record = self.train_step()
                elapsed = time.perf_counter() - start
                # a replica group that healed in this step continues from its peer's step (parallel.fault_tolerance)
                self.step = record.get("ft_healed_from_step", self.step) + 1
                memory = self.memory_probe.after_step()  # measured once, after this process's second step
                if memory and self.env.is_main:
                    _print(bar, self.memory_probe.measured_line(memory))
                record = {
                    "step": self.step,
                    **record,
                    **memory,
                    "tokens_per_s": tokens_per_step / elapsed,
                    "step_time_s": elapsed,
                }
                if self.data.remote_stats is not None:  # remote data: requests, bytes, retries so far (this rank)
                    record.update(self.data.remote_stats.snapshot())
                if self.peak:
                    record["mfu"] = self.flops_per_token * tokens_per_step / elapsed / (self.peak * self.env.world_size)
                last = self.step == t.steps
                if t.eval_interval and (self.step % t.eval_interval == 0 or last):
                    record["val_loss"] = self.evaluate()
                    result.val_losses[self.step] = record["val_loss"]
                if self.spikes is not None and self.spikes.update(record["loss"]):
                    record["loss_spike"] = 1
                    self._say(bar, f"step {self.step:>6} | loss spike: {record['loss']:.4f}")
                if record.get("skipped"):
                    self._say(
                        bar,
                        f"step {self.step:>6} | non-finite loss/gradient: update skipped "
                        f"({self.nonfinite.consecutive} in a row, {self.nonfinite.total_skipped} in all)",
                    )
                result.losses.append(record["loss"])
                self.metrics.log(record)  # before the save: a kill after it cannot lose this step's record
                self._report(bar, record)
                if self.nonfinite.diverged:  # every rank alike (the loss and grad norm are reduced)
                    self.checkpointer.wait()
                    raise self.nonfinite.diverged_error(self._newest_checkpoint())
                scheduled = last or bool(cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0)
                save_due = save_due or scheduled
                saved = save_due and not self.nonfinite.consecutive  # inside a streak the save waits for a good step
                if saved:
                    self._checkpoint()
                    save_due = False
                elif scheduled:
                    waits = (
                        "the run ends inside it, without a final one"
                        if last
                        else "the save waits for the next good step"
                    )
                    self._say(
                        bar,
                        f"step {self.step:>6} | no checkpoint inside a non-finite streak: {waits} "
                        f"(newest: {self._newest_checkpoint() or 'none yet'})",
                    )
                self._log_saves()
                # every rank's flag was reduced with this step's loss: all ranks agree, no collective here
                if self.preemption is not None and self.backend.stop_requested:
                    if not saved and not self.nonfinite.consecutive:
                        self._checkpoint()
                    self.checkpointer.wait()
                    if self.env.local_rank == 0:  # one per node: each node's `meshforge launch` looks for it
                        mark_preempted()  # the checkpoint is complete: a job script may requeue
                    if self.env.is_main:
                        written = (
                            "checkpoint written"
                            if not self.nonfinite.consecutive
                            else f"no checkpoint inside a non-finite streak (newest: {self._newest_checkpoint()})"
                        )
                        _print(
                            bar,
                            f"step {self.step:>6} | preemption signal: {written}, exiting with "
                            f"status {EXIT_PREEMPTED} (resume by rerunning the same command)",
                        )
                    result.preempted = True
                    break
            self.checkpointer.close()  # the last checkpoint is complete before the run returns
            self._log_saves()
            result.final_step = self.step
            if self.env.is_main and t.sample_prompt and t.sample_tokens and not result.preempted:
                if self.env.world_size > 1:  # sharded weights: one process cannot run the model
                    _print(
                        bar,
                        f"sample: the weights are sharded over {self.env.world_size} ranks; sample the "
                        f"final checkpoint with `meshforge generate --checkpoint {self.output_dir} "
                        f"--prompt {t.sample_prompt!r}`",
                    )
                else:
                    result.sample = self.sample(t.sample_prompt, t.sample_tokens)
                    self.metrics.text("sample", result.sample, self.step)
                    _print(bar, f"sample> {result.sample}")
        finally:
            # After a preemption the handler stays: the job is exiting, and a second SIGTERM (srun
            # stopping the other tasks once one exits) must not kill a rank mid-shutdown.
            if self.preemption is not None and not result.preempted:
                self.preemption.restore()
            if bar is not None:
                bar.close()
            self.backend.close()
            self.metrics.close()
            self.release()
        return result

    def _log_saves(self) -> None:
        """A record per save completed since the last call: how long it held the training thread in all
        (an asynchronous save: staging, then the polls and waits until it was complete)."""
        for step, blocked in self.checkpointer.completed():
            self.metrics.log({"step": step, "checkpoint_blocked_s": blocked})

    def _report(self, bar, record: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        log_every = self.cfg.logging.log_interval
        if self.env.is_main and (("val_loss" in record) or (log_every and record["step"] % log_every == 0)):
            parts = [f"step {record['step']:>6}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}"]
            if "grad_norm" in record:
                parts.append(f"gnorm {record['grad_norm']:.3f}")
            parts.append(f"tok/s {record['tokens_per_s']:,.0f}")
            if "mfu" in record:
                parts.append(f"mfu {100 * record['mfu']:.1f}%")
            if "val_loss" in record:
                parts.append(f"val_loss {record['val_loss']:.4f}")
            _print(bar, " | ".join(parts))

    def _say(self, bar, text: str) -> None:
        """A line every rank would print alike: rank 0 prints it."""
        if self.env.is_main:
            _print(bar, text)

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """Generate from the trained model on rank 0 (the model must be unsharded)."""
        if self.env.world_size > 1:
            return ""  # sharded weights: use `meshforge generate` on the checkpoint instead
        return generate_text(
            self.model,
            self.data.tokenizer,
            prompt,
            max_new_tokens,
            top_k=40,
            temperature=0.8,
            seed=self.cfg.train.seed,
            device=self.device,
        )


def _print(bar, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def train(cfg: JobConfig, memory_plan: MemoryPlan | None = None) -> TrainResult:
    """Run a training job in this process (one rank of it under torchrun); ``memory_plan``: the planner's
    prediction, printed at start and compared with the measured memory (``meshforge train`` passes it).

    A :class:`~meshforge.errors.MeshforgeError` of a multi-rank job is shared through the
    rendezvous store so that the job prints it once (rank 0 speaks; see :mod:`meshforge.launch.setup`).
    """
    env = discover()
    trainer = None
    try:
        try:
            trainer = Trainer(cfg, env, memory_plan)
            with trainer.collectives.explain_failures():  # a dead or stalled peer: one line naming the operation
                result = trainer.run()
                trainer.collectives.at("the barrier before shutdown")
                shutdown_distributed(barrier=True)  # no rank tears its connections down while a peer still uses them
            return result
        except OSError as e:  # a write the file system refused (disk full, read-only, quota): one line
            if e.errno in SPACE_ERRNOS | ACCESS_ERRNOS:
                raise storage_error(e, f"writing {e.filename or cfg.train.output_dir} failed") from e
            raise
    except MeshforgeError as e:
        share_failure(e, env, during_setup=trainer is None or not trainer.started)
        raise
    finally:
        if trainer is not None:
            trainer.release()
            if hasattr(trainer, "collectives"):
                trainer.collectives.close()
        shutdown_distributed()
