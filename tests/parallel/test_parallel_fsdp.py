"""FSDP2 data parallel (ZeRO-3, ZeRO-2-like, HSDP, CPU offload) against the single-process run."""

import pytest

from parallel_harness import assert_parity, train_layout


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("fsdp2-zero3", 2, ()),
        ("fsdp2-zero2", 2, ("--parallel.fsdp_reshard_after_forward", "false")),
        ("hsdp-2x2", 4, ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "2")),
        ("fsdp2-cpu-offload", 2, ("--parallel.fsdp_cpu_offload", "true")),
        # the default micro batch (0): each rank's 4 samples in one pass, against accumulated passes of 2
        ("fsdp2-default-micro-batch", 2, ("--train.micro_batch_size", "0")),
    ],
)
def test_fsdp_layouts_match_single_process(name, world, overrides, tiny_data, single_process_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / name, world, *overrides)
    assert_parity(single_process_ref, got)
