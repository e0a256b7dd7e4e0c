"""meshforge plan: the estimator's state bytes against the real sharding (fake-PG dry runs at full
world size), the ranking CLI and its JSON, the time model's pieces (bad input: test_plan_errors.py)."""

from __future__ import annotations

import json
import shlex

import pytest

from meshforge.cli import main
from meshforge.config import ConfigError, load_config
from meshforge.plan.devices import get_device
from meshforge.plan.dry_run import dry_run
from meshforge.plan.layouts import Layout, check_layout, enumerate_layouts
from meshforge.plan.memory import block_activation_bytes, estimate_memory, in_flight
from meshforge.plan.planner import layout_of_config
from meshforge.plan.state import chunk_len, rank_coords, state_bytes
from meshforge.plan.time_model import Link, estimate_time, link_for, ring

BIG_BATCH = {"train.global_batch_size": 16384, "train.micro_batch_size": 1}

# (preset, layout, rank): tp x pp x dp_replicate x dp_shard (x ep), ZeRO mode, schedule
FAST_CASES = [
    ("llama-1b", Layout(8, 1, 1, 128), 5),  # 1,024 ranks: TP + FSDP
    ("llama-1b", Layout(4, 2, 2, 32, zero="fsdp-zero2", schedule="interleaved_1f1b"), 77),  # PP x HSDP, virtual stages
    ("moe-small", Layout(2, 1, 1, 8, ep=4), 13),  # MoE: TP (attention) + EP + expert FSDP over dp_shard/ep
    ("moe-small", Layout(1, 1, 2, 4, ep=4, cp=2), 11),  # HSDP x cp x ep: ep borrows from dp_shard x cp
]
SLOW_CASES = [
    ("llama-1b", Layout(1, 1, 1, 1024), 1023),
    ("llama-1b", Layout(8, 4, 1, 512), 5000),  # 16,384 ranks
    ("llama-1b", Layout(2, 8, 8, 128, schedule="interleaved_1f1b"), 16383),  # 16,384 ranks, 2 stages per rank, HSDP
    ("mixtral-8x", Layout(2, 2, 1, 256, ep=8), 1000),
    ("mixtral-8x", Layout(1, 1, 2, 512, ep=8), 700),  # HSDP x EP
    ("mixtral-8x", Layout(4, 4, 1, 64, ep=4, zero="fsdp-zero2", schedule="interleaved_1f1b"), 1023),
    ("mixtral-8x", Layout(8, 1, 1, 2048, ep=8), 16383),  # 16,384 ranks
    ("llama-70b", Layout(8, 8, 1, 256), 16383),  # 16,384 ranks
    ("llama-70b", Layout(8, 4, 4, 128, schedule="interleaved_1f1b"), 9999),  # 16,384 ranks, HSDP
    ("llama-70b", Layout(4, 10, 1, 32), 1279),  # 80 layers over 10 stages, odd dp chunks
    ("t5-base", Layout(2, 4, 1, 32), 200),  # encoder-decoder: encoder norm on the stage of the last encoder block
    ("small", Layout(2, 1, 1, 2, cp=2), 6),  # context parallel x tp: FSDP over dp_shard x cp
    ("llama-1b", Layout(2, 1, 1, 8, cp=4), 13),  # cp x tp: FSDP over dp_shard x cp = 32
    ("llama-1b", Layout(1, 1, 2, 4, cp=2, zero="fsdp-zero2"), 11),  # cp x HSDP
    ("llama-70b", Layout(8, 1, 1, 1024, cp=2), 12345),  # 16,384 ranks with cp
    ("llama-1b", Layout(2, 2, 1, 4, cp=2), 13),  # cp x pp
    ("mixtral-8x", Layout(2, 1, 1, 16, ep=8, cp=2), 45),  # cp x ep, ep wider than cp
    ("moe-small", Layout(2, 1, 1, 2, ep=2, cp=4), 13),  # cp x ep, ep inside cp
]


def _check_equal(preset: str, layout: Layout, rank: int) -> None:
    cfg = load_config(preset, BIG_BATCH)
    real = dry_run(cfg, layout, rank)
    assert real.world_size == layout.world_size
    assert real.state == state_bytes(cfg, layout, rank), layout.describe()
    assert real.state["params"] > 0 and real.state["optimizer"] > 2 * real.state["params"]


@pytest.mark.parametrize(
    "preset,layout,rank", FAST_CASES, ids=lambda x: x.describe() if isinstance(x, Layout) else str(x)
)
def test_estimated_state_equals_dry_run(preset, layout, rank):
    _check_equal(preset, layout, rank)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,layout,rank", SLOW_CASES, ids=lambda x: x.describe() if isinstance(x, Layout) else str(x)
)
def test_estimated_state_equals_dry_run_at_scale(preset, layout, rank):
    """Each case in its own process, as `meshforge plan --dry-run` runs one: many 16,384-rank fake worlds in one
    process can leave a TP trace with a process-group name torch no longer resolves."""
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_plan import _check_equal; "
        f"from meshforge.plan.layouts import Layout; _check_equal({preset!r}, "
        f"Layout(**{dataclasses.asdict(layout)!r}), {rank})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_dry_run_reports_fsdp_and_pipeline_collectives():
    cfg = load_config("llama-1b", BIG_BATCH)
    layout = Layout(2, 2, 1, 16)
    res = dry_run(cfg, layout, 3)
    by_op = {(c["op"], c["group"]): c for c in res.collectives}
    mb = 16384 // 16  # local batch / micro-batch 1
    # stage 0 holds 8 blocks (7 reshard after forward, the last does not) + the root (embedding); under
    # pp gradients are reduced once per step, and a block gathered by a backward serves the next forward
    assert by_op[("reduce_scatter", "fsdp")]["group_size"] == 16
    assert sum(c["count"] for c in res.collectives if c["op"] == "reduce_scatter") == 9
    assert sum(c["count"] for c in res.collectives if c["op"] == "all_gather") == 7 * (mb + 1) + 1 + 1
    assert by_op[("send/recv", "pp")]["count"] == 2 * mb


def test_dry_run_counts_expert_fsdp_gathers_as_the_blocks():
    """Experts under ep x FSDP2 are their own units; like the blocks, the last layer's keep their gathered
    weights for backward (one all-gather per microbatch, the others two), and the root gathers once."""
    cfg = load_config("moe-small", {"train.global_batch_size": 16})
    res = dry_run(cfg, Layout(1, 1, 1, 4, ep=2), 1)
    mb, layers = 16 // 4, cfg.model.n_layers
    gathers = {}
    for c in res.collectives:
        if c["op"] == "all_gather":
            gathers[c["group"], c["bytes"]] = c["count"]
    experts = [n for (group, _), n in gathers.items() if group == "fsdp(experts)"]
    dense = sorted(n for (group, _), n in gathers.items() if group == "fsdp")
    assert experts == [(2 * layers - 1) * mb]
    assert dense == [mb, (2 * layers - 1) * mb]  # the root; the blocks


@pytest.mark.parametrize("method", ["ring", "alltoall"])
def test_context_parallel_memory_time_and_dry_run(method):
    """cp in the estimate: activations at T / cp, FSDP over dp_shard x cp, the ring's hops or the all-to-alls
    on the cp group; the dry run (real parallelize, fake PG) counts the same cp collectives."""
    cfg = load_config("llama-1b", {**BIG_BATCH, "data.seq_len": 8192, "model.max_seq_len": 8192})
    h100 = get_device("h100-80gb")
    base, cp4 = Layout(2, 1, 1, 8), Layout(2, 1, 1, 2, cp=4, cp_method=method)
    acts = {lay.cp: estimate_memory(cfg, lay)["activations"] for lay in (base, cp4)}
    assert acts[4] == pytest.approx(acts[1] / 4, rel=0.02)
    t = estimate_time(cfg, cp4, h100, 8)
    cp_comm = [c for c in t.comm if c["group"] == "cp"]
    assert cp_comm and all(c["group_size"] == 4 and c["link"] == "nvlink" for c in cp_comm)
    assert {c["op"] for c in cp_comm} == ({"p2p"} if method == "ring" else {"all_to_all"})
    fsdp = [c for c in t.comm if c["op"] == "all_gather" and c["group"] != "tp"]
    assert fsdp and fsdp[0]["group"] == "dp_shard_cp" and fsdp[0]["group_size"] == 8
    small = load_config("small", {"train.global_batch_size": 8, "train.micro_batch_size": 1})
    layout = Layout(1, 1, 1, 2, cp=2, cp_method=method)
    res = dry_run(small, layout, 3)
    assert res.state == state_bytes(small, layout, 3)
    traced = sum(c["count"] for c in res.collectives if c["group"] == "cp")
    estimated = sum(c["count"] for c in estimate_time(small, layout, h100, 8).comm if c["group"] == "cp")
    assert traced == estimated > 0


def test_enumeration_proposes_context_parallel():
    cfg = load_config("llama-1b", {"train.global_batch_size": 64, "data.seq_len": 8192, "model.max_seq_len": 8192})
    layouts, _ = enumerate_layouts(cfg, 64, 8, ac_modes=("full", "selective"), max_micro_batch=1)
    cps = {lay.cp for lay, _ in layouts}
    assert {1, 2, 4, 8} <= cps
    assert {lay.cp_method for lay, _ in layouts if lay.cp > 1} == {"ring", "alltoall"}
    # ring attention under selective checkpointing fails in backward (bench_plan_memory): refused, not proposed
    assert not [lay for lay, _ in layouts if lay.cp > 1 and lay.cp_method == "ring" and lay.ac == "selective"]
    with pytest.raises(ConfigError, match="cp_method = 'ring' and activation_checkpointing = 'selective'"):
        check_layout(cfg, Layout(1, 1, 1, 32, cp=2, ac="selective"))
    for lay, _ in [lc for lc in layouts if lc[0].cp > 1][::17]:
        check_layout(cfg, lay)


def _small_on(gpus: int, preset: str = "small"):
    """A preset as `meshforge plan` prices it (train.device cuda: bf16), with its enumeration on ``gpus``."""
    cfg = load_config(preset, {"train.global_batch_size": 16, "train.micro_batch_size": 1})
    cfg.train.device = "cuda"
    return cfg, enumerate_layouts(cfg, gpus, 8, ac_modes=("full",), max_micro_batch=1)


@pytest.mark.parametrize("preset,gpus", [("small", 8), ("moe-small", 4)])
def test_deepspeed_layouts_are_exactly_those_the_trainer_accepts(preset, gpus):
    """The DeepSpeed stages appear with context parallel (cp ranks are data-parallel ranks to the engine), and
    a DeepSpeed layout is proposed iff the trainer's own checks (check_layout: validate + check_job) accept it:
    never with tp, pp, HSDP or (in the MoE model) ep."""
    import dataclasses

    cfg, (layouts, refused) = _small_on(gpus, preset)
    proposed = {lay for lay, _ in layouts}
    ds = {lay for lay in proposed if lay.zero.startswith("ds")}
    if preset == "small":
        assert Layout(1, 1, 1, 4, cp=2, zero="ds-zero2", ac="full") in ds
        assert {lay.cp_method for lay in ds if lay.cp > 1} == {"ring", "alltoall"}
    else:
        assert ds and any(lay.ep > 1 for lay in proposed)
    for lay in {dataclasses.replace(lay, zero=z) for lay in proposed for z in ("ds-zero1", "ds-zero2", "ds-zero3")}:
        try:
            check_layout(cfg, lay)
            accepted = True
        except ConfigError as e:
            accepted = False
            assert "deepspeed" in str(e).lower(), str(e)  # what the FSDP2 twin passed, only DeepSpeed refuses
        assert (lay in ds) == accepted, lay.describe()
    assert any(lay.tp > 1 or lay.pp > 1 or lay.dp_replicate > 1 for lay in proposed - ds)  # refusals were tried
    assert any("deepspeed" in reason for reason in refused)
    _, (one_rank, _) = _small_on(1)
    assert {lay.zero for lay, _ in one_rank} == {"fsdp-zero3"}  # one rank: nothing to shard, the modes coincide


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_context_parallel_state_memory_and_time(stage):
    """DeepSpeed x cp2 on 8 GPUs: ZeRO partitions over all 8 ranks (dp 4 x cp 2); activations at T / 2; the
    cp collectives those of the FSDP2 layout of the same degrees; the engine's reductions over dp x cp."""
    import torch

    from meshforge.models import MODEL_SPECS

    cfg, (layouts, _) = _small_on(8)
    by_layout = dict(layouts)
    lay = Layout(1, 1, 1, 4, cp=2, zero=f"ds-zero{stage}", ac="full")
    job = by_layout[lay]
    assert job.parallel.dp_backend == "deepspeed" and job.parallel.zero_stage == stage
    with torch.device("meta"):
        n = sum(p.numel() for p in MODEL_SPECS["decoder"].build(cfg.model).parameters())
    part = -(-n // 8)  # ZeRO's partition of the flat parameters over the engine's 8 data-parallel ranks
    expected = {
        "params": 2 * (part if stage == 3 else n),  # bf16 model copy
        "grads": 2 * (part if stage >= 2 else n),  # bf16 gradients
        "optimizer": (4 + 4 + 4) * part,
    }  # fp32 master, exp_avg, exp_avg_sq
    for rank in (0, 5):
        assert state_bytes(job, lay, rank) == expected
    no_cp = Layout(1, 1, 1, 8, zero=f"ds-zero{stage}", ac="full")
    assert state_bytes(by_layout[no_cp], no_cp, 0) == expected  # the same 8 ranks to the engine
    acts = {x.cp: estimate_memory(by_layout[x], x)["activations"] for x in (lay, no_cp)}
    assert acts[2] == pytest.approx(acts[1] / 2, rel=0.02)  # one sample per rank either way, T / 2 tokens

    h100 = get_device("h100-80gb")
    t = estimate_time(job, lay, h100, 8)
    fsdp = Layout(1, 1, 1, 4, cp=2, ac="full")
    cp_comm = [c for c in t.comm if c["group"] == "cp"]
    assert cp_comm and cp_comm == [c for c in estimate_time(by_layout[fsdp], fsdp, h100, 8).comm if c["group"] == "cp"]
    engine = [c for c in t.comm if c["group"] != "cp"]
    assert engine and all(c["group"] == "dp_shard_cp" and c["group_size"] == 8 for c in engine)
    # messages of the whole model over the engine's 8 ranks either way; how often: a rank runs 16 / dp
    # microbatches (4 under cp 2, 2 without). ZeRO-1 all-reduces the accumulated gradients once per step,
    # ZeRO-2 reduce-scatters its gradient partitions in every backward (DeepSpeed's stage_1_and_2.py), ZeRO-3
    # also gathers the parameters forward and backward; ZeRO-1/2 gather the updated ones once per step
    for x, mb in ((lay, 4), (no_cp, 2)):
        comm = [c for c in estimate_time(by_layout[x], x, h100, 8).comm if c["group"] != "cp"]
        count = {
            op: sum(c["count"] for c in comm if c["op"] == op) for op in ("all_reduce", "reduce_scatter", "all_gather")
        }
        assert (
            count
            == {
                1: {"all_reduce": 1, "reduce_scatter": 0, "all_gather": 1},
                2: {"all_reduce": 0, "reduce_scatter": mb, "all_gather": 1},
                3: {"all_reduce": 0, "reduce_scatter": mb, "all_gather": 2 * mb},
            }[stage]
        )
        assert len({c["bytes"] for c in comm}) == 1  # the whole model's, in the compute dtype


@pytest.mark.parametrize("preset", ["small", "moe-small"])
def test_dry_run_traces_tp_collectives_as_the_time_model_counts(preset):
    """The dry run traces the TP collectives of one step (an MoE model on a narrow real-valued copy: its
    routing cannot run on meta tensors); the time model counts the same calls."""
    cfg = load_config(preset, {"train.global_batch_size": 16, "train.micro_batch_size": 2})
    layout = Layout(2, 1, 1, 2, ep=2) if preset == "moe-small" else Layout(2, 1, 1, 2)
    res = dry_run(cfg, layout, 1)
    traced = {c["op"]: c["count"] for c in res.collectives if c["group"] == "tp"}
    est = {
        c["op"]: c["count"] for c in estimate_time(cfg, layout, get_device("h100-80gb"), 8).comm if c["group"] == "tp"
    }
    assert traced == {
        "all_gather_into_tensor": est["all_gather"],
        "reduce_scatter_tensor": est["reduce_scatter"],
        "allreduce": est["all_reduce"],
    }
    if preset == "moe-small":
        assert est["all_gather"] > est["reduce_scatter"]  # MoE blocks hand their output back as a slice


def test_dry_run_of_deepspeed_is_refused_with_a_reason(capsys):
    """DeepSpeed's engine cannot be built on meta tensors under a fake process group: one clear line."""
    cfg = load_config("llama-1b", {**BIG_BATCH, "parallel.dp_backend": "deepspeed", "parallel.zero_stage": 2})
    with pytest.raises(ConfigError, match="covers the fsdp2 backend; DeepSpeed"):
        dry_run(cfg, Layout(1, 1, 1, 8, zero="ds-zero2"), 0)
    assert (
        main(
            [
                "plan",
                "--config",
                "llama-1b",
                "--gpus",
                "8",
                "--dry-run",
                "--parallel.dp_backend",
                "deepspeed",
                "--train.global_batch_size",
                "64",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "DeepSpeed" in err and "\n" not in err


def test_dry_run_refuses_what_the_code_refuses():
    cfg = load_config("llama-1b", BIG_BATCH)
    with pytest.raises(ConfigError, match="does not divide by parallel.tp"):
        dry_run(cfg, Layout(3, 1, 1, 2), 0)
    with pytest.raises(ConfigError, match="outside the world"):
        dry_run(cfg, Layout(2, 1, 1, 2), 4)


def test_enumeration_only_yields_layouts_the_code_accepts():
    cfg = load_config("llama-1b", {"train.global_batch_size": 64})
    layouts, refused = enumerate_layouts(cfg, 64, 8)
    assert layouts and refused
    for layout, _ in layouts[::97]:
        check_layout(cfg, layout)
        assert layout.world_size == 64
    assert {lay.tp for lay, _ in layouts} == {1, 2, 4, 8}


def test_enumeration_proposes_zero_bubble_with_data_parallel_only_unresharded():
    """zero_bubble under FSDP2 data parallel needs the parameters gathered until the weight pass (job_checks):
    the planner proposes it with fsdp-zero2 and never with fsdp-zero3."""
    cfg = load_config("small", {"train.global_batch_size": 16})
    layouts, refused = enumerate_layouts(cfg, 8, 8, ac_modes=("none",), max_micro_batch=2)
    zb = [lay for lay, _ in layouts if lay.pp > 1 and lay.schedule == "zero_bubble" and lay.sharded]
    assert zb and {lay.zero for lay in zb} == {"fsdp-zero2"}
    # with only replicas (dp_shard x cp = 1) ZeRO-2 is listed only where ZeRO-3 is refused, as here
    assert any(lay.fsdp_shard == 1 and lay.dp_replicate > 1 for lay in zb)
    replicas = [lay for lay, _ in layouts if lay.fsdp_shard == 1 and lay.dp_replicate > 1]
    assert {lay.zero for lay in replicas if lay.schedule != "zero_bubble"} == {"fsdp-zero3"}
    assert {"fsdp-zero2", "fsdp-zero3"} <= {lay.zero for lay, _ in layouts if lay.fsdp_shard > 1 and lay.pp == 1}
    assert any(k.startswith("parallel.pp_schedule = 'zero_bubble' with FSDP2 data parallel") for k in refused)
    for lay in zb[::7]:
        check_layout(cfg, lay)


def test_chunks_and_coordinates():
    assert [chunk_len(10, 4, i) for i in range(4)] == [3, 3, 3, 1]
    assert [chunk_len(5, 4, i) for i in range(4)] == [2, 2, 1, 0]
    assert [chunk_len(2, 4, i) for i in range(4)] == [1, 1, 0, 0]
    c = rank_coords(Layout(tp=2, pp=2, dp_replicate=2, dp_shard=4, ep=2), 1 * 16 + 0 * 8 + 3 * 2 + 1)
    assert (c.pp, c.dp_replicate, c.dp_shard, c.tp) == (1, 0, 3, 1)
    assert (c.ep_index(2), c.mod_ep_index(2)) == (1, 1)


def test_activation_checkpointing_and_pipeline_memory_order():
    cfg = load_config("llama-1b")
    per = block_activation_bytes(cfg, 0, 1, 4096, 1, 2)
    assert per["none"] > per["selective"] > per["full"] == 2 * 4096 * 2048
    assert in_flight(Layout(1, 4, 1, 1, schedule="1f1b"), 16, 1, 0) == 4
    assert in_flight(Layout(1, 4, 1, 1, schedule="1f1b"), 16, 1, 3) == 1
    assert in_flight(Layout(1, 4, 1, 1, schedule="gpipe"), 16, 1, 3) == 16
    job = load_config("llama-1b", {"train.global_batch_size": 64})
    mems = {ac: estimate_memory(job, Layout(2, 1, 1, 4, ac=ac))["activations"] for ac in ("none", "selective", "full")}
    assert mems["none"] > mems["selective"] > mems["full"]


def test_time_model_links_costs_and_bubble():
    h100 = get_device("h100-80gb")
    assert link_for(h100, 1, 8, 8).name == "nvlink" and link_for(h100, 8, 2, 8).name == "internode"
    link = Link(100.0, 1.0, "x")
    assert ring("all_gather", 4, 400.0, link) == pytest.approx(3 + 3.0)
    assert ring("all_reduce", 4, 400.0, link) == pytest.approx(2 * (3 + 3.0))
    assert ring("p2p", 2, 400.0, link) == pytest.approx(1 + 4.0)
    cfg = load_config("llama-1b", {"train.global_batch_size": 64})
    t1 = estimate_time(cfg, Layout(1, 4, 1, 2), h100, 8)
    assert t1.bubble_fraction == pytest.approx((3 / 32) / (1 + 3 / 32))  # (pp-1)/m, m = 64 / dp 2 / mbs 1
    tz = estimate_time(cfg, Layout(1, 4, 1, 2, schedule="zero_bubble"), h100, 8)
    assert tz.bubble_fraction < t1.bubble_fraction
    full = estimate_time(cfg, Layout(1, 1, 1, 8, ac="full"), h100, 8, efficiency=0.5)
    none = estimate_time(cfg, Layout(1, 1, 1, 8, ac="none"), h100, 8, efficiency=0.5)
    assert full.compute_s == pytest.approx(none.compute_s * 4 / 3)
    inter = estimate_time(cfg, Layout(8, 1, 1, 8), h100, 4)  # tp 8 over two 4-GPU nodes
    assert any(c["group"] == "tp" and c["link"] == "internode" for c in inter.comm)


def test_plan_cli_json_ranked_with_kinds(capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                "llama-1b",
                "--gpus",
                "16",
                "--gpus-per-node",
                "8",
                "--gpu",
                "h200",
                "--global-batch-tokens",
                "256K",
                "--top",
                "5",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    rows = out["layouts"]
    assert len(rows) == 5 and out["global_batch_size"] == 64 and out["device"] == "h200"
    # by step time, ties (within planner.TIE) leanest first
    assert all(a["step_s"] <= b["step_s"] * 1.002 for a, b in zip(rows, rows[1:]))
    for r in rows:
        assert {"params", "grads", "optimizer", "activations"} <= set(r)
        assert r["total"] <= out["usable_bytes"] and 0 < r["mfu"] < 1


def test_plan_cli_table_lists_overflowing_layouts(capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                "llama-1b",
                "--gpus",
                "8",
                "--gpu",
                "a100-80gb",
                "--seq-len",
                "8192",
                "--global-batch-tokens",
                "256K",
                "--top",
                "3",
                "--optim.lr",
                "1e-4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "A100-80GB" in out and "do not fit" in out and "needs" in out
    # the printed command, run as is, trains the top-ranked layout with the plan's own config and overrides
    argv = shlex.split(out.split("(one per GPU, under torchrun / srun / mpirun) with:\n")[1].splitlines()[0])
    assert argv[:6] == ["meshforge", "train", "--config", "llama-1b", "--optim.lr", "1e-4"]
    job = load_config("llama-1b", argv[4:])
    assert job.data.seq_len == 8192 and job.optim.lr == 1e-4
    best = next(line for line in out.splitlines() if line.startswith("  1  "))
    assert best[5:].startswith(layout_of_config(job, 8).describe() + " ")


def test_cpu_device_time_sharing_and_no_overlap():
    """The cpu entry: more ranks than cores stretch compute and communication; data-parallel traffic is not
    hidden behind compute (gloo is issued inline), so it adds to the step in full."""
    import dataclasses

    cpu = get_device("cpu")
    assert cpu.cores == 2 and not cpu.comm_overlap
    cfg = load_config("small", {"train.device": "cpu"})
    lay = Layout(1, 1, 2, 2, micro_batch_size=4)  # 4 ranks on one 2-core "node"
    shared = estimate_time(cfg, lay, cpu, 4)
    alone = estimate_time(cfg, lay, dataclasses.replace(cpu, cores=0), 4)
    assert shared.compute_s == pytest.approx(2 * alone.compute_s)
    dp = sum(c["seconds"] for c in shared.comm if not c["exposed"])
    assert dp > 0 and shared.step_s == pytest.approx(shared.compute_s + dp)
    overlapped = estimate_time(cfg, lay, dataclasses.replace(cpu, comm_overlap=True), 4)
    assert overlapped.step_s < shared.step_s


def test_plan_dry_run_cli_json(capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                "llama-1b",
                "--gpus",
                "64",
                "--dry-run",
                "--rank",
                "9",
                "--json",
                "--parallel.tp",
                "4",
                "--parallel.pp",
                "2",
                "--train.global_batch_size",
                "64",
                "--train.micro_batch_size",
                "1",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 64 and out["rank"] == 9
    for k in ("params", "grads", "optimizer"):
        assert out[k] == out["estimate"][k] > 0


def test_train_prints_prediction_and_measurement(tiny_data, tmp_path):
    """A fresh `meshforge train` process prints the planner's prediction and then its measurement.

    Its own process, with glibc's mmap threshold low (as bench/bench_plan_memory.py runs): inside the
    long-lived pytest process a small step's tensors reuse heap pages that are already resident, and the
    step's RSS peak can read 0."""
    import os
    import subprocess
    import sys

    from meshforge.pretrain.metrics import read_metrics

    out = tmp_path / "run"
    args = [
        "--config",
        "tiny-test",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--train.steps",
        "3",
        "--train.eval_interval",
        "0",
        "--train.sample_prompt",
        "",
        "--checkpoint.interval",
        "0",
        "--train.progress",
        "false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "meshforge", "train", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan (rank 0): params" in proc.stdout and "memory measured at step 2" in proc.stdout
    rec = next(r for r in read_metrics(out) if "mem_step_peak_bytes" in r)
    assert rec["step"] == 2 and rec["mem_step_peak_bytes"] > 0 and rec["mem_predicted_activations"] > 0


def test_layout_of_config_resolves_the_default_micro_batch():
    """train.micro_batch_size = 0 (the default) is the whole local batch; under pp the pipeline's microbatch
    (a run with the defaults on 2 ranks printed "no prediction: ZeroDivisionError" before)."""
    from meshforge.parallel.mesh import resolve_degrees
    from meshforge.parallel.pipeline import plan_pipeline
    from meshforge.plan.memory import estimate_rank
    from meshforge.plan.planner import layout_of_config

    cfg = load_config("small", {"train.micro_batch_size": 0})
    assert layout_of_config(cfg, 2).micro_batch_size == cfg.train.global_batch_size // 2
    assert estimate_rank(cfg, layout_of_config(cfg, 2), 0, "cpu")["activations"] > 0
    cfg = load_config("small", {"train.micro_batch_size": 0, "parallel.pp": 2})
    n = plan_pipeline(cfg, resolve_degrees(cfg.parallel, 2)).n_microbatches
    assert layout_of_config(cfg, 2).micro_batch_size == cfg.train.global_batch_size // n


def test_plan_output_to_a_closed_pipe_exits_quietly(monkeypatch):
    """`meshforge plan ... | head`: the reader is gone before the table is written -> exit 0, no BrokenPipeError."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # like `head` after its lines
    pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stdout", pipe)
    assert main(["plan", "--config", "small", "--gpus", "2", "--gpu", "cpu", "--top", "3"]) == 0
    pipe.write("x" * 100_000)  # stdout now goes to /dev/null: later writes (the interpreter's final flush) pass
    pipe.close()


def test_fused_loss_has_no_logits_in_the_activation_estimate():
    """train.fused_loss = on: the head keeps dh, an fp32 dW and one chunk of logits, not the 2 [tokens, vocab] buffers of lm_loss with z-loss (the preset's);
    where the trainer refuses the fused loss (tp > 1 without loss parallel), the planner does too."""
    from meshforge.plan.memory import head_activation_bytes

    cfg = load_config("small", {"train.fused_loss": "on"})
    B, T, D, V = 16, 128, cfg.model.dim, cfg.model.vocab_size
    plain = head_activation_bytes(cfg, B, T, 1, 4)
    fused = head_activation_bytes(cfg, B, T, 1, 4, fused=True)
    assert plain - fused == 2 * 4 * B * T * V - (4 * B * T * D + 4 * V * D + 4 * B * T * D)
    # bf16: dh in bf16, a bf16 copy of the weight for the matmuls, the chunk's fp32 logits and their bf16 copy
    bf16 = head_activation_bytes(cfg, B, T, 1, 2, fused=True) - head_activation_bytes(cfg, B, T, 1, 2)
    assert bf16 == (2 * B * T * D + 4 * V * D + 2 * V * D + (4 + 2) * B * T * D) - 2 * 4 * B * T * V
    on = estimate_memory(cfg, Layout(1, 1, 1, 1, micro_batch_size=16), "cpu")["activations"]
    off = estimate_memory(
        load_config("small", {"train.fused_loss": "off"}), Layout(1, 1, 1, 1, micro_batch_size=16), "cpu"
    )
    assert off["activations"] - on == plain - fused
    assert head_activation_bytes(cfg, B, T, 2, 4, fused=True) < fused  # vocab-parallel under tp
    # z-loss: the saved logits and the in-place gradient, one buffer fewer than F.cross_entropy's three
    no_z = load_config("small", {"train.z_loss_coef": 0.0})
    assert head_activation_bytes(no_z, B, T, 1, 4) - head_activation_bytes(cfg, B, T, 1, 4) == 4 * B * T * V
    no_lp = load_config("small", {"train.fused_loss": "on", "parallel.loss_parallel": False})
    with pytest.raises(ConfigError, match="fused_loss"):
        check_layout(no_lp, Layout(2, 1, 1, 1))
