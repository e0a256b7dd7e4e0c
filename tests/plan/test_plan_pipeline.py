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
    for sched, zero in (
        ("1f1b", "fsdp-zero3"),
        ("gpipe", "fsdp-zero3"),
        ("interleaved_1f1b", "fsdp-zero3"),
        ("interleaved_1f1b", "fsdp-zero2"),
        ("zero_bubble", "fsdp-zero2"),
    )
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


def test_virtual_stages_are_searched_and_shrink_the_bubble():
    """Stages per rank are part of the search wherever the layers allow (even splits or powers of two); a
    layout's count reaches the job config, and deeper interleaving prices a smaller bubble."""
    from meshforge.plan.layouts import enumerate_layouts, virtual_stages

    assert virtual_stages(16, 2, "interleaved_1f1b") == [2, 4, 8]
    assert virtual_stages(96, 8, "zero_bubble") == [2, 3, 4, 6, 8, 12]
    assert virtual_stages(16, 2, "1f1b") == [0] and virtual_stages(16, 1, "interleaved_1f1b") == [0]
    cfg = load_config("llama-1b", {"train.global_batch_size": 64})
    layouts, _ = enumerate_layouts(cfg, 16, 8, ac_modes=("full",), max_micro_batch=1)
    found = {lay.spr for lay, _ in layouts if lay.pp == 2 and lay.schedule == "interleaved_1f1b"}
    assert found == {2, 4, 8}
    bubbles = []
    for v in (2, 4, 8):
        lay = Layout(8, 2, 1, 1, schedule="interleaved_1f1b", stages_per_rank=v, ac="full")
        job = check_layout(cfg, lay)
        assert job.parallel.pp_stages_per_rank == v and f"interleaved_1f1b v{v}" in lay.describe()
        bubbles.append(estimate_time(job, lay, H100, 8).bubble_fraction)
    assert bubbles[0] > bubbles[1] > bubbles[2] > 0


def test_uneven_stages_are_priced_by_the_heaviest():
    """10 blocks over 4 stages run 3, 3, 2, 2 (+ the output on the last): the pipeline's pace is that of a
    3-block rank, not 10 / 4 blocks; with layers that divide, the last stage's output projection sets it."""
    from meshforge.plan.compute import block_weights, heaviest_share

    cfg = load_config("small", {"train.global_batch_size": 64, "model.n_layers": 10})
    blocks, head = block_weights(cfg)
    assert head > 0 and len(set(blocks)) == 1
    total = sum(blocks) + head
    assert heaviest_share(cfg, Layout(1, 4, 1, 1)) == pytest.approx(max(3 * blocks[0], 2 * blocks[0] + head) / total)
    assert heaviest_share(cfg, Layout(1, 5, 1, 1)) == pytest.approx((2 * blocks[0] + head) / total)
    lay = Layout(1, 4, 1, 1)
    for eff in (0.5, None):  # a flat efficiency, and op by op (roofline.py: the GEMMs scale by the share)
        flat = estimate_time(check_layout(cfg, Layout(1, 1, 1, 4)), Layout(1, 1, 1, 4), H100, 8, eff)
        piped = estimate_time(check_layout(cfg, lay), lay, H100, 8, eff)
        if eff:
            assert piped.compute_s == pytest.approx(flat.compute_s * 4 * heaviest_share(cfg, lay))
        else:
            gemm = piped.compute_parts["gemm"]
            assert gemm == pytest.approx(flat.compute_parts["gemm"] * 4 * heaviest_share(cfg, lay))
        assert piped.compute_s > flat.compute_s * 1.1


def test_a_given_layouts_pp_split_is_kept():
    """``--parallel.pp_split`` with a given layout prices that split (the busiest rank's FLOPs, the fullest
    rank's memory, the train command's keys); without one, layouts are balanced."""
    from meshforge.plan.compute import block_weights
    from meshforge.plan.planner import layout_keys_given, plan_layout

    base = {
        "train.global_batch_size": 64,
        "model.n_layers": 12,
        "parallel.pp": 4,
        "parallel.dp_shard": 2,
        "train.micro_batch_size": 2,
    }
    assert layout_keys_given(["--parallel.pp_split", "6,8,10"]) == ["parallel.pp_split"]
    priced = {}
    for split in ("", "6,8,10"):  # 3/3/3/3 blocks, or 6/2/2/2
        cfg = load_config("small", {**base, "parallel.pp_split": split})
        (p,) = plan_layout(cfg, 8, 8, H100, 0.5).fitting  # a flat efficiency: compute in proportion to FLOPs
        assert p.layout.pp_split == split and p.layout.overrides()["parallel.pp_split"] == split
        assert (f"split {split}" in p.layout.describe()) == bool(split)
        priced[split] = p
    blocks, head = block_weights(load_config("small", base))
    ratio = priced["6,8,10"].time.compute_s / priced[""].time.compute_s
    assert ratio == pytest.approx(6 * blocks[0] / (3 * blocks[0] + head))  # rank 0's six blocks set the pace
    assert priced["6,8,10"].memory["total"] > priced[""].memory["total"]
    assert priced["6,8,10"].memory["params"] > priced[""].memory["params"]


def test_data_parallel_traffic_hides_only_behind_the_compute_it_runs_during():
    """Under pp a ZeRO-2 stage gathers its weights in the first microbatch's forward and reduces in the last
    microbatch's backward: only those microbatches' compute hides them, not the whole step's; per-microbatch
    reductions (no pp, grad_sync = "microbatch") hide behind every backward."""

    def dp_traffic(est, behind):
        return sum(c["seconds"] for c in est.comm if not c["exposed"] and c["behind"] == behind)

    cfg = load_config("llama-1b", {"train.global_batch_size": 256})
    lay = Layout(1, 2, 1, 64, zero="fsdp-zero2", schedule="1f1b", micro_batch_size=1)
    est = estimate_time(check_layout(cfg, lay), lay, H100, 8)
    mb = 256 // 64
    gathers, reductions = dp_traffic(est, "first forward"), dp_traffic(est, "last backward")
    assert (
        gathers > 0
        and reductions > 0
        and {c["behind"] for c in est.comm if not c["exposed"]} == {"first forward", "last backward"}
    )
    beyond = max(0, gathers - est.compute_s / (3 * mb)) + max(0, reductions - 2 * est.compute_s / (3 * mb))
    assert beyond > 0 and est.terms["exposed data parallel"] == pytest.approx(
        max(beyond, gathers + reductions - est.compute_s)
    )
    flat = Layout(1, 1, 1, 128, zero="fsdp-zero3", micro_batch_size=1)
    for sync, window in (("step", "last backward"), ("microbatch", "backwards")):
        job = check_layout(load_config("llama-1b", {"train.global_batch_size": 256, "parallel.grad_sync": sync}), flat)
        t = estimate_time(job, flat, H100, 8)
        assert dp_traffic(t, window) > 0 and dp_traffic(t, "step") > 0  # ZeRO-3's gathers: forwards and backwards


@pytest.mark.parametrize("tp,cp", [(1, 1), (2, 1), (2, 2)])
def test_stage_boundary_sends_the_sequence_shard(tp, cp):
    """Under TP the residual stream crosses stages as a sequence-sharded DTensor (SP) and torch's
    PipelineStage sends each rank's local shard: [mbs, seq / cp / tp, dim] per send, in the dry run and the
    time model alike (before, both charged the whole [mbs, seq, dim] on every tp rank)."""
    cfg = load_config("small", {"train.global_batch_size": 64, "model.n_layers": 8})
    cfg.train.device = "cuda"  # bf16 activations, as the time model prices a GPU
    sent = {}
    for t, c in ((1, 1), (tp, cp)):
        layout = Layout(t, 2, 1, 2, cp=c, micro_batch_size=2)
        job = check_layout(cfg, layout)
        (traced,) = [x for x in dry_run(cfg, layout, 0).collectives if x["group"] == "pp"]
        (est,) = [x for x in estimate_time(job, layout, H100, 8).comm if x["group"] == "pp"]
        assert traced["bytes"] == est["bytes"] and traced["count"] == est["count"]
        sent[t, c] = traced["bytes"]
    whole = 2 * cfg.data.seq_len * cfg.model.dim  # elements of one microbatch's [mbs, seq, dim]
    assert sent[1, 1] == 2 * whole  # bf16
    assert sent[tp, cp] * tp * cp == sent[1, 1]
