"""meshforge plan under pipeline parallelism: the time model counts each collective as the runner
issues it (the dry run, which reads the order of forwards and backwards off torch's own schedule
classes, is the check), virtual stages and uneven stages."""

from __future__ import annotations

import pytest

from meshforge.config import load_config
from meshforge.plan.devices import get_device
from meshforge.plan.dry_run import dry_run, pipeline_gathers
from meshforge.plan.layouts import Layout, check_layout
from meshforge.plan.time_model import estimate_time

H100 = get_device("h100-80gb")
FSDP_GROUPS = ("fsdp", "fsdp(experts)", "dp_replicate")

# (schedule, ZeRO mode, dp_replicate, dp_shard): FSDP2 and HSDP under each schedule (zero-bubble runs
# FSDP2 without resharding: the weight half of its backward needs the gathered parameters)
PIPELINE_CASES = [
    (sched, zero, rep, shard)
    for sched, zero in (("1f1b", "fsdp-zero3"), ("gpipe", "fsdp-zero3"), ("interleaved_1f1b", "fsdp-zero3"),
                        ("interleaved_1f1b", "fsdp-zero2"), ("zero_bubble", "fsdp-zero2"))
    for rep, shard in ((1, 2), (2, 2))
]


def _fsdp_counts(collectives) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in collectives:
        if c["group"] in FSDP_GROUPS or c["group"].startswith("dp_shard"):
            out[c["op"]] = out.get(c["op"], 0) + c["count"]
    return out


@pytest.mark.parametrize("schedule,zero,rep,shard", PIPELINE_CASES, ids=lambda x: str(x))
def test_pipeline_fsdp_counts_equal_the_dry_run(schedule, zero, rep, shard):
    """FSDP2 / HSDP under pp: one reduce-scatter (and HSDP all-reduce) per unit per step, as torch's
    PipelineStage reduces after the last backward; all-gathers as the schedule's order leaves units gathered."""
    cfg = load_config("small", {"train.global_batch_size": 64, "model.n_layers": 8})
    layout = Layout(1, 2, rep, shard, zero=zero, schedule=schedule, micro_batch_size=2)
    job = check_layout(cfg, layout)
    for rank in (0, layout.world_size - 1):  # the first stage (embedding) and the last (norm, output)
        traced = _fsdp_counts(dry_run(cfg, layout, rank).collectives)
        est = _fsdp_counts(c for c in estimate_time(job, layout, H100, 8, rank=rank).comm)
        assert traced == est, (rank, traced, est)
        assert traced["reduce_scatter"] < 64 // (rep * shard) // 2  # fewer than one per microbatch
        assert ("all_reduce" in traced) == (rep > 1)


def test_pipeline_gathers_follow_the_order():
    assert pipeline_gathers("FFBFBB", reshard=True) == 4  # F, F, B, (F kept), B, (B kept)
    assert pipeline_gathers("FFBFBB", reshard=False) == 1
    assert pipeline_gathers("FFIFIWWIW", reshard=True) == 4  # W uses what I gathered
