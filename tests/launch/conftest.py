"""The two-node cluster of tests/harness/cluster_harness.py and a SLURM cluster on it, for the launch tests
that need them (tests/launch/test_cluster.py, tests/launch/test_ft_slurm.py)."""

from __future__ import annotations

import os

import pytest

from cluster_harness import Cluster, cluster_problem


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run this test, but {problem}")
        pytest.skip(problem)
    c = Cluster(2).start()
    yield c
    c.close()


@pytest.fixture
def slurm_env(cluster, tmp_path) -> dict:
    """slurmctld on node 0 and a slurmd per node (tests/harness/cluster_slurm.py); the environment for SLURM commands."""
    from cluster_slurm import slurm_problem, start_slurm

    problem = slurm_problem()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run this test, but {problem}")
        pytest.skip(problem)
    return start_slurm(cluster, tmp_path / "slurm")
