"""A bounded job start, and one report of a failure however many ranks see it.

Before the process group is made, every rank checks in through the job's rendezvous store
(:func:`check_in`): it waits until all ranks have arrived, and stops at once, naming the
rank and its message, when one of them reports a failure instead (:func:`share_failure`).
A rank that dies without a word is named when ``train.setup_timeout_s`` runs out. Without
this a rank that failed early left its peers in the rendezvous for the whole collective
timeout.

:func:`share_failure` is also how a multi-rank job prints an error once: every failing rank
writes its message into the store; rank 0 prints them (once when they agree, each with its
ranks when they do not), and the other ranks stay silent unless the store cannot be reached.

Keys live under ``meshforge/setup/<restart>/`` (torchrun's restart count), so an elastic
restart that reuses its agent's store never reads a previous attempt's.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist

from ..errors import CollectiveError, MeshforgeError
from .env import DistEnv


class SetupError(MeshforgeError):
    """A rank failed, or never arrived, while the job was starting."""

    exit_status = 1

    def __init__(self, message: str, seen_by_all: bool = False):
        super().__init__(message)
        self.seen_by_all = seen_by_all
        """Read from the store, so every rank in the check-in (rank 0 among them) raises the same."""


POLL_S = 0.1
REPORT_GRACE_S = 5.0
"""How long rank 0, failing during setup, waits for the other ranks' reports (they usually fail alike)."""
RUN_REPORT_GRACE_S = 2.0
"""The same wait for an error in the training loop (a diverged run, a full disk: every rank meets it at
once); none for a failed collective, whose peer is dead or stalled and will not report."""


def _prefix() -> str:
    return f"meshforge/setup/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def connect_store(env: DistEnv, timeout_s: float) -> dist.TCPStore:
    """The job's rendezvous store, as ``env://`` makes it: hosted by rank 0, or by torchrun's agent.

    Does not wait for the other ranks (they check in with :func:`check_in`); in one process a
    second call shares the first one's server.
    """
    addr = os.environ.get("MASTER_ADDR") or env.master_addr
    port = os.environ.get("MASTER_PORT") or env.master_port
    if not addr or not port:
        raise SetupError(
            f"rank {env.rank} of {env.world_size}: MASTER_ADDR and MASTER_PORT are not set; start the job "
            "with torchrun, srun, mpiexec or `meshforge launch`"
        )
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        return dist.TCPStore(
            addr,
            int(port),
            world_size=env.world_size,
            is_master=env.rank == 0 and not agent,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except (RuntimeError, dist.DistError) as e:
        who = "torchrun's agent" if agent else "rank 0"
        raise SetupError(
            f"rank {env.rank} of {env.world_size}: cannot reach the job's rendezvous at {addr}:{port} "
            f"within {timeout_s:g} s ({who} hosts it: did it start, or fail? see its log); "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None


def _failures(store, world_size: int) -> dict[int, str]:
    keys = [f"{_prefix()}failed/{r}" for r in range(world_size)]
    present = [k for k in keys if store.check([k])]
    values = store.multi_get(present) if present else []
    return {int(k.rsplit("/", 1)[1]): bytes(v).decode(errors="replace") for k, v in zip(present, values)}


def _name(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:8]) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


def describe_failures(failures: dict[int, str], world_size: int) -> str:
    """One line: the message once when every failed rank says the same, else each with its ranks."""
    by_message: dict[str, list[int]] = {}
    for r, msg in sorted(failures.items()):
        by_message.setdefault(msg, []).append(r)
    if len(by_message) == 1:
        ((msg, ranks),) = by_message.items()
        if len(ranks) == world_size:
            return msg
    return "; ".join(_tag(ranks, world_size, msg) for msg, ranks in by_message.items())


def _tag(ranks: list[int], world_size: int, msg: str) -> str:
    head = f"{_name(ranks)} of {world_size}"
    return msg if msg.startswith(head) else f"{head}: {msg}"


def check_in(store, env: DistEnv, timeout_s: float) -> None:
    """Wait until every rank has checked in; raise SetupError at once if one reports a failure,
    or naming the missing ranks after ``timeout_s``."""
    p = _prefix()
    store.set(f"{p}joined/{env.rank}", "1")
    arrived = store.add(f"{p}joined", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        if store.add(f"{p}failed", 0):
            failures = _failures(store, env.world_size)
            store.add(f"{p}settled", 1)
            raise SetupError(
                f"the job could not start: {describe_failures(failures, env.world_size)}", seen_by_all=True
            )
        if arrived >= env.world_size:
            return
        if time.monotonic() > deadline:
            missing = [r for r in range(env.world_size) if not store.check([f"{p}joined/{r}"])]
            raise SetupError(
                f"rank {env.rank} of {env.world_size}: {_name(missing)} did not start within "
                f"{timeout_s:g} s (train.setup_timeout_s): it died before its first report (see its "
                "log), or it is still starting (raise train.setup_timeout_s)"
            )
        time.sleep(POLL_S)
        arrived = store.add(f"{p}joined", 0)


def share_early_failure(error: MeshforgeError) -> None:
    """:func:`share_failure` for an error met before the job knows its place (a bad config):
    find this rank's place first; when even that fails, the error is printed where it happened."""
    from .env import discover

    try:
        env = discover()
    except Exception:
        return
    share_failure(error, env, during_setup=True)


def share_failure(error: MeshforgeError, env: DistEnv, during_setup: bool, timeout_s: float = 30.0) -> None:
    """Report ``error`` through the store so the job prints it once (see the module docs).

    Rank 0 rewrites the error's message to cover every rank's report; another rank marks the
    error ``reported_elsewhere`` once its report is in the store (the CLI then prints nothing).
    """
    if env.world_size <= 1:
        return
    if isinstance(error, SetupError) and error.seen_by_all:
        if env.rank != 0:
            error.reported_elsewhere = True  # rank 0 raised the same, from the same store, and prints it
        return
    try:
        store = connect_store(env, timeout_s if during_setup else min(timeout_s, 5.0))
        p = _prefix()
        store.set(f"{p}failed/{env.rank}", str(error))
        store.add(f"{p}failed", 1)
        store.add(f"{p}settled", 1)
        if env.rank != 0:
            error.reported_elsewhere = True
            return
        grace = REPORT_GRACE_S if during_setup else 0.0 if isinstance(error, CollectiveError) else RUN_REPORT_GRACE_S
        deadline = time.monotonic() + grace
        while store.add(f"{p}settled", 0) < env.world_size and time.monotonic() < deadline:
            time.sleep(POLL_S)  # the others usually fail alike, a moment later: one report for all
        failures = _failures(store, env.world_size)
    except Exception:  # no store to share through: this rank speaks for itself
        head = f"rank {env.rank} of {env.world_size}:"
        error.args = (str(error) if str(error).startswith(head) else f"{head} {error}",)
        return
    error.args = (describe_failures(failures, env.world_size),)
