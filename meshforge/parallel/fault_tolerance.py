"""Replica groups that outlive each other's failures: the cross-group data-parallel dimension through torchft.

With ``parallel.fault_tolerance = "torchft"`` a job is ``parallel.ft_groups`` replica groups, each
its own torchrun job with the usual mesh inside (FSDP2 shards, TP, CP, EP). A torchft lighthouse
decides, step by step, which groups form the quorum; this module is the one place that talks to
torchft's :class:`~torchft.manager.Manager`:

- :func:`replica_groups` and :func:`data_coordinates`: where this rank's slice of every global batch
  lies (group ``g`` takes slices ``g*dp ... g*dp + dp - 1`` of ``ft_groups * dp``);
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
from .mesh import Degrees

INSTALL_HINT = 'pip install -e ".[ft]" (the torchft-nightly wheel, Linux)'


def replica_groups(p: ParallelConfig) -> int:
    """How many replica groups share each global batch (1 without fault tolerance)."""
    return p.ft_groups if p.fault_tolerance == "torchft" else 1


def data_coordinates(p: ParallelConfig, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(data rank, data size) of a rank that is ``dp_rank`` of ``dp_size`` inside its replica group."""
    groups = replica_groups(p)
    group = p.ft_replica_group if groups > 1 else 0
    return group * dp_size + dp_rank, groups * dp_size


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

    def _manager_store(self, rank: int, world_size: int) -> tuple[str, int, dist.TCPStore | None]:
        """A store of this group's own for torchft's Manager, hosted by rank 0 (its port sent to the others
        over the group's process group); -> (address, port, the server on rank 0).

        The Manager keeps its keys (rank 0's manager address) unprefixed; in the job's store, which torchrun
        keeps across its restarts, a restarted rank could read the dead attempt's address and wait on it.
        """
        addr = os.environ.get("MASTER_ADDR") if world_size > 1 else None
        addr = addr or "127.0.0.1"
        server = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False) if rank == 0 else None
        port = [server.port if server is not None else None]
        if world_size > 1:
            dist.broadcast_object_list(port, src=0)
        return addr, int(port[0]), server

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
        if not first:
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

    def average(self, tensors: list[torch.Tensor]) -> list[int]:
        """Average ``tensors`` in place over the groups of this step's quorum in one flat all-reduce;
        -> the ids of the groups that contributed."""
        flat = torch.cat(
            [t.reshape(-1) for t in tensors]
            + [torch.nn.functional.one_hot(torch.tensor(self.group), self.groups).to(tensors[0])]
        )
        work = self.manager.allreduce(flat, reduce_op=dist.ReduceOp.SUM)
        work.wait()
        members = [g for g, m in enumerate(flat[-self.groups :].tolist()) if m > 0.5]  # one host read
        count = max(len(members), 1)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t) / count)
            offset += n
        return members

    def commit(self) -> bool:
        """The quorum's vote on this step (the same on every rank of the group): step the optimizer only if True.
        A group that heals at this step (after its first) loads its peer's state in here, before the vote."""
        return self.manager.should_commit()

    def participants(self) -> int:
        """Groups in this step's quorum at its newest step (torchft's count: a group healing in the step is not one)."""
        return self.manager.num_participants()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
