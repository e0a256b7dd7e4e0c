"""A rank of a replica group with one change on purpose: the fault injection of test_fault_tolerance.py.

    python tests/harness/ft_rank.py fail-vote GROUP STEP train --config ... --parallel.ft_replica_group G
    python tests/harness/ft_rank.py pace FILE SECONDS train --config ...

``fail-vote``: in replica group GROUP (``--parallel.ft_replica_group``), the STEP-th vote of the process
reports an error to torchft's Manager just before it votes, as a failed collective would, so that group
does not commit the step while the other groups do.
``pace``: every step sleeps SECONDS while FILE exists (after asking for its quorum, before joining it:
inside the step's timed part), so a test can keep a group stepping slowly, never stopping, until a
restarted peer has rejoined, however long that peer takes to start on a busy machine.
Everything else runs ``meshforge`` unchanged.
"""

from __future__ import annotations

import os
import sys
import time


def fail_vote(step: int) -> None:
    from meshforge.parallel.fault_tolerance import ReplicaGroups

    original = ReplicaGroups.commit
    votes = 0

    def commit(self) -> bool:
        nonlocal votes
        votes += 1
        if votes == step:
            print(f"replica group {self.group}: failing the vote of step {step}", file=sys.stderr, flush=True)
            self.manager.report_error(RuntimeError("injected by tests/harness/ft_rank.py"))
        return original(self)

    ReplicaGroups.commit = commit


def pace(path: str, seconds: float) -> None:
    from meshforge.parallel.fault_tolerance import ReplicaGroups

    original = ReplicaGroups.wait_quorum

    def wait_quorum(self) -> None:
        if os.path.exists(path):
            time.sleep(seconds)
        original(self)

    ReplicaGroups.wait_quorum = wait_quorum


def main(argv: list[str]) -> int:
    mode, a, b, *command = argv
    if mode == "fail-vote":
        if command[command.index("--parallel.ft_replica_group") + 1] == a:
            fail_vote(int(b))
    elif mode == "pace":
        pace(a, float(b))
    else:
        raise SystemExit(f"ft_rank.py: unknown mode {mode!r}")
    from meshforge.cli import main as meshforge_main

    return meshforge_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
