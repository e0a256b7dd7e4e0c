"""``meshforge launch --ft-groups 2`` across two nodes (tests/harness/cluster_harness.py: a network namespace,
address, hostname and hosts file per node): one replica group of 2 ranks per node, the lighthouse on node 0.

- default suite: without a scheduler, the same `meshforge launch --nodes 2 --node-rank r --hosts ...` on each node;
- ``-m slow``: under SLURM (tests/harness/cluster_slurm.py: slurmctld on node 0, a slurmd per node),
  `meshforge launch --slurm --submit --wait` on node 0 runs the lighthouse step and one srun step per group.

Both train with both groups in every step (``--ft-min-replicas 2``); the groups end with the same bits, and their
losses and weights are the one-process replay's (tests/harness/ft_harness.py), so the gradients crossed the link.
Needs root and network namespaces (skipped without them, failed in CI), and the ft extra.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchft")

from cluster_harness import finish  # noqa: E402
from cluster_slurm import job_log, submit_launch  # noqa: E402
from ft_harness import FT_LR, final_weights, records, replay  # noqa: E402
from parallel_harness import PARITY_ARGS  # noqa: E402

TIMEOUT = 300
STEPS = 8


def ft_train(tiny_data, out) -> list[str]:
    return [
        "train",
        *PARITY_ARGS,
        "--optim.lr",
        FT_LR,
        "--optim.warmup_steps",
        "2",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--train.steps",
        str(STEPS),
        "--parallel.ft_timeout_s",
        "30",
        "--parallel.ft_quorum_timeout_s",
        "60",
    ]


def assert_groups_match_replay(out) -> None:
    rows = records(out, 0)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["ft_groups"] for r in rows] == [[0, 1]] * STEPS and all(r["ft_committed"] for r in rows)
    assert [r["loss"] for r in rows] == [r["loss"] for r in records(out, 1)]
    weights = [final_weights(out, g) for g in (0, 1)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between the replica groups"
    got, want, ref = replay(out, 0)
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6
    )
    for name, value in weights[0].items():
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert want[-1] < want[0]


FT_LAUNCH = ["--gpus-per-node", "2", "--ft-groups", "2", "--ft-min-replicas", "2"]
"""Two groups of 2 ranks a node, both in every step."""


def test_two_groups_on_two_nodes_without_a_scheduler(cluster, tiny_data, tmp_path):
    out = tmp_path / "run"
    before = cluster.rx_bytes(1)
    procs = [
        cluster.meshforge(
            node,
            ["launch", "--cpu", "--nodes", "2", "--node-rank", str(node), "--hosts", ",".join(cluster.hostnames)]
            + [*FT_LAUNCH, "--", *ft_train(tiny_data, out)],
        )
        for node in (0, 1)
    ]
    logs = finish(procs, TIMEOUT)
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node} failed:\n{log[-4000:]}"
    assert cluster.rx_bytes(1) - before > 100_000  # the cross-group gradients crossed the link
    assert_groups_match_replay(out)


@pytest.mark.slow
def test_two_groups_as_slurm_steps_on_two_nodes(cluster, slurm_env, tiny_data, tmp_path):
    out = tmp_path / "run"
    before = cluster.rx_bytes(1)
    p = submit_launch(cluster, slurm_env, tmp_path, "mftgroups", FT_LAUNCH[2:], ft_train(tiny_data, out))
    log = finish([p], TIMEOUT)[0]
    written = job_log(tmp_path, "mftgroups")
    assert p.returncode == 0, f"{log[-3000:]}\n{written[-6000:]}"
    assert "srun --overlap" in (tmp_path / "job.sbatch").read_text()  # the lighthouse step
    assert cluster.rx_bytes(1) - before > 100_000
    assert_groups_match_replay(out)
