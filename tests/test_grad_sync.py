"""``parallel.grad_sync``: FSDP2 / HSDP gradients reduced once per step or after every micro-batch, each
against the single-process run, with the reductions counted as the ranks issue them (grad_sync_rank.py)."""

import re

import pytest

from parallel_harness import PARITY_ARGS, REPO, assert_parity, read_result, run_ranks

UNITS = 5
"""FSDP2 units of PARITY_ARGS' 4-layer decoder: each block and the root."""
STEPS, MICRO = 10, 2
"""PARITY_ARGS: 10 steps; 8 samples over 2 data-parallel ranks in micro-batches of 2."""


@pytest.mark.parametrize("name, overrides, reduce_scatters, all_reduces", [
    # FSDP2 over 2 ranks: one reduce-scatter per unit and step, or per unit and micro-batch
    ("fsdp2-step", ("--parallel.grad_sync", "step"), UNITS * STEPS, 0),
    ("fsdp2-microbatch", ("--parallel.grad_sync", "microbatch"), UNITS * STEPS * MICRO, 0),
    # HSDP 2 x 1 (replicas of one shard): the all-reduce over dp_replicate, once per step by default
    ("hsdp-2x1-step", ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"), None, UNITS * STEPS),
])
def test_grad_sync_matches_single_process(name, overrides, reduce_scatters, all_reduces, tiny_data,
                                          single_process_ref, tmp_path):
    out = tmp_path / name
    args = ["train", *PARITY_ARGS, "--data.path", str(tiny_data), "--train.output_dir", str(out), *overrides]
    errs = run_ranks(2, args, script=[str(REPO / "tests" / "grad_sync_rank.py")])
    for err in errs:
        counts = dict(re.findall(r"(\w+)=(\d+)", err.strip().splitlines()[-1]))
        if reduce_scatters is not None:
            assert int(counts["reduce_scatter"]) == reduce_scatters, counts
        assert int(counts["all_reduce"]) == all_reduces, counts
    assert_parity(single_process_ref, read_result(out))
