"""Expert parallel (alone, x FSDP2, x TP, x PP, capacity routing, resume under another EP degree) against one process.

Every run here trains the same MoE model (PARITY_ARGS plus MOE_ARGS): 4 experts, top-2,
with the load-balancing and z losses on. The reference is one process; per-step losses
and the final weights (the experts' full weights, gathered by DCP into a single-process
model) must agree within fp32 tolerance.
"""

from __future__ import annotations

import shutil

import pytest

from meshforge.cli import main as cli_main
from meshforge.config import load_config
from meshforge.pretrain.metrics import read_metrics
from parallel_harness import PARITY_ARGS, TP_ATOL, assert_parity, read_result, run_ranks, train_layout
from torch_compat import pp_tp

MOE_ARGS = ("--model.moe_experts", "4", "--model.moe_top_k", "2")
CAPACITY_ARGS = (*MOE_ARGS, "--model.moe_capacity_factor", "1.0")


@pytest.fixture(scope="module")
def moe_ref(tiny_data, tmp_path_factory):
    """The single-process dropless MoE reference."""
    return train_layout(tiny_data, tmp_path_factory.mktemp("ep_ref") / "ref", 1, *MOE_ARGS)


@pytest.fixture(scope="module")
def capacity_ref(tiny_data, tmp_path_factory):
    """The single-process capacity-routing reference (capacity per micro-batch of 2 samples)."""
    return train_layout(tiny_data, tmp_path_factory.mktemp("ep_cap_ref") / "ref", 1, *CAPACITY_ARGS)


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("ep2", 2, ("--parallel.ep", "2")),
        pytest.param("ep4", 4, ("--parallel.ep", "4"), marks=pytest.mark.slow),
        ("ep2xfsdp2", 4, ("--parallel.ep", "2")),  # dp_shard 4 = ep 2 x FSDP 2 for the experts
        # TP in the attention, the MoE feed-forwards replicated over tp
        ("tp2", 2, ("--parallel.tp", "2")),
        pytest.param(
            "ep2xtp2", 4, ("--parallel.ep", "2", "--parallel.tp", "2"), marks=pytest.mark.slow
        ),  # dp_shard 2 = ep 2
    ],
)
def test_ep_layouts_match_single_process(name, world, overrides, tiny_data, moe_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / name, world, *MOE_ARGS, *overrides)
    assert_parity(moe_ref, got, atol=TP_ATOL if "--parallel.tp" in overrides else 1e-6)


PP_ARGS = ("--model.tie_embeddings", "false", "--train.eval_interval", "5")
"""Pipeline runs: untied (the embedding and the head sit on different stages), validation every 5 steps."""


@pytest.fixture(scope="module")
def moe_pp_ref(tiny_data, tmp_path_factory):
    """One process, the pipeline runs' settings; the aux-loss-free bias update on (it steers routing)."""
    return train_layout(
        tiny_data,
        tmp_path_factory.mktemp("ep_pp_ref") / "ref",
        1,
        *MOE_ARGS,
        *PP_ARGS,
        "--model.moe_bias_update_rate",
        "0.01",
    )


def _moe_metrics(out) -> dict[tuple[int, str], float]:
    return {(r["step"], k): v for r in read_metrics(out) for k, v in r.items() if k.startswith("moe_")}


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("pp2-1f1b", 2, ("--parallel.pp_schedule", "1f1b")),
        # 4 stages over 2 ranks: each rank's MoE layers sit on two stages
        ("pp2-interleaved", 2, ("--parallel.pp_schedule", "interleaved_1f1b")),
        ("pp2xep2", 4, ("--parallel.pp_schedule", "1f1b", "--parallel.ep", "2")),
        pp_tp("pp2xtp2", 4, ("--parallel.pp_schedule", "1f1b", "--parallel.tp", "2"), slow=True),
    ],
)
def test_moe_pipeline_matches_single_process(name, world, overrides, tiny_data, moe_pp_ref, tmp_path):
    """Losses, weights, and every router metric of every step (load per layer, aux and z losses,
    dropped fraction): the stages' shape-inference forwards must not count, or the bias update
    (and with it the routing) would drift from the single process."""
    got = train_layout(
        tiny_data,
        tmp_path / name,
        world,
        *MOE_ARGS,
        *PP_ARGS,
        "--model.moe_bias_update_rate",
        "0.01",
        "--parallel.pp",
        "2",
        *overrides,
    )
    assert_parity(moe_pp_ref, got, atol=TP_ATOL if "--parallel.tp" in overrides else 1e-6)
    want, have = _moe_metrics(moe_pp_ref.output_dir), _moe_metrics(got.output_dir)
    assert want.keys() == have.keys() and any(k.startswith("moe_load_cv/layers.3") for _, k in want)
    for key, value in want.items():
        assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_ep_capacity_routing_matches_single_process(tiny_data, capacity_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / "ep2-cap", 2, *CAPACITY_ARGS, "--parallel.ep", "2")
    assert_parity(capacity_ref, got)


def test_ep_checkpoint_resumes_under_other_ep_degrees(tiny_data, moe_ref, tmp_path):
    """ep 2 to step 5, then ep 4 to step 10: the same run as the single-process reference."""

    def train(out, world, *extra):
        run_ranks(
            world,
            [
                "train",
                *PARITY_ARGS,
                "--data.path",
                str(tiny_data),
                "--train.output_dir",
                str(out),
                *MOE_ARGS,
                "--checkpoint.interval",
                "5",
                *extra,
            ],
        )

    out = tmp_path / "ep2-then-ep4"
    train(out, 2, "--parallel.ep", "2")
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    train(out, 4, "--parallel.ep", "4")
    assert_parity(moe_ref, read_result(out))


@pytest.mark.slow
def test_moe_checkpoint_moves_from_tp2_to_one_process(tiny_data, moe_ref, tmp_path):
    """Steps 1-5 on tp2 (MoE weights plain, the rest DTensors), 6-10 in one process: the optimizer
    state's groups are the model's, not the layout's, so it loads; the run equals the reference."""
    out = tmp_path / "tp2-then-1"
    common = [
        "train",
        *PARITY_ARGS,
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        *MOE_ARGS,
        "--checkpoint.interval",
        "5",
    ]
    run_ranks(2, [*common, "--parallel.tp", "2", "--train.steps", "5"])
    run_ranks(1, common)
    assert_parity(moe_ref, read_result(out), atol=TP_ATOL)


@pytest.mark.parametrize(
    "world, args, message",
    [
        (
            4,
            ["--model.moe_experts", "6", "--parallel.ep", "4"],
            "model.moe_experts = 6 does not divide by parallel.ep = 4",
        ),
        (2, ["--parallel.ep", "2"], "expert parallelism needs an MoE model"),
        (
            4,
            [*MOE_ARGS, "--parallel.ep", "4", "--parallel.dp_shard", "2", "--parallel.tp", "2"],
            "parallel.ep = 4 must divide dp_shard*cp = 2*1 = 2",
        ),
    ],
)
def test_bad_ep_fails_before_process_groups(world, args, message, tiny_data, tmp_path, monkeypatch, capsys):
    # nobody else is running: creating a process group would hang, so returning proves the check came first
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    code = cli_main(
        ["train", "--config", "tiny-test", "--data.path", str(tiny_data), "--train.output_dir", str(out), *args]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("preset", ["moe-small", "mixtral-8x", "moe-64e"])
def test_moe_presets_load(preset):
    cfg = load_config(preset)
    m = cfg.model
    assert m.moe_experts > 0 and 1 <= m.moe_top_k <= m.moe_experts
