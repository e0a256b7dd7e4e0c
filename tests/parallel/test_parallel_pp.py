"""Pipeline parallel (every schedule, uneven split, x FSDP2, x TP, resume) against one process.

The reference is a single-process run with untied embeddings (tied ones, whose two copies
live on the first and last stages, are tested in test_parallel_pp_tied.py). Every run also
evaluates at steps 0, 5 and 10, so the forward-only schedule is checked against the
reference's validation loss, including the switch between eval and train at step 0.
"""

from __future__ import annotations

import json

import pytest
import torch

from meshforge.cli import main as cli_main
from meshforge.config import ConfigError, load_config
from meshforge.parallel.mesh import resolve_degrees
from meshforge.parallel.pipeline import plan_pipeline, split_layers
from parallel_harness import PARITY_ARGS, TP_ATOL, assert_parity, read_result, run_ranks, train_layout
from torch_compat import pp_tp

PP_ARGS = ("--model.tie_embeddings", "false", "--train.eval_interval", "5")
"""What every run here adds to PARITY_ARGS (the reference too)."""
ZB_FSDP = ("--parallel.fsdp_reshard_after_forward", "false")
"""What zero_bubble needs under FSDP2 data parallel (check_job refuses it without)."""


def _metric(out, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def _assert_pp_parity(ref, got, atol: float = 1e-6) -> None:
    """Losses and final params (the harness), plus validation losses, z-losses and gradient norms.

    The gradient norm is what catches a wrong loss scale: AdamW's update barely depends
    on the scale of the gradient, so losses and weights alone could still agree. Layouts
    with TP pass the TP tests' parameter tolerance (TP sums matmul partials in another order).
    """
    assert_parity(ref, got, atol=atol)
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(ref.losses, got.losses))
    param_diff = max(((got.params[k] - v).abs().max() / v.abs().max()).item() for k, v in ref.params.items())
    print(f"\n{got.output_dir.name}: max rel diff loss {loss_diff:.2e}, params {param_diff:.2e}", end=" ")
    for key, steps in (("val_loss", [0, 5, 10]), ("grad_norm", list(range(1, 11))), ("z_loss", list(range(1, 11)))):
        want, have = _metric(ref.output_dir, key), _metric(got.output_dir, key)
        assert sorted(want) == sorted(have) == steps, key
        for step, v in want.items():
            assert have[step] == pytest.approx(v, rel=1e-5), (key, step)
        print(f"{key} {max(abs(have[k] - v) / abs(v) for k, v in want.items() if v):.2e}", end=" ")


@pytest.fixture(scope="module")
def untied_ref(tiny_data, tmp_path_factory):
    """The single-process reference with untied embeddings."""
    return train_layout(tiny_data, tmp_path_factory.mktemp("pp_ref") / "ref", 1, *PP_ARGS)


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("pp2-gpipe", 2, ("--parallel.pp_schedule", "gpipe")),
        # layers 0 | 1 2 3: uneven, and the last stage holds three blocks plus the head
        ("pp2-1f1b-uneven-split", 2, ("--parallel.pp_schedule", "1f1b", "--parallel.pp_split", "1")),
        ("pp2-interleaved-1f1b", 2, ("--parallel.pp_schedule", "interleaved_1f1b")),
        ("pp2-zero-bubble", 2, ("--parallel.pp_schedule", "zero_bubble")),
        ("pp2xfsdp2", 4, ("--parallel.pp_schedule", "interleaved_1f1b")),
        # the split backward under FSDP2: every unit keeps its gathered parameters until the weight pass
        ("pp2-zero-bubble-xfsdp2", 4, ("--parallel.pp_schedule", "zero_bubble", *ZB_FSDP)),
        pytest.param(
            "pp2-zero-bubble-xdp-replicate2",
            4,
            (
                "--parallel.pp_schedule",
                "zero_bubble",
                "--parallel.dp_replicate",
                "2",
                "--parallel.dp_shard",
                "1",
                *ZB_FSDP,
            ),
            marks=pytest.mark.slow,
        ),
        pp_tp("pp2xtp2", 4, ("--parallel.pp_schedule", "1f1b", "--parallel.tp", "2")),
        pp_tp("pp2xtp2xfsdp2", 8, ("--parallel.pp_schedule", "1f1b", "--parallel.tp", "2"), slow=True),
    ],
)
def test_pipeline_layouts_match_single_process(name, world, overrides, tiny_data, untied_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / name, world, "--parallel.pp", "2", *PP_ARGS, *overrides)
    _assert_pp_parity(untied_ref, got, atol=TP_ATOL if "--parallel.tp" in overrides else 1e-6)


def test_pipeline_checkpoint_resumes_in_one_process(tiny_data, untied_ref, tmp_path):
    """pp2 trains 5 steps and checkpoints; one process continues to step 10 from it."""
    out = tmp_path / "run"
    common = ["train", *PARITY_ARGS, *PP_ARGS, "--data.path", str(tiny_data), "--train.output_dir", str(out)]
    run_ranks(2, [*common, "--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", "--train.steps", "5"])
    assert (out / "checkpoints" / "step_00000005").is_dir()
    run_ranks(1, common)  # train.steps back to 10: resumes at step 5 without pipeline
    _assert_pp_parity(untied_ref, read_result(out))


# --------------------------------------------------------------------------- config


def test_too_few_layers_fails_before_process_groups(tiny_data, tmp_path, monkeypatch, capsys):
    # World size 2 with nobody else running: creating a process group would hang, so
    # returning at all proves the check came first.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    code = cli_main(
        [
            "train",
            "--config",
            "tiny-test",
            "--data.path",
            str(tiny_data),
            "--train.output_dir",
            str(out),
            "--model.tie_embeddings",
            "false",
            "--model.n_layers",
            "3",
            "--parallel.pp",
            "2",
            "--parallel.pp_schedule",
            "interleaved_1f1b",
        ]
    )
    assert code == 2
    assert (
        "model.n_layers = 3 cannot cover 4 pipeline stages (parallel.pp = 2 x 2 stages per rank)"
        in capsys.readouterr().err
    )
    assert not out.exists()


def test_bad_pipeline_split_fails_before_process_groups(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    code = cli_main(
        [
            "train",
            "--config",
            "tiny-test",
            "--data.path",
            str(tiny_data),
            "--train.output_dir",
            str(out),
            "--model.tie_embeddings",
            "false",
            "--model.n_layers",
            "4",
            "--parallel.pp",
            "2",
            "--parallel.pp_split",
            "4",
        ]
    )
    assert code == 2
    assert "split points must increase strictly within 1..3" in capsys.readouterr().err
    assert not out.exists()


def test_split_layers():
    assert split_layers(4, 2) == ((0, 2), (2, 4))
    assert split_layers(7, 3) == ((0, 3), (3, 5), (5, 7))  # the first stages take the remainder
    assert split_layers(8, 3, "3,6") == ((0, 3), (3, 6), (6, 8))
    for bad in ("3", "3,3", "0,4", "x,4", "3,8"):
        with pytest.raises(ConfigError):
            split_layers(8, 3, bad)


def _plan(world, *overrides):
    cfg = load_config(
        "tiny-test",
        [
            "--model.tie_embeddings",
            "false",
            "--model.n_layers",
            "8",
            "--train.global_batch_size",
            "8",
            "--train.micro_batch_size",
            "2",
            *overrides,
        ],
    )
    return plan_pipeline(cfg, resolve_degrees(cfg.parallel, world))


def test_pipeline_plan():
    plan = _plan(2, "--parallel.pp", "2")
    assert (plan.n_stages, plan.n_microbatches, plan.schedule) == (2, 4, "1f1b")
    assert plan.stages_of_rank(1) == [1]
    plan = _plan(4, "--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b")
    # dp 2: local batch 4 in micro batches of 2; loop placement of 4 stages on 2 ranks
    assert (plan.n_stages, plan.n_microbatches) == (4, 2)
    assert plan.stages_of_rank(0) == [0, 2] and plan.stages_of_rank(1) == [1, 3]
    assert plan.layer_ranges == ((0, 2), (2, 4), (4, 6), (6, 8))
    assert _plan(2, "--parallel.pp", "2", "--parallel.pp_microbatches", "8").n_microbatches == 8
    with pytest.raises(ConfigError, match="must divide the local batch"):
        _plan(2, "--parallel.pp", "2", "--parallel.pp_microbatches", "3")
    with pytest.raises(ConfigError, match="fewer than parallel.pp = 4"):
        _plan(4, "--parallel.pp", "4", "--train.micro_batch_size", "4")
    with pytest.raises(ConfigError, match="runs one stage per rank"):
        _plan(2, "--parallel.pp", "2", "--parallel.pp_stages_per_rank", "2")
    assert _plan(2, "--parallel.pp", "2", "--model.moe_experts", "4").layer_ranges == ((0, 4), (4, 8))  # MoE decoder
    cfg = load_config(
        "tiny-test",
        [
            "--model.tie_embeddings",
            "false",
            "--model.n_layers",
            "4",
            "--parallel.pp",
            "2",
            "--parallel.pp_schedule",
            "zero_bubble",
            "--parallel.compile",
            "auto",
        ],
    )
    plan_pipeline(cfg, resolve_degrees(cfg.parallel, 2), "cpu")  # auto: no compile on CPU
    with pytest.raises(ConfigError, match="set parallel.compile = off"):
        plan_pipeline(cfg, resolve_degrees(cfg.parallel, 2), "cuda")


def test_zero_bubble_with_fsdp_needs_gathered_params():
    """pp x FSDP2 data parallel x zero_bubble with FSDP units resharded after forward loses the weight gradients
    of those units (torch 2.13's split backward lists the sharded parameters): refused with the degrees before any
    process group; with parallel.fsdp_reshard_after_forward = false it runs (parity in the layouts above)."""
    from meshforge.parallel.job_checks import check_job

    def check(world: int, *args: str):
        cfg = load_config(
            "tiny-test",
            [
                "--model.tie_embeddings",
                "false",
                "--model.n_layers",
                "4",
                "--parallel.pp",
                "2",
                "--parallel.pp_schedule",
                "zero_bubble",
                "--train.micro_batch_size",
                "1",
                *args,
            ],
        )
        return check_job(cfg, resolve_degrees(cfg.parallel, world), "cpu")

    assert check(2).schedule == "zero_bubble"
    for world, extra, degrees in (
        (4, (), "1 x 2 x 1"),
        (4, ("--parallel.dp_replicate", "2"), "2 x 1 x 1"),
        (8, ("--parallel.dp_replicate", "2"), "2 x 2 x 1"),
    ):
        with pytest.raises(
            ConfigError,
            match=rf"zero_bubble' with FSDP2 data parallel \(dp_replicate x dp_shard x cp = "
            rf"{degrees}\) needs parallel.fsdp_reshard_after_forward = false: .*"
            rf"use parallel.pp_schedule = 'interleaved_1f1b'",
        ):
            check(world, *extra)
        assert check(world, *extra, *ZB_FSDP).schedule == "zero_bubble"
    assert check(4, "--parallel.pp_schedule", "interleaved_1f1b").schedule == "interleaved_1f1b"


def test_zero_bubble_with_activation_checkpointing_is_refused():
    """The split backward recomputes a checkpointed block in both passes; torch 2.13's composable checkpoint
    fails the second time (AttributeError in the weight pass, with or without data parallel). Refused
    before any process group, in both modes; the same run without checkpointing trains."""
    from meshforge.parallel.job_checks import check_job

    def check(*args: str):
        cfg = load_config(
            "tiny-test",
            [
                "--model.tie_embeddings",
                "false",
                "--model.n_layers",
                "4",
                "--parallel.pp",
                "2",
                "--parallel.pp_schedule",
                "zero_bubble",
                *args,
            ],
        )
        return check_job(cfg, resolve_degrees(cfg.parallel, 2), "cpu")

    for mode in ("full", "selective"):
        with pytest.raises(
            ConfigError,
            match=rf"zero_bubble' with parallel.activation_checkpointing = '{mode}': "
            r"torch's split backward recomputes a checkpointed block twice.*"
            r"use activation_checkpointing = 'none' or pp_schedule = "
            r"'interleaved_1f1b'",
        ):
            check("--parallel.activation_checkpointing", mode)
    assert check().schedule == "zero_bubble"
    assert (
        check("--parallel.activation_checkpointing", "full", "--parallel.pp_schedule", "interleaved_1f1b").schedule
        == "interleaved_1f1b"
    )


def test_pp_x_tp_is_refused_where_stages_pass_no_dtensors(monkeypatch):
    """torch 2.11's PipelineStage takes no get_mesh and cannot pass TP + SP's DTensor activations: a pp x tp
    job there fails in check_job with the layout and the way out; pp or tp alone still plans, and the planner
    (no device type: another machine's torch) still accepts pp x tp."""
    from meshforge.parallel import job_checks
    from meshforge.parallel.job_checks import check_job

    def check(world: int, *args: str, device_type: str | None = "cpu"):
        cfg = load_config(
            "tiny-test",
            ["--model.tie_embeddings", "false", "--model.n_layers", "4", "--train.micro_batch_size", "1", *args],
        )
        return check_job(cfg, resolve_degrees(cfg.parallel, world), device_type)

    pp_tp = ("--parallel.pp", "2", "--parallel.tp", "2", "--parallel.pp_schedule", "1f1b")
    monkeypatch.setattr(job_checks, "stage_takes_mesh", lambda: False)
    with pytest.raises(
        ConfigError,
        match=r"parallel.pp = 2 with parallel.tp = 2: .*DTensor .*torch \d+\.\d+.*"
        r"use parallel.pp or parallel.tp alone",
    ):
        check(4, *pp_tp)
    assert check(4, *pp_tp, device_type=None).n_stages == 2
    assert check(2, "--parallel.pp", "2").n_stages == 2
    assert check(2, "--parallel.tp", "2") is None
    monkeypatch.setattr(job_checks, "stage_takes_mesh", lambda: True)
    assert check(4, *pp_tp).n_stages == 2


def test_default_microbatches_follow_help_config():
    """With only parallel.pp given, every schedule gets a microbatch count it runs, chosen by the
    rule that `meshforge train --help-config` prints for parallel.pp_microbatches."""
    from meshforge.config import ParallelConfig, describe, field_docs
    from meshforge.parallel.pipeline import SCHEDULES

    doc = field_docs(ParallelConfig)["pp_microbatches"]
    assert doc in describe()
    assert "local batch / train.micro_batch_size when train.micro_batch_size > 0" in doc
    assert "nearest to 2 * pp * stages per rank among those the schedule accepts (the larger one on a tie)" in doc
    seen = set()
    for schedule in SCHEDULES:
        for pp, world, batch in ((2, 2, 16), (2, 4, 16), (3, 3, 16), (4, 4, 16), (4, 8, 24), (2, 2, 6)):
            cfg = load_config(
                "small",
                [
                    "--model.tie_embeddings",
                    "false",
                    "--model.n_layers",
                    "16",
                    "--parallel.pp",
                    str(pp),
                    "--parallel.pp_schedule",
                    schedule,
                    "--train.global_batch_size",
                    str(batch),
                ],
            )
            d = resolve_degrees(cfg.parallel, world)
            n = plan_pipeline(cfg, d).n_microbatches
            local, spr = batch // d.dp, 2 if schedule in ("interleaved_1f1b", "zero_bubble") else 1
            runs = [
                k
                for k in range(1, local + 1)
                if local % k == 0 and (schedule == "gpipe" or k >= pp) and (spr == 1 or k % max(1, k // pp) == 0)
            ]  # what each torch schedule accepts
            assert n in runs, (schedule, pp, world, batch, n)
            assert n == min(runs, key=lambda k: (abs(k - 2 * pp * spr), -k)), (schedule, pp, world, batch, n)
            seen.add(n)
            # a positive micro batch keeps its meaning: local batch / micro batch microbatches
            cfg.train.micro_batch_size = local // n
            assert plan_pipeline(cfg, d).n_microbatches == n
    assert len(seen) > 3  # the grid exercises the rule, not one constant
    with pytest.raises(
        ConfigError,
        match=r"no microbatch count suits schedule '1f1b' with parallel.pp = 4 on a "
        r"local batch of 2",
    ):
        plan_pipeline(
            load_config(
                "small", ["--model.tie_embeddings", "false", "--parallel.pp", "4", "--train.global_batch_size", "4"]
            ),
            resolve_degrees(ParallelConfig(pp=4), 8),
        )


def test_split_keeps_names_and_weights():
    """Stages of every rank together hold exactly the full model's parameters, by name and value."""
    from meshforge.models import build_model
    from meshforge.parallel.pipeline import PipelineModel, split_model

    cfg = load_config(
        "tiny-test",
        [
            "--model.tie_embeddings",
            "false",
            "--model.n_layers",
            "5",
            "--parallel.pp",
            "2",
            "--parallel.pp_schedule",
            "interleaved_1f1b",
        ],
    )
    plan = plan_pipeline(cfg, resolve_degrees(cfg.parallel, 2))
    torch.manual_seed(0)
    full = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    seen = {}
    for rank in range(2):
        torch.manual_seed(0)
        parts = split_model(build_model(cfg.model), plan, rank)
        view = PipelineModel(parts, plan.stages_of_rank(rank), plan)
        sd = view.state_dict()
        assert not seen.keys() & sd.keys()
        seen.update(sd)
        x = torch.randint(0, cfg.model.vocab_size, (2, 8))
        assert (parts[0].tok_embeddings is not None) == (rank == 0)
        assert (parts[-1].output is not None) == (rank == 1)
        if rank == 0:
            assert parts[0](x).shape == (2, 8, cfg.model.dim)  # hidden states out of stage 0
    assert seen.keys() == full.keys()
    for k, v in full.items():
        torch.testing.assert_close(seen[k], v, rtol=0, atol=0)


def test_checkpoint_moves_tp2xdp2_to_pp2xdp2_to_one_process(tiny_data, untied_ref, tmp_path):
    """Steps 1-4 on tp2 x dp2, 5-7 on pp2 x dp2, 8-10 in one process: the same run as the reference."""
    out = tmp_path / "run"
    common = ["train", *PARITY_ARGS, *PP_ARGS, "--data.path", str(tiny_data), "--train.output_dir", str(out)]
    run_ranks(4, [*common, "--parallel.tp", "2", "--train.steps", "4"])
    run_ranks(4, [*common, "--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", "--train.steps", "7"])
    assert (out / "checkpoints" / "step_00000007").is_dir()
    run_ranks(1, common)
    got = read_result(out)
    assert_parity(untied_ref, got, atol=TP_ATOL)  # steps 1-4 ran under TP
    want, have = _metric(untied_ref.output_dir, "grad_norm"), _metric(out, "grad_norm")
    assert sorted(have) == list(range(1, 11))
    assert [have[s] for s in sorted(have)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5)
    assert _metric(out, "val_loss")[10] == pytest.approx(_metric(untied_ref.output_dir, "val_loss")[10], rel=1e-5)
