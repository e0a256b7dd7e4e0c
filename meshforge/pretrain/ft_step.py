"""The step of one replica group under ``parallel.fault_tolerance = "torchft"``; healing from a live peer.

A step, on every rank of a group:

1. the lighthouse's quorum for this step, asked for at once; a process's first quorum is waited for (a
   group that joins heals here, before its forward), every later one runs in torchft's thread while
2. forward and backward of this rank's slice by the inner step, :class:`~meshforge.pretrain.step_local.LocalStep`
   (FSDP2 averages the gradients inside the group, as ``parallel.grad_sync`` says) or, under pipeline parallel,
   :class:`~meshforge.pretrain.step_pipeline.PipelineStep` (the schedule; the loss is the last stage's, which
   every pipeline rank receives), the loss averaged inside the group; then the quorum is joined;
3. one flat all-reduce over the groups of the quorum (torchft's managed Gloo group): every gradient
   shard, the loss and a one-hot of the group id, divided by the number of groups that contributed;
   a group that is gone contributes nothing, so its share of the global batch is **skipped** (the batch shrinks; the record says which samples
   were used);
4. clipping over the averaged gradients (the inner step's norm: over the pipeline ranks under pp), then the quorum's vote (``should_commit``): the optimizer
   steps only when it commits; a step that does not commit (a peer failed during it, or fewer than
   ``parallel.ft_min_replicas`` groups) is counted as skipped, like a non-finite one: the LR schedule
   and the data move on, the weights do not.

Healing: a group that joins behind the quorum's step (or any group but one at step 0) receives, at
the quorum of its first step, its peer's weights, optimizer moments, LR schedule, loader position,
RNG and step number as they were at the start of the step (each rank from the rank of the same number
in the peer group: the same shards), re-reads the step's batch from that position and trains the step
in full, so it holds its peer's bits from then on. A group with another layout inside it is refused
there, naming both, before any cross-group collective. A running group that falls behind (its vote
failed where its peers' passed) heals at a later step's vote instead, since that quorum overlapped its
forward: its own gradients of the step are discarded (it sends zeros, so ``ft_groups`` and
``ft_samples`` leave its share out), it loads the same state with the loader past the step's batch, and
its optimizer step applies the others' average, as its peer's does (``ft_heal_at`` says which).

Every rank averages, votes and heals with the rank of the same number in the other groups (torchft's
pairing): under pipeline parallel that is the same stage, so each stage's shards meet their own kind.
:class:`ReplicaGroupLogic` is all of the above, once; :class:`ReplicaGroupStep` and
:class:`ReplicaGroupPipelineStep` put it over the two inner steps.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import ConfigError
from ..errors import MeshforgeError
from ..parallel.fault_tolerance import ReplicaGroups, local
from .checkpoint import rng_state, set_rng_state
from .faults import CollectiveError
from .step import StepSetup
from .step_local import LocalStep
from .step_pipeline import PipelineStep


class ReplicaGroupLogic:
    """The replica-group logic over an inner step (a :class:`LocalStep` or :class:`PipelineStep`, after this
    class in the bases): quorum, cross-group average, vote, heal and records around the inner step's
    ``batch_losses`` (forward and backward inside the group), ``clipped_norm`` and ``router_update``. Each
    rank averages, votes and heals with the rank of the same number in the other groups: under pipeline
    parallel, the same stage."""

    def __init__(self, setup: StepSetup, model: nn.Module):
        super().__init__(setup, model)
        self.healed_step: int | None = None
        """The step number taken from a peer at this step's heal (the trainer continues from it)."""
        self.phase = "start"
        """Where the step is: "start" (its quorum, waited for) or "commit" (the vote): where a heal lands."""
        self.heal_at: str | None = None
        """The phase of this step's heal, if it healed."""
        self.step_rng: dict | None = None
        """The RNG state at the start of the running step: what a healing peer gets, whenever torchft asks."""
        p, d = self.cfg.parallel, setup.degrees
        self.named_state = dict(model.state_dict(keep_vars=True))
        """Every parameter and buffer, sharded, by its single-process name: taken once here, since torchft
        reads them from its own thread while FSDP2 may have swapped gathered copies into the modules."""
        self.layout = {"degrees": [d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp, d.ep], "world": d.world_size}
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.replicas = ReplicaGroups(p, rank, d.world_size, self.state_dict, self.load_state_dict, self.peer_died)
        self.last_groups: list[int] | None = None
        self.quorum_changes = 0
        """How often the set of contributing groups changed since this process started (the first quorum not counted)."""
        self.lost_s = 0.0
        """Seconds of training lost so far in this process: per step, its wall time times the share of the global
        batch not trained (all of it when the step did not commit)."""

    # ------------------------------------------------------------------ the step

    def train_step(self, batch, step: int) -> dict:
        try:
            return self.group_step(batch, step)
        except BaseException:
            self.replicas.shutdown()  # this group is going down: the others' quorum need not wait on its heartbeat
            raise

    def group_step(self, batch, step: int) -> dict:
        self.healed_step, self.phase, self.step_rng = None, "start", rng_state()
        self.setup.collectives.at(f"the quorum of replica groups at step {step}")
        start = time.perf_counter()
        self.quorum(self.replicas.start_step, step)  # a first quorum may heal: then the batch is the peer's
        quorum_s = time.perf_counter() - start
        if self.healed_step is not None:
            batch = self.setup.train_loader.next_batch()
        slot = self.replicas.slot()  # a standby's: known now (it waited for its quorum)
        if slot is None:  # a standby with no group to stand in for: zeros in, the average out
            losses, stats = self.idle_losses(step), None
        else:
            if slot != self.replicas.group:  # a standby training a missing group's slot of this step's batch
                batch = self.slot_batch(slot)
            losses, stats = self.batch_losses(batch, step)  # the group's [ce, z_loss, stop flag] means
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        self.setup.collectives.at(f"the quorum of replica groups at step {step}")
        wait_start = time.perf_counter()
        self.quorum(self.replicas.wait_quorum, step)  # what of it the forward and backward did not hide
        quorum_s += time.perf_counter() - wait_start
        self.setup.collectives.at(f"the all-reduce over replica groups at step {step}")
        loss_parts = losses[:2].clone()
        reduce_start = time.perf_counter()
        slots = self.replicas.average(grads + [loss_parts], slot)  # a peer failing in it: an error the vote sees
        allreduce_s = time.perf_counter() - reduce_start
        losses = torch.cat([loss_parts, losses[2:]])
        grad_norm = self.clipped_norm() if self.needs_grad_norm(step) else None
        vote_start = time.perf_counter()
        self.phase = "commit"
        committed = self.replicas.commit()  # a group healing after its first step loads its peer's state in here
        commit_s = time.perf_counter() - vote_start
        record = self.optimizer_update(losses, grad_norm, step, commit=committed)
        record.update(self.router_update(stats))
        owners = self.replicas.owners()
        record.update(self.data_record(slots, owners, committed))
        record.update(self.health_record(slots, owners, committed, time.perf_counter() - start))
        record.update(ft_quorum_s=quorum_s, ft_allreduce_s=allreduce_s, ft_commit_s=commit_s)
        return record

    def idle_losses(self, step: int) -> torch.Tensor:
        """A standby's step with nothing to train: zero gradients (the all-reduce brings the others' average)
        and zero losses, with the group's stop flag, through the same collectives inside the group."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        return self.loss_mean(torch.zeros(2, device=self.device), step)

    def slot_batch(self, slot: int):
        """This rank's slice of slot ``slot`` of the step's batch (the one the trainer just read)."""
        loader = self.setup.train_loader
        per_group = loader.dp_size // self.replicas.groups  # a standby's own coordinates are slot 0's
        return loader.read_slice(loader.consumed_samples - loader.global_batch_size, slot * per_group + loader.dp_rank)

    def peer_died(self, what: str) -> None:
        """A rank of this group died (from the liveness thread): stop beating to the lighthouse, say so in one
        line and leave at once, whatever the training thread waits on, so that torchrun restarts the group
        and the other groups' next quorum goes on without it."""
        self.replicas.shutdown()
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(
            f"meshforge: error: replica group {self.replicas.group}, rank {rank}: {what}; this rank leaves at once "
            "so that the group restarts (the other groups train on; it heals from them when it is back)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(CollectiveError.exit_status)

    def quorum(self, call, step: int) -> None:
        """``call()`` (starting or joining the quorum); torchft's client giving up (the lighthouse is gone: a
        dead peer fails the vote instead) stops this group with one line."""
        try:
            call()
        except (RuntimeError, TimeoutError) as e:
            if isinstance(e, MeshforgeError):
                raise
            raise CollectiveError(
                f"replica group {self.replicas.group}: no quorum from the torchft lighthouse at "
                f"{self.replicas.lighthouse} within parallel.ft_quorum_timeout_s = {self.cfg.parallel.ft_quorum_timeout_s:g} s "
                f"at step {step} ({str(e).splitlines()[0][:160]}); this group stops: restart the lighthouse, then the "
                "group (it heals from a live peer, or resumes from its newest checkpoint)"
            ) from None

    def health_record(self, slots: list[int], owners: dict[int, int], committed: bool, elapsed: float) -> dict:
        """The replica groups' health in metrics.jsonl: groups alive in this step's quorum, quorum changes
        so far, and the seconds of training lost (this step's and, in this process, in all); ``owners``:
        the step's {slot: group}."""
        groups = sorted(owners.get(k, k) for k in slots)  # a standby in a missing group's slot counts as itself
        if self.last_groups is not None and groups != self.last_groups:
            self.quorum_changes += 1
        self.last_groups = groups
        trained = len(slots) / self.replicas.groups if committed else 0.0
        lost = elapsed * (1.0 - trained)
        self.lost_s += lost
        return {
            "ft_groups_alive": self.replicas.participants(),
            "ft_quorum_changes": self.quorum_changes,
            "ft_lost_s": lost,
            "ft_lost_total_s": self.lost_s,
        }

    def data_record(self, slots: list[int], owners: dict[int, int], committed: bool) -> dict:
        """What metrics.jsonl says about this step's data: the slots trained (``ft_groups``, which are the
        groups' ids; ``ft_standby`` says which standby trained a missing group's slot) and the global sample
        ranges ``[first, end)`` they hold (none when the step did not commit)."""
        loader = self.setup.train_loader
        size = loader.global_batch_size
        first = loader.consumed_samples - size  # this step's batch was the last one read
        share = size // self.replicas.groups
        used = [[first + k * share, first + (k + 1) * share] for k in slots] if committed else []
        record = {"ft_groups": slots, "ft_committed": int(committed), "ft_samples": used, "ft_participants": len(slots)}
        standby = {str(k): owners[k] for k in slots if owners.get(k, k) != k}
        if standby:
            record["ft_standby"] = standby  # {slot: the standby group that trained it}
        if self.healed_step is not None:
            record["ft_healed_from_step"] = self.healed_step
            record["ft_heal_at"] = self.heal_at  # "commit": this group's own gradients of the step were discarded
        return record

    def close(self) -> None:
        self.replicas.shutdown()

    # ------------------------------------------------------------------ healing

    def state_dict(self) -> dict:
        """What a healing peer receives, as it is at the start of a step (the trainer has read the step's
        batch: the loader position is the one before it, and the one after it for a heal at the vote).
        torchft calls it from its quorum thread, while this rank runs the forward and backward, and serves
        it until this step's vote; the weights and moments change only after the vote, and a healing peer
        has fetched them before the all-reduce this group waits on."""
        loader = self.setup.train_loader
        return {
            "layout": self.layout,
            "model": {k: local(v).detach() for k, v in self.named_state.items()},
            "optimizer": _local_tree(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "loader": loader.state_dict(loader.consumed_samples - loader.global_batch_size),  # this step's batch on
            "loader_after": loader.state_dict(),  # past it: a heal at the vote does not train the batch
            "rng": self.step_rng if self.step_rng is not None else rng_state(),
            "step": self.setup.current_step(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["layout"] != self.layout:
            raise ConfigError(
                f"replica group {self.replicas.group} cannot heal from its peer: the peer's layout inside "
                f"its group is {_describe(state['layout'])}, this group's {_describe(self.layout)}; "
                "start every replica group with the same parallel degrees and world size"
            )
        with torch.no_grad():
            for name, value in self.named_state.items():
                local(value).copy_(state["model"][name])
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        optim = state["optimizer"]
        for index, moments in optim["state"].items():
            param = params[index]
            if isinstance(param, DTensor):
                moments = {k: _like(v, param) for k, v in moments.items()}
            optim["state"][index] = moments
        self.optimizer.load_state_dict(optim)
        self.scheduler.load_state_dict(state["scheduler"])
        self.heal_at = self.phase
        self.setup.train_loader.load_state_dict(state["loader_after" if self.phase == "commit" else "loader"])
        set_rng_state(state["rng"])
        self.healed_step = int(state["step"])


class ReplicaGroupStep(ReplicaGroupLogic, LocalStep):
    """A replica group's step with the model called directly (FSDP2, TP, CP, EP inside the group)."""


class ReplicaGroupPipelineStep(ReplicaGroupLogic, PipelineStep):
    """A replica group's step under pipeline parallel: each stage averages with the same stage of the other
    groups; the loss is the last stage's, as every pipeline rank receives it."""


def _local_tree(value):
    if isinstance(value, dict):
        return {k: _local_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_local_tree(v) for v in value]
    if isinstance(value, torch.Tensor):
        return local(value).detach()
    return value


def _like(value, param: DTensor):
    """A received local moment as a DTensor sharded like ``param`` (a scalar such as Adam's step stays as is)."""
    if isinstance(value, torch.Tensor) and value.shape == param.to_local().shape and value.dim() > 0:
        return DTensor.from_local(
            value.clone(), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    return value


def _describe(layout: dict) -> str:
    pp, rep, shard, cp, tp, ep = layout["degrees"]
    return f"pp {pp} x dp_replicate {rep} x dp_shard {shard} x cp {cp} x tp {tp} (ep {ep}), {layout['world']} ranks"
