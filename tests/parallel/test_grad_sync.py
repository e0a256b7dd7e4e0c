"""``parallel.grad_sync``: FSDP2 / HSDP gradients reduced once per step or after every micro-batch, each
against the single-process run, with the reductions counted as the ranks issue them (grad_sync_rank.py)."""

import re

import pytest

from parallel_harness import PARITY_ARGS, REPO, assert_parity, read_result, run_ranks

UNITS = 5
"""FSDP2 units of PARITY_ARGS' 4-layer decoder: each block and the root."""
STEPS, MICRO = 10, 2
"""PARITY_ARGS: 10 steps; 8 samples over 2 data-parallel ranks in micro-batches of 2."""


@pytest.mark.parametrize(
    "name, overrides, reduce_scatters, all_reduces",
    [
        # FSDP2 over 2 ranks: one reduce-scatter per unit and step, or per unit and micro-batch
        ("fsdp2-step", ("--parallel.grad_sync", "step"), UNITS * STEPS, 0),
        ("fsdp2-microbatch", ("--parallel.grad_sync", "microbatch"), UNITS * STEPS * MICRO, 0),
        # HSDP 2 x 1 (replicas of one shard): the all-reduce over dp_replicate, once per step by default
        ("hsdp-2x1-step", ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"), None, UNITS * STEPS),
    ],
)
def test_grad_sync_matches_single_process(
    name, overrides, reduce_scatters, all_reduces, tiny_data, single_process_ref, tmp_path
):
    out = tmp_path / name
    args = ["train", *PARITY_ARGS, "--data.path", str(tiny_data), "--train.output_dir", str(out), *overrides]
    errs = run_ranks(2, args, script=[str(REPO / "tests" / "harness" / "grad_sync_rank.py")])
    for err in errs:
        counts = dict(re.findall(r"(\w+)=(\d+)", err.strip().splitlines()[-1]))
        if reduce_scatters is not None:
            assert int(counts["reduce_scatter"]) == reduce_scatters, counts
        assert int(counts["all_reduce"]) == all_reduces, counts
    assert_parity(single_process_ref, read_result(out))


FSDP_GROUPS = ("fsdp", "dp_replicate")


@pytest.mark.parametrize("grad_sync", ["step", "microbatch"])
@pytest.mark.parametrize("zero, rep, shard", [("fsdp-zero3", 1, 4), ("fsdp-zero2", 1, 4), ("fsdp-zero3", 2, 2)])
def test_planner_and_dry_run_price_the_trainers_grad_sync(grad_sync, zero, rep, shard):
    """Without pp the time model counts the FSDP2 reduce-scatters (and HSDP all-reduces) as the trainer issues
    them -- once per step or per microbatch -- and the dry run, read off the sharded model, agrees."""
    from meshforge.config import load_config
    from meshforge.plan.devices import get_device
    from meshforge.plan.dry_run import dry_run
    from meshforge.plan.layouts import Layout, check_layout
    from meshforge.plan.time_model import estimate_time

    cfg = load_config("small", {"train.global_batch_size": 32, "model.n_layers": 4, "parallel.grad_sync": grad_sync})
    layout = Layout(1, 1, rep, shard, zero=zero, micro_batch_size=2)
    job = check_layout(cfg, layout)
    mb, units = 32 // 4 // 2, 4 + 1
    counts = []
    for collectives in (
        dry_run(cfg, layout, 0).collectives,
        estimate_time(job, layout, get_device("h100-80gb"), 8).comm,
    ):
        got: dict[str, float] = {}
        for c in collectives:
            if c["group"] in FSDP_GROUPS or c["group"].startswith("dp_shard"):
                got[c["op"]] = got.get(c["op"], 0) + c["count"]
        counts.append(got)
    assert counts[0] == counts[1]
    per_step = units * (1 if grad_sync == "step" else mb)
    assert counts[0]["reduce_scatter"] == per_step
    assert counts[0].get("all_reduce", 0) == (per_step if rep > 1 else 0)


def test_memory_counts_the_unsharded_gradients_kept_between_microbatches():
    """Reducing once per step, FSDP2 holds each unit's unsharded fp32 gradient through the backwards: the
    rank's whole gradient (4 bytes x its tp/pp share of the parameters) in the backward peak; per microbatch,
    or with one microbatch, none."""
    from meshforge.config import load_config
    from meshforge.plan.layouts import Layout, check_layout
    from meshforge.plan.memory import estimate_memory
    from meshforge.plan.state import unsharded_numel

    peaks = {}
    for sync, mbs in (("step", 2), ("microbatch", 2), ("step", 8)):
        cfg = load_config("small", {"train.global_batch_size": 32, "parallel.grad_sync": sync})
        layout = Layout(1, 1, 1, 4, micro_batch_size=mbs)
        est = estimate_memory(check_layout(cfg, layout), layout)
        peaks[sync, mbs] = est
    whole = 4 * unsharded_numel(check_layout(cfg, layout), layout, 0)["all"]
    assert peaks["step", 2]["grad_accum"] == whole > 3 * peaks["step", 2]["grads"]  # unsharded vs a quarter
    assert peaks["microbatch", 2]["grad_accum"] == peaks["step", 8]["grad_accum"] == 0  # 8 = the local batch
    assert peaks["step", 2]["total"] - peaks["microbatch", 2]["total"] >= whole - peaks["step", 2]["grads"]
