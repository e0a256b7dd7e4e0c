"""meshforge plan's constrained search: layout keys given on the command line fix those dimensions and the rest
is searched; a constraint no layout can meet gets one line naming it."""

from __future__ import annotations

import json

import pytest

from meshforge.cli import main
from meshforge.config import load_config
from meshforge.plan.constraints import constraints_of, satisfies
from meshforge.plan.devices import get_device
from meshforge.plan.planner import TIE, layout_keys_given, plan_job, plan_layout

H100 = get_device("h100-80gb")
BASE = {"train.global_batch_size": 32, "train.micro_batch_size": 1}


def _cfg(argv: list[str]):
    """The small preset with ``argv``'s ``--key value`` overrides, as ``plan`` builds it."""
    cfg = load_config("small", [*(a for k, v in BASE.items() for a in (f"--{k}", str(v))), *argv])
    cfg.train.device = "cuda"
    return cfg


def _search(argv: list[str], gpus: int = 16):
    cfg = _cfg(argv)
    fixed = constraints_of(cfg, layout_keys_given(argv))
    return cfg, fixed, plan_job(cfg, gpus, 8, H100, fixed=fixed)


@pytest.mark.parametrize(
    "argv,check",
    [
        (["--parallel.tp", "2"], lambda lay: lay.tp == 2),
        (
            ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b"],
            lambda lay: lay.schedule == "interleaved_1f1b",
        ),
        (["--parallel.activation_checkpointing", "full"], lambda lay: lay.ac == "full"),
        (["--parallel.dp_shard", "1", "--parallel.cp", "1"], lambda lay: lay.fsdp_shard == 1),
        (["--parallel.dp_backend", "deepspeed"], lambda lay: lay.zero.startswith("ds-")),
        (["--parallel.fsdp_reshard_after_forward", "false"], lambda lay: lay.zero == "fsdp-zero2"),
        (["--parallel.zero_stage", "2", "--parallel.dp_backend", "deepspeed"], lambda lay: lay.zero == "ds-zero2"),
        (["--train.micro_batch_size", "2", "--parallel.pp", "1"], lambda lay: lay.micro_batch_size == 2),
        (
            ["--parallel.pp", "4", "--parallel.pp_microbatches", "8"],
            lambda lay: 32 // (lay.dp * lay.micro_batch_size) == 8,
        ),
        (["--parallel.pp", "2", "--parallel.pp_stages_per_rank", "2"], lambda lay: lay.spr == 2),
    ],
)
def test_constrained_search_is_the_full_search_filtered(argv, check):
    """The constrained search lists exactly the layouts of the full search that meet the constraints, with the
    same prices, fastest first, and each has the given value. (The full search runs with the fixed recompute
    mode where one is given: it prunes heavier modes of fitting layouts; and it lists replicas under ZeRO-3
    only, where ``fsdp_reshard_after_forward false`` asks for their ZeRO-2 twin.)"""
    cfg, fixed, plan = _search(argv)
    assert plan.fixed == fixed and fixed
    listed = [*plan.fitting, *plan.overflowing]
    assert listed and all(check(p.layout) for p in listed)
    times = [p.time.step_s for p in plan.fitting]
    assert all(b >= a / (1 + TIE) for a, b in zip(times, times[1:]))
    full = plan_job(cfg, 16, 8, H100, ac_modes=tuple(fixed.get("ac", ("none", "selective", "full"))))
    kept = {(p.layout, p.time.step_s) for p in full.fitting if satisfies(p.layout, fixed, 32)}
    got = {(p.layout, p.time.step_s) for p in plan.fitting}
    twins = {(lay, t) for lay, t in got - kept if lay.label == "replicated" and lay.zero == "fsdp-zero2"}
    assert got - twins == kept and len(kept) > 1
    assert bool(twins) == (fixed.get("zero") == {"fsdp-zero2"})


def test_fixed_values_outside_the_search_range_are_tried():
    """A given tp may span nodes and a given micro-batch size exceed the search's largest (16)."""
    cfg, fixed, plan = _search(["--parallel.tp", "2"], gpus=16)
    node = plan_job(cfg, 16, 1, H100, fixed=fixed)  # one GPU per node: tp 2 crosses nodes
    assert {p.layout.tp for p in node.fitting} == {2}
    assert node.fitting[0].time.step_s > plan.fitting[0].time.step_s  # the inter-node link is slower
    cfg = load_config("small", {"train.global_batch_size": 512, "train.micro_batch_size": 32})
    cfg.train.device = "cuda"
    big = plan_job(cfg, 8, 8, H100, fixed=constraints_of(cfg, ["train.micro_batch_size"]))
    assert {p.layout.micro_batch_size for p in big.fitting} == {32}


def test_fully_given_layout_searches_to_the_exact_price():
    """Every dimension given: the search finds one layout, priced as ``--exact`` prices it."""
    argv = [
        "--parallel.tp", "2", "--parallel.pp", "2", "--parallel.cp", "1", "--parallel.dp_replicate", "2",
        "--parallel.dp_shard", "2", "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_stages_per_rank",
        "2", "--parallel.activation_checkpointing", "selective", "--train.micro_batch_size", "2",
        "--parallel.fsdp_reshard_after_forward", "true",
    ]  # fmt: skip
    cfg, _, plan = _search(argv)
    (p,) = plan.fitting
    (q,) = plan_layout(cfg, 16, 8, H100).fitting
    assert p.layout.describe() == q.layout.describe() and p.layout.overrides() == q.layout.overrides()
    assert p.time.step_s == q.time.step_s and p.memory == q.memory


def test_cli_lists_the_constrained_layouts(capsys):
    argv = ["plan", "--config", "small", "--gpus", "16", "--global-batch-tokens", "64K", "--json"]
    assert main([*argv, "--parallel.tp", "2", "--parallel.activation_checkpointing=full"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fixed"] == {"tp": [2], "ac": ["full"]} and len(out["layouts"]) == 10
    assert all(r["overrides"]["parallel.tp"] == 2 for r in out["layouts"])
    assert all(r["overrides"]["parallel.activation_checkpointing"] == "full" for r in out["layouts"])
    assert main(argv[:-1] + ["--parallel.tp", "2", "--top", "1"]) == 0
    text = capsys.readouterr().out
    assert "layouts with tp 2 (given)" in text
    assert text.count("--parallel.tp") == 1  # the train command gives the layout's keys once


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--parallel.tp", "3"], "no layout of 16 GPUs has tp 3: 3 does not divide 16"),
        (
            ["--parallel.tp", "2", "--parallel.pp", "4", "--parallel.dp_replicate", "4"],
            "no layout of 16 GPUs has tp 2 x pp 4 x dp_replicate 4: that is 32 ranks",
        ),
        (
            [
                "--parallel.tp",
                "2",
                "--parallel.pp",
                "2",
                "--parallel.cp",
                "1",
                "--parallel.dp_replicate",
                "1",
                "--parallel.dp_shard",
                "2",
            ],
            "need the degrees to multiply to 16",
        ),  # fmt: skip
        (["--parallel.pp", "8"], "no layout has pp 8: the model's 4 layers cannot cover 8 pipeline stages"),
        (
            ["--parallel.pp_schedule", "1f1b", "--parallel.pp_stages_per_rank", "2"],
            "no layout has schedule 1f1b with spr 2: 1f1b runs one stage per rank",
        ),
        (
            ["--parallel.zero_stage", "2", "--parallel.fsdp_reshard_after_forward", "true"],
            "parallel.zero_stage = 2 is a setting of parallel.dp_backend = 'deepspeed'",
        ),  # the config's own check, before any search
        (
            ["--parallel.tp", "4"],
            "no layout of 16 GPUs with tp 4 is valid: model.n_heads = 6 does not divide by parallel.tp = 4",
        ),
        (
            ["--parallel.pp", "4", "--parallel.pp_microbatches", "3"],
            "no layout of 16 GPUs with pp 4, microbatches 3 is valid",
        ),
        (
            ["--parallel.tp", "1", "--parallel.pp", "1", "--parallel.dp_shard", "1", "--parallel.cp", "1"],
            "no layout of 16 H100-80GB with tp 1, pp 1, dp_shard 1, cp 1 fits",
        ),
    ],
)
def test_unmeetable_constraints_one_line(capsys, argv, message):
    extra = ["--model.dim", "16384", "--model.n_heads", "128"] if "fits" in message else []
    assert main(["plan", "--config", "small", "--gpus", "16", "--global-batch-tokens", "64K", *extra, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("meshforge: error: ") and "\n" not in err
