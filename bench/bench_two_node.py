"""Bytes per training step on the link between two nodes, measured against the planner's prediction.

    sudo python bench/bench_two_node.py [--steps 4,12] [--record]

Two nodes of ``tests/harness/cluster_harness.py`` (network namespaces on one bridge; needs root) run the
layout of ``tests/launch/test_cluster.py`` with ``meshforge launch`` on each node: 2 ranks per node, TP
inside a node, HSDP ``dp_replicate = 2`` across the link (the tiny-test decoder, 4 layers, 8 samples
of 32 tokens a step, fp32). Node 1's interface counters (``rx_bytes``/``tx_bytes``: Ethernet frames,
headers included) are read before and after a run of each step count; the difference of two runs
divided by the difference of their steps is the traffic of one step, without the start-up's
(rendezvous, process groups, the first all-gathers).

The prediction is ``meshforge plan --json`` for the same job on ``--gpus 4 --gpus-per-node 2``: its
collectives on an ``internode`` link, each rank sending ``2 (n-1)/n x bytes`` per all-reduce of ``n``
ranks (``(n-1)/n x bytes`` per all-gather or reduce-scatter, ``bytes`` per send), times its count,
times the ranks of node 1 (each of them is in one ``dp_replicate`` pair that crosses the link).
What the planner leaves out -- the per-step all-reduces of the loss and the gradient norm, which span
the link too, the rendezvous store's marks and heartbeats, TCP/IP and Ethernet headers and ACKs --
is in the measured number; the script prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "harness"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import REPO, loadavg, record  # noqa: E402

from cluster_harness import Cluster, cluster_problem  # noqa: E402

JOB = [
    "--config",
    "tiny-test",
    "--model.n_layers",
    "4",
    "--train.global_batch_size",
    "8",
    "--train.micro_batch_size",
    "2",
]
LAYOUT = ["--parallel.tp", "2", "--parallel.dp_replicate", "2"]
TRAIN = [
    *JOB,
    *LAYOUT,
    "--train.eval_interval",
    "0",
    "--train.sample_prompt",
    "",
    "--checkpoint.interval",
    "0",
    "--train.progress",
    "false",
    "--logging.tensorboard",
    "false",
]
RANKS_PER_NODE = 2
RING_SHARE = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "p2p": lambda n: 1.0,
}


def predicted_bytes_per_step() -> tuple[float, list[dict]]:
    """Bytes node 1 sends across the link in one step, by the planner; and its inter-node collectives."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshforge",
            "plan",
            *JOB,
            *LAYOUT,
            "--gpus",
            "4",
            "--gpus-per-node",
            str(RANKS_PER_NODE),
            "--gpu",
            "cpu",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    layout = json.loads(out)["layouts"][0]
    internode = [c for c in layout["collectives"] if c["link"] == "internode"]
    per_rank = sum(RING_SHARE[c["op"]](c["group_size"]) * c["bytes"] * c["count"] for c in internode)
    return per_rank * RANKS_PER_NODE, internode


def run(cluster: Cluster, data: Path, out: Path, steps: int, tag: str) -> tuple[int, int]:
    """Train ``steps`` steps on both nodes; node 1's (rx, tx) bytes during the run."""
    before = cluster.rx_bytes(1), cluster.tx_bytes(1)
    argv = ["train", *TRAIN, "--train.steps", str(steps), "--data.path", str(data), "--train.output_dir", str(out)]
    procs = [
        cluster.popen(
            node,
            [
                sys.executable,
                "-m",
                "meshforge",
                "launch",
                "--nodes",
                "2",
                "--gpus-per-node",
                str(RANKS_PER_NODE),
                "--rdzv-endpoint",
                f"{cluster.hostnames[0]}:29400",
                "--rdzv-id",
                tag,
                "--",
                *argv,
            ],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    for node, p in enumerate(procs):
        log = p.communicate(timeout=600)[0]
        if p.returncode != 0:
            raise SystemExit(f"node {node} failed:\n{log[-3000:]}")
    return cluster.rx_bytes(1) - before[0], cluster.tx_bytes(1) - before[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="4,12", help="the two step counts whose traffic is subtracted")
    ap.add_argument("--record", action="store_true", help="append the numbers to bench/RESULTS.md")
    args = ap.parse_args()
    problem = cluster_problem()
    if problem:
        raise SystemExit(f"bench_two_node: {problem}")
    short, long = (int(s) for s in args.steps.split(","))
    from meshforge.data_pipeline.builtin import ensure_builtin

    load_before = loadavg()
    predicted, internode = predicted_bytes_per_step()
    with tempfile.TemporaryDirectory() as tmp:
        data = ensure_builtin("shakespeare", Path(tmp) / "cache", 512, progress=False)
        cluster = Cluster(2, tag="b").start()
        try:
            t0 = time.monotonic()
            measured = {
                n: run(cluster, data, Path(tmp) / f"run{n}", n, f"bench{n}-{os.getpid()}") for n in (short, long)
            }
            took = time.monotonic() - t0
        finally:
            cluster.close()
    rx, tx = ((measured[long][i] - measured[short][i]) / (long - short) for i in (0, 1))
    lines = [
        f"layout: 2 nodes x {RANKS_PER_NODE} ranks (tests/harness/cluster_harness.py namespaces, a veth pair per node on one "
        f"bridge), tp 2 inside a node, dp_replicate 2 across the link; {' '.join(JOB)}; runs of {short} and {long} "
        f"steps, {took:.0f} s; load average {load_before} before, {loadavg()} after",
        "",
        "| | bytes per step | / predicted |",
        "|---|---:|---:|",
        f"| planner: node 1 sends (inter-node collectives x ring share x {RANKS_PER_NODE} ranks) | {predicted:,.0f} | 1.00 |",
        f"| measured: node 1 tx (veth counter) | {tx:,.0f} | {tx / predicted:.3f} |",
        f"| measured: node 1 rx (veth counter) | {rx:,.0f} | {rx / predicted:.3f} |",
        "",
        "planner's inter-node collectives (per rank, per step): "
        + "; ".join(
            f"{c['group']} {c['op']} of {c['group_size']}: {c['count']:g} x {c['bytes']:,} B" for c in internode
        ),
    ]
    print("\n".join(lines))
    if args.record:
        record("## Two nodes: bytes on the link per step vs the planner", lines)


if __name__ == "__main__":
    main()
