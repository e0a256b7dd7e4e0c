"""Replica groups that outlive each other's failures: the cross-group data-parallel dimension through torchft.

With ``parallel.fault_tolerance = "torchft"`` a job is ``parallel.ft_groups`` replica groups, each
its own torchrun job with the usual mesh inside (FSDP2 shards, TP, CP, EP). A torchft lighthouse
decides, step by step, which groups form the quorum; this module is the one place that talks to
torchft's :class:`~torchft.manager.Manager`:

- :func:`replica_groups` and :func:`data_coordinates`: where this rank's slice of every global batch
  lies (group ``g`` takes slices ``g*dp ... g*dp + dp - 1`` of ``ft_groups * dp``: its slot);
- :func:`slot_owners`: which group trains which slot in a step, from the quorum's members (a standby
  group, ``parallel.ft_spares``, takes the slot of a group the quorum lacks);
- :func:`check_fault_tolerance`: what the option needs, checked before any process group;
- :class:`ReplicaGroups`: the quorum of a step, the average of one flat buffer over the groups of
  the quorum (a group that is healing sends zeros) and the commit vote.

Nothing here imports torchft at module level: a job without the option never loads it.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ConfigError, JobConfig, ParallelConfig, check_ft_groups, micro_batch_size
from .group_liveness import GroupLiveness
from .mesh import Degrees

INSTALL_HINT = 'pip install -e ".[ft]" (the torchft-nightly wheel, Linux)'


def replica_groups(p: ParallelConfig) -> int:
    """How many replica groups share each global batch (1 without fault tolerance)."""
    return p.ft_groups if p.fault_tolerance == "torchft" else 1


def data_coordinates(p: ParallelConfig, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(data rank, data size) of a rank that is ``dp_rank`` of ``dp_size`` inside its replica group (a
    standby's: slot 0's, until a step gives it a slot to train)."""
    groups = replica_groups(p)
    group = p.ft_replica_group if p.ft_replica_group < groups else 0  # groups is 1 without torchft
    return group * dp_size + dp_rank, groups * dp_size


def slot_owners(members: list[int], groups: int) -> dict[int, int]:
    """{slot: the group that trains it} in a step whose quorum holds the groups ``members``: a group with
    an id below ``groups`` trains its own slot; the standbys present (ids ``groups`` and up), in id order,
    take the slots whose groups are missing, in slot order. A slot left out is skipped this step."""
    owners = {g: g for g in members if g < groups}
    missing = [k for k in range(groups) if k not in owners]
    standbys = sorted(g for g in members if g >= groups)
    owners.update(zip(missing, standbys))
    return dict(sorted(owners.items()))


def check_fault_tolerance(cfg: JobConfig, d: Degrees, device_type: str | None = None) -> None:
    """What ``parallel.fault_tolerance = "torchft"`` needs (ConfigError, one line each); ``device_type``
    given (the job runs here): the torchft package too."""
    p = cfg.parallel
    if p.fault_tolerance != "torchft":
        return
    check_ft_groups(p)
    if not (p.ft_timeout_s > 0 and p.ft_quorum_timeout_s > 0):
        raise ConfigError(
            f"parallel.ft_timeout_s and parallel.ft_quorum_timeout_s must be > 0 (got {p.ft_timeout_s}, "
            f"{p.ft_quorum_timeout_s})"
        )
    unsupported = [
        (
            p.dp_backend != "fsdp2",
            f"parallel.dp_backend = {p.dp_backend!r} (the DeepSpeed engine owns its "
            "gradient reduction and optimizer step)",
        ),
        (
            cfg.model.moe_experts > 0 and cfg.model.moe_bias_update_rate > 0,
            f"model.moe_bias_update_rate = {cfg.model.moe_bias_update_rate:g} (each group would move its routing "
            "biases by its own expert loads, and the groups' weights would drift apart; balance with the aux loss)",
        ),
        (
            d.dp_replicate > 1,
            f"parallel.dp_replicate = {d.dp_replicate} (the replica groups are the "
            "replicated dimension: launch one group per replica instead)",
        ),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(
                f"parallel.fault_tolerance = 'torchft' does not work with {what}; use "
                "fault_tolerance = 'none' for this layout"
            )
    if p.ft_spares > 0 and (d.pp > 1 or cfg.model.moe_experts > 0):
        what = f"pipeline parallel (pp = {d.pp})" if d.pp > 1 else f"MoE (model.moe_experts = {cfg.model.moe_experts})"
        raise ConfigError(
            f"parallel.ft_spares = {p.ft_spares} does not work with {what}: a standby's idle step is built for the "
            "plain step only; set ft_spares = 0 (launch one more training group instead)"
        )
    micro_batch_size(cfg.train, d.dp * p.ft_groups)  # the global batch splits over every group's ranks
    if device_type is not None:
        require_torchft()
        if not (p.ft_lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
            raise ConfigError(
                "parallel.fault_tolerance = 'torchft' needs the lighthouse's address: set "
                "parallel.ft_lighthouse = 'http://host:port' or $TORCHFT_LIGHTHOUSE (start it with "
                "`torchft_lighthouse --bind [::]:29510 --min_replicas 1`, or use `meshforge launch --ft`)"
            )


def require_torchft() -> None:
    # before torchft's first import: its Rust side logs each quorum and vote at info
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        importlib.import_module("torchft.manager")
    except ImportError as e:
        raise ConfigError(
            f"parallel.fault_tolerance = 'torchft' needs the torchft package, which is not installed "
            f"({e}); install the ft extra: {INSTALL_HINT}"
        ) from None


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter, gradient or optimizer moment (a DTensor's shard, or the tensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


class ReplicaGroups:
    """This rank's handle on the replica groups: quorum, cross-group average, commit.

    ``state_dict()`` / ``load_state_dict(sd)`` are what a healing group receives from a live peer
    (the rank of the same number in the peer group), through torchft's HTTP transport.
    """

    def __init__(
        self,
        p: ParallelConfig,
        rank: int,
        world_size: int,
        state_dict: Callable[[], dict],
        load_state_dict: Callable[[dict], None],
        on_peer_death: Callable[[str], None] | None = None,
    ):
        require_torchft()
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo

        # its own notes per quorum (no NCCL flight recorder on CPU, ...) at warning; errors still show
        logging.getLogger("torchft").setLevel(logging.ERROR)
        # torchft's HTTP transport deserialises a heal's tensors from a read-only buffer; they are copied at once
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

        self.group = p.ft_replica_group
        self.lighthouse = p.ft_lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")
        self.groups = p.ft_groups
        self.standby = self.group >= self.groups
        """A standby group (``parallel.ft_spares``): it learns each step's quorum before its forward."""
        timeout = timedelta(seconds=p.ft_timeout_s)
        addr, port, self._own_store = self._manager_store(rank, world_size)
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout),
            state_dict=state_dict,
            load_state_dict=load_state_dict,
            min_replica_size=p.ft_min_replicas,
            timeout=timeout,
            quorum_timeout=timedelta(seconds=p.ft_quorum_timeout_s),
            connect_timeout=timeout,
            rank=rank,
            world_size=world_size,
            store_addr=addr,
            store_port=int(port),
            lighthouse_addr=self.lighthouse,
            replica_id=f"meshforge_group_{self.group}",
            # later quorums run in torchft's thread while the forward and backward run (start_step says why)
            use_async_quorum=True,
            init_sync=True,
        )  # at step 0 the groups heal from one of them too: that checks their layouts
        self._quorums = 0
        self._stopped = False
        # a rank of this group that dies takes the group out of the quorum at once (group_liveness.py says why)
        self.liveness = (
            GroupLiveness(rank, world_size, addr, _publish, on_peer_death, p.ft_timeout_s)
            if on_peer_death is not None and world_size > 1
            else None
        )
        # the quorum's members are not kept by the Manager: its client is wrapped to read them off each result
        self._members = _QuorumMembers(self.manager._client)
        self.manager._client = self._members

    def _manager_store(self, rank: int, world_size: int) -> tuple[str, int, dist.TCPStore | None]:
        """A store of this group's own for torchft's Manager, hosted by rank 0 (its port sent to the others
        over the group's process group); -> (address, port, the server on rank 0).

        The Manager keeps its keys (rank 0's manager address) unprefixed; in the job's store, which torchrun
        keeps across its restarts, a restarted rank could read the dead attempt's address and wait on it.
        """
        addr = os.environ.get("MASTER_ADDR") if world_size > 1 else None
        addr = addr or "127.0.0.1"
        server = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False) if rank == 0 else None
        port = server.port if server is not None else None
        return addr, _publish(port) if world_size > 1 else int(port), server

    def start_step(self) -> None:
        """Ask the lighthouse for this step's quorum.

        A process's first quorum is waited for here: a group that joins (a replacement, or any group but
        one at step 0) heals before its forward, trains that step in full, and a peer with another layout
        is refused before any cross-group collective. Every later quorum runs in torchft's thread while
        this rank computes its forward and backward (:meth:`wait_quorum` joins it before the all-reduce);
        a group that must heal then (it missed a commit its peers made) contributes zeros to that step's
        all-reduce and loads its peer's state in :meth:`commit`.
        """
        first = self._quorums == 0
        self._quorums += 1
        if not first and not self.standby:  # a standby waits for every quorum: it decides what it trains
            self.manager.start_quorum()
            return
        # torchft has the choice per Manager only; the pinned wheel reads this flag per quorum, in start_quorum
        # (wait, then apply a heal at once) and in its quorum thread (a healed group counts as a participant)
        self.manager._use_async_quorum = False
        try:
            self.manager.start_quorum()
        finally:
            self.manager._use_async_quorum = True

    def wait_quorum(self) -> None:
        """Until this step's quorum is in (the cross-group process group is configured for it)."""
        self.manager.wait_quorum()

    def owners(self) -> dict[int, int]:
        """{slot: group} for this step (its quorum joined): who trains which slot of the global batch."""
        return slot_owners(self._members.members, self.groups)

    def slot(self) -> int | None:
        """The slot this group trains in this step (its quorum joined): its own, or for a standby the
        missing group's it takes, or None (a standby with nothing to cover: it steps with zeros)."""
        if not self.standby:
            return self.group
        return next((k for k, g in self.owners().items() if g == self.group), None)

    def average(self, tensors: list[torch.Tensor], slot: int | None) -> list[int]:
        """Average ``tensors`` in place over the groups of this step's quorum in one flat all-reduce, this
        group having trained ``slot`` (None: it sends zeros); -> the slots trained."""
        mark = torch.zeros(self.groups).to(tensors[0])
        if slot is not None:
            mark[slot] = 1.0
        flat = torch.cat([t.reshape(-1) for t in tensors] + [mark])
        work = self.manager.allreduce(flat, reduce_op=dist.ReduceOp.SUM)
        work.wait()
        slots = [k for k, m in enumerate(flat[-self.groups :].tolist()) if m > 0.5]  # one host read
        count = max(len(slots), 1)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t) / count)
            offset += n
        return slots

    def commit(self) -> bool:
        """The quorum's vote on this step (the same on every rank of the group): step the optimizer only if True.
        A group that heals at this step (after its first) loads its peer's state in here, before the vote."""
        return self.manager.should_commit()

    def participants(self) -> int:
        """Groups in this step's quorum at its newest step (torchft's count: a group healing in the step is not one)."""
        return self.manager.num_participants()

    def shutdown(self) -> None:
        """Stop the Manager: its heartbeat to the lighthouse ends, so the others' next quorum goes on
        without this group after the lighthouse's heartbeat timeout (once; later calls do nothing)."""
        if not self._stopped:
            self._stopped = True
            if self.liveness is not None:
                self.liveness.close()
            self.manager.shutdown(wait=False)


def _publish(port: int | None) -> int:
    """Rank 0's ``port`` to every rank of this process's group (a broadcast inside the group)."""
    box = [port]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


class _QuorumMembers:
    """torchft's manager client, passed through, keeping the replica group ids of its newest quorum
    (``members``; written in torchft's quorum thread, read after the quorum is joined). The pinned wheel
    (torchft-nightly 2026.10.26) calls ``_client._quorum`` from ``Manager._async_quorum``."""

    def __init__(self, client):
        self._client = client
        self.members: list[int] = []

    def _quorum(self, *args, **kwargs):
        result = self._client._quorum(*args, **kwargs)
        self.members = sorted(group_of(r) for r in result.replica_ids)
        return result

    def __getattr__(self, name: str):
        return getattr(self._client, name)


def group_of(replica_id: str) -> int:
    """The group id in a torchft replica id: ``meshforge_group_<g>`` plus the ``:<uuid>`` torchft appends."""
    return int(replica_id.split(":", 1)[0].rsplit("_", 1)[1])
